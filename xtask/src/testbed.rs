//! `cargo xtask testbed …`: the real Kubernetes control plane the tests run against.
//!
//! `build` compiles kube-apiserver, kubectl and etcd from the Go module `go/k8s-testbed` (pinned
//! in its `pins.env`, go.mod and go.sum; fetched from the Go module proxy) and takes Kube-OVN's CRD
//! manifest from the pinned Kube-OVN module, into `target/testbed/<versions>-<hash>/`. The hash
//! covers the pins, go.mod, go.sum, the Go version and the build flags, so a change to any of
//! them builds anew and an unchanged tree reuses the cache. See docs/testbed.md.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Subcommand;

use crate::{cmd, setup};

#[derive(Subcommand)]
pub enum Args {
    /// Build (or reuse from target/testbed/) kube-apiserver, etcd and kubectl at the pinned
    /// versions; print their paths, the last two lines being `KUBE_APISERVER=…` and `ETCD=…`.
    Build,
    /// Start etcd + kube-apiserver on loopback (built first), print the admin kubeconfig's path,
    /// and stop them when stdin closes or a line is entered.
    Up,
}

pub fn run(args: &Args) -> Result<()> {
    match args {
        Args::Build => {
            let built = build()?;
            for (var, path) in built.env() {
                println!("{var}={}", path.display());
            }
            Ok(())
        }
        Args::Up => up(),
    }
}

/// What `build` produced.
pub struct Built {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
    pub kube_ovn_crds: PathBuf,
}

impl Built {
    /// The environment the tests read (`kube_ovn_testkit::control_plane::Binaries::from_env`);
    /// `KUBE_APISERVER` and `ETCD` last.
    pub fn env(&self) -> [(&'static str, &Path); 4] {
        [
            ("KUBECTL", &self.kubectl),
            ("KUBE_OVN_CRDS", &self.kube_ovn_crds),
            ("KUBE_APISERVER", &self.kube_apiserver),
            ("ETCD", &self.etcd),
        ]
    }
}

/// The Kube-OVN manifest with the Subnet CRD, inside the Kube-OVN module.
const KUBE_OVN_CRD_PATH: &str = "charts/kube-ovn/templates/kube-ovn-crd.yaml";
const KUBE_OVN_MODULE: &str = "github.com/kubeovn/kube-ovn";

fn module_dir() -> PathBuf {
    cmd::workspace_root().join("go/k8s-testbed")
}

/// Builds the testbed, or reuses the cached build of the same pins.
pub fn build() -> Result<Built> {
    setup::ensure_apt_tools(&[("openssl", "openssl")])?;
    let started = Instant::now();
    let module = module_dir();
    let pins = read_pins(&module.join("pins.env"))?;
    let go_mod = fs::read_to_string(module.join("go.mod")).context("reading go.mod")?;
    let go_sum = fs::read_to_string(module.join("go.sum")).context("reading go.sum")?;
    check_go_mod(&go_mod, &pins)?;
    let go_version = cmd::output(
        Command::new("go")
            .arg("version")
            .env("GOTOOLCHAIN", "local"),
    )?;
    let ldflags = ldflags(&pins["KUBERNETES"])?;

    let mut hasher = Fnv1a::default();
    for part in [
        fs::read_to_string(module.join("pins.env"))?.as_str(),
        &go_mod,
        &go_sum,
        &go_version,
        &ldflags,
    ] {
        hasher.write(part.as_bytes());
        hasher.write(&[0]);
    }
    let key = format!(
        "k8s-{}-etcd-{}-kube-ovn-{}-{:016x}",
        pins["KUBERNETES"], pins["ETCD"], pins["KUBE_OVN"], hasher.0
    );
    let root = cmd::target_dir().join("testbed");
    let dir = root.join(&key);
    let built = Built {
        kube_apiserver: dir.join("kube-apiserver"),
        etcd: dir.join("etcd"),
        kubectl: dir.join("kubectl"),
        kube_ovn_crds: dir.join("kube-ovn-crd.yaml"),
    };
    if dir.join(".complete").exists() {
        eprintln!(
            "testbed: reusing {} ({:.1?})",
            dir.display(),
            started.elapsed()
        );
        return Ok(built);
    }

    // Built in a scratch directory and renamed into place, so an interrupted build is never
    // taken for a finished one.
    let scratch = root.join(format!("{key}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let go = |args: &[&str]| {
        let mut command = Command::new("go");
        command
            .args(args)
            .current_dir(&module)
            .env("CGO_ENABLED", "0")
            // The machine's Go, never a toolchain download; go.sum must already be complete.
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly -trimpath -buildvcs=false");
        command
    };
    let out_dir = format!("{}/", scratch.display());
    cmd::run(go(&["build", "-ldflags", &ldflags, "-o", &out_dir]).args([
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "k8s.io/kubernetes/cmd/kubectl",
    ]))?;
    // Built on its own for its name: Go would call the binary of `…/server/v3` "server".
    cmd::run(go(&["build", "-ldflags", "-s -w", "-o"]).args([
        scratch.join("etcd").as_os_str(),
        "go.etcd.io/etcd/server/v3".as_ref(),
    ]))?;
    fetch_kube_ovn_crds(&pins, &root, &scratch.join("kube-ovn-crd.yaml"))?;
    fs::write(scratch.join(".complete"), &key)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&scratch, &dir).with_context(|| format!("moving the build to {}", dir.display()))?;
    // Earlier builds (other pins) would only take disk.
    for entry in fs::read_dir(&root)?.flatten() {
        if entry.file_name() != key.as_str() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    eprintln!(
        "testbed: built {} in {:.1?}",
        dir.display(),
        started.elapsed()
    );
    Ok(built)
}

/// Version stamps the upstream build scripts set (`kubectl version`, the apiserver's `/version`).
fn ldflags(kubernetes: &str) -> Result<String> {
    let (major, minor) = kubernetes
        .strip_prefix('v')
        .and_then(|v| {
            let mut parts = v.split('.');
            Some((parts.next()?, parts.next()?))
        })
        .with_context(|| format!("KUBERNETES={kubernetes} is not vMAJOR.MINOR.PATCH"))?;
    let mut flags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (var, value) in [
            ("gitVersion", kubernetes),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            let _ = write!(flags, " -X {package}.{var}={value}");
        }
    }
    Ok(flags)
}

/// `KEY=value` lines; `#` comments and blank lines skipped.
fn read_pins(path: &Path) -> Result<BTreeMap<String, String>> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pins = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}: not KEY=value: {line}", path.display()))?;
        pins.insert(key.to_owned(), value.to_owned());
    }
    for key in ["KUBERNETES", "ETCD", "KUBE_OVN", "KUBE_OVN_SUM"] {
        ensure!(pins.contains_key(key), "{}: no {key}=", path.display());
    }
    Ok(pins)
}

/// go.mod must build exactly the pinned versions: k8s.io/kubernetes, etcd's server, and every
/// staging module replaced by its published `v0.<minor>.<patch>`.
fn check_go_mod(go_mod: &str, pins: &BTreeMap<String, String>) -> Result<()> {
    let kubernetes = &pins["KUBERNETES"];
    let staging = format!("v0.{}", kubernetes.trim_start_matches("v1."));
    let mut problems = Vec::new();
    let required = |module: &str, version: &str| {
        go_mod.lines().any(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(module) && words.next() == Some(version)
        })
    };
    if !required("k8s.io/kubernetes", kubernetes) {
        problems.push(format!("require k8s.io/kubernetes {kubernetes}"));
    }
    if !required("go.etcd.io/etcd/server/v3", &pins["ETCD"]) {
        problems.push(format!(
            "require go.etcd.io/etcd/server/v3 {}",
            pins["ETCD"]
        ));
    }
    let mut replaced = 0;
    for line in go_mod.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [from, "=>", to, version] = words[..]
            && from.starts_with("k8s.io/")
        {
            replaced += 1;
            if from != to || version != staging {
                problems.push(format!("{from} => {from} {staging} (found {to} {version})"));
            }
        }
    }
    if replaced == 0 {
        problems.push(format!(
            "replace of the k8s.io staging modules at {staging}"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "go/k8s-testbed/go.mod does not match pins.env; needs:\n  {}\n(edit go.mod, then `go mod tidy` there)",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Copies Kube-OVN's CRD manifest out of the pinned module (the Go module proxy's zip, checked
/// against `KUBE_OVN_SUM` as well as the checksum database).
fn fetch_kube_ovn_crds(pins: &BTreeMap<String, String>, cwd: &Path, to: &Path) -> Result<()> {
    let version = &pins["KUBE_OVN"];
    let json = cmd::output(
        Command::new("go")
            .args(["mod", "download", "-json"])
            .arg(format!("{KUBE_OVN_MODULE}@{version}"))
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            // Outside any module: nothing to update.
            .current_dir(cwd),
    )?;
    let info: serde_json::Value = serde_json::from_str(&json).context("go mod download -json")?;
    ensure!(
        info["Sum"].as_str() == Some(pins["KUBE_OVN_SUM"].as_str()),
        "{KUBE_OVN_MODULE}@{version}: checksum {} is not the pinned {}",
        info["Sum"],
        pins["KUBE_OVN_SUM"]
    );
    let dir = info["Dir"]
        .as_str()
        .context("go mod download reported no Dir")?;
    let source = Path::new(dir).join(KUBE_OVN_CRD_PATH);
    let text =
        fs::read_to_string(&source).with_context(|| format!("reading {}", source.display()))?;
    ensure!(
        text.contains("name: subnets.kubeovn.io"),
        "{} has no Subnet CRD",
        source.display()
    );
    fs::write(to, text)?;
    Ok(())
}

/// FNV-1a, 64 bits: a stable cache key without a hashing crate.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn up() -> Result<()> {
    use kube_ovn_testkit::control_plane::{Binaries, ControlPlane, Options};
    let built = build()?;
    let started = Instant::now();
    let plane = ControlPlane::start(Options::new(Binaries {
        kube_apiserver: built.kube_apiserver,
        etcd: built.etcd,
        kubectl: built.kubectl.clone(),
        kube_ovn_crds: built.kube_ovn_crds,
    }))?;
    eprintln!(
        "testbed: etcd + kube-apiserver at {} ready in {:.1?}; logs in {}",
        plane.server_url(),
        started.elapsed(),
        plane.dir().display()
    );
    eprintln!("press Enter (or close stdin) to stop");
    println!("KUBECTL={}", built.kubectl.display());
    println!("KUBECONFIG={}", plane.kubeconfig_path().display());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    plane.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> BTreeMap<String, String> {
        [("KUBERNETES", "v1.37.2"), ("ETCD", "v3.7.0")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn the_repository_go_mod_matches_its_pins() {
        let module = module_dir();
        let pins = read_pins(&module.join("pins.env")).unwrap();
        check_go_mod(&fs::read_to_string(module.join("go.mod")).unwrap(), &pins).unwrap();
    }

    #[test]
    fn a_go_mod_drifting_from_the_pins_is_refused() {
        let good = "require (\n\tgo.etcd.io/etcd/server/v3 v3.7.0\n\tk8s.io/kubernetes v1.37.2\n)\n\
                    replace (\n\tk8s.io/api => k8s.io/api v0.37.2\n)\n";
        check_go_mod(good, &pins()).unwrap();
        for bad in [
            good.replace("k8s.io/kubernetes v1.37.2", "k8s.io/kubernetes v1.37.1"),
            good.replace("k8s.io/api v0.37.2", "k8s.io/api v0.36.0"),
            good.replace("v3.7.0", "v3.6.0"),
            good.replace("\tk8s.io/api => k8s.io/api v0.37.2\n", ""),
        ] {
            assert!(check_go_mod(&bad, &pins()).is_err(), "accepted:\n{bad}");
        }
    }

    #[test]
    fn version_stamps_follow_the_pin() {
        let flags = ldflags("v1.37.2").unwrap();
        assert!(flags.contains("-X k8s.io/component-base/version.gitMinor=37"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitVersion=v1.37.2"));
        assert!(ldflags("1.37").is_err());
    }
}
