//! The agent binary run on a node namespace for the privileged interface and TPROXY suites:
//! start it on spec §5.1's example cluster, read `status`/`dump`, wait, and count packets in
//! netfilter. The agent is killed and the namespace and bpffs removed on drop.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kube_ovn_testkit::agent::{AgentCli, AgentProcess, Dump, Privilege, Status};

use super::{
    netns::{Bpffs, NetNs, TempPath, example_cluster},
    scaled,
};

/// A node namespace (named `n1` to the agent) and the bpffs its agent pins to.
pub struct Node {
    pub ns: NetNs,
    pub bpffs: Bpffs,
}

/// A running `kube-ovn-agent run`, killed on drop.
pub struct Agent {
    pub process: AgentProcess,
    log: TempPath,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }
}

/// `run`'s arguments as node n1 on `cluster` (kube-proxy IPVS mode, no metrics endpoint), plus
/// `extra` flags.
pub fn n1_run_args(cluster: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--node-name",
        "n1",
        "--metrics-addr",
        "none",
        "--kube-proxy-mode",
        "ipvs",
    ]
    .map(str::to_owned)
    .into();
    args.push(format!("--source=file:{}", cluster.display()));
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

impl Node {
    pub fn new(prefix: &str) -> Self {
        Self {
            ns: NetNs::new(prefix).expect("create namespace"),
            bpffs: Bpffs::mount(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.bpffs.root()
    }

    /// `binary`'s commands in this node, on its bpffs, with the capabilities
    /// `KOVN_TEST_AGENT_CAPS` names.
    pub fn cli(&self, binary: &str) -> AgentCli {
        AgentCli::new(&self.ns, binary, self.root(), Privilege::from_env())
    }

    /// Starts `binary run` as node n1 on `cluster` (kube-proxy IPVS mode), plus `extra` flags.
    pub fn agent(&self, binary: &str, cluster: &Path, extra: &[&str]) -> Agent {
        let log = TempPath::new("kovn-agent-", "log");
        let args = n1_run_args(cluster, extra);
        let process = self
            .cli(binary)
            .spawn(&args, &log)
            .unwrap_or_else(|e| panic!("{e}"));
        Agent { process, log }
    }

    /// [`Self::agent`] on the repository's example cluster.
    pub fn example_agent(&self, binary: &str, extra: &[&str]) -> Agent {
        self.agent(binary, &example_cluster(), extra)
    }

    /// `binary status --json`, or `None` when it fails (nothing pinned yet); panics when its
    /// output is not the JSON the kit reads.
    pub fn status(&self, binary: &str) -> Option<Status> {
        readable(self.cli(binary).status())
    }

    /// `binary dump --json`, as [`Self::status`].
    pub fn dump(&self, binary: &str) -> Option<Dump> {
        readable(self.cli(binary).dump())
    }

    /// The interfaces `status` lists as attached.
    pub fn attached(&self, binary: &str) -> Vec<String> {
        self.status(binary)
            .map(|s| s.attached().into_iter().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Waits until the agent attached to at least `ifaces` and programmed its rules.
    pub fn wait_ready(
        &self,
        binary: &str,
        agent: &mut Agent,
        ifaces: &[&str],
    ) -> Result<(), String> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            if let Ok(Some(status)) = agent.process.try_wait() {
                return Err(format!("agent exited with {status}:\n{}", agent.log_text()));
            }
            let attached = self.attached(binary);
            let programmed = self.status(binary).is_some_and(|s| s.rules_v4.len() > 1);
            if programmed && ifaces.iter().all(|i| attached.iter().any(|a| a == i)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not attached to {ifaces:?} in time (attached: {attached:?})\n{}",
                    agent.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A datapath counter from `status`, by name.
    pub fn counter(&self, binary: &str, name: &str) -> u64 {
        let status = self.status(binary).expect("status");
        status
            .counter(name)
            .unwrap_or_else(|| panic!("no counter {name} in {:?}", status.counters))
    }

    /// The packet count of the rule commented `comment` in `tool -t mangle` `chain`
    /// (`iptables` or `ip6tables`); 0 when there is no such rule.
    pub fn rule_packets(&self, tool: &str, chain: &str, comment: &str) -> u64 {
        let listing = self
            .ns
            .sh(&format!("{tool} -t mangle -nvxL {chain}"))
            .expect("shell in namespace");
        listing
            .lines()
            .find(|l| l.contains(&format!("/* {comment} */")))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Polls `done` every 50 ms until it holds or `timeout` (scaled) passes.
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A read command's value; `None` when it did not succeed, a panic when it answered something
/// the kit cannot read (the JSON changed shape).
fn readable<T>(result: kube_ovn_testkit::agent::Result<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e @ kube_ovn_testkit::agent::Error::Json { .. }) => panic!("{e}"),
        Err(_) => None,
    }
}
