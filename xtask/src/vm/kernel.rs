//! Debian's `-cloud-amd64` kernels (LZ4-compressed: they boot in ~5 s under TCG, half the time of
//! the generic flavour), fetched with `apt-get download` through an apt configuration of our own
//! under `target/vm/apt/<kernel>`: its own sources list, package lists, cache and an empty dpkg
//! status, so the system's sources are neither read nor changed. Only `vmlinuz`, the config and
//! the wanted modules with their dependencies are kept, under `target/vm/kernels/<kernel>`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The flavour's metapackage; it depends on the current ABI's versioned image package.
const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel line this harness can boot, and the Debian suites that carry it.
pub struct Line {
    pub key: &'static str,
    suites: &'static [(&'static str, &'static str)],
}

pub const LINES: &[Line] = &[
    Line {
        key: "5.10",
        suites: &[(DEBIAN, "bullseye"), (SECURITY, "bullseye-security")],
    },
    Line {
        key: "6.1",
        suites: &[(DEBIAN, "bookworm"), (SECURITY, "bookworm-security")],
    },
    Line {
        key: "6.12",
        suites: &[(DEBIAN, "bookworm-backports")],
    },
];

/// A cached kernel, ready to boot.
pub struct Kernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// Debian package and version it came from.
    pub package: String,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
    /// Module files in load order (dependencies first).
    pub modules: Vec<PathBuf>,
    /// Wanted modules that this kernel has built in.
    pub builtin: Vec<String>,
}

impl Kernel {
    /// `CONFIG_<name>`'s value in the kernel's config (`None` when unset).
    pub fn config_value(&self, name: &str) -> Option<String> {
        let config = fs::read_to_string(&self.config).ok()?;
        let prefix = format!("CONFIG_{name}=");
        config
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }
}

const MANIFEST: &str = "manifest";

/// The kernel of line `key`, from the cache when it holds one with the `wanted` modules, else
/// fetched (network: Debian's archive).
pub fn fetch(vm_dir: &Path, key: &str, wanted: &[&str]) -> Result<Kernel> {
    let line = LINES
        .iter()
        .find(|l| l.key == key)
        .with_context(|| format!("no Debian suite known for kernel {key}"))?;
    let dir = vm_dir.join("kernels").join(key);
    let wanted_line = wanted.join(",");
    if let Some(kernel) = read_manifest(&dir)? {
        if fs::read_to_string(dir.join("wanted")).is_ok_and(|w| w.trim() == wanted_line) {
            eprintln!(
                "vm-test: {key}: cached {} ({})",
                kernel.release, kernel.package
            );
            return Ok(kernel);
        }
        eprintln!("vm-test: {key}: the module list changed, fetching again");
    }

    let apt = Apt::new(&vm_dir.join("apt").join(key), line)?;
    apt.update()?;
    let package = apt.resolve(key)?;
    let scratch = vm_dir
        .join("kernels")
        .join(format!(".fetch-{key}-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let deb = apt.download(&package, &scratch)?;
    let tree = scratch.join("tree");
    extract(&deb, &tree)?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;

    let staged = scratch.join("kernel");
    fs::create_dir_all(staged.join("modules"))?;
    let vmlinuz = only_file(&tree.join("boot"), "vmlinuz-")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz file name")?
        .to_owned();
    fs::rename(&vmlinuz, staged.join("vmlinuz"))?;
    fs::rename(
        only_file(&tree.join("boot"), "config-")?,
        staged.join("config"),
    )?;
    let modules_root = find_modules_root(&tree, &release)?;
    let (order, builtin) = resolve_modules(&modules_root, wanted)?;
    let mut manifest = format!("release {release}\npackage {package}\n");
    for (name, path) in &order {
        let bytes = read_module(path)?;
        fs::write(staged.join("modules").join(format!("{name}.ko")), bytes)?;
        let _ = writeln!(manifest, "module {name}");
    }
    for name in &builtin {
        let _ = writeln!(manifest, "builtin {name}");
    }
    fs::write(staged.join("wanted"), format!("{wanted_line}\n"))?;
    fs::write(staged.join(MANIFEST), manifest)?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&staged, &dir).with_context(|| format!("moving the kernel to {}", dir.display()))?;
    let kernel = read_manifest(&dir)?.context("manifest just written")?;
    eprintln!(
        "vm-test: {key}: fetched {} ({}), modules {:?}, built in {:?}",
        kernel.release,
        kernel.package,
        order_names(&order),
        kernel.builtin
    );
    Ok(kernel)
}

fn order_names(order: &[(String, PathBuf)]) -> Vec<&str> {
    order.iter().map(|(n, _)| n.as_str()).collect()
}

fn read_manifest(dir: &Path) -> Result<Option<Kernel>> {
    let Ok(text) = fs::read_to_string(dir.join(MANIFEST)) else {
        return Ok(None);
    };
    let mut kernel = Kernel {
        release: String::new(),
        package: String::new(),
        vmlinuz: dir.join("vmlinuz"),
        config: dir.join("config"),
        modules: Vec::new(),
        builtin: Vec::new(),
    };
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("release", v)) => v.clone_into(&mut kernel.release),
            Some(("package", v)) => v.clone_into(&mut kernel.package),
            Some(("module", v)) => kernel
                .modules
                .push(dir.join("modules").join(format!("{v}.ko"))),
            Some(("builtin", v)) => kernel.builtin.push(v.to_owned()),
            _ => bail!(
                "unexpected line {line:?} in {}",
                dir.join(MANIFEST).display()
            ),
        }
    }
    let complete = !kernel.release.is_empty()
        && kernel.vmlinuz.is_file()
        && kernel.modules.iter().all(|m| m.is_file());
    Ok(complete.then_some(kernel))
}

struct Apt {
    root: PathBuf,
}

impl Apt {
    fn new(root: &Path, line: &Line) -> Result<Self> {
        for sub in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        // Only the Packages indices: the system's apt.conf.d (kept for its proxy and validity
        // settings) may enable others, such as DEP-11 metadata, that we do not need.
        let mut sources = String::new();
        for (uri, suite) in line.suites {
            let _ = writeln!(
                sources,
                "deb [target=Packages signed-by={KEYRING}] {uri} {suite} main"
            );
        }
        fs::write(root.join("etc/sources.list"), sources)?;
        fs::write(root.join("state/status"), "")?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let path = |sub: &str| self.root.join(sub).display().to_string();
        for (key, value) in [
            ("Dir::Etc::SourceList", path("etc/sources.list")),
            ("Dir::Etc::SourceParts", path("etc/sources.list.d")),
            ("Dir::Etc::Preferences", path("etc/preferences")),
            ("Dir::Etc::PreferencesParts", path("etc/preferences.d")),
            ("Dir::State", path("state")),
            ("Dir::State::status", path("state/status")),
            ("Dir::Cache", path("cache")),
            ("Acquire::Languages", "none".into()),
            ("APT::Architecture", "amd64".into()),
            ("APT::Architectures", "amd64".into()),
            // The download lands in a directory the `_apt` sandbox user cannot write.
            ("APT::Sandbox::User", "root".into()),
        ] {
            command.arg("-o").arg(format!("{key}={value}"));
        }
        command.arg("-q");
        command
    }

    fn update(&self) -> Result<()> {
        cmd::run(self.command("apt-get").arg("update"))
            .context("apt-get update with the VM kernels' own sources")
    }

    /// The versioned image package the metapackage points at, as `name version`.
    fn resolve(&self, key: &str) -> Result<String> {
        let depends = cmd::output(self.command("apt-cache").args(["depends", METAPACKAGE]))?;
        let name = depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .with_context(|| format!("{METAPACKAGE} depends on no linux-image:\n{depends}"))?
            .to_owned();
        // Guards against the suite moving to another kernel line.
        ensure!(
            name.starts_with(&format!("linux-image-{key}.")),
            "{METAPACKAGE} in the {key} suites now points at {name}"
        );
        let show =
            cmd::output(
                self.command("apt-cache")
                    .args(["show", "--no-all-versions", &name]),
            )?;
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .with_context(|| format!("no version for {name}"))?;
        Ok(format!("{name} {version}"))
    }

    fn download(&self, package: &str, into: &Path) -> Result<PathBuf> {
        let name = package.split(' ').next().unwrap_or(package);
        cmd::run(
            self.command("apt-get")
                .args(["download", name])
                .current_dir(into),
        )?;
        fs::read_dir(into)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", into.display()))
    }
}

/// Extracts only the image, config, built-in list and module files of `deb` under `into`.
fn extract(deb: &Path, into: &Path) -> Result<()> {
    fs::create_dir_all(into)?;
    eprintln!("+ dpkg-deb --fsys-tarfile {} | tar -x …", deb.display());
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    let status = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(into)
        .args([
            "--wildcards",
            "./boot/vmlinuz-*",
            "./boot/config-*",
            "*/modules.builtin",
            "*.ko*",
        ])
        .stdin(dpkg.stdout.take().context("dpkg-deb stdout")?)
        .status()
        .context("starting tar")?;
    let dpkg_status = dpkg.wait()?;
    ensure!(
        dpkg_status.success() && status.success(),
        "extracting {}: dpkg-deb {dpkg_status}, tar {status}",
        deb.display()
    );
    Ok(())
}

fn only_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    ensure!(
        found.len() == 1,
        "expected one {prefix}* in {}, found {found:?}",
        dir.display()
    );
    Ok(found.remove(0))
}

/// `lib/modules/<release>` (or `usr/lib/…` once Debian moves it) inside the extracted tree.
fn find_modules_root(tree: &Path, release: &str) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p).join(release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules directory for {release} in the package"))
}

/// Module names use `-` and `_` interchangeably.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.split(".ko").next()?;
    (file.len() > stem.len()).then(|| normalise(stem))
}

/// The wanted modules and everything they depend on, dependencies first, and the wanted modules
/// that are built in. A wanted module that is neither is an error naming it, unless its name
/// ends in `?` (needed only on kernels that build it separately).
/// Modules by name with their files, in load order.
type LoadOrder = Vec<(String, PathBuf)>;

fn resolve_modules(root: &Path, wanted: &[&str]) -> Result<(LoadOrder, Vec<String>)> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                files.insert(name, path);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    let mut order = Vec::new();
    let mut builtin_wanted = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        let (name, optional) = match name.strip_suffix('?') {
            Some(name) => (normalise(name), true),
            None => (normalise(name), false),
        };
        if builtin.contains(&name) {
            builtin_wanted.push(name);
            continue;
        }
        if optional && !files.contains_key(&name) {
            continue;
        }
        visit(&name, &files, &builtin, &mut seen, &mut order)?;
    }
    Ok((order, builtin_wanted))
}

fn visit(
    name: &str,
    files: &std::collections::BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = files
        .get(name)
        .with_context(|| format!("module {name} is neither in the package nor built in"))?;
    for dep in depends(&read_module(path)?) {
        visit(&dep, files, builtin, seen, order)?;
    }
    order.push((name.to_owned(), path.clone()));
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn depends(module: &[u8]) -> Vec<String> {
    module
        .split(|b| *b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(normalise)
                .collect()
        })
        .unwrap_or_default()
}

/// A module file's bytes, decompressed (busybox `insmod` takes plain ELF only).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {tool} for {name}"))?;
    ensure!(out.status.success(), "{tool} -dc {name}: {}", out.status);
    Ok(out.stdout)
}

/// Removes a scratch directory however the fetch ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = fs::remove_dir_all(&self.0)
        {
            eprintln!("vm-test: could not remove {}: {e}", self.0.display());
        }
    }
}
