//! Config errors: each names the field and says what to change.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid: {0}")]
    Parse(String),
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Turns a serde error into one line naming where it happened, with a spelling suggestion for
/// unknown fields.
pub(super) fn describe_parse_error(
    err: &serde_path_to_error::Error<serde_json::Error>,
) -> ConfigError {
    let inner = err.inner();
    let location = format!("line {} column {}", inner.line(), inner.column());
    if inner.is_syntax() || inner.is_eof() {
        return ConfigError::Parse(format!("malformed JSON at {location}: {inner}"));
    }
    let path = err.path().to_string();
    let field = if path == "." {
        "(top level)".to_owned()
    } else {
        path
    };
    let mut message = strip_position(&inner.to_string());
    if let Some(hint) = unknown_field_hint(&message) {
        message.push_str(&hint);
    }
    ConfigError::Parse(format!("`{field}` at {location}: {message}"))
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" suggests the closest name.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (edit_distance(unknown, name), name))
        .min()?;
    // Suggest only plausible typos, not an arbitrary field.
    (best.0 <= unknown.len().max(3) / 2 + 1).then(|| format!(" (did you mean `{}`?)", best.1))
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_field_names_only() {
        let msg = "unknown field `vcpu`, expected one of `vcpus`, `memory_mib`, `acpi`";
        assert_eq!(unknown_field_hint(msg).unwrap(), " (did you mean `vcpus`?)");
        let msg = "unknown field `colour`, expected `mode` or `path`";
        assert_eq!(unknown_field_hint(msg), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
