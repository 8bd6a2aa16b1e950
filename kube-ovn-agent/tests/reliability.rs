//! Faults an operator's node can throw at the agent, run the way the node runs it (the binary,
//! root, a bpffs, private network namespaces): a second agent on the same pin root, `detach`
//! under a running agent, an idle-connection flood on the health endpoint, a full map, missing
//! capabilities, a read-only bpffs, a FIFO as the cluster file, control characters in object
//! names. Needs root.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    netns::{Bpffs, NetNs, TempPath, example_cluster, veth},
    scaled,
};
use kube_ovn_testkit::agent::Privilege;
use libtest_mimic::{Failed, Trial};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
/// Inside each test's own node namespace, so every test can use the same port.
const METRICS: &str = "127.0.0.1:10669";
/// The exit status of `run` and `detach` when another agent holds the pin root.
const ROOT_IN_USE: i32 = 4;

type Test = fn() -> Result<(), Failed>;

fn main() {
    let tests: Vec<(&str, Test)> = vec![
        (
            "a_second_agent_on_the_same_root_refuses_with_its_own_exit_code",
            second_agent,
        ),
        (
            "detach_refuses_under_a_running_agent_and_force_makes_it_report_unhealthy",
            detach_under_agent,
        ),
        (
            "an_idle_connection_flood_leaves_healthz_answering_and_is_closed",
            idle_flood,
        ),
        (
            "a_full_map_is_logged_once_per_map_with_errno_capacity_and_count",
            map_full,
        ),
        (
            "a_missing_capability_is_named_and_each_cause_printed_once",
            missing_capability,
        ),
        ("status_and_dump_work_on_a_read_only_bpffs", read_only_bpffs),
        (
            "detach_on_a_root_without_our_pins_fails_clearly",
            detach_wrong_root,
        ),
        ("a_fifo_as_the_cluster_file_is_refused_not_waited_on", fifo),
        (
            "control_characters_in_object_names_cannot_forge_log_lines",
            forged_names,
        ),
        (
            "a_self_mounted_private_bpffs_is_reported_not_persistent",
            private_bpffs,
        ),
        (
            "a_map_layout_change_migrates_under_traffic_without_an_unmarked_packet",
            || layout_migration("tcx"),
        ),
        ("a_map_layout_change_migrates_netlink_filters_too", || {
            layout_migration("netlink")
        }),
        (
            "a_migration_killed_after_the_first_attachment_swapped_finishes_on_restart",
            || interrupted_migration("swapped-first-attachment", Restart::NewBuild),
        ),
        (
            "a_migration_killed_after_every_swap_finishes_on_restart",
            || interrupted_migration("migration-swapped", Restart::NewBuild),
        ),
        (
            "a_migration_killed_after_the_program_pin_finishes_on_restart",
            || interrupted_migration("migration-program-pinned", Restart::NewBuild),
        ),
        (
            "a_migration_killed_between_its_renames_finishes_on_restart",
            || interrupted_migration("migration-renamed-first", Restart::NewBuild),
        ),
        (
            "a_migration_killed_after_every_swap_rolls_back_to_the_older_build",
            || interrupted_migration("migration-swapped", Restart::OlderBuild),
        ),
        (
            "a_migration_killed_between_its_renames_rolls_back_to_the_older_build",
            || interrupted_migration("migration-renamed-first", Restart::OlderBuild),
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| Trial::test(name, f))
        .collect();
    kube_ovn_testkit::privileged::main("reliability tests", trials);
}

/// A node namespace with `ovn0` to a pod and `eth0` to another node (spec §5.1's n1), and a
/// bpffs for the pins.
struct Node {
    ns: NetNs,
    peers: [NetNs; 2],
    bpffs: Bpffs,
}

impl Node {
    fn new() -> Self {
        let ns = NetNs::new("kovn-rel-node-").expect("create namespace");
        let client = NetNs::new("kovn-rel-client-").expect("create namespace");
        let pod = NetNs::new("kovn-rel-pod-").expect("create namespace");
        veth(&ns, "eth0", &client, "eth0").expect("veth pair");
        veth(&ns, "ovn0", &pod, "eth0").expect("veth pair");
        ns.sh(
            "ip addr add 192.168.0.11/24 dev eth0; ip addr add 100.64.0.2/16 dev ovn0; \
             ip route add 10.16.0.0/16 dev ovn0",
        )
        .expect("shell in namespace");
        Self {
            ns,
            peers: [client, pod],
            bpffs: Bpffs::mount(),
        }
    }

    fn root(&self) -> PathBuf {
        self.bpffs.root()
    }

    /// The pod peer, addressed in the pod subnet and routed through `ovn0`.
    fn pod_on_ovn0(&self) -> &NetNs {
        let pod = &self.peers[1];
        pod.sh(
            "ip addr add 10.16.0.5/16 dev eth0; ip route add 100.64.0.2 dev eth0; \
             ip route add default via 100.64.0.2",
        )
        .expect("shell in namespace");
        pod
    }

    /// `kube-ovn-agent run` on `cluster` in the node namespace, its stderr in a file.
    fn agent(&self, cluster: &Path, extra: &[&str]) -> Agent {
        self.agent_with(&[], cluster, extra)
    }

    /// As [`Self::agent`], started through `wrapper` (e.g. `prlimit …`).
    fn agent_with(&self, wrapper: &[&str], cluster: &Path, extra: &[&str]) -> Agent {
        let stderr = TempPath::new("kovn-rel-agent-", "log");
        let stdout = TempPath::new("kovn-rel-agent-", "out");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.ns.command(program);
                c.args(args).arg(AGENT);
                c
            }
            None => self.ns.command(AGENT),
        };
        let child = command
            .args(["run", "--node-name", "n1", "--kube-proxy-mode", "ipvs"])
            .arg(format!("--source=file:{}", cluster.display()))
            .arg("--bpffs-root")
            .arg(self.root())
            .args(extra)
            .stdout(std::fs::File::create(&*stdout).expect("agent stdout"))
            .stderr(std::fs::File::create(&*stderr).expect("agent log"))
            .spawn()
            .expect("start the agent");
        Agent {
            child,
            stderr,
            stdout,
        }
    }

    /// A read-side or `detach` command against `root`.
    fn cli(&self, root: &Path, args: &[&str]) -> std::process::Output {
        self.ns
            .command(AGENT)
            .args(args)
            .arg("--bpffs-root")
            .arg(root)
            .output()
            .expect("run the agent CLI")
    }

    fn status(&self) -> Option<Value> {
        let out = self.cli(&self.root(), &["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status --json is JSON"))
    }

    /// Waits until the agent attached to `ovn0` and programmed the ClusterIP map.
    fn wait_ready(&self, agent: &mut Agent) -> Result<Value, Failed> {
        self.wait_programmed(agent, "kovn_svcport4")
    }

    /// Waits until the agent attached to `ovn0` and wrote entries into `map`.
    fn wait_programmed(&self, agent: &mut Agent, map: &str) -> Result<Value, Failed> {
        wait(scaled(Duration::from_secs(20)), || {
            agent.check_running()?;
            let Some(status) = self.status() else {
                return Ok(None);
            };
            let attached = status["attachments"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["ifname"] == "ovn0");
            Ok((attached && map_size(&status, map) > 0).then_some(status))
        })
        .map_err(|e| format!("{e}\nagent log:\n{}", agent.log()).into())
    }

    /// `GET path` on the agent's metrics address: (status code, body), or why not.
    fn get(&self, path: &str, timeout: Duration) -> Result<(u16, String), String> {
        self.ns
            .enter(|| http_get(path, timeout))
            .expect("enter namespace")
    }
}

fn http_get(path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let started = Instant::now();
    let addr = METRICS.parse().expect("address");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("no answer after {:?}: {e}", started.elapsed()))?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

struct Agent {
    child: Child,
    stderr: TempPath,
    stdout: TempPath,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&*self.stderr).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&*self.stdout).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("agent exited with {status}:\n{}", self.log())),
            _ => Ok(()),
        }
    }

    /// Waits for the process to exit on its own; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>, String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "still running after {timeout:?}; log:\n{}",
            self.log()
        ))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms until it returns `Some`, an error, or `timeout` passes.
fn wait<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn map_size(status: &Value, map: &str) -> u64 {
    status["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m[0] == map)
        .and_then(|m| m[1].as_u64())
        .unwrap_or(0)
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

fn second_agent() -> Result<(), Failed> {
    let node = Node::new();
    let mut first = node.agent(&example_cluster(), &["--metrics-addr", "none"]);
    node.wait_ready(&mut first)?;
    let mut second = node.agent(
        &example_cluster(),
        &["--metrics-addr", "none", "--mode", "shadow", "--log-json"],
    );
    let code = second.wait_exit(scaled(Duration::from_secs(10)))?;
    let log = second.log();
    ensure(code == Some(ROOT_IN_USE), || {
        format!("second agent exited with {code:?}, want {ROOT_IN_USE}; log:\n{log}")
    })?;
    let pid = first.child.id().to_string();
    ensure(log.contains("another agent") && log.contains(&pid), || {
        format!("the refusal must say another agent (pid {pid}) holds the root:\n{log}")
    })?;
    // --log-json: every line on stderr is JSON, stdout stays free for command output.
    for line in log.lines() {
        ensure(serde_json::from_str::<Value>(line).is_ok(), || {
            format!("not a JSON log line: {line:?}")
        })?;
    }
    ensure(second.stdout().is_empty(), || {
        format!("JSON logs went to stdout:\n{}", second.stdout())
    })?;
    let status = node.status().ok_or("status failed")?;
    ensure(status["mode"] == "enforce", || {
        format!("the refused agent changed the mode: {}", status["mode"])
    })?;
    first.check_running()?;
    // Text logs into a file carry no terminal colour codes.
    let text = first.log();
    ensure(!text.contains('\u{1b}'), || {
        format!("ANSI escapes in a non-terminal log:\n{text:?}")
    })
}

fn detach_under_agent() -> Result<(), Failed> {
    let node = Node::new();
    let mut agent = node.agent(
        &example_cluster(),
        &["--metrics-addr", METRICS, "--attach", "netlink"],
    );
    node.wait_ready(&mut agent)?;
    let healthy = node.get("/healthz", Duration::from_secs(2))?;
    ensure(healthy.0 == 200, || format!("/healthz {healthy:?}"))?;

    let refused = node.cli(&node.root(), &["detach"]);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure(refused.status.code() == Some(ROOT_IN_USE), || {
        format!(
            "detach under a running agent: {}, want exit {ROOT_IN_USE}:\n{stderr}",
            refused.status
        )
    })?;
    ensure(stderr.contains("--force"), || {
        format!("the refusal must name --force:\n{stderr}")
    })?;
    node.wait_ready(&mut agent)?;

    let forced = node.cli(&node.root(), &["detach", "--force"]);
    ensure(forced.status.success(), || {
        format!(
            "detach --force: {}\n{}",
            forced.status,
            String::from_utf8_lossy(&forced.stderr)
        )
    })?;
    let body = wait(scaled(Duration::from_secs(10)), || {
        agent.check_running()?;
        match node.get("/healthz", Duration::from_secs(2)) {
            Ok((503, body)) => Ok(Some(body)),
            _ => Ok(None),
        }
    })
    .map_err(|e| {
        format!(
            "/healthz still 200 after detach --force: {e}\n{}",
            agent.log()
        )
    })?;
    ensure(body.contains("pins"), || format!("/healthz body {body:?}"))?;
    let (_, metrics) = node.get("/metrics", Duration::from_secs(2))?;
    ensure(metrics.contains("kovn_pins_present 0"), || {
        format!("no kovn_pins_present 0 in\n{metrics}")
    })?;
    ensure(metrics.contains("kovn_bpffs_persistent 1"), || {
        format!(
            "the test's bpffs is mounted outside the agent: want kovn_bpffs_persistent 1 in\n{metrics}"
        )
    })?;
    let log = agent.log();
    ensure(log.contains("detach --force"), || {
        format!("the log must say what happened:\n{log}")
    })?;
    // The agent must not quietly put back what the operator removed.
    std::thread::sleep(Duration::from_secs(2));
    let filters = node
        .ns
        .sh("tc filter show dev ovn0 ingress")
        .expect("shell in namespace");
    ensure(!filters.contains("kovn_ingress"), || {
        format!("re-attached after detach --force:\n{filters}")
    })
}

fn idle_flood() -> Result<(), Failed> {
    let node = Node::new();
    // A descriptor budget well under the flood, as a tight container limit would be.
    let mut agent = node.agent_with(
        &["prlimit", "--nofile=256:256", "--"],
        &example_cluster(),
        &["--metrics-addr", METRICS],
    );
    node.wait_ready(&mut agent)?;
    let flood = 400;
    node.ns.enter(|| -> Result<(), Failed> {
        let addr = METRICS.parse().expect("address");
        let idle: Vec<TcpStream> = (0..flood)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("connecting: {e}"))?;
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let answer = http_get("/healthz", Duration::from_secs(1));
        ensure(matches!(answer, Ok((200, _))), || {
            format!(
                "/healthz with {flood} idle connections open: {answer:?} after {:?}",
                started.elapsed()
            )
        })?;
        // Every idle connection is closed by the server: evicted over the bound, or after the
        // idle timeout (10 s).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut open = 0;
        for mut stream in idle {
            let left = deadline.saturating_duration_since(Instant::now());
            stream
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .expect("timeout");
            let mut byte = [0u8; 1];
            if matches!(stream.read(&mut byte), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
            {
                open += 1;
            }
        }
        ensure(open == 0, || {
            format!("{open} of {flood} idle connections still open after 15 s")
        })
    })??;
    agent.check_running()?;
    let log = agent.log();
    ensure(!log.contains("Too many open files"), || {
        format!("descriptors ran out:\n{log}")
    })
}

/// 300 ready ServiceCIDRs: more than `kovn_svccidr4`'s 256 entries.
fn service_cidrs(count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        let _ = write!(
            text,
            "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: extra-{i}\n\
             spec:\n  cidrs:\n  - 10.{}.{}.0/24\nstatus:\n  conditions:\n  - type: Ready\n    \
             status: \"True\"\n    reason: Test\n    message: ready\n    \
             lastTransitionTime: \"2026-01-01T00:00:00Z\"\n",
            100 + i / 256,
            i % 256
        );
    }
    text
}

fn write_cluster(path: &Path, extra: &str) {
    let mut text = std::fs::read_to_string(example_cluster()).expect("example cluster");
    text.push_str(extra);
    // Written beside and renamed over, as the docs ask writers to.
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).expect("write cluster");
    std::fs::rename(&temp, path).expect("rename cluster");
}

fn map_full() -> Result<(), Failed> {
    let node = Node::new();
    let cluster = TempPath::new("kovn-rel-cluster-", "yaml");
    write_cluster(&cluster, &service_cidrs(300));
    // R1 by Service CIDR: the form that programs `kovn_svccidr4`.
    let mut agent = node.agent(
        &cluster,
        &["--metrics-addr", METRICS, "--service-match", "cidr"],
    );
    node.wait_programmed(&mut agent, "kovn_svccidr4")?;
    let full_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("kovn_svccidr4") && !l.contains("first full sync"))
            .map(str::to_owned)
            .collect()
    };
    let lines = wait(scaled(Duration::from_secs(10)), || {
        let lines = full_lines(&agent.log());
        Ok((!lines.is_empty()).then_some(lines))
    })
    .map_err(|e| format!("no line about the full map: {e}\n{}", agent.log()))?;
    std::thread::sleep(Duration::from_secs(1));
    let lines_now = full_lines(&agent.log());
    ensure(lines_now.len() == 1, || {
        format!(
            "{} lines about the full map (want one summary):\n{}",
            lines_now.len(),
            lines_now
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let line = &lines[0];
    for needle in ["capacity 256", "44 entries refused", "ENOSPC"] {
        ensure(line.contains(needle), || format!("no {needle:?} in {line}"))?;
    }
    let (_, metrics) = node.get("/metrics", Duration::from_secs(2))?;
    for needle in [
        "kovn_map_capacity{map=\"kovn_svccidr4\"} 256",
        "kovn_map_entries{map=\"kovn_svccidr4\"} 256",
    ] {
        ensure(metrics.contains(needle), || {
            format!("no {needle} in\n{metrics}")
        })?;
    }
    let status = node.status().ok_or("status failed")?;
    let capacity = status["map_capacity"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m[0] == "kovn_svccidr4")
        .and_then(|m| m[1].as_u64());
    ensure(capacity == Some(256), || {
        format!("status --json map_capacity: {capacity:?}")
    })?;
    // Another pass with the map still full: no new line.
    write_cluster(&cluster, &service_cidrs(301));
    std::thread::sleep(Duration::from_secs(3));
    let after_pass = full_lines(&agent.log());
    ensure(after_pass.len() == 1, || {
        format!(
            "a lasting fault was logged again:\n{}",
            after_pass.join("\n")
        )
    })?;
    // Resolved, then back: logged again.
    write_cluster(&cluster, &service_cidrs(200));
    wait(scaled(Duration::from_secs(10)), || {
        Ok(full_lines(&agent.log())
            .iter()
            .any(|l| l.contains("resolved"))
            .then_some(()))
    })?;
    write_cluster(&cluster, &service_cidrs(300));
    wait(scaled(Duration::from_secs(10)), || {
        Ok((full_lines(&agent.log())
            .iter()
            .filter(|l| l.contains("refused"))
            .count()
            == 2)
            .then_some(()))
    })
    .map_err(|e| {
        format!(
            "a returning fault was not logged again: {e}\n{}",
            agent.log()
        )
    })?;
    Ok(())
}

fn missing_capability() -> Result<(), Failed> {
    let node = Node::new();
    let mut agent = node.agent_with(
        &["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--"],
        &example_cluster(),
        &["--metrics-addr", "none"],
    );
    let code = agent.wait_exit(scaled(Duration::from_secs(10)))?;
    let log = agent.log();
    ensure(code.is_some_and(|c| c != 0), || {
        format!("exited with {code:?}:\n{log}")
    })?;
    ensure(log.contains("CAP_BPF"), || {
        format!("the error must name CAP_BPF:\n{log}")
    })?;
    let repeats = log.matches("Operation not permitted").count();
    ensure(repeats == 1, || {
        format!("the cause is printed {repeats} times:\n{log}")
    })
}

/// The test's bpffs remounted read-only (the superblock, as `mount -o ro` would mount it: a
/// read-only bind mount alone does not stop `BPF_OBJ_GET` from opening pins read-write);
/// read-write again on drop.
struct ReadOnly<'a>(&'a Path);

impl<'a> ReadOnly<'a> {
    fn remount(path: &'a Path) -> Self {
        let ro = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(ro.success(), "read-only remount failed");
        Self(path)
    }
}

impl Drop for ReadOnly<'_> {
    fn drop(&mut self) {
        let _ = Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(self.0)
            .status();
    }
}

fn read_only_bpffs() -> Result<(), Failed> {
    let node = Node::new();
    let mut agent = node.agent(&example_cluster(), &["--metrics-addr", "none"]);
    node.wait_ready(&mut agent)?;
    let read_only = ReadOnly::remount(&node.bpffs.path);
    let probe = node.bpffs.path.join("kube-ovn/write-probe");
    ensure(std::fs::create_dir(&probe).is_err(), || {
        "the bpffs is still writable".into()
    })?;
    for args in [&["status", "--json"][..], &["dump", "--json"]] {
        let out = node.cli(&node.root(), args);
        ensure(out.status.success(), || {
            format!(
                "{args:?} on a read-only bpffs: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let json: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if args[0] == "status" {
            ensure(map_size(&json, "kovn_svcport4") > 0, || {
                format!("status read no entries: {json}")
            })?;
            ensure(json["program"]["id"].as_u64().is_some(), || {
                format!("status did not find the pinned program: {json}")
            })?;
        }
    }
    drop(read_only);
    Ok(())
}

fn detach_wrong_root() -> Result<(), Failed> {
    let node = Node::new();
    let empty = node.bpffs.path.join("not-ours");
    std::fs::create_dir_all(&empty).expect("mkdir");
    for root in [empty.clone(), node.bpffs.path.join("missing")] {
        let out = node.cli(&root, &["detach"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure(!out.status.success(), || {
            format!("detach on {} succeeded", root.display())
        })?;
        ensure(stderr.contains("nothing of ours"), || {
            format!("unclear message for {}:\n{stderr}", root.display())
        })?;
    }
    ensure(empty.is_dir(), || {
        "detach removed a directory not ours".into()
    })
}

fn fifo() -> Result<(), Failed> {
    let node = Node::new();
    let path = TempPath::new("kovn-rel-fifo-", "yaml");
    let made = Command::new("mkfifo").arg(&*path).status().expect("mkfifo");
    assert!(made.success());
    let mut agent = node.agent(&path, &["--metrics-addr", "none"]);
    let code = agent.wait_exit(scaled(Duration::from_secs(10)))?;
    let log = agent.log();
    ensure(code.is_some_and(|c| c != 0), || {
        format!("exited with {code:?}:\n{log}")
    })?;
    ensure(log.contains("not a regular file"), || {
        format!("unclear refusal:\n{log}")
    })
}

fn forged_names() -> Result<(), Failed> {
    let node = Node::new();
    let cluster = TempPath::new("kovn-rel-cluster-", "yaml");
    write_cluster(&cluster, "");
    let mut agent = node.agent(&cluster, &["--metrics-addr", "none"]);
    node.wait_ready(&mut agent)?;
    write_cluster(
        &cluster,
        "---\napiVersion: kubeovn.io/v1\nkind: Subnet\nmetadata:\n  \
         name: \"evil\\nFORGED ERROR all marks lost\"\nspec:\n  cidrBlock: 10.300.0.0/16\n  \
         vpc: ovn-cluster\n",
    );
    let log = wait(scaled(Duration::from_secs(10)), || {
        let log = agent.log();
        Ok(log.contains("evil").then_some(log))
    })?;
    ensure(!log.lines().any(|l| l.starts_with("FORGED")), || {
        format!("a name started a log line of its own:\n{log}")
    })?;
    ensure(log.contains("evil\\nFORGED"), || {
        format!("the newline must show escaped:\n{log}")
    })
}

/// `ip netns exec` gives the agent a mount namespace of its own with a fresh sysfs, so
/// `/sys/fs/bpf` there is no bpffs and the agent mounts one, private to that namespace (and
/// `unshare -m --propagation private` makes sure nothing propagates). Its pins die with it: the
/// agent must say so at start, in `status`, in `kovn_bpffs_persistent` and when it stops.
fn private_bpffs() -> Result<(), Failed> {
    let node = Node::new();
    let root = format!(
        "/sys/fs/bpf/{}",
        kube_ovn_agent::testing::netns::unique("kovn-rel-")
    );
    let stderr = TempPath::new("kovn-rel-agent-", "log");
    let child = node
        .ns
        .command("unshare")
        .args(["-m", "--propagation", "private", AGENT])
        .args(["run", "--node-name", "n1", "--kube-proxy-mode", "ipvs"])
        .args(["--metrics-addr", METRICS, "--bpffs-root", &root])
        .arg(format!("--source=file:{}", example_cluster().display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&*stderr).expect("agent log"))
        .spawn()
        .expect("start the agent");
    let pid = child.id().to_string();
    let mut agent = Agent {
        child,
        stderr,
        stdout: TempPath::new("kovn-rel-agent-", "out"),
    };
    // `status` must run in the agent's mount namespace to see its pins at all.
    let status = |args: &[&str]| {
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "-n", "--", AGENT])
            .args(args)
            .args(["--bpffs-root", &root])
            .output()
            .expect("nsenter")
    };
    let json = wait(scaled(Duration::from_secs(20)), || {
        agent.check_running()?;
        let out = status(&["status", "--json"]);
        let Ok(json) = serde_json::from_slice::<Value>(&out.stdout) else {
            return Ok(None);
        };
        let attached = !json["attachments"].as_array().is_none_or(Vec::is_empty);
        Ok((attached && json["agent"].is_object()).then_some(json))
    })
    .map_err(|e| format!("{e}\nagent log:\n{}", agent.log()))?;
    let why = json["agent"]["bpffs_not_persistent"]
        .as_str()
        .unwrap_or_default();
    ensure(why.contains("private"), || {
        format!(
            "status --json does not say the bpffs is private: {}",
            json["agent"]
        )
    })?;
    let text = String::from_utf8_lossy(&status(&["status"]).stdout).into_owned();
    ensure(text.contains("bpffs         NOT PERSISTENT"), || {
        format!("status text:\n{text}")
    })?;
    let (_, metrics) = node.get("/metrics", Duration::from_secs(2))?;
    ensure(metrics.contains("kovn_bpffs_persistent 0"), || {
        format!("no kovn_bpffs_persistent 0 in\n{metrics}")
    })?;
    let log = agent.log();
    ensure(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("not persist")),
        || format!("no startup warning:\n{log}"),
    )?;
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    agent.wait_exit(scaled(Duration::from_secs(10)))?;
    let log = agent.log();
    ensure(!log.contains("stays attached"), || {
        format!("claimed persistence it does not have:\n{log}")
    })?;
    ensure(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("stopping") && l.contains("pins go")),
        || format!("the stop line must say the pins go:\n{log}"),
    )
}

/// The layout the "older build" gives `kovn_svcport4` (the map R1a reads): a smaller capacity,
/// as a release that raises a full map's capacity would change it. The agent of this test
/// binary honours `KOVN_TEST_MAP_MAX_ENTRIES` (built with the `testing` feature only), so the
/// older build is this same agent with that one map's `max_entries` changed.
const OLD_SVCPORT4: &str = "kovn_svcport4=512";

/// Sends UDP from the pod to kube-dns' ClusterIP (R1a) until `stop`; returns how many it sent.
fn pod_to_cluster_ip(pod: &NetNs, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use std::sync::atomic::Ordering;
    pod.enter(|| {
        let socket = std::net::UdpSocket::bind("10.16.0.5:0").expect("bind");
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..20 {
                if socket.send_to(b"x", "10.96.0.10:53").is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    })
    .expect("enter namespace")
}

fn capacity(status: &Value, map: &str) -> u64 {
    status["map_capacity"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m[0] == map)
        .and_then(|m| m[1].as_u64())
        .unwrap_or(0)
}

/// Issue 13 item 11: an agent whose map layout differs from the pinned maps migrates them —
/// new maps staged, filled from the complete view, the program swapped on every attachment,
/// then the new maps take the canonical names — while a pod sends to a ClusterIP: every packet
/// is marked. A staged map left by an interrupted attempt (wrong layout) is replaced.
fn layout_migration(attach: &str) -> Result<(), Failed> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let node = Node::new();
    let pod = node.pod_on_ovn0();
    let counts = count_marks(&node);
    let extra = [
        "--metrics-addr",
        "none",
        "--mode",
        "enforce",
        "--attach",
        attach,
    ];
    // Both agents run with exactly the DaemonSet's capabilities (item 1).
    let daemonset = Privilege::DaemonSet.wrapper();
    let daemonset: Vec<&str> = daemonset.iter().map(String::as_str).collect();
    let old_env = format!("KOVN_TEST_MAP_MAX_ENTRIES={OLD_SVCPORT4}");
    let mut old = node.agent_with(
        &[daemonset.as_slice(), &["env", &old_env]].concat(),
        &example_cluster(),
        &extra,
    );
    let before = node.wait_ready(&mut old)?;
    ensure(capacity(&before, "kovn_svcport4") == 512, || {
        format!("the older build's capacity: {}", before["map_capacity"])
    })?;
    let old_program = before["program"]["id"].as_u64().unwrap_or_default();
    let links: Vec<Value> = before["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["link_id"].clone())
        .collect();
    let start = counts();
    let stop = AtomicBool::new(false);
    let (sent, outcome) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| pod_to_cluster_ip(pod, &stop));
        let outcome = (|| -> Result<Agent, Failed> {
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill")
                .args(["-TERM", &old.child.id().to_string()])
                .status();
            old.wait_exit(scaled(Duration::from_secs(10)))?;
            // What an attempt interrupted before its swap leaves: a staged map, here of a
            // layout this build does not use either.
            stage_bogus_map(&node.root().join("maps-next"), "kovn_svcport4");
            let mut new = node.agent_with(&daemonset, &example_cluster(), &extra);
            wait(scaled(Duration::from_secs(30)), || {
                new.check_running()?;
                Ok(new.log().contains("map layout migrated").then_some(()))
            })
            .map_err(|e| format!("{e}\n{}", new.log()))?;
            std::thread::sleep(Duration::from_millis(500));
            Ok(new)
        })();
        stop.store(true, Ordering::Relaxed);
        (sender.join().expect("sender"), outcome)
    });
    let mut new = outcome?;
    let end = counts();
    let (marked, unmarked) = (end.0 - start.0, end.1 - start.1);
    eprintln!("layout migration under traffic: sent {sent}, marked {marked}, unmarked {unmarked}");
    ensure(marked > 0 && unmarked == 0, || {
        format!(
            "pod → ClusterIP: sent {sent}, marked {marked}, unmarked {unmarked}\n{}",
            new.log()
        )
    })?;
    check_migrated(&node, &mut new, old_program, &links)?;
    // A restart after the migration is an ordinary one.
    let _ = Command::new("kill")
        .args(["-TERM", &new.child.id().to_string()])
        .status();
    new.wait_exit(scaled(Duration::from_secs(10)))?;
    let mut again = node.agent_with(&daemonset, &example_cluster(), &extra);
    node.wait_ready(&mut again)?;
    let log = again.log();
    ensure(!log.contains("migrat"), || {
        format!("a second migration after a finished one:\n{log}")
    })
}

/// The "older build" of the interrupted-migration tests: two maps with another layout, so a
/// crash can fall between their renames.
const OLD_TWO_MAPS: &str = "kovn_svcport4=512,kovn_othernode4=128";

/// Which build starts after the crash.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Restart {
    /// The build that was migrating: it must finish the migration.
    NewBuild,
    /// The older build (a rollback): it must take the node back to its own layout.
    OlderBuild,
}

/// Issue 13 item 11, the crash case: the migrating agent is killed (aborts, as `kill -9` would)
/// at `point` of its migration (`KOVN_TEST_CRASH_AT`, a `testing` build's hook); the build given
/// by `restart` then starts on what was left. A pod sends to a ClusterIP throughout: not one
/// packet may go unmarked, and the node must end in the restarted build's layout, its program
/// on every attachment, no staged map left.
fn interrupted_migration(point: &str, restart: Restart) -> Result<(), Failed> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let node = Node::new();
    let pod = node.pod_on_ovn0();
    let counts = count_marks(&node);
    let extra = [
        "--metrics-addr",
        "none",
        "--mode",
        "enforce",
        "--attach",
        "tcx",
    ];
    let daemonset = Privilege::DaemonSet.wrapper();
    let daemonset: Vec<&str> = daemonset.iter().map(String::as_str).collect();
    let old_env = format!("KOVN_TEST_MAP_MAX_ENTRIES={OLD_TWO_MAPS}");
    let crash_env = format!("KOVN_TEST_CRASH_AT={point}");
    let older = [daemonset.as_slice(), &["env", &old_env]].concat();
    let crashing = [daemonset.as_slice(), &["env", &crash_env]].concat();
    let mut old = node.agent_with(&older, &example_cluster(), &extra);
    node.wait_ready(&mut old)?;
    let start = counts();
    let stop = AtomicBool::new(false);
    let (sent, outcome) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| pod_to_cluster_ip(pod, &stop));
        let outcome = (|| -> Result<(Agent, Value), Failed> {
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill")
                .args(["-TERM", &old.child.id().to_string()])
                .status();
            old.wait_exit(scaled(Duration::from_secs(10)))?;
            let mut killed = node.agent_with(&crashing, &example_cluster(), &extra);
            let code = killed.wait_exit(scaled(Duration::from_secs(30)))?;
            let log = killed.log();
            ensure(code.is_none() && log.contains(&crash_env), || {
                format!("the agent did not abort at {point} (exit {code:?}):\n{log}")
            })?;
            std::thread::sleep(Duration::from_millis(300));
            let wrapper = match restart {
                Restart::NewBuild => daemonset.clone(),
                Restart::OlderBuild => older.clone(),
            };
            let mut next = node.agent_with(&wrapper, &example_cluster(), &extra);
            node.wait_ready(&mut next)?;
            // A map of the other layout is left in maps/ in every case but a rollback from
            // before the renames: that start migrates it.
            let migrates = restart == Restart::NewBuild || point == "migration-renamed-first";
            if migrates {
                wait(scaled(Duration::from_secs(30)), || {
                    next.check_running()?;
                    Ok(next.log().contains("map layout migrated").then_some(()))
                })
                .map_err(|e| format!("{e}\n{}", next.log()))?;
            }
            std::thread::sleep(Duration::from_millis(500));
            let status = node.wait_ready(&mut next)?;
            Ok((next, status))
        })();
        stop.store(true, Ordering::Relaxed);
        (sender.join().expect("sender"), outcome)
    });
    let (next, status) = outcome?;
    let end = counts();
    let (marked, unmarked) = (end.0 - start.0, end.1 - start.1);
    eprintln!(
        "killed at {point}, restarted {restart:?}: sent {sent}, marked {marked}, unmarked {unmarked}"
    );
    ensure(marked > 0 && unmarked == 0, || {
        format!(
            "pod → ClusterIP: sent {sent}, marked {marked}, unmarked {unmarked}\n{}",
            next.log()
        )
    })?;
    let want = match restart {
        Restart::NewBuild => |c: u64| c > 512,
        Restart::OlderBuild => |c: u64| c == 512,
    };
    let program = status["program"]["id"].as_u64();
    let attachments = status["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure(
        want(capacity(&status, "kovn_svcport4"))
            && !attachments.is_empty()
            && attachments
                .iter()
                .all(|a| a["program_id"].as_u64() == program)
            && !node.root().join("maps-next").exists(),
        || {
            format!(
                "after the restart: capacities {}, program {program:?}, attachments {}, staging \
                 left: {}\n{}",
                status["map_capacity"],
                status["attachments"],
                node.root().join("maps-next").exists(),
                next.log()
            )
        },
    )
}

/// Counting rules in the node's mangle PREROUTING for the pod's packets to kube-dns' ClusterIP;
/// reads (marked, unmarked). Marked packets RETURN at the first rule, the second counts the rest.
fn count_marks(node: &Node) -> impl Fn() -> (u64, u64) + '_ {
    // Marked packets RETURN at the first rule; the second counts the rest: unmarked.
    node.ns.sh(
        "iptables -t mangle -A PREROUTING -p udp --dport 53 -d 10.96.0.10 -m mark --mark 0x4000/0x4000 -j RETURN; \
         iptables -t mangle -A PREROUTING -p udp --dport 53 -d 10.96.0.10 -j RETURN",
    ).expect("shell in namespace");
    move || -> (u64, u64) {
        let listing = node
            .ns
            .sh("iptables -t mangle -nvxL PREROUTING")
            .expect("shell in namespace");
        let mut rows = listing
            .lines()
            .filter(|l| l.contains("10.96.0.10") && l.contains("dpt:53"))
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            });
        (rows.next().unwrap_or(0), rows.next().unwrap_or(0))
    }
}

/// After a migration: the new capacity, the new program on the same links, no staging left.
fn check_migrated(
    node: &Node,
    new: &mut Agent,
    old_program: u64,
    links: &[Value],
) -> Result<(), Failed> {
    let after = node.wait_ready(new)?;
    let program = after["program"]["id"].as_u64().unwrap_or_default();
    let now: Vec<Value> = after["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["link_id"].clone())
        .collect();
    ensure(
        capacity(&after, "kovn_svcport4") > 512
            && program != old_program
            && now.as_slice() == links
            && after["attachments"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|a| a["program_id"].as_u64() == Some(program)),
        || {
            format!(
                "after the migration: capacity {}, program {old_program} → {program}, links \
                 {links:?} → {now:?}, attachments {}",
                after["map_capacity"], after["attachments"]
            )
        },
    )?;
    ensure(!node.root().join("maps-next").exists(), || {
        "the staging directory is left behind".into()
    })?;
    Ok(())
}

/// Pins an empty hash map (key 4, value 4, 7 entries) at `dir/name`.
fn stage_bogus_map(dir: &Path, name: &str) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    std::fs::create_dir_all(dir).expect("staging directory");
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
        // SAFETY: a zero-padded 128-byte bpf_attr whose pointers outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
        assert!(rc >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        rc
    };
    let mut attr = [0u64; 16];
    // BPF_MAP_CREATE: map_type (1, hash), key_size | value_size, max_entries
    attr[0] = 1 | (4 << 32);
    attr[1] = 4 | (7 << 32);
    // SAFETY: BPF_MAP_CREATE returned a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(bpf(0, &mut attr)).expect("fd")) };
    let path = std::ffi::CString::new(dir.join(name).as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = u64::try_from(fd.as_raw_fd()).expect("fd");
    bpf(6, &mut attr);
}
