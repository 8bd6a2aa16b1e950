//! Private network namespaces and bpffs mounts for the agent's tests and the node simulator:
//! unique names per run, removed on drop (so also when a test panics) or by the caller's cleanup
//! registry. Nothing here touches the root namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::exec::{self, Error, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, e.g. `kovn-t1234-3`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn check(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A network namespace created with `ip netns add`, and two ways to act inside it: commands via
/// `ip netns exec` (what an operator or the agent's pod would see), and closures on a short-lived
/// thread that joined the namespace with `setns` (sockets, `/proc/sys/net` reads and writes). Every
/// command is bounded in time ([`exec`]).
///
/// It is deleted when dropped, or, when created with [`NetNs::create_guarded`], by the guard the
/// caller's own cleanup registry returned (the node simulator's signal handler removes what is
/// still registered on SIGINT/SIGTERM).
pub struct NetNs {
    name: String,
    /// `None`: this value deletes the namespace on drop; `Some`: the guard does.
    guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl NetNs {
    /// A namespace named [`unique`]`(prefix)` with its loopback up, deleted on drop.
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = Self::create(&unique(prefix))?;
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// The namespace `name`, as is (loopback down), deleted on drop.
    pub fn create(name: &str) -> Result<Self> {
        exec::checked(Command::new("ip").args(["netns", "add", name]), None)?;
        Ok(Self {
            name: name.to_owned(),
            guard: None,
        })
    }

    /// The namespace `name`, handed to `register` the moment it exists; the guard `register`
    /// returns deletes it when this value drops (or earlier, if the registry's owner decides so).
    pub fn create_guarded<G: Send + Sync + 'static>(
        name: &str,
        register: impl FnOnce(&str) -> G,
    ) -> Result<Self> {
        exec::checked(Command::new("ip").args(["netns", "add", name]), None)?;
        Ok(Self {
            name: name.to_owned(),
            guard: Some(Box::new(register(name))),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for [`join`].
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip netns exec <ns> <program>`, ready for arguments.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs a shell snippet (`sh -ec`) inside the namespace; fails with its stderr unless it
    /// exits 0. Returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run("sh", &["-ec", script])
    }

    /// Runs `program args…` in the namespace; fails with its stderr unless it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        exec::checked(self.command(program).args(args), None)
    }

    /// Like [`NetNs::run`], with `stdin` fed to the program (restore files, `ip -batch`).
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
        self.ip_batch_bounded(lines, exec::DEFAULT_TIMEOUT)
    }

    /// [`NetNs::ip_batch`] for batches too long for the default deadline (a benchmark's
    /// 100 000 ClusterIPs on `kube-ipvs0`); errors quote only the batch's first lines.
    pub fn ip_batch_bounded(&self, lines: &str, timeout: Duration) -> Result<()> {
        let output = exec::run_bounded(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(lines),
            timeout,
        )?;
        let head: Vec<&str> = lines.lines().take(5).collect();
        let what = format!(
            "ip -batch in {} ({} lines, starting {head:?})",
            self.name,
            lines.lines().count()
        );
        exec::success(what, &output).map(drop)
    }

    /// Writes `/proc/sys/<key>` (slash-separated, e.g. `net/ipv4/ip_forward`) in this namespace.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.enter(|| {
            for (key, value) in settings {
                let path = format!("/proc/sys/{key}");
                std::fs::write(&path, value).map_err(|source| Error::Io {
                    what: format!("writing {value} to {path}"),
                    source,
                })?;
            }
            Ok(())
        })?
    }

    /// Runs `f` on a new thread that has joined this namespace; sockets it creates belong to the
    /// namespace for their whole life, whichever thread uses them later. A panic in `f` goes on
    /// in the caller.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<T> {
                    join(&path)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.guard.is_none() {
            let _ = exec::run_bounded(
                Command::new("ip").args(["netns", "del", &self.name]),
                None,
                exec::DEFAULT_TIMEOUT,
            );
        }
    }
}

/// Moves the calling thread into the namespace bound at `path` (`/run/netns/<name>`).
pub fn join(path: &str) -> Result<()> {
    let file = File::open(path).map_err(|source| Error::Io {
        what: format!("opening {path}"),
        source,
    })?;
    // SAFETY: the fd is valid for the duration of the call; setns only affects this thread's
    // network namespace (CLONE_NEWNET is allowed in multi-threaded processes).
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Io {
            what: format!("setns({path})"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Connects two namespaces with a veth pair `(a_if in a) <-> (b_if in b)`.
/// Created from inside `a`, so no interface ever exists in the root namespace.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    a.sh(&format!(
        "ip link add name {a_if} type veth peer name {b_if} netns {} && ip link set {a_if} up",
        b.name
    ))?;
    b.sh(&format!("ip link set {b_if} up"))?;
    Ok(())
}

/// A bpffs mounted outside `/sys` (which `ip netns exec` replaces), so every command of a test
/// sees the same instance.
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    pub fn mount() -> Self {
        let path = PathBuf::from(format!("/run/{}", unique("kovn-bpffs-")));
        std::fs::create_dir_all(&path).expect("create bpffs mountpoint");
        check(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path));
        Self { path }
    }

    pub fn root(&self) -> PathBuf {
        self.path.join("kube-ovn")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The repository's example cluster (spec §5.1).
pub fn example_cluster() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/cluster.yaml")
}

/// A file path removed on drop.
pub struct TempPath(pub PathBuf);

impl TempPath {
    /// A unique path under the temp directory; `extension` without the dot.
    pub fn new(prefix: &str, extension: &str) -> Self {
        Self(std::env::temp_dir().join(format!("{}.{extension}", unique(prefix))))
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sends raw frames out of `ifname` of the current namespace; panics when one is not sent whole.
pub fn send_frames(frames: &[Vec<u8>], ifname: &str) {
    // SAFETY: plain socket syscalls on owned buffers; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).expect("name");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = u16::try_from(libc::AF_PACKET).expect("fits");
        addr.sll_ifindex = i32::try_from(libc::if_nametoindex(name.as_ptr())).expect("fits");
        addr.sll_halen = 6;
        for frame in frames {
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).expect("fits"),
            );
            assert_eq!(
                sent,
                isize::try_from(frame.len()).expect("fits"),
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}
