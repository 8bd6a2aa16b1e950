//! `cargo xtask image`: the agent's OCI image, built here from Debian packages and our release
//! binary, without pulling from any container registry. A minimal Debian rootfs (mmdebstrap,
//! `essential` variant plus iptables, from the machine's own apt sources) and the agent are
//! committed with buildah from `scratch` as `localhost/kube-ovn-ebpf:VERSION`, exported as an OCI
//! archive under `target/image/`, and started with podman (`--network=none`) to prove the binary
//! runs in it (`--version`, `preflight`). amd64 only. deploy/Containerfile builds the same
//! contents for people with a registry; docs/install.md says which is canonical.
//!
//! The rootfs is cached under `target/image/`, keyed by the suite, the package list and
//! [`ROOTFS_LAYOUT`]: mmdebstrap takes about 2 min here, assembling the image about 20 s.
//! `cargo xtask test` runs [`ci_smoke`]: the same rootfs with the debug binary its test run has
//! just built, started the same way, then removed — the release build the shipped image needs is
//! not part of CI.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// Command → Debian package, installed when missing.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("buildah", "buildah"),
    ("podman", "podman"),
    // crun (podman's default) refuses hosts with cgroup v1 and v2 mounted side by side
    // ("cgroups in hybrid mode not supported"), which this machine has; runc runs there.
    ("runc", "runc"),
];

/// The Debian release of the runtime image; the machine's apt sources must serve it.
const SUITE: &str = "bookworm";

/// The packages on top of Debian's `essential` set: iptables ships both backends (nft and
/// legacy) and ip6tables, which the mark-clobber check, `verify` and `cleanup-iptables` drive.
/// kube-proxy's ipsets are read over netlink and TLS uses rustls' own roots, so nothing else.
const PACKAGES: &str = "iptables";

const NAME: &str = "localhost/kube-ovn-ebpf";

/// Bumped whenever [`build_rootfs`]'s options change, so a cached rootfs is rebuilt.
const ROOTFS_LAYOUT: u32 = 1;

/// The cached rootfs: built once per suite, package list and layout.
fn rootfs_path(dir: &Path) -> std::path::PathBuf {
    dir.join(format!(
        "rootfs-{SUITE}-{}-v{ROOTFS_LAYOUT}.tar",
        PACKAGES.replace(' ', "+")
    ))
}

/// The image CI assembles and starts ([`ci_smoke`]); removed afterwards.
const CI_TAG: &str = "localhost/kube-ovn-ebpf:ci";

/// `cargo xtask test`'s image check: the cached rootfs (built when missing) and the debug agent
/// the test run built, committed as [`CI_TAG`], started with `--version` and `preflight`, then
/// removed. Proves the binary runs on the image's Debian userland and that the runtime's default
/// profile leaves the `DaemonSet`'s capabilities in place.
pub fn ci_smoke() -> Result<()> {
    if !setup::is_root() {
        bail!("buildah and mmdebstrap need root here");
    }
    setup::ensure_apt_tools(TOOLS)?;
    cmd::cargo(&["build", "--locked", "--package", "kube-ovn-agent"])?;
    let target = cmd::target_dir();
    let dir = target.join("image");
    std::fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    let rootfs = ensure_rootfs(&dir)?;
    let revision = git(&["rev-parse", "HEAD"])?;
    let epoch = git(&["log", "-1", "--format=%ct"])?;
    commit(
        &rootfs,
        &target.join("debug/kube-ovn-agent"),
        CI_TAG,
        &revision,
        &epoch,
    )?;
    let result = prove_it_starts(CI_TAG, env!("CARGO_PKG_VERSION"));
    let _ = Command::new("podman").args(["rmi", CI_TAG]).output();
    let (agent, iptables) = result?;
    println!(
        "image check: {} and {} start in {CI_TAG} ({:.0} s)",
        agent.trim(),
        iptables.trim(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn git(args: &[&str]) -> Result<String> {
    Ok(cmd::output(
        Command::new("git")
            .current_dir(cmd::workspace_root())
            .args(args),
    )?
    .trim()
    .to_owned())
}

/// The cached rootfs, built (to a temporary name, then renamed) when missing.
fn ensure_rootfs(dir: &Path) -> Result<std::path::PathBuf> {
    let rootfs = rootfs_path(dir);
    if !rootfs.exists() {
        let partial = rootfs.with_extension(format!("partial-{}", std::process::id()));
        let epoch = git(&["log", "-1", "--format=%ct"])?;
        let built = build_rootfs(&partial, &epoch);
        if built.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        built?;
        std::fs::rename(&partial, &rootfs)?;
    }
    Ok(rootfs)
}

pub fn run() -> Result<()> {
    if std::env::consts::ARCH != "x86_64" {
        bail!("the image is built for amd64 only");
    }
    if !setup::is_root() {
        bail!("buildah and mmdebstrap need root here");
    }
    setup::ensure_apt_tools(TOOLS)?;
    setup::ensure_build_tools()?;
    cmd::cargo(&[
        "build",
        "--release",
        "--locked",
        "--package",
        "kube-ovn-agent",
    ])?;
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("{NAME}:{version}");
    let target = cmd::target_dir();
    let binary = target.join("release/kube-ovn-agent");
    let dir = target.join("image");
    std::fs::create_dir_all(&dir)?;

    let revision = git(&["rev-parse", "HEAD"])?;
    let epoch = git(&["log", "-1", "--format=%ct"])?;
    let rootfs = ensure_rootfs(&dir)?;

    commit(&rootfs, &binary, &tag, &revision, &epoch)?;

    let archive = dir.join(format!("kube-ovn-ebpf-{version}.oci.tar"));
    let _ = std::fs::remove_file(&archive);
    cmd::run(Command::new("buildah").args([
        "push",
        tag.as_str(),
        &format!("oci-archive:{}:{tag}", archive.display()),
    ]))?;
    let digest = cmd::output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        tag.as_str(),
    ]))?;
    let size = cmd::output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Size}}",
        tag.as_str(),
    ]))?;

    let (agent, iptables) = prove_it_starts(&tag, version)?;

    let archive_size = std::fs::metadata(&archive)?.len();
    println!("image      {tag}");
    println!("digest     {}", digest.trim());
    println!("size       {} bytes unpacked", size.trim());
    println!("archive    {} ({archive_size} bytes)", archive.display());
    println!("starts     {}", agent.trim());
    println!("iptables   {}", iptables.trim());
    Ok(())
}

/// The image from `scratch`: the rootfs, the agent as entrypoint, OCI labels; committed as
/// `tag` with the commit's time, so an unchanged tree gives the same config.
fn commit(rootfs: &Path, binary: &Path, tag: &str, revision: &str, epoch: &str) -> Result<()> {
    let container = Container::from_scratch()?;
    cmd::run(
        Command::new("buildah")
            .args(["add", container.0.as_str()])
            .arg(rootfs)
            .arg("/"),
    )?;
    cmd::run(
        Command::new("buildah")
            .args(["copy", "--chmod", "0755", container.0.as_str()])
            .arg(binary)
            .arg("/usr/local/bin/kube-ovn-agent"),
    )?;
    cmd::run(Command::new("buildah").args([
        "config",
        "--arch",
        "amd64",
        "--os",
        "linux",
        "--entrypoint",
        r#"["/usr/local/bin/kube-ovn-agent"]"#,
        "--cmd",
        "--help",
        "--label",
        &format!(
            "org.opencontainers.image.version={}",
            env!("CARGO_PKG_VERSION")
        ),
        "--label",
        &format!("org.opencontainers.image.revision={revision}"),
        "--label",
        "org.opencontainers.image.title=kube-ovn-ebpf",
        "--label",
        // The agent and its common crate: Apache-2.0; the embedded eBPF object: MIT or GPL-2.0.
        "org.opencontainers.image.licenses=Apache-2.0 AND (MIT OR GPL-2.0-only)",
        container.0.as_str(),
    ]))?;
    cmd::run(Command::new("buildah").args([
        "commit",
        "--format",
        "oci",
        "--timestamp",
        epoch,
        container.0.as_str(),
        tag,
    ]))?;
    Ok(())
}

/// Starts the image without network: the agent (`--version`, which must name `version`), the
/// iptables it drives, and `preflight` with the `DaemonSet`'s capabilities, which must find them
/// all (the runtime's default seccomp profile applies, as for the pod) and print every node
/// check; the bpffs verdict depends on the host and is shown, not required. Lower limits than
/// podman's defaults, which a sandboxed host may refuse to raise to.
fn prove_it_starts(tag: &str, version: &str) -> Result<(String, String)> {
    let run = |entrypoint: Option<&str>, args: &[&str]| -> Result<String> {
        let mut podman = Command::new("podman");
        podman.args([
            "--runtime",
            "runc",
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
        if let Some(e) = entrypoint {
            podman.args(["--entrypoint", e]);
        }
        if args.first() == Some(&"preflight") {
            podman.args([
                "--cap-drop",
                "ALL",
                "--cap-add",
                "BPF,NET_ADMIN,PERFMON,NET_RAW",
            ]);
            // preflight exits 1 when a check fails (the bpffs one, on a host without one at
            // /sys/fs/bpf): its output is what is judged.
            let out = podman
                .arg(tag)
                .args(args)
                .output()
                .context("running podman")?;
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        cmd::output(podman.arg(tag).args(args))
    };
    let agent = run(None, &["--version"])?;
    if !agent.contains(version) {
        bail!("the image's agent says {agent:?}, not version {version}");
    }
    let iptables = run(Some("/usr/sbin/iptables"), &["--version"])?;
    let preflight = run(None, &["preflight", "--json", "--kube-ovn-cni", "none"])?;
    let checks: serde_json::Value = serde_json::from_str(&preflight)
        .with_context(|| format!("preflight --json in the image printed {preflight:?}"))?;
    let verdict = |name: &str| {
        checks
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .map(|c| {
                (
                    c["verdict"].as_str().unwrap_or_default().to_owned(),
                    c["detail"].clone(),
                )
            })
    };
    for name in ["kernel", "attach", "capabilities", "bpffs", "btf"] {
        match verdict(name) {
            None => bail!("preflight in the image has no {name} check: {preflight}"),
            Some((v, detail)) if name == "capabilities" && v != "ok" => {
                bail!("preflight in the image, with the DaemonSet's capabilities: {v} {detail}")
            }
            Some((v, detail)) => println!("preflight  {v:<5} {name:<13} {detail}"),
        }
    }
    Ok((agent, iptables))
}

/// A minimal Debian rootfs as a tarball. `SOURCE_DATE_EPOCH` (the commit's time) makes file times
/// repeatable; package versions follow the apt sources of the day.
fn build_rootfs(out: &Path, epoch: &str) -> Result<()> {
    let sources = Path::new("/etc/apt/sources.list.d/debian.sources");
    let sources = if sources.exists() {
        sources
    } else {
        Path::new("/etc/apt/sources.list")
    };
    cmd::run(
        Command::new("mmdebstrap")
            .args([
                "--variant=essential",
                "--include",
                PACKAGES,
                // Documentation and translations are not needed to run; the packages'
                // copyright files are kept.
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/info/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
            ])
            .arg(out)
            .arg(sources)
            .env("SOURCE_DATE_EPOCH", epoch),
    )
    .context("mmdebstrap (the machine's apt sources must serve Debian bookworm)")
}

/// A buildah working container, removed however the build ends.
struct Container(String);

impl Container {
    fn from_scratch() -> Result<Self> {
        let name = format!("kovn-image-{}", std::process::id());
        cmd::run(Command::new("buildah").args(["from", "--name", &name, "scratch"]))?;
        Ok(Self(name))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rm", &self.0]).output();
    }
}
