//! Host programs the suites run inside the guest (iproute2's `ip netns`, `tc`, iptables, ipset:
//! busybox has no namespace support and no netfilter tools), copied with the shared libraries
//! `ldd` names and the directories they load plugins from, at the same paths as on the host.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A file of the guest's root filesystem.
pub enum Member {
    /// Copied from this host file.
    File(PathBuf),
    /// A symbolic link with this target.
    Symlink(String),
    /// An empty directory (a path component the suites traverse, like `…/kube-ovn-agent/..`).
    Dir,
}

/// Guest path (relative to `/`) → member.
pub type Members = BTreeMap<String, Member>;

/// Adds `programs` and everything they load to `members`.
pub fn collect(members: &mut Members, programs: &[&str], plugin_dirs: &[&str]) -> Result<()> {
    let mut elves = Vec::new();
    for program in programs {
        let found = which(program)?;
        let real =
            fs::canonicalize(&found).with_context(|| format!("resolving {}", found.display()))?;
        let guest = guest_path(&found)?;
        let real_guest = guest_path(&real)?;
        // Multi-call binaries (xtables-nft-multi) dispatch on argv[0]: keep the name, link it.
        if real_guest != guest {
            members.insert(guest, Member::Symlink(real_guest.clone()));
        }
        members.insert(real_guest, Member::File(real.clone()));
        elves.push(real);
    }
    for dir in plugin_dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_file() {
                members.insert(guest_path(&path)?, Member::File(path.clone()));
                elves.push(path);
            }
        }
    }
    for elf in &elves {
        for library in libraries(elf)? {
            let real = fs::canonicalize(&library)
                .with_context(|| format!("resolving {}", library.display()))?;
            // The loader asks for the path `ldd` printed (e.g. /lib64/ld-linux-x86-64.so.2).
            members.insert(guest_path(&library)?, Member::File(real));
        }
    }
    Ok(())
}

/// Adds every file under `dir` at its own path.
pub fn tree(members: &mut Members, dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            tree(members, &path)?;
        } else {
            members.insert(guest_path(&path)?, Member::File(path));
        }
    }
    Ok(())
}

pub fn guest_path(path: &Path) -> Result<String> {
    let text = path.to_str().context("non-UTF-8 path")?;
    Ok(text.trim_start_matches('/').to_owned())
}

/// The guest's `PATH` order (see `/init`), so a program lands where the guest finds it first.
pub const SEARCH_PATH: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

fn which(program: &str) -> Result<PathBuf> {
    SEARCH_PATH
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} is not installed on the host"))
}

/// The shared libraries `ldd` resolves for `elf` (none for a static one).
fn libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("starting ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || out.stderr.is_empty() {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path == "not found" {
            bail!("{}: a library is missing: {line}", elf.display());
        }
        if path.starts_with('/') {
            found.push(PathBuf::from(path));
        }
    }
    Ok(found)
}
