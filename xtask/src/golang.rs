//! The repository's Go modules (`go/*`: the testbed's kube-apiserver/etcd pins, Helm's pins and
//! the Kube-OVN harness): gofmt-clean, `go vet` clean, their own tests green, and their go.sum
//! complete (`-mod=readonly`: nothing is resolved on the fly).

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

fn modules() -> Result<Vec<PathBuf>> {
    let root = cmd::workspace_root().join("go");
    let mut out: Vec<PathBuf> = fs::read_dir(&root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("go.mod").is_file())
        .collect();
    out.sort();
    Ok(out)
}

pub fn checks() -> Result<()> {
    // Go 1.26 comes with the machine (Debian's golang-go is too old for these modules).
    cmd::output(Command::new("go").arg("version"))
        .context("`go` (1.26 or later) must be on PATH for the Go modules under go/")?;
    for module in modules()? {
        let unformatted = cmd::output(
            Command::new("gofmt")
                .arg("-l")
                .arg(".")
                .current_dir(&module),
        )?;
        if !unformatted.trim().is_empty() {
            bail!(
                "gofmt would change these files in {}:\n{unformatted}",
                module.display()
            );
        }
        // A module of tool pins only (go/helm) has no package: `go vet` fails on "./..." there.
        let packages = cmd::output(
            Command::new("go")
                .args(["list", "./..."])
                .current_dir(&module)
                .env("GOFLAGS", "-mod=readonly")
                .env("GOTOOLCHAIN", "local"),
        )?;
        if packages.trim().is_empty() {
            continue;
        }
        for args in [&["vet", "./..."][..], &["test", "./..."][..]] {
            cmd::run(
                Command::new("go")
                    .args(args)
                    .current_dir(&module)
                    .env("GOFLAGS", "-mod=readonly")
                    .env("GOTOOLCHAIN", "local"),
            )?;
        }
    }
    Ok(())
}
