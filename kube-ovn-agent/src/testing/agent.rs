//! The agent binary run on a node namespace for the privileged interface and TPROXY suites:
//! start it on spec §5.1's example cluster, read `status`/`dump`, wait, and count packets in
//! netfilter. The agent is killed and the namespace and bpffs removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

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
    pub child: Child,
    log: TempPath,
}

impl Agent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    pub fn new(prefix: &str) -> Self {
        Self {
            ns: NetNs::new(prefix),
            bpffs: Bpffs::mount(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.bpffs.root()
    }

    /// Starts `binary run` as node n1 on `cluster` (kube-proxy IPVS mode), plus `extra` flags.
    pub fn agent(&self, binary: &str, cluster: &Path, extra: &[&str]) -> Agent {
        let log = TempPath::new("kovn-agent-", "log");
        let file = std::fs::File::create(&*log).expect("agent log");
        let child = self
            .ns
            .command(binary)
            .args([
                "run",
                "--node-name",
                "n1",
                "--metrics-addr",
                "none",
                "--kube-proxy-mode",
                "ipvs",
            ])
            .arg(format!("--source=file:{}", cluster.display()))
            .arg("--bpffs-root")
            .arg(self.root())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start the agent");
        Agent { child, log }
    }

    /// [`Self::agent`] on the repository's example cluster.
    pub fn example_agent(&self, binary: &str, extra: &[&str]) -> Agent {
        self.agent(binary, &example_cluster(), extra)
    }

    /// `binary SUBCOMMAND --json` parsed, or `None` when it fails (nothing pinned yet).
    pub fn read(&self, binary: &str, subcommand: &str) -> Option<Value> {
        let out = self
            .ns
            .command(binary)
            .args([subcommand, "--json", "--bpffs-root"])
            .arg(self.root())
            .output()
            .expect("run the agent CLI");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("--json output is JSON"))
    }

    /// The interfaces `status` lists as attached.
    pub fn attached(&self, binary: &str) -> Vec<String> {
        self.read(binary, "status")
            .map(|s| {
                s["attachments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["ifname"].as_str().map(str::to_owned))
                    .collect()
            })
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
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(format!("agent exited with {status}:\n{}", agent.log_text()));
            }
            let attached = self.attached(binary);
            let programmed = self
                .read(binary, "status")
                .is_some_and(|s| s["rules_v4"].as_array().is_some_and(|r| r.len() > 1));
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
        let status = self.read(binary, "status").expect("status");
        status["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c[0] == name)
            .and_then(|c| c[1].as_u64())
            .unwrap_or_else(|| panic!("no counter {name} in {status}"))
    }

    /// The packet count of the rule commented `comment` in `tool -t mangle` `chain`
    /// (`iptables` or `ip6tables`); 0 when there is no such rule.
    pub fn rule_packets(&self, tool: &str, chain: &str, comment: &str) -> u64 {
        let listing = self.ns.sh(&format!("{tool} -t mangle -nvxL {chain}"));
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
