//! `kube-ovn-agent preflight`: whether this node can run the agent, checked before install (as a
//! one-off pod or in the image) with the same privileges the `DaemonSet` gives it. It reads facts
//! only: nothing is loaded, attached or pinned.
//!
//! Checks: kernel ≥ 5.10; how the program will attach (tcx from 6.6, else clsact filters);
//! the capabilities the agent needs in its effective set (`BPF`, `NET_ADMIN`, `PERFMON`; and
//! `SYS_RESOURCE` below 5.11, where BPF memory is charged to `RLIMIT_MEMLOCK`); a bpffs under
//! the pin root (else pins die with the pod); the kernel's BTF (`bpftool` field names only).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, with a limitation worth knowing.
    Warn,
    /// The agent cannot work (or cannot keep its state) here.
    Fail,
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

/// The node facts the checks decide from (read by [`Facts::read`], or made up in tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// The effective capability set (`CapEff` of `/proc/self/status`).
    pub cap_eff: u64,
    /// The pin root, and whether the filesystem holding it (or its nearest existing ancestor)
    /// is a bpffs.
    pub bpffs_root: PathBuf,
    pub bpffs: bool,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub vmlinux_btf: bool,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// `BPF_FS_MAGIC` of `statfs(2)`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

impl Facts {
    /// Reads this process's view of the node.
    pub fn read(bpffs_root: &Path) -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
        let cap_eff = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| u64::from_str_radix(l.strip_prefix("CapEff:")?.trim(), 16).ok())
            })
            .unwrap_or(0);
        Self {
            kernel,
            cap_eff,
            bpffs_root: bpffs_root.to_owned(),
            bpffs: on_bpffs(bpffs_root),
            vmlinux_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        }
    }
}

/// Whether `path`, or its nearest existing ancestor, is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c_path) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is NUL-terminated and `buf` is a valid statfs buffer.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut buf) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast, clippy::cast_lossless)]
    let magic = buf.f_type as i64;
    magic == BPF_FS_MAGIC
}

/// `major.minor` of a kernel release (`6.1.0-18-amd64` → (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

fn has(cap_eff: u64, cap: u32) -> bool {
    cap_eff & (1 << cap) != 0
}

/// Decides every check from `facts`.
pub fn evaluate(facts: &Facts) -> Vec<Check> {
    let mut checks = Vec::new();
    let version = kernel_version(&facts.kernel);
    checks.push(match version {
        Some(v) if v >= (5, 10) => Check {
            name: "kernel",
            verdict: Verdict::Ok,
            detail: format!("{} (≥ 5.10)", facts.kernel),
        },
        Some(_) => Check {
            name: "kernel",
            verdict: Verdict::Fail,
            detail: format!(
                "{} is older than 5.10, the oldest kernel tested",
                facts.kernel
            ),
        },
        None => Check {
            name: "kernel",
            verdict: Verdict::Fail,
            detail: format!("cannot read the kernel version from {:?}", facts.kernel),
        },
    });
    if let Some(v) = version {
        checks.push(Check {
            name: "attach",
            verdict: Verdict::Ok,
            detail: if v >= (6, 6) {
                "tcx links (kernel ≥ 6.6), pinned".to_owned()
            } else {
                "netlink clsact filters (tcx needs kernel 6.6)".to_owned()
            },
        });
    }
    // CAP_SYS_ADMIN still grants what CAP_BPF and CAP_PERFMON split off from it (the
    // cap-sys-admin profile), never NET_ADMIN's attach rights.
    let sys_admin = has(facts.cap_eff, CAP_SYS_ADMIN);
    let mut missing: Vec<&str> = [
        (CAP_BPF, "BPF", true),
        (CAP_NET_ADMIN, "NET_ADMIN", false),
        (CAP_PERFMON, "PERFMON", true),
    ]
    .into_iter()
    .filter(|(cap, _, admin_covers)| !(has(facts.cap_eff, *cap) || sys_admin && *admin_covers))
    .map(|(_, name, _)| name)
    .collect();
    if version.is_some_and(|v| v < (5, 11)) && !has(facts.cap_eff, CAP_SYS_RESOURCE) {
        missing.push("SYS_RESOURCE (kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK)");
    }
    checks.push(if missing.is_empty() {
        Check {
            name: "capabilities",
            verdict: Verdict::Ok,
            detail: format!(
                "effective set {:#x} has what the agent needs",
                facts.cap_eff
            ),
        }
    } else {
        Check {
            name: "capabilities",
            verdict: Verdict::Fail,
            detail: format!(
                "missing CAP_{} (effective set {:#x}; the DaemonSet adds them, a seccomp or \
                 runtime profile may still take them away)",
                missing.join(", CAP_"),
                facts.cap_eff
            ),
        }
    });
    checks.push(if facts.bpffs {
        Check {
            name: "bpffs",
            verdict: Verdict::Ok,
            detail: format!("{} is on a bpffs", facts.bpffs_root.display()),
        }
    } else {
        Check {
            name: "bpffs",
            verdict: Verdict::Fail,
            detail: format!(
                "{} is not on a bpffs: pins would not outlive the agent (mount the host's \
                 /sys/fs/bpf, as the DaemonSet does)",
                facts.bpffs_root.display()
            ),
        }
    });
    checks.push(if facts.vmlinux_btf {
        Check {
            name: "btf",
            verdict: Verdict::Ok,
            detail: "/sys/kernel/btf/vmlinux present".to_owned(),
        }
    } else {
        Check {
            name: "btf",
            verdict: Verdict::Warn,
            detail: "no /sys/kernel/btf/vmlinux: the datapath works (its maps carry their own \
                     BTF), but bpftool cannot show kernel types"
                .to_owned(),
        }
    });
    checks
}

/// The text `preflight` prints: one line per check.
pub fn text(checks: &[Check]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for check in checks {
        let verdict = match check.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(out, "{verdict:<5} {:<13} {}", check.name, check.detail);
    }
    out
}

/// Whether any check failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.verdict == Verdict::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMONSET_CAPS: u64 =
        (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON) | (1 << 13);

    fn facts(kernel: &str, cap_eff: u64) -> Facts {
        Facts {
            kernel: kernel.to_owned(),
            cap_eff,
            bpffs_root: "/sys/fs/bpf/kube-ovn".into(),
            bpffs: true,
            vmlinux_btf: true,
        }
    }

    fn verdict(checks: &[Check], name: &str) -> (Verdict, String) {
        let check = checks.iter().find(|c| c.name == name).expect(name);
        (check.verdict, check.detail.clone())
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(kernel_version("6.18.0+"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-1057-azure"), Some((5, 15)));
        assert_eq!(kernel_version("6.6rc1"), Some((6, 6)));
        assert_eq!(kernel_version("unknown"), None);
    }

    #[test]
    fn the_daemonsets_privileges_pass_on_a_supported_kernel() {
        let checks = evaluate(&facts("6.6.0", DAEMONSET_CAPS));
        assert!(!failed(&checks), "{}", text(&checks));
        assert!(verdict(&checks, "attach").1.starts_with("tcx"));
        let older = evaluate(&facts("6.1.0", DAEMONSET_CAPS));
        assert!(verdict(&older, "attach").1.starts_with("netlink"));
    }

    #[test]
    fn each_missing_fact_fails_or_warns_with_a_reason() {
        let old = evaluate(&facts("5.4.0", DAEMONSET_CAPS));
        assert_eq!(verdict(&old, "kernel").0, Verdict::Fail);
        let no_bpf = evaluate(&facts("6.6.0", DAEMONSET_CAPS & !(1 << CAP_BPF)));
        let (v, detail) = verdict(&no_bpf, "capabilities");
        assert_eq!(v, Verdict::Fail);
        assert!(detail.contains("CAP_BPF"), "{detail}");
        // CAP_SYS_ADMIN stands in for BPF and PERFMON, not for NET_ADMIN.
        let admin = evaluate(&facts("6.6.0", (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)));
        assert_eq!(verdict(&admin, "capabilities").0, Verdict::Ok);
        let (v, detail) = verdict(
            &evaluate(&facts("6.6.0", 1 << CAP_SYS_ADMIN)),
            "capabilities",
        );
        assert_eq!(v, Verdict::Fail);
        assert!(detail.contains("CAP_NET_ADMIN"), "{detail}");
        // 5.10 also needs SYS_RESOURCE (the kernel-5.10 component).
        let (v, detail) = verdict(&evaluate(&facts("5.10.0", DAEMONSET_CAPS)), "capabilities");
        assert_eq!(v, Verdict::Fail);
        assert!(detail.contains("SYS_RESOURCE"), "{detail}");
        let with = DAEMONSET_CAPS | (1 << CAP_SYS_RESOURCE);
        assert!(!failed(&evaluate(&facts("5.10.0", with))));
        let mut without_bpffs = facts("6.6.0", DAEMONSET_CAPS);
        without_bpffs.bpffs = false;
        assert_eq!(verdict(&evaluate(&without_bpffs), "bpffs").0, Verdict::Fail);
        let mut without_btf = facts("6.6.0", DAEMONSET_CAPS);
        without_btf.vmlinux_btf = false;
        let checks = evaluate(&without_btf);
        assert_eq!(verdict(&checks, "btf").0, Verdict::Warn);
        assert!(!failed(&checks), "a warning is not a failure");
    }

    #[test]
    fn the_bpffs_check_reads_the_filesystem() {
        // /proc is never a bpffs; a path below a missing directory is judged by its ancestor.
        assert!(!on_bpffs(Path::new("/proc/self")));
        assert!(!on_bpffs(Path::new("/proc/no/such/dir")));
    }
}
