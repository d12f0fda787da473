//! CPU time and scheduling counts of a process's threads, from `/proc`.

use std::time::{Duration, Instant};

use super::json_str;

pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    /// Time on the CPU, and how many times the thread was scheduled in.
    pub run_ns: u64,
    pub slices: u64,
}

/// Fields after `comm)` in a `/proc/.../stat` line (the first is the state, field 3).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map_or("", |(_, a)| a)
        .split_whitespace()
        .collect()
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no side effects.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// The threads of process `pid` ("self" for this one) and their CPU time so far.
pub fn threads(pid: &str) -> Vec<ThreadCpu> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        // schedstat: run time (ns), wait time (ns), timeslices; stat (ticks) as a fallback.
        let (run_ns, slices) = match std::fs::read_to_string(path.join("schedstat")) {
            Ok(s) => {
                let f: Vec<u64> = s
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (
                    f.first().copied().unwrap_or(0),
                    f.get(2).copied().unwrap_or(0),
                )
            }
            Err(_) => {
                let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                let f: Vec<u64> = stat_fields(&stat)
                    .iter()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // utime and stime are fields 14 and 15 (the state, field 3, does not parse).
                let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
                (ticks * 1_000_000_000 / clock_ticks_per_s(), 0)
            }
        };
        out.push(ThreadCpu {
            tid,
            name,
            run_ns,
            slices,
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// CPU used by each thread between two snapshots (threads that appeared count from zero).
pub fn cpu_delta(before: &[ThreadCpu], after: &[ThreadCpu]) -> Vec<ThreadCpu> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.tid == a.tid);
            ThreadCpu {
                tid: a.tid,
                name: a.name.clone(),
                run_ns: a.run_ns - b.map_or(0, |b| b.run_ns.min(a.run_ns)),
                slices: a.slices - b.map_or(0, |b| b.slices.min(a.slices)),
            }
        })
        .collect()
}

/// Waits (up to a second) until every thread of this process but the main one has run and is
/// asleep, so a thread that was just started and not yet scheduled (the frontend's watcher)
/// does not charge its start-up to a timed pass.
pub fn settle_threads(main_tid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let settled = threads("self").iter().all(|t| {
            let state = std::fs::read_to_string(format!("/proc/self/task/{}/stat", t.tid))
                .ok()
                .and_then(|s| stat_fields(&s).first().and_then(|f| f.chars().next()));
            t.tid == main_tid || (t.slices > 0 && state == Some('S'))
        });
        if settled {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn threads_json(threads: &[ThreadCpu]) -> String {
    let items: Vec<String> = threads
        .iter()
        .map(|t| {
            format!(
                "{{\"tid\":{},\"name\":{},\"cpu_ms\":{:.3},\"runs\":{}}}",
                t.tid,
                json_str(&t.name),
                t.run_ns as f64 / 1e6,
                t.slices
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A process as seen from outside at one moment: its CPU time, including threads that have
/// exited (the thread-group totals of `/proc/PID/stat`), and the context switches of its live
/// threads (a thread that exits takes its count with it; per-thread `status` is the only
/// place these are kept).
#[derive(Clone, Copy, Default)]
pub struct ProcessSample {
    pub cpu_s: f64,
    pub voluntary: u64,
    pub involuntary: u64,
    pub threads: usize,
}

/// None when the process is gone.
pub fn sample_process(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&stat);
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    let mut s = ProcessSample {
        cpu_s: ticks as f64 / clock_ticks_per_s() as f64,
        ..ProcessSample::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        s.threads += 1;
        for line in status.lines() {
            let count = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(n) = count("voluntary_ctxt_switches:") {
                s.voluntary += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                s.involuntary += n;
            }
        }
    }
    Some(s)
}
