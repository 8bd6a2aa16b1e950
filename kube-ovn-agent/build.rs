//! Builds the eBPF object with aya-build (the pinned nightly + bpf-linker) and leaves it in `OUT_DIR`, where
//! `src/datapath/object.rs` embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    git_commit();
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
    // `KOVN_EBPF_SALT` (read by the program's source at compile time) yields a program with the
    // same behaviour and a different tag: how the e2e suite exercises an in-place upgrade.
    // (Another optimisation level did that until the program at `s` and `1` came to spill a
    // register the verifier calls uninitialised; only 2 and 3, which give one program, load.)
    println!("cargo:rerun-if-env-changed=KOVN_EBPF_SALT");
    aya_build::build_ebpf(
        [Package {
            name: "kube-ovn-ebpf",
            root_dir: root,
            ..Package::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// Sets `KOVN_GIT_COMMIT` for `--version`, `status` and `kovn_build_info`: the
/// `KOVN_GIT_COMMIT` environment variable when set (an image build from a source tree without
/// `.git` passes it as a build argument), else `git rev-parse` of the checkout, else `unknown`
/// (a source tarball). It names the commit checked out: uncommitted changes are not marked.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=KOVN_GIT_COMMIT");
    let commit = match std::env::var("KOVN_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_owned(),
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=KOVN_GIT_COMMIT={commit}");
}

fn from_git() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let output = std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Re-run when HEAD moves (a commit, checkout or reset writes both; worktrees included).
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(file) = git(&["rev-parse", "--path-format=absolute", "--git-path", path]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    Some(commit)
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
