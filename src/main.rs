//! mvmm: one process, one VM. See README.md.

mod api;
mod arch;
mod backend;
mod cli;
mod config;
mod ctl;
mod jail;
mod loader;
mod logger;
mod seccomp;
mod supervisor;
mod terminal;
mod vmm;

use clap::Parser;

/// Exit codes (README, "Exit codes").
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub use seccomp::EXIT_SECCOMP;

fn main() {
    // clap exits with 2 on a bad command line and 0 for --help/--version.
    let cli = cli::Cli::parse();
    logger::init(cli.log_level.into());
    // Before any thread exists: the SIGSYS report handler is process-wide.
    if let Err(e) = seccomp::init(!cli.no_seccomp) {
        log::error!("{e}");
        std::process::exit(EXIT_FAILURE);
    }
    let code = run(&cli);
    terminal::restore();
    // Exit without dropping the VM: the kernel tears it down with the process, which is much
    // faster than closing the VM fd ourselves.
    std::process::exit(code);
}

fn run(cli: &cli::Cli) -> i32 {
    match (&cli.command, &cli.config) {
        // Not a clap conflict: that would also refuse global options before a command.
        (Some(_), Some(_)) => {
            log::error!("--config runs a VM and cannot be combined with a command (see --help)");
            EXIT_USAGE
        }
        (Some(cli::Command::Backend(backend)), _) => backend::run(backend),
        (Some(cli::Command::Ctl(args)), _) => ctl::run(args),
        (Some(cli::Command::Supervise(args)), _) => supervisor::run(cli, args),
        (Some(cli::Command::List(args)), _) => supervisor::list::run(args),
        (None, Some(config)) => run_vm(config),
        (None, None) => {
            log::error!("nothing to do: give --config FILE to run a VM, or a command (see --help)");
            EXIT_USAGE
        }
    }
}

fn run_vm(config_path: &std::path::Path) -> i32 {
    let config = match config::VmConfig::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            log::error!("{e}");
            return EXIT_USAGE;
        }
    };
    if let Some(jail) = &config.jail {
        match jail::enter_pid_namespace(jail) {
            Ok(None) => {}
            // The parent: the VM ran in the child.
            Ok(Some(code)) => return code,
            Err(e) => {
                log::error!("{e}");
                return e.exit_code();
            }
        }
    }
    match vmm::run(&config) {
        Ok(exit) => {
            let code = exit.exit_code();
            if code == EXIT_OK {
                log::info!("{}", exit.describe());
            } else {
                log::error!("{}", exit.describe());
            }
            code
        }
        Err(e) => {
            log::error!("{e}");
            e.exit_code()
        }
    }
}
