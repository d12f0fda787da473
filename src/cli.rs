//! Command line: `mvmm --config vm.json [--log-level LEVEL]`.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mvmm",
    version,
    about = "A minimal, fast, sandboxed KVM virtual machine monitor for microVMs",
    after_help = "Exit codes: 0 = the guest shut down or rebooted (or a stop signal ended it), \
                  1 = VMM or guest failure, 2 = bad command line or config."
)]
pub struct Cli {
    /// The VM's configuration file (vm.json).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// How much to log on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, value_name = "LEVEL")]
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}
