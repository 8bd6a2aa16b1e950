//! CPU accounting per measurement window, without a PMU.
//!
//! `perf stat -e cycles` reports `<not supported>` in this VM (no PMU is virtualised), so cycles
//! are out of reach. What is measured instead, in nanoseconds of CPU time:
//! - this process (`getrusage(RUSAGE_SELF)`, every thread): the traffic generators and servers,
//!   *and* the softirq work they trigger — on veth a packet is forwarded through every namespace
//!   in the softirq that runs when the sending thread re-enables bottom halves, and this kernel
//!   has no `CONFIG_IRQ_TIME_ACCOUNTING`, so that time is charged to the thread;
//! - `ksoftirqd/*` (`/proc/<pid>/schedstat`): softirq work deferred to those threads;
//! - the agent (`/proc/<pid>/task/*/schedstat`, every thread), in ebpf mode.
//!
//! All three are nanosecond run-time accounting (the scheduler's `sum_exec_runtime`), not the
//! 10 ms ticks of `/proc/<pid>/stat`, which would round a 1 s window's agent time to 0 or 10 ms.
//!
//! The machine-wide busy time (`/proc/stat`, ticks: the kernel keeps no ns total) minus all of
//! that is what *other* processes used meanwhile: reported per window as a noise indicator,
//! never subtracted from anything.

use std::{fs, time::Instant};

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/stat` and `/proc/<pid>/stat` times.
fn clock_tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).unwrap_or(100).max(1)
}

#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: Instant,
    own_ns: u64,
    softirqd_ns: u64,
    agent_ns: u64,
    machine_busy_ns: u64,
}

/// What one window used.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub wall_s: f64,
    /// Generators, servers and the softirq work charged to them.
    pub own_ns: u64,
    pub softirqd_ns: u64,
    pub agent_ns: u64,
    /// Busy time of everything else on the machine (other users' builds, …).
    pub foreign_ns: u64,
}

impl Usage {
    /// Everything the measured traffic cost.
    pub fn total_ns(&self) -> u64 {
        self.own_ns + self.softirqd_ns + self.agent_ns
    }

    /// Share of the machine's capacity other processes used during the window.
    pub fn foreign_share(&self, cores: usize) -> f64 {
        #[expect(
            clippy::cast_precision_loss,
            reason = "ns over a few seconds fit f64 exactly enough"
        )]
        let foreign = self.foreign_ns as f64;
        #[expect(clippy::cast_precision_loss, reason = "core counts are tiny")]
        let capacity = self.wall_s * 1e9 * cores as f64;
        if capacity > 0.0 {
            foreign / capacity
        } else {
            0.0
        }
    }
}

pub struct Meter {
    softirqd: Vec<u32>,
    agent: Option<u32>,
    tick_ns: u64,
}

impl Meter {
    /// `agent`: the agent's pid, if one runs for the measured node.
    pub fn new(agent: Option<u32>) -> Self {
        Self {
            softirqd: softirqd_pids(),
            agent,
            tick_ns: clock_tick_ns(),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            own_ns: own_cpu_ns(),
            softirqd_ns: self.softirqd.iter().map(|&p| schedstat_ns(p)).sum(),
            agent_ns: self.agent.map_or(0, process_schedstat_ns),
            machine_busy_ns: machine_busy_ticks() * self.tick_ns,
        }
    }

    pub fn usage(before: &Snapshot, after: &Snapshot) -> Usage {
        let own_ns = after.own_ns.saturating_sub(before.own_ns);
        let softirqd_ns = after.softirqd_ns.saturating_sub(before.softirqd_ns);
        let agent_ns = after.agent_ns.saturating_sub(before.agent_ns);
        let busy = after.machine_busy_ns.saturating_sub(before.machine_busy_ns);
        Usage {
            wall_s: after.at.duration_since(before.at).as_secs_f64(),
            own_ns,
            softirqd_ns,
            agent_ns,
            // Tick-sampled machine time against precise own time: clamp the rounding.
            foreign_ns: busy.saturating_sub(own_ns + softirqd_ns + agent_ns),
        }
    }
}

fn own_cpu_ns() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return 0;
    }
    let ns = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_usec).unwrap_or(0) * 1_000
    };
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

fn softirqd_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// A thread's run time in ns (first field of `/proc/<pid>/schedstat`).
fn schedstat_ns(pid: u32) -> u64 {
    schedstat_ns_of(&format!("/proc/{pid}/schedstat"))
}

fn schedstat_ns_of(path: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Run time of every thread of a process in ns (the sum of its tasks' schedstat). Threads that
/// exited between two snapshots drop out; the agent's threads are long-lived (tokio workers).
fn process_schedstat_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
        .map(|tid| schedstat_ns_of(&format!("/proc/{pid}/task/{tid}/schedstat")))
        .sum()
}

/// Non-idle time of all CPUs (`/proc/stat` "cpu" line minus idle and iowait), in ticks.
fn machine_busy_ticks() -> u64 {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?;
            let values: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal (guest is inside user already).
            let busy: u64 = values.iter().take(8).sum::<u64>()
                - values.get(3).copied().unwrap_or(0)
                - values.get(4).copied().unwrap_or(0);
            Some(busy)
        })
        .unwrap_or(0)
}

pub use kube_ovn_testkit::machine::loadavg;

/// [`kube_ovn_testkit::machine::facts`], the kernel command line's mitigation switches and the
/// load now.
pub fn machine_facts() -> serde_json::Value {
    let mut facts = kube_ovn_testkit::machine::facts();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // Only the switches that change mitigations (mitigations=off, nospectre_v2, pti=off, …).
    let switches: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|t| {
            [
                "mitigation",
                "spectre",
                "pti",
                "retbleed",
                "mds",
                "srbds",
                "tsx",
                "l1tf",
                "ssbd",
                "spec_",
            ]
            .iter()
            .any(|k| t.contains(k))
        })
        .collect();
    facts.insert("cmdline_mitigation_switches".into(), switches.into());
    facts.insert("loadavg".into(), loadavg().to_vec().into());
    facts.into()
}

/// Whether `perf stat -e cycles` works here; the reason when it does not.
pub fn perf_cycles() -> Result<(), String> {
    let out = std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles", "--", "true"])
        .output();
    match out {
        Err(e) => Err(format!("perf not runnable: {e}")),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stderr);
            if text.contains("not supported") || text.contains("not counted") {
                Err("`perf stat -e cycles` reports <not supported>: no PMU in this VM".into())
            } else if out.status.success() {
                Ok(())
            } else {
                Err(format!("perf stat failed: {}", text.trim()))
            }
        }
    }
}
