#!/usr/bin/env bash
# install-virtiofsd.sh - make sure the Rust virtiofsd (vhost-user virtio-fs
# backend) is installed, for mvmm's virtio-fs tests.
#
# If `virtiofsd --version` already works (from $CARGO_HOME/bin, default
# ~/.cargo/bin, or from PATH), nothing is done. Otherwise the build
# dependencies libseccomp-dev and libcap-ng-dev are installed with apt-get
# (when missing; needs root or password-less sudo) and virtiofsd is built with
# `cargo install virtiofsd --locked`.
#
# Usage:
#   install-virtiofsd.sh        last stdout line: VIRTIOFSD=<absolute path>
#
# Environment:
#   CARGO_HOME               cargo's home (default: $HOME/.cargo)
#   MVMM_APT_LOCK_TIMEOUT    seconds to keep retrying while apt/dpkg locks are
#                            held by someone else (default: 120)
#
# Only the VIRTIOFSD= line goes to stdout; progress and errors go to stderr.
# When virtiofsd is already installed the script prints nothing else.
set -euo pipefail

log() { printf 'install-virtiofsd: %s\n' "$*" >&2; }
die() {
    printf 'install-virtiofsd: error: %s\n' "$*" >&2
    exit 1
}

case ${1:-} in
'') ;;
-h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 0
    ;;
*) die "unknown argument '$1' (try --help)" ;;
esac

CARGO_ROOT=${CARGO_HOME:-${HOME:?HOME is not set}/.cargo}
CARGO_BIN=$CARGO_ROOT/bin

# Prints the absolute path of a working virtiofsd, or fails.
find_virtiofsd() {
    local cand path
    for cand in "$CARGO_BIN/virtiofsd" "$(command -v virtiofsd 2>/dev/null || true)"; do
        [[ -n $cand && -x $cand ]] || continue
        path=$(realpath -e "$cand" 2>/dev/null) || continue
        "$path" --version >/dev/null 2>&1 || continue
        printf '%s\n' "$path"
        return 0
    done
    return 1
}

# Fast path: already installed.
if path=$(find_virtiofsd); then
    printf 'VIRTIOFSD=%s\n' "$path"
    exit 0
fi

source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

pkg_installed() { # <package>
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# 1. Build dependencies.
missing=()
for pkg in libseccomp-dev libcap-ng-dev; do
    pkg_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} yourself"
    log "installing ${missing[*]}"
    apt_install() { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; }
    if ! apt_retry apt_install "${missing[@]}"; then
        log "apt-get install failed; running apt-get update and trying again"
        apt_retry as_root apt-get update -q || die "apt-get update failed"
        apt_retry apt_install "${missing[@]}" ||
            die "apt-get install ${missing[*]} failed"
    fi
fi

# 2. virtiofsd itself.
command -v cargo >/dev/null 2>&1 || [[ -x $CARGO_BIN/cargo ]] ||
    die "cargo not found (install Rust: https://rustup.rs)"
cargo=$(command -v cargo 2>/dev/null || printf '%s' "$CARGO_BIN/cargo")
log "building virtiofsd with cargo install (takes a few minutes)"
"$cargo" install virtiofsd --locked --root "$CARGO_ROOT" >&2 ||
    die "cargo install virtiofsd --locked failed"

path=$(find_virtiofsd) || die "virtiofsd was installed but '$CARGO_BIN/virtiofsd --version' does not work"
log "installed $("$path" --version 2>&1 | head -n1)"
printf 'VIRTIOFSD=%s\n' "$path"
