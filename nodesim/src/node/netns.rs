//! One named network namespace (`ip netns add`), removed on drop, with two ways to act inside it:
//! commands via `ip netns exec` (what an operator or the agent's pod would see), and
//! closures on a short-lived thread that joined the namespace with `setns` (sockets for traffic,
//! `/proc/sys/net` and `/proc/thread-self/net` reads) — no process per connection.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{cleanup, exec};

pub struct Netns {
    name: String,
    _guard: cleanup::Guard,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Netns {
    /// Creates the namespace; it is deleted when the returned value is dropped, or by the signal
    /// handler. IPv6 duplicate address detection is switched off before any link exists, so
    /// addresses (including link-local ones NDP uses) are usable at once.
    pub fn create(name: &str) -> Result<Self> {
        exec::checked(Command::new("ip").args(["netns", "add", name]), None)?;
        let ns = Self {
            name: name.to_owned(),
            _guard: cleanup::netns(name),
        };
        ns.sysctl(&[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <program>`, ready for arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program args…` in the namespace; fails with its stderr unless it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        exec::checked(self.command(program).args(args), None)
    }

    /// Like [`Netns::run`], with `stdin` fed to the program (restore files, `ip -batch`).
    pub fn run_stdin(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        exec::checked(self.command(program).args(args), Some(stdin))
    }

    /// Runs `program args…` and returns its output whatever the exit status, for callers that
    /// look at failures themselves (the coexistence actors record iptables' own error text).
    pub fn output(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        exec::run_bounded(self.command(program).args(args), None, timeout)
    }

    /// `ip -n <ns> -batch -`: many link/address/route commands in one process.
    pub fn ip_batch(&self, lines: &str) -> Result<()> {
        exec::checked(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(lines),
        )
        .with_context(|| format!("ip -batch in {}:\n{lines}", self.name))
        .map(drop)
    }

    /// [`Netns::ip_batch`] for batches too long for the default deadline (a benchmark's
    /// 100 000 ClusterIPs on `kube-ipvs0`); errors quote only the batch's first lines.
    pub fn ip_batch_bounded(&self, lines: &str, timeout: Duration) -> Result<()> {
        let out = exec::run_bounded(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(lines),
            timeout,
        )?;
        if !out.status.success() {
            let head: Vec<&str> = lines.lines().take(5).collect();
            bail!(
                "ip -batch in {} ({} lines, starting {:?}) failed ({}): {}",
                self.name,
                lines.lines().count(),
                head,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Writes `/proc/sys/<key>` (slash-separated, e.g. `net/ipv4/ip_forward`) in this namespace.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.run_in(move || {
            for (key, value) in &settings {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value)
                    .with_context(|| format!("writing {value} to {path}"))?;
            }
            Ok(())
        })?
    }

    /// Runs `f` on a new thread that has joined this namespace; sockets it creates belong to the
    /// namespace for their whole life, whichever thread uses them later.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<T> {
                    enter(&path)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Moves the calling thread into the namespace bound at `path` (`/run/netns/<name>`).
pub fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: the fd is valid for the duration of the call; setns only affects this thread's
    // network namespace (CLONE_NEWNET is allowed in multi-threaded processes).
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}
