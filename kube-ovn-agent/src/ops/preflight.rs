//! `kube-ovn-agent preflight`: whether this node can run the agent, checked before install (as a
//! one-off pod or in the image) with the same privileges the `DaemonSet` gives it. It reads facts
//! only: nothing is loaded, attached or pinned.
//!
//! Checks: kernel ≥ 5.10; how the program will attach (tcx from 6.6, else clsact filters);
//! the capabilities the agent needs in its effective set (`BPF`, `NET_ADMIN`, `PERFMON`; and
//! `SYS_RESOURCE` below 5.11, where BPF memory is charged to `RLIMIT_MEMLOCK`); a bpffs under
//! the pin root (else pins die with the pod); the kernel's BTF (`bpftool` field names only).
//!
//! Through the API server it also reads Kube-OVN's kube-ovn-cni `DaemonSet` and compares the
//! `cni-server` container's flags that decide which packets Kube-OVN marks
//! (`--service-cluster-ip-range`, `--cluster-router`, `--enable-tproxy`) with ours, and its
//! image tag with the Kube-OVN versions this project is tested against.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::api::apps::v1::DaemonSet;
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

/// The Kube-OVN releases whose gateway code the harness runs (`cargo xtask kube-ovn test
/// --versions`, docs/kube-ovn-real.md): other versions get a warning, not a failure.
pub const TESTED_KUBE_OVN: &[&str] = &["v1.13.11", "v1.13.13", "v1.14.10", "v1.16.2"];

/// A `DaemonSet` by namespace and name (`--kube-ovn-cni`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What kube-ovn-cni's `DaemonSet` says about the flags that matter to us. A flag missing from
/// the args has kube-ovn-cni's own default ([`pkg/daemon/config.go`](https://github.com/kubeovn/kube-ovn/blob/v1.13.13/pkg/daemon/config.go#L97-L117)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeOvnCni {
    pub image: String,
    /// The image's tag (`v1.13.13` of `docker.io/kubeovn/kube-ovn:v1.13.13`), if it has one.
    pub version: Option<String>,
    pub service_cluster_ip_range: String,
    pub cluster_router: String,
    pub enable_tproxy: bool,
}

/// The settings `run` will get, to compare with Kube-OVN's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ours {
    pub service_cidrs: Vec<IpNet>,
    pub cluster_router: String,
    pub enable_tproxy: bool,
}

/// The tag of an image reference (`registry:5000/kubeovn/kube-ovn:v1.13.13@sha256:…` →
/// `v1.13.13`); `None` for a digest-only or untagged reference.
pub fn image_tag(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split_once(':')
        .map(|(_, tag)| tag)
        .filter(|t| !t.is_empty())
}

/// The value of Go `pflag` flag `name` in `args` (`--name=value` or `--name value`; the last
/// occurrence wins, as in pflag). `bool_flag`: a bare `--name` means `true`.
pub fn flag_value(args: &[String], name: &str, bool_flag: bool) -> Option<String> {
    let long = format!("--{name}");
    let mut found = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if let Some(value) = arg.strip_prefix(&long).and_then(|r| r.strip_prefix('=')) {
            found = Some(value.to_owned());
        } else if *arg == long {
            if bool_flag {
                found = Some("true".to_owned());
            } else if let Some(value) = args.get(i + 1) {
                found = Some(value.clone());
                i += 1;
            }
        }
        i += 1;
    }
    found
}

/// Reads kube-ovn-cni's settings from its `DaemonSet`: the container named `cni-server` (as in
/// Kube-OVN's chart and install.sh), else the only container; its command and args together,
/// since Kube-OVN's start script passes its args on to the daemon.
pub fn kube_ovn_cni(ds: &DaemonSet) -> Result<KubeOvnCni, String> {
    let containers = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let container = containers
        .iter()
        .find(|c| c.name == "cni-server")
        .or(match containers {
            [only] => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            format!(
                "no container named cni-server among {:?}",
                containers.iter().map(|c| &c.name).collect::<Vec<_>>()
            )
        })?;
    let args: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    let image = container.image.clone().unwrap_or_default();
    let enable_tproxy = match flag_value(&args, "enable-tproxy", true).as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("--enable-tproxy={other} is not a boolean")),
    };
    Ok(KubeOvnCni {
        version: image_tag(&image).map(str::to_owned),
        image,
        service_cluster_ip_range: flag_value(&args, "service-cluster-ip-range", false)
            .unwrap_or_else(|| "10.96.0.0/12".to_owned()),
        cluster_router: flag_value(&args, "cluster-router", false)
            .unwrap_or_else(|| "ovn-cluster".to_owned()),
        enable_tproxy,
    })
}

/// Whether `tag` is a tested release (`v1.13.13`, or a build of it such as `v1.13.13-x86`).
fn tested(tag: &str) -> bool {
    TESTED_KUBE_OVN.iter().any(|v| {
        tag.strip_prefix(v)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

/// Judges Kube-OVN's settings (or why they could not be read) against ours.
pub fn evaluate_kube_ovn(
    target: &DaemonSetRef,
    found: &Result<KubeOvnCni, String>,
    ours: &Ours,
) -> Vec<Check> {
    let cni = match found {
        Ok(cni) => cni,
        Err(error) => {
            return vec![Check {
                name: "kube-ovn",
                verdict: Verdict::Warn,
                detail: format!(
                    "cannot read DaemonSet {target} ({error}): Kube-OVN's flags not compared (--kube-ovn-cni NAMESPACE/NAME names another, `none` skips this)"
                ),
            }];
        }
    };
    let mut checks = vec![version_check(cni), service_cidr_check(cni, ours)];
    checks.push(same_as_kube_ovn(
        "cluster-router",
        cni.cluster_router == ours.cluster_router,
        format!("{}, as Kube-OVN's", ours.cluster_router),
        format!(
            "Kube-OVN has --cluster-router={}, ours is {}: the default VPC's subnets would be picked wrongly (set ours to Kube-OVN's)",
            cni.cluster_router, ours.cluster_router
        ),
    ));
    checks.push(same_as_kube_ovn(
        "tproxy",
        cni.enable_tproxy == ours.enable_tproxy,
        format!("--enable-tproxy={}, as Kube-OVN's", ours.enable_tproxy),
        format!(
            "Kube-OVN has --enable-tproxy={}, ours is {}: give the agent the same",
            cni.enable_tproxy, ours.enable_tproxy
        ),
    ));
    checks
}

/// A setting ours must share with Kube-OVN: `Ok` with `same`, else `Fail` with `differs`.
fn same_as_kube_ovn(name: &'static str, equal: bool, same: String, differs: String) -> Check {
    Check {
        name,
        verdict: if equal { Verdict::Ok } else { Verdict::Fail },
        detail: if equal { same } else { differs },
    }
}

/// Whether kube-ovn-cni's image is a tested Kube-OVN release.
fn version_check(cni: &KubeOvnCni) -> Check {
    match cni.version.as_deref() {
        Some(tag) if tested(tag) => Check {
            name: "kube-ovn",
            verdict: Verdict::Ok,
            detail: format!("{tag} ({}), a tested version", cni.image),
        },
        Some(tag) => Check {
            name: "kube-ovn",
            verdict: Verdict::Warn,
            detail: format!(
                "{tag} ({}) is not a tested version (tested: {})",
                cni.image,
                TESTED_KUBE_OVN.join(", ")
            ),
        },
        None => Check {
            name: "kube-ovn",
            verdict: Verdict::Warn,
            detail: format!(
                "image {:?} has no tag: the Kube-OVN version is unknown (tested: {})",
                cni.image,
                TESTED_KUBE_OVN.join(", ")
            ),
        },
    }
}

/// Kube-OVN's Service CIDRs against ours, in any order.
fn service_cidr_check(cni: &KubeOvnCni, ours: &Ours) -> Check {
    let theirs: Result<Vec<IpNet>, String> = cni
        .service_cluster_ip_range
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
        .collect();
    let ours_text = ours
        .service_cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    match theirs {
        Err(error) => Check {
            name: "service-cidr",
            verdict: Verdict::Warn,
            detail: format!(
                "Kube-OVN's --service-cluster-ip-range={} does not parse ({error})",
                cni.service_cluster_ip_range
            ),
        },
        Ok(mut theirs) => {
            let mut mine = ours.service_cidrs.clone();
            theirs.sort();
            mine.sort();
            if theirs == mine {
                Check {
                    name: "service-cidr",
                    verdict: Verdict::Ok,
                    detail: format!("{ours_text}, as Kube-OVN's"),
                }
            } else {
                Check {
                    name: "service-cidr",
                    verdict: Verdict::Fail,
                    detail: format!(
                        "Kube-OVN has --service-cluster-ip-range={}, ours is {ours_text}: R1b would mark other packets than Kube-OVN (set ours to Kube-OVN's)",
                        cni.service_cluster_ip_range
                    ),
                }
            }
        }
    }
}

/// How long reading the `DaemonSet` may take, connection included.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `target` through the API server (in-cluster configuration or the kubeconfig).
pub async fn read_kube_ovn_cni(target: &DaemonSetRef) -> Result<KubeOvnCni, String> {
    let read = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes API: {e}"))?;
        let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, &target.namespace);
        let ds = api.get(&target.name).await.map_err(|e| e.to_string())?;
        kube_ovn_cni(&ds)
    };
    tokio::time::timeout(API_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {API_TIMEOUT:?}")))
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

    /// kube-ovn-cni's `DaemonSet` as Kube-OVN's chart renders it (trimmed): `bash
    /// start-cniserver.sh` with the daemon's flags as args.
    fn kube_ovn_ds(image: &str, args: &[&str]) -> DaemonSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kube-ovn-cni", "namespace": "kube-system"},
            "spec": {
                "selector": {"matchLabels": {"app": "kube-ovn-cni"}},
                "template": {"spec": {
                    "initContainers": [{"name": "install-cni", "image": image}],
                    "containers": [
                        {"name": "cni-server", "image": image,
                         "command": ["bash", "/kube-ovn/start-cniserver.sh"], "args": args},
                        {"name": "sidecar", "image": "busybox"}
                    ]
                }}
            }
        }))
        .unwrap()
    }

    fn ours() -> Ours {
        Ours {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            cluster_router: "ovn-cluster".into(),
            enable_tproxy: false,
        }
    }

    const TARGET: fn() -> DaemonSetRef = || DaemonSetRef {
        namespace: "kube-system".into(),
        name: "kube-ovn-cni".into(),
    };

    #[test]
    fn image_tags_and_pflag_values_parse() {
        assert_eq!(
            image_tag("docker.io/kubeovn/kube-ovn:v1.13.13"),
            Some("v1.13.13")
        );
        assert_eq!(
            image_tag("reg:5000/kubeovn/kube-ovn:v1.14.10-x86@sha256:00"),
            Some("v1.14.10-x86")
        );
        assert_eq!(image_tag("reg:5000/kubeovn/kube-ovn"), None);
        assert_eq!(image_tag("kube-ovn@sha256:00"), None);
        let args: Vec<String> = [
            "--a=1",
            "--enable-tproxy",
            "--cluster-router",
            "vpc",
            "--a=2",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(flag_value(&args, "a", false).as_deref(), Some("2"));
        assert_eq!(
            flag_value(&args, "cluster-router", false).as_deref(),
            Some("vpc")
        );
        assert_eq!(
            flag_value(&args, "enable-tproxy", true).as_deref(),
            Some("true")
        );
        assert_eq!(
            flag_value(&args, "enable", true),
            None,
            "a prefix is not the flag"
        );
    }

    #[test]
    fn kube_ovn_cni_flags_come_from_the_cni_server_container_with_kube_ovns_defaults() {
        let ds = kube_ovn_ds(
            "docker.io/kubeovn/kube-ovn:v1.13.13",
            &[
                "--enable-mirror=false",
                "--service-cluster-ip-range=10.233.0.0/18,fd00:10:96::/112",
                "--enable-tproxy=true",
            ],
        );
        let cni = kube_ovn_cni(&ds).unwrap();
        assert_eq!(cni.version.as_deref(), Some("v1.13.13"));
        assert_eq!(
            cni.service_cluster_ip_range,
            "10.233.0.0/18,fd00:10:96::/112"
        );
        assert_eq!(cni.cluster_router, "ovn-cluster", "kube-ovn-cni's default");
        assert!(cni.enable_tproxy);
        let defaults = kube_ovn_cni(&kube_ovn_ds("kube-ovn:v1.16.2", &[])).unwrap();
        assert_eq!(defaults.service_cluster_ip_range, "10.96.0.0/12");
        assert!(!defaults.enable_tproxy);
        let bad = kube_ovn_ds("kube-ovn:v1.16.2", &["--enable-tproxy=yes"]);
        assert!(kube_ovn_cni(&bad).unwrap_err().contains("enable-tproxy"));
        let containers = |ds: &mut DaemonSet| {
            let spec = ds.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
            std::mem::take(&mut spec.containers)
        };
        let mut unnamed = kube_ovn_ds("kube-ovn:v1.16.2", &[]);
        let mut list = containers(&mut unnamed);
        list[0].name = "cni".into();
        let mut two = unnamed.clone();
        two.spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers = list.clone();
        assert!(kube_ovn_cni(&two).unwrap_err().contains("cni-server"));
        list.truncate(1);
        unnamed
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers = list;
        assert!(
            kube_ovn_cni(&unnamed).is_ok(),
            "a single container is the one"
        );
    }

    #[test]
    fn kube_ovn_checks_pass_on_equal_settings_and_name_each_mismatch() {
        let same = kube_ovn_cni(&kube_ovn_ds("kubeovn/kube-ovn:v1.14.10", &[])).unwrap();
        let checks = evaluate_kube_ovn(&TARGET(), &Ok(same.clone()), &ours());
        assert!(
            checks.iter().all(|c| c.verdict == Verdict::Ok),
            "{}",
            text(&checks)
        );
        assert_eq!(checks.len(), 4);

        let dual = Ours {
            service_cidrs: vec![
                "fd00:10:96::/112".parse().unwrap(),
                "10.233.0.0/18".parse().unwrap(),
            ],
            ..ours()
        };
        let theirs = KubeOvnCni {
            service_cluster_ip_range: "10.233.0.0/18,fd00:10:96::/112".into(),
            ..same.clone()
        };
        let checks = evaluate_kube_ovn(&TARGET(), &Ok(theirs.clone()), &dual);
        assert_eq!(
            verdict(&checks, "service-cidr").0,
            Verdict::Ok,
            "order does not matter"
        );
        let (v, detail) = verdict(
            &evaluate_kube_ovn(&TARGET(), &Ok(theirs), &ours()),
            "service-cidr",
        );
        assert_eq!(v, Verdict::Fail);
        assert!(
            detail.contains("10.233.0.0/18,fd00:10:96::/112") && detail.contains("10.96.0.0/12")
        );

        let other = KubeOvnCni {
            cluster_router: "vpc-main".into(),
            enable_tproxy: true,
            version: Some("v1.12.4".into()),
            ..same
        };
        let checks = evaluate_kube_ovn(&TARGET(), &Ok(other), &ours());
        let (v, detail) = verdict(&checks, "cluster-router");
        assert_eq!(v, Verdict::Fail);
        assert!(detail.contains("vpc-main"), "{detail}");
        assert_eq!(verdict(&checks, "tproxy").0, Verdict::Fail);
        let (v, detail) = verdict(&checks, "kube-ovn");
        assert_eq!(v, Verdict::Warn);
        assert!(
            detail.contains("v1.12.4") && detail.contains("v1.16.2"),
            "{detail}"
        );
        assert!(failed(&checks));

        let unreadable = evaluate_kube_ovn(&TARGET(), &Err("forbidden".into()), &ours());
        assert_eq!(unreadable.len(), 1);
        let (v, detail) = verdict(&unreadable, "kube-ovn");
        assert_eq!(v, Verdict::Warn);
        assert!(detail.contains("kube-system/kube-ovn-cni") && detail.contains("forbidden"));
        assert!(tested("v1.13.11") && tested("v1.16.2-x86") && !tested("v1.16.20"));
    }
}
