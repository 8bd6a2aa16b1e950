//! Prerequisites, installed when missing: the pinned nightly (kube-ovn-ebpf/rust-toolchain.toml)
//! with `rust-src` and `clippy`, `bpf-linker` at the version that matches that nightly's LLVM, and the apt
//! packages the tests drive.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// bpf-linker 0.10.0 links with rustc's own LLVM; newer releases need a system LLVM 21+.
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// Command → Debian package providing it.
const APT_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("ipset", "ipset"),
    ("nft", "nftables"),
    // The chart test checks and unit-tests the alert rules with it.
    ("promtool", "prometheus"),
    // The Kube-OVN harness applies contrib/kube-ovn's patch series to the module source.
    ("patch", "patch"),
    // The reliability suite runs the agent under a capability set and descriptor limit.
    ("setpriv", "util-linux"),
    ("prlimit", "util-linux"),
];

/// The pin of the eBPF build's nightly; the agent's build script reads the same file.
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../kube-ovn-ebpf/rust-toolchain.toml");

/// The toolchain that builds the eBPF crate: `KOVN_EBPF_TOOLCHAIN`, else the dated nightly pinned
/// in `kube-ovn-ebpf/rust-toolchain.toml`.
pub fn ebpf_toolchain() -> String {
    std::env::var("KOVN_EBPF_TOOLCHAIN").unwrap_or_else(|_| pinned_ebpf_toolchain().to_owned())
}

fn pinned_ebpf_toolchain() -> &'static str {
    EBPF_TOOLCHAIN_FILE
        .lines()
        .find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("channel")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"'))
        })
        .expect("kube-ovn-ebpf/rust-toolchain.toml names a channel")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn ensure_all() -> Result<()> {
    ensure_build_tools()?;
    ensure_apt_tools(APT_TOOLS)
}

pub fn ensure_build_tools() -> Result<()> {
    let toolchain = ebpf_toolchain();
    let installed = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(&toolchain)) {
        eprintln!("setup: installing the {toolchain} toolchain for the eBPF build");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            &toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]))?;
    }
    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &toolchain,
    ]))?;
    // rust-src for -Z build-std=core; clippy for the eBPF crate's lint pass in `xtask test`.
    for component in ["rust-src", "clippy"] {
        if !components.lines().any(|c| c.starts_with(component)) {
            eprintln!("setup: adding {component} to {toolchain}");
            cmd::run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                &toolchain,
            ]))?;
        }
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    let have = linker
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} (found: {:?})",
            have.trim()
        );
        cmd::run(Command::new(env!("CARGO")).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}

fn have_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages providing any missing command of `tools`.
pub fn ensure_apt_tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !have_command(command))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}; install them (apt-get install {}) or run as root",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {missing:?} with apt-get");
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install")
}
