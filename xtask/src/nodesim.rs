//! The node simulator (`nodesim/`, package `kube-ovn-nodesim`): the e2e suite, the traffic
//! benchmark and the Kube-OVN harness runs live there, built `--release` so the load generators
//! and servers the benchmark times are optimised. xtask only builds it and hands over the
//! command line unchanged.

use std::{ffi::OsStr, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::cmd;

const PACKAGE: &str = "kube-ovn-nodesim";

/// Builds the simulator (optimised) and returns its path.
fn build() -> Result<PathBuf> {
    cmd::cargo(&["build", "--release", "--quiet", "--package", PACKAGE])?;
    Ok(cmd::target_dir().join("release").join(PACKAGE))
}

/// Builds the simulator and runs it to completion with `args`.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    let binary = build()?;
    cmd::run(Command::new(binary).args(args))
}

/// Builds the simulator and replaces this process with it, so its exit status, its output and
/// Ctrl-C (the simulator removes its namespaces on SIGINT) are the command's own.
pub fn exec<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    let binary = build()?;
    let error = Command::new(&binary).args(args).exec();
    Err(error).with_context(|| format!("failed to run {}", binary.display()))
}
