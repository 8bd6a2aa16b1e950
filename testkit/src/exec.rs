//! Running short commands with a deadline, for the agent handle, the namespaces and the node
//! simulator alike: a hung `ip`, `iptables` or agent CLI call must fail the test or the run, not
//! stall it.

use std::{
    io::Write as _,
    process::{Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{what}: not the JSON this kit reads: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Default deadline for one configuration command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `command` (stdout and stderr captured, `stdin` fed if given) and kills it if it has not
/// finished within `timeout`.
pub fn run_bounded(
    command: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let what = format!("{command:?}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().map_err(|source| Error::Spawn {
        what: what.clone(),
        source,
    })?;
    let pid = child.id();
    let input = stdin.map(str::to_owned);
    let mut child_stdin = child.stdin.take();
    let (tx, rx) = mpsc::channel();
    // Feeding stdin and collecting output both happen off this thread so a large input or output
    // cannot deadlock against the pipe buffers, and the deadline below still holds.
    std::thread::spawn(move || {
        if let (Some(input), Some(pipe)) = (input, child_stdin.as_mut()) {
            // A child that exits early closes the pipe; its status reports the real problem.
            let _ = pipe.write_all(input.as_bytes());
        }
        drop(child_stdin);
        let _ = tx.send(child.wait_with_output());
    });
    if let Ok(result) = rx.recv_timeout(timeout) {
        return result.map_err(|source| Error::Io { what, source });
    }
    let pid = i32::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet (its waiter
    // thread is still blocked), so the pid is still ours.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = rx.recv();
    Err(Error::Timeout { what, timeout })
}

/// Runs `command` within [`DEFAULT_TIMEOUT`]; fails with its stderr unless it exits 0. Returns
/// stdout.
pub fn checked(command: &mut Command, stdin: Option<&str>) -> Result<String> {
    let what = format!("{command:?}");
    let output = run_bounded(command, stdin, DEFAULT_TIMEOUT)?;
    success(what, &output)
}

/// `output`'s stdout if its status is success, else [`Error::Failed`] with its stderr.
pub fn success(what: String, output: &Output) -> Result<String> {
    if !output.status.success() {
        return Err(Error::Failed {
            what,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
