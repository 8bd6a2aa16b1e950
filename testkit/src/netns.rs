//! Private network namespaces and bpffs mounts for tests: unique names per run, removed on drop
//! (so also when a test panics). Nothing here touches the root namespace.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

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

/// A network namespace created with `ip netns add`.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs a shell snippet inside the namespace; panics with its stderr on failure.
    pub fn sh(&self, script: &str) -> String {
        let output = check(self.command("sh").args(["-ec", script]));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    // SAFETY: a valid namespace fd; only this thread switches.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Connects two namespaces with a veth pair `(a_if in a) <-> (b_if in b)`.
/// Created from inside `a`, so no interface ever exists in the root namespace.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.sh(&format!(
        "ip link add name {a_if} type veth peer name {b_if} netns {} && ip link set {a_if} up",
        b.name
    ));
    b.sh(&format!("ip link set {b_if} up"));
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
