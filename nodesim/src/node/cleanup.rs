//! Everything a run creates outside its own memory — network namespaces, bpffs mounts, run
//! directories, child processes — is registered here the moment it exists, and removed exactly
//! once: by its guard's `Drop` (normal exit, `?`, panic unwinding) or, on SIGINT/SIGTERM/SIGHUP,
//! by the signal thread, which removes whatever is still registered and exits. Each removal step
//! is bounded in time, so cleanup never hangs.
//!
//! A run killed with SIGKILL cannot clean up; [`remove_stale`] removes what a dead run left.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicI32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace and run directory this tool creates; the pid follows, so a later run
/// can tell which ones belong to a process that no longer exists.
pub const PREFIX: &str = "kovn-e2e-";

/// Where run directories (bpffs mount points, generated files) live: tmpfs, outside `/sys`
/// (`ip netns exec` remounts `/sys`, design §5) and visible to every `ip netns exec` child.
pub const RUN_ROOT: &str = "/run";

/// How long one cleanup step may take before it is abandoned (and reported).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Resource {
    /// A child process: SIGTERM, then SIGKILL if it has not exited in time.
    Process(i32),
    Netns(String),
    Mount(PathBuf),
    Dir(PathBuf),
}

static REGISTRY: Mutex<Vec<(u64, Resource)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Removes its resource when dropped (unless [`Guard::forget`] was called).
#[derive(Debug)]
pub struct Guard(u64);

impl Guard {
    /// The resource is gone already (e.g. a process that was waited for): just unregister it.
    pub fn forget(self) {
        take(self.0);
        std::mem::forget(self);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(resource) = take(self.0) {
            remove(&resource);
        }
    }
}

fn register(resource: Resource) -> Guard {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock().push((id, resource));
    Guard(id)
}

fn lock() -> std::sync::MutexGuard<'static, Vec<(u64, Resource)>> {
    // A panic while holding the lock cannot leave the list inconsistent (push/remove only).
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn take(id: u64) -> Option<Resource> {
    let mut registry = lock();
    let index = registry.iter().position(|(i, _)| *i == id)?;
    Some(registry.remove(index).1)
}

pub fn process(pid: u32) -> Guard {
    register(Resource::Process(
        i32::try_from(pid).expect("pid fits in pid_t"),
    ))
}

pub fn netns(name: &str) -> Guard {
    register(Resource::Netns(name.to_owned()))
}

pub fn mount(path: &Path) -> Guard {
    register(Resource::Mount(path.to_owned()))
}

pub fn dir(path: &Path) -> Guard {
    register(Resource::Dir(path.to_owned()))
}

fn remove(resource: &Resource) {
    let result = match resource {
        Resource::Process(pid) => stop_process(*pid),
        Resource::Netns(name) => bounded(Command::new("ip").args(["netns", "delete", name])),
        // Lazy unmount: a process that still has the mount open (it should not) cannot block us.
        Resource::Mount(path) => bounded(Command::new("umount").arg("-l").arg(path)),
        Resource::Dir(path) => fs::remove_dir_all(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("removing {}", path.display())),
    };
    if let Err(e) = result {
        eprintln!("cleanup: {resource:?}: {e:#}");
    }
}

/// SIGTERM, up to [`STEP_TIMEOUT`] for it to go, then SIGKILL.
fn stop_process(pid: i32) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions; the pid is one we spawned and have not
    // reaped (the owner unregisters before reaping), so it cannot have been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if !alive(pid) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    bail!("pid {pid} ignored SIGTERM for {STEP_TIMEOUT:?}; sent SIGKILL")
}

/// Whether `pid` still runs (a zombie counts as gone: it only waits to be reaped).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Runs a cleanup command, killing it after [`STEP_TIMEOUT`].
fn bounded(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let out = crate::node::exec::run_bounded(command.stdin(Stdio::null()), None, STEP_TIMEOUT)
        .with_context(|| shown.clone())?;
    if !out.status.success() {
        bail!("{shown}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Removes everything still registered, newest first (processes die before their namespaces).
pub fn remove_all() {
    loop {
        let Some((_, resource)) = lock().pop() else {
            return;
        };
        remove(&resource);
    }
}

/// Write end of the pipe the signal handler reports on (-1 before installation).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = u8::try_from(signal).unwrap_or(0);
    // SAFETY: write(2) is async-signal-safe; the buffer is a live local byte.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        )
    };
}

/// On SIGINT, SIGTERM or SIGHUP: removes everything registered and exits 128+signal.
///
/// The handler only writes the signal number to a pipe; a thread reads it and does the work.
/// Signals are not blocked (a blocked mask would be inherited by every child, e.g. the agent,
/// which then could not be stopped with SIGTERM), and exec resets handlers, so children start
/// with default signal behaviour.
pub fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
            0,
            "pipe2"
        );
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        let read_end = fds[0];
        thread::Builder::new()
            .name("cleanup-on-signal".into())
            .spawn(move || {
                let mut byte = 0u8;
                // SAFETY: reads one byte into a live local.
                if unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) } == 1 {
                    eprintln!(
                        "\nsignal {byte}: removing namespaces, mounts and processes of this run"
                    );
                    remove_all();
                    std::process::exit(128 + i32::from(byte));
                }
            })
            .expect("spawning the signal thread");
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: an all-zero sigaction is valid; the handler is an extern "C" fn that only
            // calls async-signal-safe functions.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&raw mut action.sa_mask);
                assert_eq!(
                    libc::sigaction(signal, &raw const action, std::ptr::null_mut()),
                    0
                );
            }
        }
    });
}

/// A process-unique name stem: `kovn-e2e-<pid>-<n>`.
pub fn unique_stem() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid embedded in a name made by [`unique_stem`].
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes namespaces, mounts and run directories left by runs that no longer exist (killed with
/// SIGKILL, or a crash in cleanup), and by an earlier process that had our pid.
pub fn remove_stale() -> Result<()> {
    let me = i32::try_from(std::process::id()).expect("pid fits in pid_t");
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| pid == me || !alive(pid));
    let listing = crate::node::exec::run_bounded(
        Command::new("ip").args(["netns", "list"]),
        None,
        STEP_TIMEOUT,
    )?;
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if stale(name) {
            eprintln!("cleanup: removing stale namespace {name}");
            remove(&Resource::Netns(name.to_owned()));
        }
    }
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let run_prefix = format!("{RUN_ROOT}/{PREFIX}");
    for mount_point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if let Some(rest) = mount_point.strip_prefix(&run_prefix)
            && stale(&format!("{PREFIX}{rest}"))
        {
            eprintln!("cleanup: unmounting stale {mount_point}");
            remove(&Resource::Mount(PathBuf::from(mount_point)));
        }
    }
    for entry in fs::read_dir(RUN_ROOT).context("listing /run")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if stale(&name) {
            eprintln!("cleanup: removing stale {}", entry.path().display());
            remove(&Resource::Dir(entry.path()));
        }
    }
    Ok(())
}
