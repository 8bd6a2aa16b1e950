//! Running the suites: in a QEMU guest (TCG, no network, serial console to a file) or directly
//! on the host kernel, and reading the result lines back from the log.

use std::{
    fs::{self, File},
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{binaries::TestBinary, kernel::Kernel};

/// How a run ended, as far as the host can tell.
pub struct Run {
    pub elapsed: Duration,
    pub timed_out: bool,
    /// The process's exit code (QEMU's says nothing about the guest).
    pub code: Option<i32>,
}

/// Boots `kernel` with `initramfs` and waits for the guest to reset itself, or `timeout`.
pub fn qemu(kernel: &Kernel, initramfs: &Path, log: &Path, timeout: Duration) -> Result<Run> {
    let _ = fs::remove_file(log);
    let mut command = Command::new("qemu-system-x86_64");
    command
        // `/dev/kvm` exists on these machines but KVM guests hang: software emulation only.
        .args(["-accel", "tcg", "-m", "512", "-smp", "1"])
        // Without CMPXCHG16B: with it, 6.12 guests under this QEMU (7.2, TCG) corrupt their SLUB
        // freelists at random (double faults in kmem_cache_alloc, some before /init runs; 17 of
        // 21 boots crashed, 0 of 13 without). The kernel falls back to a lock; nothing the
        // suites test depends on the instruction.
        .args(["-cpu", "qemu64,-cx16"])
        .args(["-nodefaults", "-no-user-config", "-nic", "none"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        // The guest's `reboot -f` (or a panic, with panic=-1) ends QEMU instead of rebooting.
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null());
    eprintln!("+ {command:?}");
    let child = command.spawn().context("starting qemu-system-x86_64")?;
    wait(child, timeout)
}

/// Runs the binaries on the host kernel, writing to `log` what a guest's `/init` would print.
pub fn host(
    tests: &[TestBinary],
    proptest_cases: u32,
    log: &Path,
    timeout: Duration,
) -> Result<Run> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the host kernel release")?;
    let release = release.trim();
    let mut out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut verdict = "PASS";
    let mut timed_out = false;
    for test in tests {
        let name = &test.name;
        writeln!(out, "KOVN-VM-TEST-BEGIN kernel={release} test={name}")?;
        let child = Command::new(&test.path)
            .args(["--test-threads", "1", "--color", "never"])
            .env("KOVN_REQUIRE_PRIVILEGED", "1")
            .env("KOVN_PROPTEST_CASES", proptest_cases.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .spawn()
            .with_context(|| format!("starting {}", test.path.display()))?;
        let run = wait(child, timeout)?;
        timed_out |= run.timed_out;
        let rc = run
            .code
            .map_or_else(|| "killed".to_owned(), |c| c.to_string());
        let result = if run.code == Some(0) {
            "PASS"
        } else {
            verdict = "FAIL";
            "FAIL"
        };
        writeln!(
            out,
            "KOVN-VM-TEST kernel={release} test={name} rc={rc} {result}"
        )?;
    }
    writeln!(out, "KOVN-VM-RESULT kernel={release} {verdict}")?;
    Ok(Run {
        elapsed: started.elapsed(),
        timed_out,
        code: None,
    })
}

/// Waits for `child` up to `timeout`, then kills it.
fn wait(mut child: Child, timeout: Duration) -> Result<Run> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Run {
                elapsed: started.elapsed(),
                timed_out: false,
                code: status.code(),
            });
        }
        if started.elapsed() > timeout {
            // Our own child, by its pid: nothing else is signalled.
            child.kill().context("killing a run past its timeout")?;
            child.wait()?;
            return Ok(Run {
                elapsed: started.elapsed(),
                timed_out: true,
                code: None,
            });
        }
        thread::sleep(Duration::from_millis(200));
    }
}
