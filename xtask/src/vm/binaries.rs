//! The privileged test binaries, built for `x86_64-unknown-linux-musl`: statically linked, they
//! run in a busybox initramfs with no libc, loader or library path to provide, and the same
//! binary runs on every guest kernel and on the host.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::cmd;

pub const TARGET: &str = "x86_64-unknown-linux-musl";
pub const PACKAGE: &str = "kube-ovn-agent";

/// Every privileged test binary the matrix runs, in run order: the verifier statistics first
/// (short, and the counts are printed even if a later suite hangs), then the
/// `BPF_PROG_TEST_RUN` suite, then the attach test in a private network namespace, then a fresh
/// start, a restart and the read-only commands under exactly the `DaemonSet`'s capabilities.
/// Adding a suite to the matrix is one line here; a name the package does not (yet) have is
/// reported, not run.
pub const PRIVILEGED_TESTS: &[&str] = &["verifier", "datapath", "netns", "least_privilege"];

pub struct TestBinary {
    pub name: String,
    /// Debug info stripped (the datapath suite is ~50 MB with it), symbols kept for
    /// backtraces: the guest has 512 MiB.
    pub path: PathBuf,
}

pub struct Built {
    pub tests: Vec<TestBinary>,
    /// The package's own programs (the agent), which suites run by the absolute path cargo
    /// compiled into them (`CARGO_BIN_EXE_…`): (that path, stripped copy).
    pub programs: Vec<(PathBuf, PathBuf)>,
    /// Names in [`PRIVILEGED_TESTS`] the package does not have (yet).
    pub missing: Vec<String>,
}

/// Builds the privileged test binaries for the musl target and leaves stripped copies in
/// `out_dir`.
pub fn build(out_dir: &Path) -> Result<Built> {
    ensure_target()?;
    let available = test_targets()?;
    let (present, missing): (Vec<&str>, Vec<&str>) = PRIVILEGED_TESTS
        .iter()
        .partition(|name| available.iter().any(|a| a == *name));
    let mut args = vec![
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--target",
        TARGET,
        "--package",
        PACKAGE,
    ];
    for name in &present {
        args.extend(["--test", name]);
    }
    let mut command = Command::new(env!("CARGO"));
    command.args(&args).current_dir(cmd::workspace_root());
    // C code in dependencies (ring, for the API client's TLS) must be compiled against musl's
    // headers; cc-rs looks for `x86_64-linux-musl-gcc`, Debian's musl-tools names it `musl-gcc`.
    let cc = "CC_x86_64_unknown_linux_musl";
    if std::env::var_os(cc).is_none() {
        command.env(cc, "musl-gcc");
    }
    let messages = cmd::output(&mut command)?;
    fs::create_dir_all(out_dir)?;
    let mut binaries = Vec::new();
    for name in &present {
        let built = executable(&messages, name, "test")
            .with_context(|| format!("cargo reported no executable for test {name}"))?;
        let path = out_dir.join(name);
        strip(&built, &path, "--strip-debug")?;
        binaries.push(TestBinary {
            name: (*name).to_owned(),
            path,
        });
    }
    let mut programs = Vec::new();
    for built in executables(&messages, "bin") {
        let name = built.file_name().context("executable without a name")?;
        let path = out_dir.join("programs").join(name);
        fs::create_dir_all(out_dir.join("programs"))?;
        // The agent's debug build keeps ~15 MB of symbols even without debug info.
        strip(&built, &path, "--strip-all")?;
        programs.push((built, path));
    }
    Ok(Built {
        tests: binaries,
        programs,
        missing: missing.into_iter().map(str::to_owned).collect(),
    })
}

fn strip(from: &Path, to: &Path, how: &str) -> Result<()> {
    cmd::run(Command::new("strip").arg(how).arg("-o").arg(to).arg(from))
}

/// Adds the musl target to the toolchain in use when it is missing (rustup ships musl's C runtime
/// and links with it), and musl's gcc wrapper for dependencies with C code.
fn ensure_target() -> Result<()> {
    crate::setup::ensure_apt_tools(&[("musl-gcc", "musl-tools")])?;
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|t| t.trim() == TARGET) {
        eprintln!("vm-test: adding the {TARGET} target (static test binaries for the guests)");
        cmd::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    Ok(())
}

/// Names of the package's integration test targets.
fn test_targets() -> Result<Vec<String>> {
    let mut command = Command::new(env!("CARGO"));
    command
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(cmd::workspace_root());
    let metadata: Value =
        serde_json::from_str(&cmd::output(&mut command)?).context("parsing cargo metadata")?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == PACKAGE))
        .with_context(|| format!("package {PACKAGE} not in cargo metadata"))?;
    Ok(package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect())
}

/// Executables of `kind` ("test", "bin") that cargo built for the package, by target name.
fn artifacts(messages: &str, kind: &str) -> Vec<(String, PathBuf)> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["manifest_path"].as_str().is_some_and(|p| {
                Path::new(p) == cmd::workspace_root().join(PACKAGE).join("Cargo.toml")
            })
        })
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        })
        .filter_map(|m| {
            Some((
                m["target"]["name"].as_str()?.to_owned(),
                PathBuf::from(m["executable"].as_str()?),
            ))
        })
        .collect()
}

fn executable(messages: &str, name: &str, kind: &str) -> Option<PathBuf> {
    artifacts(messages, kind)
        .into_iter()
        .find_map(|(n, path)| (n == name).then_some(path))
}

fn executables(messages: &str, kind: &str) -> Vec<PathBuf> {
    artifacts(messages, kind)
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}
