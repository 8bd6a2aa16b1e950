//! Running short commands with a deadline: a hung `iptables`, `ip` or agent CLI call must fail the
//! run, not stall it.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Default deadline for one configuration command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `command` (stdout and stderr captured, `stdin` fed if given) and kills it if it has not
/// finished within `timeout`.
pub fn run_bounded(
    command: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let shown = format!("{command:?}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    } else {
        command.stdin(Stdio::null());
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start {shown}"))?;
    let pid = child.id();
    let input = stdin.map(str::to_owned);
    let mut child_stdin = child.stdin.take();
    let (tx, rx) = mpsc::channel();
    // Feeding stdin and collecting output both happen off this thread so a large input or output
    // cannot deadlock against the pipe buffers, and the deadline below still holds.
    thread::spawn(move || {
        if let (Some(input), Some(pipe)) = (input, child_stdin.as_mut()) {
            // A child that exits early closes the pipe; its status reports the real problem.
            let _ = pipe.write_all(input.as_bytes());
        }
        drop(child_stdin);
        let _ = tx.send(child.wait_with_output());
    });
    if let Ok(result) = rx.recv_timeout(timeout) {
        return result.with_context(|| format!("waiting for {shown}"));
    }
    let pid = i32::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet (its waiter
    // thread is still blocked), so the pid is still ours.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = rx.recv();
    bail!("{shown} did not finish within {timeout:?}; killed")
}

/// Runs `command`; fails with its stderr unless it exits 0. Returns stdout.
pub fn checked(command: &mut Command, stdin: Option<&str>) -> Result<String> {
    let shown = format!("{command:?}");
    let out = run_bounded(command, stdin, DEFAULT_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
