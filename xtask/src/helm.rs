//! `cargo xtask helm build`: Helm and Kustomize, built from the Go module proxy at the versions
//! `go/helm/go.mod` pins (its `tool` directives), cached as `target/tools/NAME-VERSION`.
//! kube-ovn-agent/tests/chart.rs builds the same files on demand the same way.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::cmd;

#[derive(Subcommand)]
pub enum Args {
    /// Build helm and kustomize (when not cached yet) and print their paths.
    Build,
}

/// (command, the Go package `go build` builds, the module whose version go.mod pins).
const TOOLS: [(&str, &str, &str); 2] = [
    ("helm", "helm.sh/helm/v3/cmd/helm", "helm.sh/helm/v3"),
    (
        "kustomize",
        "sigs.k8s.io/kustomize/kustomize/v5",
        "sigs.k8s.io/kustomize/kustomize/v5",
    ),
];

pub fn run(args: &Args) -> Result<()> {
    match args {
        Args::Build => {
            for (name, _, _) in TOOLS {
                println!("{}", tool(name)?.display());
            }
            Ok(())
        }
    }
}

fn module_dir() -> PathBuf {
    cmd::workspace_root().join("go/helm")
}

/// The version `go.mod` requires of `module`.
fn pinned(go_mod: &str, module: &str) -> Option<String> {
    go_mod.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == module).then(|| words.next().map(str::to_owned))?
    })
}

/// The cached binary of `name`, built first if missing.
pub fn tool(name: &str) -> Result<PathBuf> {
    let (_, package, module) = TOOLS
        .iter()
        .find(|(n, _, _)| *n == name)
        .with_context(|| format!("no tool {name} in go/helm"))?;
    let dir = module_dir();
    let go_mod = std::fs::read_to_string(dir.join("go.mod")).context("go/helm/go.mod")?;
    let Some(version) = pinned(&go_mod, module) else {
        bail!("go/helm/go.mod does not require {module}");
    };
    let out = cmd::target_dir()
        .join("tools")
        .join(format!("{name}-{version}"));
    if out.exists() {
        return Ok(out);
    }
    eprintln!("helm: building {package}@{version} into {}", out.display());
    build(&dir, package, &ldflags(name, &version, &go_mod), &out)?;
    Ok(out)
}

/// What the projects' release builds stamp into the binary: the version, and for Helm the
/// Kubernetes version `helm template` and `helm lint` assume (its Makefile derives it from the
/// client-go it links: v0.37 → 1.37; unset, Helm assumes 1.20).
fn ldflags(name: &str, version: &str, go_mod: &str) -> String {
    if name != "helm" {
        return format!("-X sigs.k8s.io/kustomize/api/provenance.version={version}");
    }
    let minor = pinned(go_mod, "k8s.io/client-go")
        .and_then(|v| v.split('.').nth(1).map(str::to_owned))
        .unwrap_or_default();
    let mut flags = format!("-X helm.sh/helm/v3/internal/version.version={version}");
    for package in ["pkg/lint/rules", "pkg/chartutil"] {
        let _ = write!(
            flags,
            " -X helm.sh/helm/v3/{package}.k8sVersionMajor=1 -X helm.sh/helm/v3/{package}.k8sVersionMinor={minor}"
        );
    }
    flags
}

fn build(dir: &Path, package: &str, ldflags: &str, out: &Path) -> Result<()> {
    let parent = out.parent().context("tools dir")?;
    std::fs::create_dir_all(parent)?;
    // Built beside the final name and renamed: a concurrent test run never sees half a file.
    let partial = parent.join(format!(
        ".{}.{}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    cmd::run(
        Command::new("go")
            .current_dir(dir)
            .args(["build", "-trimpath", "-ldflags", ldflags, "-o"])
            .arg(&partial)
            .arg(package),
    )?;
    std::fs::rename(&partial, out)?;
    Ok(())
}
