//! The pin root: one directory on a bpffs holding everything the agent creates, so the datapath
//! outlives the agent and `bpftool` can inspect it.
//!
//! ```text
//! <root>/maps/kovn_*            every map
//! <root>/programs/kovn_ingress  the attached program
//! <root>/links/<ifname>         tcx links (netlink filters live in the kernel's tc tables)
//! ```

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/kube-ovn";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "{path} is not on a bpffs; mount one there (`mount -t bpf bpf {path}`) or pass a --bpffs-root on one"
    )]
    NotBpffs { path: PathBuf },
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
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
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
    /// layout's directories.
    pub fn prepare(&self) -> Result<(), BpffsError> {
        let sysfs_bpf = Path::new("/sys/fs/bpf");
        if self.root.starts_with(sysfs_bpf) && !is_bpffs(sysfs_bpf) {
            mount_bpffs(sysfs_bpf)?;
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
        Ok(())
    }

    /// Removes the layout's pins and directories; entries we do not know are left alone.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>, BpffsError> {
        let mut removed = Vec::new();
        for dir in [self.links(), self.programs(), self.maps()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| BpffsError::Io {
                    op: "unpinning",
                    path: path.clone(),
                    source,
                })?;
                removed.push(path);
            }
            // Not empty means someone else's pin is in there: keep the directory.
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
        Ok(removed)
    }
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
