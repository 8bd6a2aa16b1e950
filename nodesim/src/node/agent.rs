//! The eBPF agent running for the simulated node: `kube-ovn-agent run` under `ip netns exec`
//! with its own bpffs, and the operations fault tests need (kill -9, restart, detach, status).
//!
//! The bpffs is mounted at `/run/kovn-e2e-<pid>-<n>/bpffs`: outside `/sys`, because `ip netns
//! exec` gives its command a fresh `/sys` (design §5), and in the root mount namespace, so every
//! `ip netns exec` child (run, status, detach) sees the same instance. Every agent command gets
//! `--bpffs-root` on it.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kube_ovn_testkit::agent::{AgentCli, AgentProcess, Privilege, Status};

use super::{NodeSpec, cleanup, exec, netns};

/// How the agent is started.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub binary: PathBuf,
    /// `--mode shadow` instead of `enforce`.
    pub shadow: bool,
    /// How long `run` may take to become ready (attached, first sync done).
    pub ready_timeout: Duration,
    /// Appended to `run`'s arguments (a benchmark's `--resync-interval`, size limits).
    pub extra_args: Vec<String>,
    /// The cluster file's content when it must differ from the node's cluster (a benchmark
    /// that programs part of the state another way); `None` writes the node's cluster.
    pub cluster_yaml: Option<String>,
    /// `--kube-proxy-mode` when it must differ from the node's kube-proxy (`auto`).
    pub kube_proxy_mode: Option<&'static str>,
    /// The capabilities the agent runs with (`KOVN_TEST_AGENT_CAPS`).
    pub privilege: Privilege,
}

impl AgentConfig {
    /// Enforce mode, 20 s to become ready, the capabilities `KOVN_TEST_AGENT_CAPS` names.
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            shadow: false,
            ready_timeout: Duration::from_secs(20),
            extra_args: Vec::new(),
            cluster_yaml: None,
            kube_proxy_mode: None,
            privilege: Privilege::from_env(),
        }
    }
}

/// Where the agent listens for metrics and health, inside the node namespace.
const METRICS_ADDR: &str = "127.0.0.1:9464";

pub struct Agent {
    /// The binary, namespace and bpffs root of every agent command.
    cli: AgentCli,
    run_args: Vec<String>,
    log: PathBuf,
    ready_timeout: Duration,
    process: Option<(AgentProcess, cleanup::Guard)>,
    // Dropped after `process` (field order): unmount, then remove the run directory.
    _mount: cleanup::Guard,
    _dir: cleanup::Guard,
}

impl Agent {
    /// Writes the cluster file, mounts a private bpffs and starts `kube-ovn-agent run` in
    /// `node_ns`; returns once it is ready. Any failure reads "agent not available: …".
    pub fn start(node_ns: &str, spec: &NodeSpec, config: &AgentConfig) -> Result<Self> {
        if !config.binary.is_file() {
            bail!(
                "agent not available: {} does not exist",
                config.binary.display()
            );
        }
        let dir = PathBuf::from(cleanup::RUN_ROOT).join(cleanup::unique_stem());
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir_guard = cleanup::dir(&dir);
        let bpffs = dir.join("bpffs");
        fs::create_dir(&bpffs)?;
        exec::checked(
            Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs),
            None,
        )
        .context("mounting a bpffs for the agent")?;
        let mount_guard = cleanup::mount(&bpffs);
        let cluster_file = dir.join("cluster.yaml");
        let yaml = config
            .cluster_yaml
            .clone()
            .unwrap_or_else(|| spec.cluster.to_yaml());
        fs::write(&cluster_file, yaml)?;
        let mut run_args = run_args(spec, config, &cluster_file);
        run_args.extend(config.extra_args.iter().cloned());
        let mut agent = Self {
            cli: AgentCli {
                netns: node_ns.to_owned(),
                binary: config.binary.clone(),
                bpffs_root: bpffs,
                privilege: config.privilege,
            },
            run_args,
            log: dir.join("agent.log"),
            ready_timeout: config.ready_timeout,
            process: None,
            _mount: mount_guard,
            _dir: dir_guard,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts `run` again (after [`Agent::kill9`] or for an upgrade with a new binary) and waits
    /// until it is ready.
    pub fn spawn(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("the agent is already running");
        }
        let child = self
            .cli
            .spawn(&self.run_args, &self.log)
            .context("agent not available")?;
        let pid = child.id().context("agent not available: no pid")?;
        self.process = Some((child, cleanup::process(pid)));
        self.wait_ready()
    }

    /// Replaces the binary used by later [`Agent::spawn`] calls (upgrade tests).
    pub fn set_binary(&mut self, binary: PathBuf) {
        self.cli.binary = binary;
    }

    /// `--mode shadow` or `enforce` for later [`Agent::spawn`] calls (the migration's switch).
    pub fn set_shadow(&mut self, shadow: bool) {
        if let Some(i) = self.run_args.iter().position(|a| a == "--mode") {
            if shadow { "shadow" } else { "enforce" }.clone_into(&mut self.run_args[i + 1]);
        }
    }

    /// The pid of `run` while it runs (`ip netns exec` execs the agent in place, so it is the
    /// agent's own pid), for CPU accounting.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|(child, _)| child.id())
    }

    /// The bpffs root the agent pins under (`<root>/maps/kovn_*`).
    pub fn bpffs(&self) -> &Path {
        &self.cli.bpffs_root
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(status) = self.exited()? {
                bail!(
                    "agent not available: `kube-ovn-agent run` exited ({status}) before becoming \
                     ready; log:\n{}",
                    self.log_tail()
                );
            }
            let ready = self.readyz();
            let status = self.status();
            if matches!(ready, Ok(true)) && status.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not available: not ready after {:?} (GET /readyz on {METRICS_ADDR}: \
                     {ready:?}; `status --json`: {}); log:\n{}",
                    self.ready_timeout,
                    status
                        .err()
                        .map_or_else(|| "ok".to_owned(), |e| format!("{e:#}")),
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The exit status if `run` is no longer running (reaped).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        let Some((child, _)) = self.process.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        if status.is_some()
            && let Some((_, guard)) = self.process.take()
        {
            guard.forget();
        }
        Ok(status)
    }

    /// Fails unless `run` is still running.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.exited()? {
            bail!("the agent exited ({status}); log:\n{}", self.log_tail());
        }
        if self.process.is_none() {
            bail!("the agent is not running");
        }
        Ok(())
    }

    /// SIGKILL, as a crash or OOM kill would; pins and links stay (fail-static).
    pub fn kill9(&mut self) -> Result<()> {
        let Some((mut child, guard)) = self.process.take() else {
            bail!("the agent is not running");
        };
        child.kill()?;
        guard.forget();
        Ok(())
    }

    /// SIGTERM, as a pod deletion or a rolling update sends, and waits (at most 10 s) for `run` to
    /// exit; pins and links stay (fail-static). SIGKILL and an error if it does not exit.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let Some((mut child, guard)) = self.process.take() else {
            bail!("the agent is not running");
        };
        let exited = child.terminate(Duration::from_secs(10));
        guard.forget();
        match exited {
            Ok(status) => Ok(status),
            Err(kube_ovn_testkit::agent::Error::Timeout { .. }) => bail!(
                "the agent ignored SIGTERM for 10 s; killed. log:\n{}",
                self.log_tail()
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// The binary [`Agent::spawn`] runs.
    pub fn binary(&self) -> &Path {
        &self.cli.binary
    }

    /// `kube-ovn-agent <args…> --bpffs-root DIR` in the node namespace (migration commands:
    /// `verify`, `cleanup-iptables`), bounded by `timeout`; the output whatever the exit status.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> Result<std::process::Output> {
        Ok(self.cli.output(args, timeout)?)
    }

    /// Every pin under the agent's bpffs root: files, at any depth, except the two the kernel
    /// itself puts in every new bpffs (`maps.debug`, `progs.debug`: `bpf_preload`'s iterators,
    /// `CONFIG_BPF_PRELOAD`), which are not the agent's.
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found);
                } else {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        let root = self.bpffs();
        walk(root, &mut found);
        found.retain(|p| {
            !(p.parent() == Some(root)
                && p.file_name()
                    .is_some_and(|n| n == "maps.debug" || n == "progs.debug"))
        });
        found
    }

    /// `kube-ovn-agent status --bpffs-root DIR --json`.
    pub fn status(&self) -> Result<Status> {
        Ok(self.cli.status()?)
    }

    /// `kube-ovn-agent detach --bpffs-root DIR`.
    pub fn detach(&self) -> Result<()> {
        Ok(self.cli.detach()?)
    }

    /// `GET /readyz` from inside the node namespace: whether it answered 200.
    fn readyz(&self) -> Result<bool> {
        Ok(self.http_get("/readyz")?.0 == 200)
    }

    /// The Prometheus text the agent exports (`GET /metrics`).
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        Ok(body)
    }

    /// A minimal HTTP/1.0 GET against the agent's metrics address, from inside the node
    /// namespace; returns the status code and the body.
    fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let ns_path = format!("/run/netns/{}", self.cli.netns);
        thread::scope(|s| {
            s.spawn(|| -> Result<(u16, String)> {
                netns::join(&ns_path)?;
                let addr: SocketAddr = METRICS_ADDR.parse().expect("valid address");
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                let mut reply = String::new();
                stream.read_to_string(&mut reply)?;
                let status = reply
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|code| code.parse().ok())
                    .context("no HTTP status line")?;
                let body = reply
                    .split_once("\r\n\r\n")
                    .map_or("", |(_, b)| b)
                    .to_owned();
                Ok((status, body))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The agent's whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some((child, guard)) = self.process.take() {
            drop(guard); // SIGTERM, bounded wait, SIGKILL
            drop(child); // reaped
        }
        // The datapath survives the agent by design; remove it so nothing outlives the run. The
        // namespace deletion and unmount that follow would release it anyway.
        if !self.pins().is_empty()
            && let Err(e) = self.detach()
        {
            eprintln!("cleanup: agent detach: {e:#}");
        }
    }
}

/// `run`'s arguments but the bpffs root (which [`AgentCli`] adds).
fn run_args(spec: &NodeSpec, config: &AgentConfig, cluster_file: &Path) -> Vec<String> {
    [
        "--source",
        &format!("file:{}", cluster_file.display()),
        "--node-name",
        &spec.cluster.local_node,
        "--service-cluster-ip-range",
        &spec.cluster.service_cidr_flag(),
        "--kube-proxy-mode",
        config.kube_proxy_mode.unwrap_or(spec.kube_proxy.flag()),
        "--iface",
        "ovn0=ovn0",
        "--iface",
        "eth0=nic",
        "--mode",
        if config.shadow { "shadow" } else { "enforce" },
        "--metrics-addr",
        METRICS_ADDR,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
