//! The agent under exactly the agent Pod's capabilities (deploy/base/daemonset.yaml: BPF,
//! `NET_ADMIN`, PERFMON, `NET_RAW`; no `SYS_ADMIN`), in private network namespaces: first run, a
//! restart that adopts its own attachments, `status`, `cleanup-iptables` and an in-place upgrade
//! from another pinned program, with real packets marked throughout. Needs root (to build the
//! namespaces and drop to the capability set).
//!
//! Every agent command here goes through the test kit's agent handle with
//! [`Privilege::DaemonSet`]: `setpriv` keeps uid 0 but limits the bounding, inheritable and
//! ambient sets to the agent Pod's four capabilities.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use kube_ovn_agent::testing::{
    netns::{TempPath, example_cluster},
    scaled,
    topology::N1,
};
use kube_ovn_testkit::agent::{AgentCli, AgentProcess, CLI_TIMEOUT, Privilege, Status};
use libtest_mimic::{Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const METRICS: &str = "127.0.0.1:10669";

type Test = fn() -> Result<(), Failed>;

fn main() {
    let tcx = kube_ovn_agent::datapath::attach::tcx_supported();
    let tests: Vec<(&str, Test, bool)> = vec![
        (
            "tcx_restart_status_cleanup_and_upgrade_need_only_the_daemonsets_capabilities",
            || lifecycle("tcx"),
            true,
        ),
        (
            "netlink_restart_status_and_cleanup_need_only_the_daemonsets_capabilities",
            || lifecycle("netlink"),
            false,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f, needs_tcx)| Trial::test(name, f).with_ignored_flag(needs_tcx && !tcx))
        .collect();
    kube_ovn_testkit::privileged::main("least-privilege tests", trials);
}

/// Spec §5.1's node n1, IPv4 only (the kit's [`N1`]), and this suite's agent.
struct Node(N1);

impl std::ops::Deref for Node {
    type Target = N1;
    fn deref(&self) -> &N1 {
        &self.0
    }
}

impl Node {
    fn new() -> Self {
        Self(N1::new("kovn-lp-", false))
    }

    /// The agent's commands in the node namespace, under the agent Pod's capabilities.
    fn handle(&self) -> AgentCli {
        AgentCli::new(&self.node, AGENT, self.root(), Privilege::DaemonSet)
    }

    fn agent(&self, attach: &str) -> Agent {
        let log = TempPath::new("kovn-lp-agent-", "log");
        let args = [
            "--node-name",
            "n1",
            "--kube-proxy-mode",
            "ipvs",
            "--mode",
            "enforce",
            "--metrics-addr",
            METRICS,
            "--attach",
            attach,
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([format!("--source=file:{}", example_cluster().display())])
        .collect::<Vec<_>>();
        let process = self.handle().spawn(&args, &log).expect("start the agent");
        Agent { process, log }
    }

    /// An agent subcommand under the agent Pod's capabilities.
    fn cli(&self, args: &[&str]) -> Output {
        self.handle()
            .output(args, CLI_TIMEOUT)
            .expect("run the agent CLI")
    }

    fn status(&self) -> Result<Status, String> {
        self.handle().status().map_err(|e| e.to_string())
    }

    /// The agent's `kovn_attached_interfaces`.
    fn attached_metric(&self) -> Option<u64> {
        // In-process (no curl: the VM matrix's guests have none).
        let (_, body) = self
            .node
            .enter(|| {
                kube_ovn_agent::testing::http::get(METRICS.parse().expect("address"), "/metrics")
            })
            .ok()??;
        body.lines()
            .find_map(|l| l.strip_prefix("kovn_attached_interfaces "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until the agent reports both interfaces attached (metric) and `status`, under the
    /// same capabilities, lists them with the pinned program.
    fn wait_attached(&self, agent: &mut Agent) -> Result<Status, Failed> {
        let mut last = String::new();
        wait(scaled(Duration::from_secs(20)), || {
            agent.check_running()?;
            let status = match self.status() {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    return Ok(None);
                }
            };
            let metric = self.attached_metric();
            let names = attached_names(&status);
            last = format!("metric {metric:?}, status attachments {names:?}");
            Ok((metric == Some(2) && names == ["eth0", "ovn0"]).then_some(status))
        })
        .map_err(|e| format!("{e}; last: {last}\nagent log:\n{}", agent.log_text()).into())
    }

    /// Marks `n` of each kind more than before, or says what happened.
    fn marks(&self, n: u64, when: &str) -> Result<(), Failed> {
        let before = self.marked();
        self.send(usize::try_from(n).expect("small"));
        let after = self.marked();
        ensure(after == (before.0 + n, before.1 + n), || {
            format!("{when}: marked {before:?} → {after:?}, want {n} more of each")
        })
    }
}

struct Agent {
    process: AgentProcess,
    log: TempPath,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&*self.log).unwrap_or_default()
    }

    fn check_running(&mut self) -> Result<(), String> {
        match self.process.try_wait() {
            Ok(Some(status)) => Err(format!("agent exited with {status}:\n{}", self.log_text())),
            _ => Ok(()),
        }
    }

    fn terminate(&mut self) -> Result<(), Failed> {
        self.process
            .terminate(scaled(Duration::from_secs(10)))
            .map(drop)
            .map_err(|e| format!("agent did not exit on SIGTERM: {e}\n{}", self.log_text()).into())
    }
}

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
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), Failed> {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

fn attached_names(status: &Status) -> Vec<String> {
    let mut names: Vec<String> = status.attached().into_iter().map(str::to_owned).collect();
    names.sort();
    names
}

/// (ifname, link id or filter, program id) of each attachment `status` lists.
fn attachments(status: &Status) -> Vec<(String, String, u64)> {
    let mut list: Vec<_> = status
        .attachments
        .iter()
        .map(|a| {
            (
                a.ifname.clone(),
                format!("{:?}{:?}", a.link_id, a.filter),
                u64::from(a.program_id),
            )
        })
        .collect();
    list.sort();
    list
}

/// The pinned program's id, 0 when none is pinned.
fn program_id(status: &Status) -> u64 {
    status.program.as_ref().map_or(0, |p| u64::from(p.id))
}

/// Warnings and errors in an agent's log (text format: the level follows the timestamp).
fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

fn lifecycle(attach: &str) -> Result<(), Failed> {
    let node = Node::new();

    // First run: creates everything.
    let mut first = node.agent(attach);
    let status = node.wait_attached(&mut first)?;
    let program = program_id(&status);
    ensure(program != 0, || {
        format!("status shows no pinned program: {:?}", status.program)
    })?;
    let created = attachments(&status);
    ensure(created.iter().all(|a| a.2 == program), || {
        format!("attachments {created:?} do not all run program {program}")
    })?;
    node.marks(10, "first run")?;
    first.terminate()?;

    // Restart: adopts its own attachments, unchanged, with no complaint.
    let mut second = node.agent(attach);
    let status = node.wait_attached(&mut second)?;
    ensure(attachments(&status) == created, || {
        format!(
            "after a restart the attachments are {:?}, want the adopted {created:?}",
            attachments(&status)
        )
    })?;
    node.marks(10, "after the restart")?;
    let text = node.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    ensure(!text.contains("attachments   none"), || {
        format!("status text:\n{text}")
    })?;

    // cleanup-iptables' interlock sees the enforcing, attached datapath.
    let cleanup = node.cli(&["cleanup-iptables", "--dry-run"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&cleanup.stdout),
        String::from_utf8_lossy(&cleanup.stderr)
    );
    ensure(
        cleanup.status.success() && !said.contains("refusing"),
        || format!("cleanup-iptables --dry-run: {}\n{said}", cleanup.status),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let log = second.log_text();
    ensure(complaints(&log).is_empty(), || {
        format!("the restarted agent complained:\n{log}")
    })?;

    if attach == "tcx" {
        // In-place upgrade: the pins and links of "an older build" (another program, pinned
        // and attached through the same links) are taken over by this build's program.
        second.terminate()?;
        let older = StandIn::load();
        older.take_over(&node.root());
        let before = attachments(&node.status()?);
        ensure(before.iter().all(|a| a.2 == u64::from(older.id)), || {
            format!("the stand-in did not take over: {before:?}")
        })?;
        let mut third = node.agent(attach);
        let status = wait(scaled(Duration::from_secs(20)), || {
            third.check_running()?;
            let status = node.status()?;
            let now = attachments(&status);
            let upgraded = now.len() == 2 && now.iter().all(|a| a.2 != u64::from(older.id));
            Ok(upgraded.then_some(status))
        })
        .map_err(|e| format!("no upgrade: {e}\n{}", third.log_text()))?;
        let upgraded = attachments(&status);
        let new_program = program_id(&status);
        ensure(
            upgraded
                .iter()
                .map(|a| &a.1)
                .eq(created.iter().map(|a| &a.1))
                && upgraded.iter().all(|a| a.2 == new_program),
            || format!("upgrade: {created:?} → {upgraded:?}, pinned program {new_program}"),
        )?;
        node.wait_attached(&mut third)?;
        node.marks(10, "after the in-place upgrade")?;
        let log = third.log_text();
        ensure(complaints(&log).is_empty(), || {
            format!("the upgrading agent complained:\n{log}")
        })?;
    }
    Ok(())
}

/// A stand-in for an older build's program: a `sched_cls` program that passes every packet on
/// (`return TCX_NEXT`), loaded here with full root.
struct StandIn {
    fd: OwnedFd,
    id: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr of 128 bytes whose pointers (set by the callers)
    // outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: i64) -> OwnedFd {
    // SAFETY: the bpf command returned a new descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(rc).expect("fd")) }
}

fn pinned(path: &Path) -> OwnedFd {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    owned(bpf(BPF_OBJ_GET, &mut attr).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

impl StandIn {
    fn load() -> Self {
        // r0 = -1 (TCX_NEXT); exit
        let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
        let license = c"GPL";
        let mut attr = [0u64; 16];
        // prog_type, insn_cnt | insns | license | log_level, log_size | log_buf | kern_version,
        // prog_flags | prog_name[16]
        attr[0] = u64::from(BPF_PROG_TYPE_SCHED_CLS) | (2 << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        attr[6] = u64::from_ne_bytes(*b"kovn_ing");
        attr[7] = u64::from_ne_bytes(*b"ress\0\0\0\0");
        let fd = owned(bpf(BPF_PROG_LOAD, &mut attr).expect("loading the stand-in program"));
        let mut info = [0u8; 256];
        let mut attr = [0u64; 16];
        attr[0] = u64::try_from(fd.as_raw_fd()).expect("fd") | (256 << 32);
        attr[1] = info.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("stand-in info");
        let id = u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes"));
        Self { fd, id }
    }

    /// Pins this program as ours and runs it on every pinned link, as an older build would have.
    fn take_over(&self, root: &Path) {
        let program = root.join("programs/kovn_ingress");
        std::fs::remove_file(&program).expect("unpin our program");
        let c_path = std::ffi::CString::new(program.as_os_str().as_encoded_bytes()).expect("path");
        let mut attr = [0u64; 16];
        attr[0] = c_path.as_ptr() as u64;
        attr[1] = u64::try_from(self.fd.as_raw_fd()).expect("fd");
        bpf(BPF_OBJ_PIN, &mut attr).expect("pin the stand-in");
        for entry in std::fs::read_dir(root.join("links")).expect("links") {
            let link = pinned(&entry.expect("entry").path());
            let mut attr = [0u64; 16];
            // link_fd, new_prog_fd | flags, old_prog_fd
            attr[0] = u64::try_from(link.as_raw_fd()).expect("fd")
                | (u64::try_from(self.fd.as_raw_fd()).expect("fd") << 32);
            bpf(BPF_LINK_UPDATE, &mut attr).expect("BPF_LINK_UPDATE to the stand-in");
        }
    }
}
