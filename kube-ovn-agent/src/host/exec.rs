//! Running a node tool (`iptables-restore`, `kubectl`, …) with input, bounded in time.
//!
//! The input is written and both outputs are read on threads of their own: a tool that reads
//! its input only after taking a lock (`iptables-restore -w`), or that writes much before it has
//! read everything, can then neither stall the caller on a full pipe nor outlast the bound.

use std::{
    io::{self, Read, Write as _},
    process::{Child, Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// What a tool that ran to its end left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spawn(#[source] io::Error),
    /// Killed at the bound.
    #[error("no exit within {0:?}: killed")]
    Timeout(Duration),
}

/// Runs `command` with `stdin` (or none) and waits for it, killing it after `timeout` if given.
pub fn run(
    command: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Finished, RunError> {
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RunError::Spawn)?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_vec();
            // A tool that exits without reading everything closes the pipe: not an error of ours.
            Some(thread::spawn(move || drop(pipe.write_all(&input))))
        }
        _ => None,
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait(&mut child, timeout);
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(Finished {
        status: status?,
        stdout,
        stderr,
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        out
    })
}

fn wait(child: &mut Child, timeout: Option<Duration>) -> Result<ExitStatus, RunError> {
    let Some(timeout) = timeout else {
        return child.wait().map_err(RunError::Spawn);
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(RunError::Spawn)? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            // Killing the child closes its pipes, which ends the writer and the readers.
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Timeout(timeout));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_large_input_and_output_pass_through_without_stalling() {
        let input = vec![b'x'; 4 * MIB];
        let done = run(
            Command::new("cat").arg("-"),
            Some(&input),
            Some(Duration::from_secs(20)),
        )
        .unwrap();
        assert!(done.status.success());
        assert_eq!(done.stdout.len(), input.len());
    }

    #[test]
    fn the_bound_holds_while_the_tool_does_not_read_its_input() {
        // More than a pipe holds, to a tool that never reads: writing it first would block
        // before the deadline is ever checked.
        let input = vec![b'x'; 4 * MIB];
        let started = Instant::now();
        let outcome = run(
            Command::new("sleep").arg("30"),
            Some(&input),
            Some(Duration::from_millis(300)),
        );
        assert!(matches!(outcome, Err(RunError::Timeout(_))), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stderr_and_the_status_of_a_failure_are_kept() {
        let done = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(done.stderr, b"oops\n");
    }

    #[test]
    fn a_missing_tool_is_a_spawn_error() {
        let outcome = run(&mut Command::new("/nonexistent/kovn-tool"), None, None);
        assert!(matches!(outcome, Err(RunError::Spawn(_))), "{outcome:?}");
    }
}
