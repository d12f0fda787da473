//! Command line: `mvmm --config vm.json`, and subcommands for the other roles of the binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mvmm",
    version,
    about = "A minimal, fast, sandboxed KVM virtual machine monitor for microVMs",
    after_help = "Exit codes: 0 = the guest shut down or rebooted (or a stop signal ended it), \
                  1 = VMM or guest failure, or a forced stop, 2 = bad command line or config, \
                  3 = a thread made a system call its seccomp filter forbids."
)]
pub struct Cli {
    /// Run the VM described by this configuration file (vm.json).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How much to log on stderr.
    #[arg(long, value_enum, default_value_t = LogLevel::Info, value_name = "LEVEL", global = true)]
    pub log_level: LogLevel,

    /// Run without seccomp filters. For debugging only: logged loudly.
    #[arg(long, global = true)]
    pub no_seccomp: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one of mvmm's device models as a vhost-user backend, in its own process.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Talk to a running VM through its control socket (`api_socket` in its config).
    Ctl(CtlArgs),
    /// Run one VM of a state directory for systemd: taps, virtiofsd, mvmm as the VM's user.
    Supervise(SuperviseArgs),
    /// List the VMs of a state directory: the generation each runs and the one it would run.
    List(ListArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Reads <state-dir>/<name>/current/vm.json. Exits with mvmm's exit code; \
                        2 if the state directory or config is wrong (then nothing is started)."
)]
pub struct SuperviseArgs {
    /// The VM: a directory under the state directory.
    pub name: String,
    /// Where the VMs live, one directory each (microvm.nix's layout).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/microvms")]
    pub state_dir: PathBuf,
    /// Run mvmm as this user (its primary group, no supplementary groups).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// The virtiofsd to start for shares with a `source` (default: virtiofsd in PATH).
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,
    /// Where the host's journal looks for machine directories (for a `journal` share).
    #[arg(long, value_name = "DIR", default_value = "/var/log/journal")]
    pub journal_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Where the VMs live, one directory each.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/microvms")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Prints the VM's reply. Exit codes: 0 = done, 1 = the VM refused \
                  (the reply says why), 2 = cannot reach the socket."
)]
pub struct CtlArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    #[arg(value_enum)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CtlCommand {
    /// State, uptime, vCPUs and per-device counters.
    Status,
    /// Press the power button; the VM stops after the guest powers off or the grace period.
    Shutdown,
    /// Stop the vCPUs.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// virtio-blk over a disk image or block device.
    Blk(BlkBackendArgs),
    /// virtio-net over a tap device.
    Net(NetBackendArgs),
}

#[derive(Debug, Args)]
pub struct BackendCommonArgs {
    /// The vhost-user socket to listen on (created; an old socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Keep serving new frontends after one disconnects (default: exit when it does).
    #[arg(long)]
    pub persistent: bool,
}

#[derive(Debug, Args)]
pub struct BlkBackendArgs {
    #[command(flatten)]
    pub common: BackendCommonArgs,
    /// Disk image file or block device.
    #[arg(long, value_name = "FILE")]
    pub path: PathBuf,
    #[arg(long)]
    pub read_only: bool,
    /// The disk ID the guest sees (at most 20 bytes).
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,
    /// Open the file with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// After serving requests, watch the queue this many microseconds for the next one
    /// before sleeping (saves the driver's kick and a wake-up at low queue depth; 0 = never).
    #[arg(long, value_name = "US", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_us: u64,
}

#[derive(Debug, Args)]
pub struct NetBackendArgs {
    #[command(flatten)]
    pub common: BackendCommonArgs,
    /// Tap interface to open (created if missing and permitted).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "fd",
        conflicts_with = "fd"
    )]
    pub tap: Option<String>,
    /// An inherited tap or macvtap file descriptor.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// The MAC address the guest sees.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,
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
