//! The options every virtio-blk bench takes: the workload, the request size, the queue depth,
//! how long to run, and what the driver negotiates and checks.

use super::blk::{MAX_QD, PAGE, QUEUE_SIZE};
use super::{die, number, on_off, parse_size, Args};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Workload {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "randread" => Self::RandRead,
            "randwrite" => Self::RandWrite,
            "seqread" => Self::SeqRead,
            "seqwrite" => Self::SeqWrite,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::SeqRead => "seqread",
            Self::SeqWrite => "seqwrite",
        }
    }
    pub fn is_read(self) -> bool {
        matches!(self, Self::RandRead | Self::SeqRead)
    }
    pub fn is_random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }
}

/// What every virtio-blk bench takes.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub workload: Workload,
    pub bs: u64,
    pub qd: usize,
    pub seconds: f64,
    pub warmup: f64,
    pub event_idx: bool,
    /// Check the data: the disk holds its own offsets (the first u64 of every 4 KiB page is
    /// the page's offset), reads must return them and writes keep them.
    pub verify: bool,
}

pub const BLK_USAGE: &str = "[--workload randread|randwrite|seqread|seqwrite] [--bs BYTES] \
[--qd N] [--seconds S] [--warmup S] [--event-idx on|off] [--verify]";

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            workload: Workload::RandRead,
            bs: 4096,
            qd: 32,
            seconds: 1.0,
            warmup: 0.5,
            event_idx: true,
            verify: false,
        }
    }
}

impl BlkOptions {
    /// Takes the option `args` is at, if it is one of these; false otherwise.
    pub fn parse_one(&mut self, args: &mut Args, usage: &str) -> bool {
        let name = args.name.clone();
        match name.as_str() {
            "--workload" => {
                let v = args.value(usage);
                self.workload =
                    Workload::parse(&v).unwrap_or_else(|| die(&format!("bad workload {v}")));
            }
            "--bs" => self.bs = parse_size(&args.value(usage)),
            "--qd" => self.qd = number(&name, &args.value(usage)),
            "--seconds" => self.seconds = number(&name, &args.value(usage)),
            "--warmup" => self.warmup = number(&name, &args.value(usage)),
            "--event-idx" => self.event_idx = on_off(&name, &args.value(usage)),
            "--verify" => self.verify = true,
            _ => return false,
        }
        true
    }

    pub fn check(&self) {
        if self.bs == 0 || self.bs % 512 != 0 || self.bs > u64::from(u32::MAX) - 1 {
            die("--bs must be a non-zero multiple of 512 below 4 GiB");
        }
        if self.verify && self.bs % PAGE != 0 {
            die("--verify needs --bs to be a multiple of 4096");
        }
        if self.qd == 0 || self.qd > MAX_QD {
            die(&format!(
                "--qd must be 1..={MAX_QD} (3 descriptors per request, {QUEUE_SIZE} descriptors)"
            ));
        }
        if !self.seconds.is_finite()
            || self.seconds <= 0.0
            || !self.warmup.is_finite()
            || self.warmup < 0.0
        {
            die("--seconds must be > 0 and --warmup >= 0");
        }
    }
}
