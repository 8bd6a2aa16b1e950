//! Builds the eBPF object with aya-build (the pinned nightly + bpf-linker) and leaves it in `OUT_DIR`, where
//! `src/datapath/object.rs` embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("kube-ovn-ebpf");
    let root = root.to_str().context("non-UTF-8 path to the eBPF crate")?;
    // The pinned nightly (kube-ovn-ebpf/rust-toolchain.toml), unless KOVN_EBPF_TOOLCHAIN says
    // otherwise; `cargo xtask setup` installs it with rustup.
    let toolchain = match std::env::var("KOVN_EBPF_TOOLCHAIN") {
        Ok(toolchain) => toolchain,
        Err(_) => pinned_channel(&format!("{root}/rust-toolchain.toml"))?,
    };
    println!("cargo:rerun-if-env-changed=KOVN_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-changed={root}/rust-toolchain.toml");
    // Rebuilding the object at another optimisation level yields a program with the same
    // behaviour and a different tag: how the e2e suite exercises an in-place upgrade.
    println!("cargo:rerun-if-env-changed=KOVN_EBPF_OPT_LEVEL");
    if let Ok(level) = std::env::var("KOVN_EBPF_OPT_LEVEL") {
        // SAFETY: the build script is single-threaded at this point.
        unsafe { std::env::set_var("CARGO_PROFILE_RELEASE_OPT_LEVEL", level) };
    }
    aya_build::build_ebpf(
        [Package {
            name: "kube-ovn-ebpf",
            root_dir: root,
            ..Package::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// `channel = "…"` of a rust-toolchain.toml (no TOML parser needed for one key).
fn pinned_channel(path: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| {
            let value = line
                .trim()
                .strip_prefix("channel")?
                .trim()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("{path} has no `channel = \"…\"` line"))
}
