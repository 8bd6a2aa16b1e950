//! An agent process under test: `kube-ovn-agent run` inside a network namespace, and its one-shot
//! commands (`status --json`, `dump --json`, `detach`) with their JSON read into typed values.
//! Shared by the agent's privileged suites and the node simulator, so there is one way to start
//! the agent and one reading of its output. The process is killed on drop.
//!
//! [`Privilege::DaemonSet`] runs every agent command with only the capabilities the `DaemonSet`
//! grants (deploy/base/daemonset.yaml), through `setpriv`; `KOVN_TEST_AGENT_CAPS=daemonset`
//! selects it for every agent a test starts.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::exec::run_bounded;
pub use crate::exec::{Error, Result};

/// deploy/base/daemonset.yaml's `capabilities.add`, as `setpriv` spells them.
pub const DAEMONSET_CAPS: &str = "+bpf,+net_admin,+perfmon,+net_raw";

/// What deploy/components/kernel-5.10 adds: kernels before 5.11 charge BPF memory to
/// `RLIMIT_MEMLOCK`, which the agent raises.
pub const KERNEL_5_10_CAPS: &str = "+sys_resource";

/// The capabilities the `DaemonSet` runs with on this kernel: [`DAEMONSET_CAPS`], plus
/// [`KERNEL_5_10_CAPS`] below 5.11 (the profile an operator applies there).
pub fn daemonset_caps() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < (5, 11) {
        format!("{DAEMONSET_CAPS},{KERNEL_5_10_CAPS}")
    } else {
        DAEMONSET_CAPS.to_owned()
    }
}

/// The capabilities agent commands run with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Privilege {
    /// The test's own (root, every capability).
    #[default]
    Inherited,
    /// The `DaemonSet`'s: uid 0 with only [`daemonset_caps`] in the bounding, inheritable and
    /// ambient sets (so also effective after exec).
    DaemonSet,
}

impl Privilege {
    /// `KOVN_TEST_AGENT_CAPS`: `daemonset`, or `inherited` (the default when unset). Panics on
    /// any other value, so a typo cannot silently test the wrong thing.
    pub fn from_env() -> Self {
        match std::env::var("KOVN_TEST_AGENT_CAPS").as_deref() {
            Err(_) | Ok("" | "inherited") => Self::Inherited,
            Ok("daemonset") => Self::DaemonSet,
            Ok(other) => {
                panic!("KOVN_TEST_AGENT_CAPS={other:?}: expected `daemonset` or `inherited`")
            }
        }
    }

    /// The command prefix that runs a program with these capabilities: nothing, or
    /// `setpriv … --` (for a test that starts the agent through wrappers of its own).
    pub fn wrapper(self) -> Vec<String> {
        match self {
            Self::Inherited => Vec::new(),
            Self::DaemonSet => {
                let caps = daemonset_caps();
                [
                    "setpriv".to_owned(),
                    "--reuid=0".to_owned(),
                    "--regid=0".to_owned(),
                    "--clear-groups".to_owned(),
                    format!("--bounding-set=-all,{caps}"),
                    format!("--inh-caps=-all,{caps}"),
                    format!("--ambient-caps=-all,{caps}"),
                    "--".to_owned(),
                ]
                .into()
            }
        }
    }
}

/// The agent binary in one namespace, on one bpffs root: builds its commands.
#[derive(Clone, Debug)]
pub struct AgentCli {
    /// The network namespace's name (`ip netns exec NAME`).
    pub netns: String,
    pub binary: PathBuf,
    /// The `--bpffs-root` every command gets.
    pub bpffs_root: PathBuf,
    pub privilege: Privilege,
}

/// Upper bound of one read-only command (`status` waits at most 3 s for the agent's `/status`
/// and 10 s for the mark-clobber check).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentCli {
    /// `binary` in `ns`, on the bpffs root `bpffs_root`, with `privilege`.
    pub fn new(
        ns: &crate::netns::NetNs,
        binary: impl Into<PathBuf>,
        bpffs_root: PathBuf,
        privilege: Privilege,
    ) -> Self {
        Self {
            netns: ns.name().to_owned(),
            binary: binary.into(),
            bpffs_root,
            privilege,
        }
    }

    /// `ip netns exec NETNS [setpriv …] BINARY`, ready for the subcommand.
    pub fn command(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]);
        command.args(self.privilege.wrapper());
        command.arg(&self.binary);
        command
    }

    /// `BINARY ARGS… --bpffs-root ROOT`, its output whatever the exit status, bounded by
    /// `timeout`.
    pub fn output(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut command = self.command();
        command.args(args).arg("--bpffs-root").arg(&self.bpffs_root);
        run_bounded(&mut command, None, timeout)
    }

    /// Like [`AgentCli::output`], failing unless it exits 0; returns stdout.
    pub fn checked(&self, args: &[&str]) -> Result<String> {
        let output = self.output(args, CLI_TIMEOUT)?;
        crate::exec::success(format!("kube-ovn-agent {}", args.join(" ")), &output)
    }

    /// `status --json`.
    pub fn status(&self) -> Result<Status> {
        self.json(&["status", "--json"])
    }

    /// `dump --json`.
    pub fn dump(&self) -> Result<Dump> {
        self.json(&["dump", "--json"])
    }

    /// `detach`.
    pub fn detach(&self) -> Result<()> {
        self.checked(&["detach"]).map(drop)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let text = self.checked(args)?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            what: format!("kube-ovn-agent {}", args.join(" ")),
            source,
        })
    }

    /// Starts `BINARY run ARGS… --bpffs-root ROOT`, stdout and stderr appended to `log`.
    pub fn spawn(&self, run_args: &[String], log: &Path) -> Result<AgentProcess> {
        let io = |what: &str, source| Error::Io {
            what: format!("{what} {}", log.display()),
            source,
        };
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io("opening", e))?;
        let stderr = file.try_clone().map_err(|e| io("duplicating", e))?;
        let child = self
            .command()
            .arg("run")
            .args(run_args)
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|source| Error::Spawn {
                what: "`kube-ovn-agent run`".into(),
                source,
            })?;
        Ok(AgentProcess { child: Some(child) })
    }
}

/// A running `kube-ovn-agent run`; killed (SIGKILL) and reaped on drop unless already stopped.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
}

impl AgentProcess {
    /// Its pid (`ip netns exec` and `setpriv` exec in place, so it is the agent's own).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status once it has exited (and is reaped).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().map_err(|source| Error::Io {
            what: "polling the agent".into(),
            source,
        })?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    /// SIGKILL, as a crash or an OOM kill would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let io = |what: &str, source| Error::Io {
            what: what.into(),
            source,
        };
        child.kill().map_err(|e| io("SIGKILL to the agent", e))?;
        child.wait().map_err(|e| io("reaping the agent", e))?;
        Ok(())
    }

    /// SIGTERM, as a pod deletion sends, and waits up to `within` for the exit; SIGKILL and
    /// [`Error::Timeout`] if it does not exit.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Io {
                what: "SIGTERM to the agent".into(),
                source: std::io::Error::other("the agent is not running"),
            });
        };
        let pid = i32::try_from(child.id()).expect("pid fits in pid_t");
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet, so the
        // pid is still ours.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Timeout {
                        what: "the agent's exit after SIGTERM".into(),
                        timeout: within,
                    });
                }
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `status --json`: what the pins say, plus what the running agent reports on `/status`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Status {
    /// The CLI binary's version and commit.
    pub version: String,
    /// The running agent's own report; `None` when it did not answer (`agent_error` says why).
    pub agent: Option<AgentReport>,
    pub agent_error: Option<String>,
    pub kernel: String,
    pub bpffs_root: String,
    pub program: Option<Program>,
    /// `enforce` or `shadow`, from the pinned config.
    pub mode: String,
    pub rules_v4: Vec<String>,
    pub rules_v6: Vec<String>,
    pub service_match_v4: String,
    pub service_match_v6: String,
    pub attachments: Vec<Attachment>,
    /// Datapath counters by name, in slot order.
    pub counters: Vec<(String, u64)>,
    /// Entries per map.
    pub maps: Vec<(String, u64)>,
    pub map_capacity: Vec<(String, u64)>,
    pub mark_clobber: MarkClobber,
}

/// The netfilter rules `status` found that can clear our mark bits.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MarkClobber {
    /// The tools that ran.
    pub checked: Vec<String>,
    pub findings: Vec<ClobberFinding>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClobberFinding {
    /// The `*-save` tool whose output showed it.
    pub source: String,
    pub table: String,
    pub chain: String,
    pub rule: String,
    pub cleared_bits: u32,
}

impl Status {
    /// A datapath counter by name.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| *value)
    }

    /// The interfaces our program is attached to.
    pub fn attached(&self) -> Vec<&str> {
        self.attachments.iter().map(|a| a.ifname.as_str()).collect()
    }
}

/// The pinned program.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Program {
    pub name: String,
    pub id: u32,
    pub tag: String,
    pub verified_instructions: Option<u32>,
}

/// Where our program runs.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Attachment {
    pub ifname: String,
    /// `tcx` or `netlink`.
    pub mode: String,
    pub program_id: u32,
    /// tcx: the link id.
    pub link_id: Option<u32>,
    /// netlink: the filter's (priority, handle).
    pub filter: Option<(u16, u32)>,
}

/// The running agent's `/status`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AgentReport {
    pub version: String,
    pub commit: String,
    pub node: String,
    pub mode: String,
    /// `flag` or `node label`.
    pub mode_from: String,
    pub ready: bool,
    pub not_ready: Vec<String>,
    pub last_sync_unix: Option<u64>,
    pub interfaces: Vec<Interface>,
}

/// An interface with a role, as the agent reports it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Interface {
    pub name: String,
    pub role: String,
    pub attached: bool,
}

/// `dump --json`: every map decoded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Dump {
    pub v4: DumpFamily,
    pub v6: DumpFamily,
    /// ifindex → role names.
    pub ifaces: BTreeMap<u32, Vec<String>>,
    pub shadow: bool,
    pub tproxy_port: u16,
}

/// One family's maps in `dump --json`; addresses and CIDRs as text.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct DumpFamily {
    /// Rule names in force (`R1a`, …).
    pub rules: Vec<String>,
    pub subnets: Vec<String>,
    pub service_cidrs: Vec<String>,
    pub service_ports: Vec<ServicePort>,
    pub other_nodes: Vec<String>,
    pub local: Vec<String>,
    pub nodeport_local_tcp: Vec<u16>,
    pub nodeport_local_udp: Vec<u16>,
    pub probe_targets: Vec<ProbeTarget>,
    pub tproxy_listener: Option<String>,
    pub tproxy_listener_opaque: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct ServicePort {
    pub addr: String,
    /// `tcp` or `udp`.
    pub proto: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct ProbeTarget {
    pub addr: String,
    pub port: u16,
}
