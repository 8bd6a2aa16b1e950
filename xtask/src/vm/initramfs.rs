//! The guest's whole userland: a gzip-compressed `newc` cpio archive (the format the kernel
//! unpacks into its rootfs) holding static busybox, the kernel's modules, the test binaries, the
//! host tools they call and `/init`. Compressed, the archive and its unpacked copy fit together in
//! the guest's 512 MiB while the kernel unpacks it.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

use super::{
    binaries::TestBinary,
    kernel::Kernel,
    tools::{self, Member, Members},
};

/// What `/init` runs and with what budget.
pub struct Plan<'a> {
    pub kernel: &'a Kernel,
    pub busybox: &'a Path,
    pub tests: &'a [TestBinary],
    /// Seconds one test binary may take before `/init` kills it and records a failure.
    pub test_timeout_secs: u64,
    /// `KOVN_PROPTEST_CASES` for the datapath suite's property test.
    pub proptest_cases: u32,
    /// `KOVN_TEST_TIME_SCALE`: how much slower than the host the guest runs.
    pub time_scale: u32,
    /// Host programs, their libraries and data, at their host paths.
    pub extra: &'a Members,
}

pub fn write(path: &Path, plan: &Plan<'_>) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "lib",
        "lib/modules",
        "tests",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    cpio.char_device("dev/console", 5, 1);
    cpio.char_device("dev/null", 1, 3);
    cpio.file("bin/busybox", 0o755, &read(plan.busybox)?);
    cpio.symlink("bin/sh", "busybox");
    let mut modules = Vec::new();
    for module in &plan.kernel.modules {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &read(module)?);
        modules.push(name.to_owned());
    }
    for test in plan.tests {
        cpio.file(&format!("tests/{}", test.name), 0o755, &read(&test.path)?);
    }
    for (path, member) in plan.extra {
        match member {
            Member::File(from) => {
                let executable =
                    fs::metadata(from).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
                cpio.file(path, if executable { 0o755 } else { 0o644 }, &read(from)?);
            }
            Member::Symlink(target) => cpio.symlink(path, &format!("/{target}")),
            Member::Dir => cpio.dir(path),
        }
    }
    cpio.file("init", 0o755, init_script(plan, &modules).as_bytes());
    let mut gzip = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        .spawn()
        .context("starting gzip")?;
    let mut stdin = gzip.stdin.take().context("gzip stdin")?;
    stdin
        .write_all(&cpio.finish())
        .context("compressing the initramfs")?;
    drop(stdin);
    let status = gzip.wait()?;
    ensure!(status.success(), "gzip: {status}");
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `/init`: mounts, loads the modules in order, runs each test binary with a timeout, prints one
/// `KOVN-VM-TEST` line per binary and a final `KOVN-VM-RESULT` line, then resets the machine
/// (QEMU runs with `-no-reboot`, so the reset ends it).
fn init_script(plan: &Plan<'_>, modules: &[String]) -> String {
    let modules = modules.join(" ");
    let tests = plan
        .tests
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let timeout = plan.test_timeout_secs;
    let cases = plan.proptest_cases;
    let path = tools::SEARCH_PATH.join(":");
    let scale = plan.time_scale;
    format!(
        r#"#!/bin/sh
/bin/busybox --install -s /bin
# The host's iproute2, netfilter tools and shell (under /usr) before busybox's applets.
export PATH={path}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp stays on the rootfs (already in memory): a workspace under /tmp holds files the suites
# open by their build paths.
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
kernel=$(uname -r)
verdict=PASS
echo "KOVN-VM-BOOT kernel=$kernel uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in {modules}; do
    if insmod /lib/modules/$m; then
        echo "KOVN-VM-MODULE kernel=$kernel module=$m loaded"
    else
        echo "KOVN-VM-MODULE kernel=$kernel module=$m FAIL"
        verdict=FAIL
    fi
done
ip link set lo up
# Backtraces for panics, not for every error the agent reports (it runs without symbols).
export KOVN_REQUIRE_PRIVILEGED=1 KOVN_PROPTEST_CASES={cases} RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0
# Every agent a suite starts runs with only the DaemonSet's capabilities (plus SYS_RESOURCE
# below 5.11, as deploy/components/kernel-5.10 grants), through setpriv.
export KOVN_TEST_AGENT_CAPS=daemonset
# TCG runs the suites 5-10x slower than the host: suites multiply their deadlines by this.
export KOVN_TEST_TIME_SCALE={scale}
for t in {tests}; do
    echo "KOVN-VM-TEST-BEGIN kernel=$kernel test=$t uptime=$(cut -d' ' -f1 /proc/uptime)"
    timeout {timeout} /tests/$t --test-threads 1 --color never
    rc=$?
    if [ $rc -eq 0 ]; then r=PASS; else r=FAIL; verdict=FAIL; fi
    echo "KOVN-VM-TEST kernel=$kernel test=$t rc=$rc $r uptime=$(cut -d' ' -f1 /proc/uptime)"
done
echo "KOVN-VM-RESULT kernel=$kernel $verdict"
sync
reboot -f
"#
    )
}

/// A `newc` archive writer (see the kernel's Documentation/driver-api/early-userspace).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
    /// Directories written so far: the kernel's unpacker creates no missing parents.
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.parents(name);
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
        }
    }

    fn parents(&mut self, name: &str) {
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.parents(name);
        self.entry(name, S_IFREG | mode, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.parents(name);
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.parents(name);
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let size = u32::try_from(data.len()).expect("initramfs member under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short name");
        let fields = [
            self.inode, mode, 0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size, 0, // dev major
            0, // dev minor
            rdev.0, rdev.1, name_size, 0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
