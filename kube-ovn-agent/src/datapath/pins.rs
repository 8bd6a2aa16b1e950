//! The pin root: one directory on a bpffs holding everything the agent creates, so the datapath
//! outlives the agent and `bpftool` can inspect it.
//!
//! ```text
//! <root>/maps/kovn_*            every map
//! <root>/programs/kovn_ingress  the attached program
//! <root>/links/<ifname>         tcx links (netlink filters live in the kernel's tc tables)
//! <root>/maps-next/kovn_*       during a map-layout migration: the new maps, until they take
//!                               the canonical names (bpffs refuses dots in names)
//! <root>/programs/kovn_ingress-next   the new program, for a moment, before it is renamed
//! <root>/programs/kovn_ingress-identity-<hex>   the same program again, naming the build and
//!                               configuration that loaded it (a restart reuses it: `reuse`)
//! ```

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use kube_ovn_ebpf_common::names;

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/kube-ovn";

/// Exit status of `run` and `detach` when another agent holds the pin root.
pub const EXIT_ROOT_IN_USE: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "{path} is not on a bpffs; mount one there (`mount -t bpf bpf {path}`) or pass a --bpffs-root on one"
    )]
    NotBpffs { path: PathBuf },
    /// Another process (an agent, or a `detach` in progress) holds the root's lock.
    #[error(
        "another agent{} holds the pin root {}: one agent per --bpffs-root, two would overwrite \
         each other's maps and mode",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        path.display()
    )]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error(
        "nothing of ours under {}: no attachment, no kovn_* pin (wrong --bpffs-root?)",
        path.display()
    )]
    NothingOurs { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The pin root's layout.
#[derive(Clone, Debug)]
pub struct PinRoot {
    pub root: PathBuf,
    /// Why pins here will not outlive this process, when they will not: `run` sets it from
    /// [`Self::prepare`] (a bpffs this agent mounted in a mount namespace of its own).
    pub not_persistent: Option<String>,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            not_persistent: None,
        }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    /// Where a map-layout migration builds the new maps.
    pub fn staging(&self) -> PathBuf {
        self.root.join("maps-next")
    }

    /// Where a migration pins the new program before renaming it over [`Self::program`].
    pub fn program_next(&self, name: &str) -> PathBuf {
        self.programs().join(format!("{name}-next"))
    }

    /// The frozen values of the pinned program (`object::FROZEN_MAP`), pinned next to it: the
    /// program's tag does not cover them.
    pub fn frozen(&self, name: &str) -> PathBuf {
        self.programs().join(format!("{name}-frozen"))
    }

    /// Where [`Self::frozen`] is pinned before it is renamed into place.
    pub fn frozen_next(&self, name: &str) -> PathBuf {
        self.programs().join(format!("{name}-frozen-next"))
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links().join(ifname)
    }

    /// Whether anything has been pinned here (a previous `run`).
    pub fn exists(&self) -> bool {
        self.maps().is_dir()
    }

    /// Makes sure the root is a directory on a bpffs, mounting bpffs at `/sys/fs/bpf` when the
    /// root lies under it and nothing is mounted there yet (as Cilium does), and creates the
    /// layout's directories. Returns why the pins will not outlive this process when the bpffs
    /// is one it mounted where nobody else sees it ([`mount_persistence`]); a bpffs someone else
    /// mounted (the host's, through the pod's hostPath) is theirs to keep.
    pub fn prepare(&self) -> Result<Option<String>, BpffsError> {
        let sysfs_bpf = Path::new("/sys/fs/bpf");
        let mut not_persistent = None;
        if self.root.starts_with(sysfs_bpf) && !is_bpffs(sysfs_bpf) {
            mount_bpffs(sysfs_bpf)?;
            not_persistent = mount_persistence(sysfs_bpf);
        }
        let nearest = self
            .root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(nearest) {
            return Err(BpffsError::NotBpffs {
                path: self.root.clone(),
            });
        }
        for dir in [self.maps(), self.programs(), self.links()] {
            std::fs::create_dir_all(&dir).map_err(|source| BpffsError::Io {
                op: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(not_persistent)
    }

    /// Takes the root's lock: an exclusive `flock` on the root directory itself, held until the
    /// returned guard is dropped (or the process dies). bpffs holds no regular files, but its
    /// directories take locks like any inode, and the lock is on the host's inode, so agents in
    /// different pods or mount namespaces see each other. Fails at once with
    /// [`BpffsError::InUse`] when another process holds it.
    pub fn lock(&self) -> Result<RootLock, BpffsError> {
        let io_error = |op| {
            move |source| BpffsError::Io {
                op,
                path: self.root.clone(),
                source,
            }
        };
        let dir = File::open(&self.root).map_err(io_error("opening"))?;
        let meta = dir.metadata().map_err(io_error("reading"))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(BpffsError::InUse {
                    path: self.root.clone(),
                    holder: lock_holder(meta.dev(), meta.ino()),
                });
            }
            return Err(io_error("locking")(error));
        }
        Ok(RootLock {
            _dir: dir,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Removes the layout's pins and directories: our maps (`kovn_*`), our program and the
    /// links under `links/` (every entry there is one of ours by layout). Anything else is left,
    /// and so is a directory that still holds it.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>, BpffsError> {
        let mut removed = Vec::new();
        let mut layout_found = false;
        let program_pins = [
            self.program(names::PROGRAM),
            self.program_next(names::PROGRAM),
            self.frozen(names::PROGRAM),
            self.frozen_next(names::PROGRAM),
        ];
        for dir in [self.links(), self.programs(), self.maps(), self.staging()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                let ours = dir == self.links()
                    || (dir == self.programs()
                        && (program_pins.contains(&path)
                            || name.to_string_lossy().starts_with(super::reuse::PREFIX)))
                    || ((dir == self.maps() || dir == self.staging())
                        && names::ALL_MAPS
                            .iter()
                            .any(|m| name.as_bytes() == m.as_bytes()));
                if !ours {
                    continue;
                }
                std::fs::remove_file(&path).map_err(|source| BpffsError::Io {
                    op: "unpinning",
                    path: path.clone(),
                    source,
                })?;
                removed.push(path);
            }
            // Not empty means someone else's pin is in there: keep the directory.
            layout_found |= std::fs::remove_dir(&dir).is_ok();
        }
        // A directory without our layout is not ours to remove (a mistyped --bpffs-root).
        if layout_found || !removed.is_empty() {
            let _ = std::fs::remove_dir(&self.root);
        }
        Ok(removed)
    }
}

/// The pin root's lock, held while this value lives.
#[derive(Debug)]
pub struct RootLock {
    _dir: File,
    dev: u64,
    ino: u64,
}

impl RootLock {
    /// Whether `pins` still names the directory this lock is on and our program and maps are
    /// pinned there. False once `detach --force` (or anyone) removed them behind our back.
    pub fn intact(&self, pins: &PinRoot) -> bool {
        let same_root =
            std::fs::metadata(&pins.root).is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino));
        same_root
            && pins.program(names::PROGRAM).exists()
            && names::ALL_MAPS.iter().all(|m| pins.maps().join(m).exists())
    }
}

/// The pid holding a `flock` on inode `ino` of device `dev`, from `/proc/locks` (as seen from
/// our pid namespace; `None` when the holder lives in another one or the table is unreadable).
fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    let wanted = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    holder_in(&table, &wanted)
}

/// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 12674 00:28:16590 0 EOF`;
/// waiters (`1: -> FLOCK …`) are skipped.
fn holder_in(table: &str, wanted: &str) -> Option<u32> {
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed, properly sized struct; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        // f_type is i64 with glibc and u64 with musl: compare the bits.
        libc::statfs(c_path.as_ptr(), &raw mut stat) == 0
            && u64::from_ne_bytes(stat.f_type.to_ne_bytes()) == BPF_FS_MAGIC
    }
}

/// Whether a mount this process just made at `target` is seen beyond its mount namespace: `None`
/// when it is (its peer group propagates it: `shared:N` in `/proc/self/mountinfo`; or this is
/// PID 1's mount namespace, which lives as long as the system), else why not. A bpffs mounted in
/// a namespace of our own (a container's private view of `/sys/fs/bpf`, `unshare -m`, `ip
/// netns exec`) is torn down with that namespace, and every pin with it: tcx links are then
/// released (detached), netlink filters keep running their program on the maps as they are.
fn mount_persistence(target: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mount_is_shared(&mountinfo, target) {
        return None;
    }
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let (ours, init) = (ns("self"), ns("1"));
    if ours.is_some() && ours == init {
        return None;
    }
    Some(format!(
        "the bpffs this agent mounted at {} is private to its mount namespace ({}, not PID 1's{}, \
         and not shared): the pins go when that namespace's last process exits",
        target.display(),
        ours.map_or_else(|| "unknown".into(), |p| p.display().to_string()),
        init.map_or_else(
            || ", which cannot be read".into(),
            |p| format!(" {}", p.display())
        ),
    ))
}

/// Whether the last mount at `target` in a `/proc/self/mountinfo` table has a `shared:N`
/// optional field (it propagates to its peer group).
fn mount_is_shared(mountinfo: &str, target: &Path) -> bool {
    let target = target.as_os_str().as_bytes();
    mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // id parent major:minor root mount-point options [optional…] - type source super
            let point = fields.get(4)?;
            let end = fields.iter().position(|f| *f == "-")?;
            (point.as_bytes() == target).then(|| fields[6.min(end)..end].to_vec())
        })
        .is_some_and(|optional| optional.iter().any(|f| f.starts_with("shared:")))
}

fn mount_bpffs(target: &Path) -> Result<(), BpffsError> {
    let io_error = |source| BpffsError::Io {
        op: "mounting bpffs on",
        path: target.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(target).map_err(io_error)?;
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io_error(io::Error::last_os_error()));
    }
    tracing::info!(path = %target.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_shared_when_its_last_entry_has_a_peer_group() {
        let table = "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                     30 22 0:26 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw\n\
                     41 30 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw\n\
                     42 22 0:41 / /run/x rw master:3 - tmpfs tmpfs rw\n";
        let bpf = Path::new("/sys/fs/bpf");
        assert!(
            !mount_is_shared(table, bpf),
            "the mount stacked on top is private"
        );
        assert!(mount_is_shared(&table[..table.find("41 30").unwrap()], bpf));
        assert!(
            !mount_is_shared(table, Path::new("/run/x")),
            "a slave receives, it does not propagate"
        );
        assert!(!mount_is_shared(table, Path::new("/nowhere")));
    }

    #[test]
    fn the_lock_holder_is_read_from_proc_locks() {
        let table = "1: FLOCK  ADVISORY  WRITE 12674 00:28:16590 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 999 00:28:16590 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 6600 fe:00:5308615 0 EOF\n";
        assert_eq!(holder_in(table, "00:28:16590"), Some(12674));
        assert_eq!(
            holder_in(table, "fe:00:5308615"),
            None,
            "POSIX locks are not ours"
        );
        assert_eq!(holder_in(table, "00:28:1"), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("kovn-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pins = PinRoot::new(&dir);
        let held = pins.lock().expect("first lock");
        match pins.lock() {
            Err(BpffsError::InUse { holder, .. }) => {
                assert_eq!(
                    holder,
                    Some(std::process::id()),
                    "flock locks are per open file"
                );
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(held);
        drop(pins.lock().expect("free again once dropped"));
        std::fs::remove_dir(&dir).unwrap();
    }
}
