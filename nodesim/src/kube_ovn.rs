//! Real Kube-OVN as the oracle: builds kube-ovn-cni's own gateway code (the netfilter part of its
//! 3-second pass: `setIPSet`, `setIptables`, `gcIPSet`) from the Go module proxy into a small
//! harness (`go/kube-ovn-harness`), runs it in throw-away network namespaces and checks the rules
//! and sets it makes — against spec §5.1's fixture, and against this project's transcription of
//! them (`node::kube_ovn`). `patched` is the newest pinned release with `contrib/kube-ovn`'s
//! hand-over switch applied and turned on. See docs/kube-ovn-real.md.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args as ClapArgs, Subcommand};

use crate::{
    cmd,
    node::{
        Cluster, Family, KubeProxyMode, cleanup, exec, kube_ovn, kube_ovn::Positioning, kube_proxy,
        netns::NetNs,
    },
    setup,
};

/// The Kube-OVN releases the harness is built from: the one place they are pinned. The Go module
/// proxy serves these, but not v1.13.3 or v1.13.15 (403), so stand-ins with the same nat
/// PREROUTING jump positioning take their places (docs/kube-ovn-real.md): v1.13.11 for v1.13.3
/// (insert at 1, delete duplicates by stale index), v1.13.13 (#5232 only), v1.14.10 for v1.13.15
/// (#5232 and #5421).
pub const VERSIONS: &[&str] = &["v1.13.11", "v1.14.10", "v1.16.2"];

/// The release `contrib/kube-ovn/<version>/` patches are applied to for the `patched` variant.
pub const PATCHED_BASE: &str = "v1.16.2";

const MODULE: &str = "github.com/kubeovn/kube-ovn";
/// The harness's own Go module (the cluster-file loader) and the files copied into Kube-OVN's.
const HARNESS_DIR: &str = "go/kube-ovn-harness";
/// Module path of the harness module, required (and replaced by its directory) in the copy.
const HARNESS_MODULE: &str = "kube-ovn-ebpf/go/kube-ovn-harness";
const PATCH_DIR: &str = "contrib/kube-ovn";
/// A cold build downloads Kube-OVN's dependencies (~95 MB) and compiles pkg/daemon: ~10 min on
/// 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_mins(40);
const PASS_TIMEOUT: Duration = Duration::from_mins(1);

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Build the harness for each variant (cached under target/kube-ovn-harness/) and print the
    /// binaries' paths.
    Build(Versions),
    /// Run each variant once in throw-away namespaces (root) on spec §5.1's fixture, in kube-proxy
    /// IPVS and iptables mode; check its rules and sets and list every difference from this
    /// project's transcription (`nodesim/src/node/kube_ovn.rs`).
    Test(Versions),
    /// Apply contrib/kube-ovn's patches to a copy of each patched release and run Kube-OVN's
    /// `go test ./pkg/daemon/...` on it, without and with the patches.
    PatchTest,
}

#[derive(ClapArgs)]
struct Versions {
    /// Variants, comma-separated: pinned versions (v1.16.2) and `patched`. Default: all pinned
    /// versions and `patched`.
    #[arg(long, value_delimiter = ',')]
    versions: Vec<String>,
}

impl Versions {
    fn variants(&self) -> Result<Vec<Variant>> {
        if self.versions.is_empty() {
            let mut all: Vec<Variant> = VERSIONS.iter().map(|v| Variant::release(v)).collect();
            all.push(Variant::patched());
            return Ok(all);
        }
        self.versions.iter().map(|v| Variant::parse(v)).collect()
    }
}

/// One harness build: a release, or [`PATCHED_BASE`] with the hand-over patches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub version: String,
    pub patched: bool,
}

impl Variant {
    pub fn release(version: &str) -> Self {
        Self {
            version: version.to_owned(),
            patched: false,
        }
    }

    pub fn patched() -> Self {
        Self {
            version: PATCHED_BASE.to_owned(),
            patched: true,
        }
    }

    /// `patched`, or a version the proxy may serve (`vX.Y.Z`; [`VERSIONS`] are the pinned ones).
    pub fn parse(s: &str) -> Result<Self> {
        if s == "patched" {
            return Ok(Self::patched());
        }
        let numbers: Vec<&str> = s.strip_prefix('v').unwrap_or("").split('.').collect();
        ensure!(
            numbers.len() == 3 && numbers.iter().all(|n| n.parse::<u32>().is_ok()),
            "{s:?} is neither `patched` nor a Kube-OVN version like v1.16.2 (pinned: {})",
            VERSIONS.join(", ")
        );
        Ok(Self::release(s))
    }

    /// `v1.16.2`, or `patched`.
    pub fn name(&self) -> String {
        if self.patched {
            "patched".to_owned()
        } else {
            self.version.clone()
        }
    }

    fn dir(&self) -> PathBuf {
        cmd::target_dir().join("kube-ovn-harness").join(self.name())
    }

    pub fn binary(&self) -> PathBuf {
        self.dir().join("kovn-harness")
    }
}

pub fn run(args: &Args) -> Result<()> {
    match &args.command {
        Sub::Build(v) => {
            for variant in v.variants()? {
                let started = Instant::now();
                let path = build(&variant)?;
                eprintln!(
                    "kube-ovn build {}: {:.1} s",
                    variant.name(),
                    started.elapsed().as_secs_f64()
                );
                println!("{}", path.display());
            }
            Ok(())
        }
        Sub::Test(v) => test(&v.variants()?),
        Sub::PatchTest => patch_test(),
    }
}

/// `go` with the toolchain on PATH (no toolchain download), module-mode builds, and a writable
/// module cache: `$GOMODCACHE` if set, else one under target/ that no other project's
/// `go clean -modcache` removes mid-build.
fn go() -> Command {
    let mut command = Command::new("go");
    command.env("GOTOOLCHAIN", "local");
    command.env("GOFLAGS", "-mod=mod -modcacherw -buildvcs=false");
    if std::env::var_os("GOMODCACHE").is_none() {
        command.env(
            "GOMODCACHE",
            cmd::target_dir().join("kube-ovn-harness").join("gomod"),
        );
    }
    command
}

fn go_output(command: &mut Command) -> Result<String> {
    let out = exec::run_bounded(command, None, BUILD_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kube-OVN's module source for `version`, from the Go module proxy (read-only in the cache).
fn module_source(version: &str) -> Result<PathBuf> {
    let json = go_output(
        go().args(["mod", "download", "-json", &format!("{MODULE}@{version}")])
            .current_dir(cmd::workspace_root()),
    )
    .with_context(|| format!("downloading {MODULE}@{version} from the Go module proxy"))?;
    let dir = serde_json::from_str::<serde_json::Value>(&json)?
        .get("Dir")
        .and_then(|d| d.as_str())
        .map(PathBuf::from)
        .with_context(|| format!("no Dir for {MODULE}@{version}: {json}"))?;
    Ok(dir)
}

/// The patches of `contrib/kube-ovn/<version>/`, in order.
fn patches(version: &str) -> Result<Vec<PathBuf>> {
    let dir = cmd::workspace_root().join(PATCH_DIR).join(version);
    let mut list: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    list.retain(|p| p.extension().is_some_and(|e| e == "patch"));
    list.sort();
    ensure!(!list.is_empty(), "no patches in {}", dir.display());
    Ok(list)
}

/// Copies Kube-OVN's module source for `version` to `dest` (fresh, writable) and applies the
/// patches when `patched`.
fn prepare_source(version: &str, patched: bool, dest: &Path) -> Result<()> {
    let source = module_source(version)?;
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::create_dir_all(dest.parent().expect("a parent"))?;
    cmd::run(Command::new("cp").arg("-R").arg(&source).arg(dest))?;
    cmd::run(Command::new("chmod").args(["-R", "u+w"]).arg(dest))?;
    if patched {
        for patch in patches(version)? {
            cmd::run(
                Command::new("patch")
                    .args([
                        "-p1",
                        "--forward",
                        "--batch",
                        "--no-backup-if-mismatch",
                        "-i",
                    ])
                    .arg(&patch)
                    .current_dir(dest),
            )
            .with_context(|| format!("applying {}", patch.display()))?;
        }
    }
    Ok(())
}

/// Every file that goes into a build, hashed with the variant: the cache key.
fn inputs_stamp(variant: &Variant) -> Result<String> {
    let root = cmd::workspace_root();
    let mut files = Vec::new();
    collect_files(&root.join(HARNESS_DIR), &mut files)?;
    if variant.patched {
        files.extend(patches(&variant.version)?);
    }
    files.sort();
    let mut hasher = std::hash::DefaultHasher::new();
    variant.name().hash(&mut hasher);
    variant.version.hash(&mut hasher);
    for file in &files {
        file.hash(&mut hasher);
        fs::read(file)?.hash(&mut hasher);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Builds (or finds cached) the harness for `variant`; returns the binary's path.
pub fn build(variant: &Variant) -> Result<PathBuf> {
    let dir = variant.dir();
    let binary = variant.binary();
    let stamp_file = dir.join("inputs.stamp");
    let stamp = inputs_stamp(variant)?;
    if binary.exists() && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return Ok(binary);
    }
    let src = dir.join("src");
    prepare_source(&variant.version, variant.patched, &src)?;
    let harness = cmd::workspace_root().join(HARNESS_DIR);
    cmd::run(
        Command::new("cp")
            .arg("-R")
            .arg(harness.join("inject/."))
            .arg(&src),
    )?;
    go_output(
        go().args(["mod", "edit"])
            .arg(format!("-require={HARNESS_MODULE}@v0.0.0"))
            .arg(format!("-replace={HARNESS_MODULE}={}", harness.display()))
            .current_dir(&src),
    )?;
    let mut tags = vec!["kovnharness"];
    if variant.patched {
        tags.push("kovnpatched");
    }
    tags.extend(version_tags(&variant.version));
    let tags = tags.join(",");
    eprintln!(
        "kube-ovn build {}: go build in {} (a cold build takes ~10 min)",
        variant.name(),
        src.display()
    );
    go_output(
        go().args(["build", "-tags", &tags, "-o"])
            .arg(&binary)
            .arg("./cmd/kovn-harness")
            .current_dir(&src),
    )
    .with_context(|| format!("building the harness for {}", variant.name()))?;
    fs::write(&stamp_file, stamp)?;
    Ok(binary)
}

/// Build tags for the harness's per-release files (go/kube-ovn-harness/inject/pkg/daemon), where
/// `pkg/daemon`'s internals differ from v1.16.2's:
/// - `kovnlegacy` (v1.13, v1.14): initRuntime makes its k8s.io/kubernetes iptables/ipset helpers
///   with an exec interface and names its counters `GwIPtableCounters`;
/// - `kovnnoservices` (v1.13): the Controller has no Service lister.
fn version_tags(version: &str) -> Vec<&'static str> {
    let minor = version
        .strip_prefix("v1.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    let mut tags = Vec::new();
    if minor.is_some_and(|m| m < 15) {
        tags.push("kovnlegacy");
    }
    if minor.is_some_and(|m| m < 14) {
        tags.push("kovnnoservices");
    }
    tags
}

/// The nat PREROUTING jump positioning generation of a release (docs/kube-ovn-real.md):
/// v1.13.0–v1.13.12, v1.13.13–v1.13.14, and v1.13.15+ (which v1.14.1+ shares).
pub fn positioning_of(version: &str) -> Positioning {
    let numbers: Vec<u32> = version
        .trim_start_matches('v')
        .split('.')
        .map_while(|n| n.parse().ok())
        .collect();
    match numbers.as_slice() {
        [1, 13, patch, ..] if *patch <= 12 => Positioning::V1_13_0,
        [1, 13, 13 | 14, ..] => Positioning::V1_13_13,
        _ => Positioning::V1_13_15,
    }
}

/// Runs the harness once in `ns` on the cluster in `cluster_file` (node `node1`, dual-stack).
pub fn run_once(ns: &NetNs, binary: &Path, cluster_file: &Path, cluster: &Cluster) -> Result<()> {
    run_once_with(ns, binary, cluster_file, cluster, &[])
}

/// [`run_once`] with more kube-ovn-cni flags (later flags override earlier ones: `--protocol ""`
/// makes it take the families from the node's annotation, as kube-ovn-cni does).
pub fn run_once_with(
    ns: &NetNs,
    binary: &Path,
    cluster_file: &Path,
    cluster: &Cluster,
    flags: &[&str],
) -> Result<()> {
    let mut command = ns.command(binary.display().to_string());
    command
        .arg("--cluster")
        .arg(cluster_file)
        .args([
            "--node-name",
            &cluster.local_node,
            "--protocol",
            "Dual",
            "--service-cluster-ip-range",
            &cluster.service_cidr_flag(),
            "--once",
        ])
        .args(extra_flags(binary))
        .args(flags);
    let out = exec::run_bounded(&mut command, None, PASS_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        last_lines(&String::from_utf8_lossy(&out.stderr), 20)
    );
    Ok(())
}

/// The harness running every 3 s in a namespace, as kube-ovn-cni does; stopped on drop.
pub struct Running {
    _process: cleanup::Guard,
    _child: std::process::Child,
}

/// Starts the harness in `ns` in its loop mode and returns after its first pass succeeded.
pub fn spawn(
    ns: &NetNs,
    binary: &Path,
    cluster_file: &Path,
    cluster: &Cluster,
    log: &Path,
) -> Result<Running> {
    spawn_with(ns, binary, cluster_file, cluster, log, &[])
}

/// [`spawn`] with more kube-ovn-cni flags, as [`run_once_with`].
pub fn spawn_with(
    ns: &NetNs,
    binary: &Path,
    cluster_file: &Path,
    cluster: &Cluster,
    log: &Path,
    flags: &[&str],
) -> Result<Running> {
    let out = fs::File::create(log)?;
    let child = ns
        .command(binary.display().to_string())
        .arg("--cluster")
        .arg(cluster_file)
        .args([
            "--node-name",
            &cluster.local_node,
            "--protocol",
            "Dual",
            "--service-cluster-ip-range",
            &cluster.service_cidr_flag(),
        ])
        .args(extra_flags(binary))
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting kovn-harness")?;
    let running = Running {
        _process: cleanup::process(child.id()),
        _child: child,
    };
    let deadline = Instant::now() + PASS_TIMEOUT;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains("kovn-harness: pass 1 ok") {
            return Ok(running);
        }
        if text.contains("kovn-harness: pass 1 failed") || Instant::now() > deadline {
            bail!(
                "kovn-harness did not complete its first pass:\n{}",
                last_lines(&text, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The patched build runs with the switch on.
fn extra_flags(binary: &Path) -> &'static [&'static str] {
    if binary.parent().and_then(Path::file_name) == Some("patched".as_ref()) {
        &["--prerouting-datapath", "external"]
    } else {
        &[]
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `iptables -t TABLE -S CHAIN` without the policy/`-N` line; empty when the chain is absent.
fn chain(ns: &NetNs, family: Family, table: &str, chain: &str) -> Result<Vec<String>> {
    let out = ns.output(
        family.iptables(),
        &["-t", table, "-S", chain],
        exec::DEFAULT_TIMEOUT,
    )?;
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect())
}

/// Members of an ipset, sorted; hash:net host entries without their /32 or /128 (as ipset lists
/// them).
fn set_members(ns: &NetNs, name: &str) -> Result<Vec<String>> {
    let out = ns.run("ipset", &["list", name])?;
    let mut members: Vec<String> = out
        .lines()
        .skip_while(|l| !l.starts_with("Members:"))
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    members.sort();
    Ok(members)
}

/// Every rule of the node in `iptables-save` order, without counters and per-table headers,
/// prefixed by family and table: the unit a difference is reported in.
fn all_rules(ns: &NetNs, family: Family) -> Result<Vec<String>> {
    let save = match family {
        Family::V4 => "iptables-save",
        Family::V6 => "ip6tables-save",
    };
    let mut table = String::new();
    let mut rules = Vec::new();
    for line in ns.run(save, &[])?.lines() {
        if let Some(t) = line.strip_prefix('*') {
            t.clone_into(&mut table);
        } else if line.starts_with("-A ") {
            rules.push(format!("{family} {table} {line}"));
        }
    }
    Ok(rules)
}

/// The chain a rule of [`all_rules`] is in: "IPv4 filter -A INPUT".
fn chain_of(rule: &str) -> &str {
    let mut fields = rule.match_indices(' ');
    let end = fields.nth(3).map_or(rule.len(), |(i, _)| i);
    &rule[..end]
}

/// Chains whose rules both sides install in a different relative order (order decides which of
/// an ACCEPT and a REJECT wins).
fn order_differences(real: &[String], ours: &[String]) -> Vec<String> {
    let common = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|r| b.contains(r)).cloned().collect()
    };
    let (real_common, our_common) = (common(real, ours), common(ours, real));
    let chains: BTreeSet<&str> = real_common.iter().map(|r| chain_of(r)).collect();
    chains
        .into_iter()
        .filter(|chain| {
            let pick = |v: &[String]| -> Vec<String> {
                v.iter()
                    .filter(|r| chain_of(r) == *chain)
                    .cloned()
                    .collect()
            };
            pick(&real_common) != pick(&our_common)
        })
        .map(str::to_owned)
        .collect()
}

/// Spec §1.2's rules for `family`, IPVS mode (R1a, R2t, R3t, R2u, R3u) or iptables mode (R1b).
fn spec_prerouting(family: Family, mode: KubeProxyMode) -> Vec<String> {
    let subnets = family.ovn_set("subnets");
    let mark = "-j MARK --set-xmark";
    if mode == KubeProxyMode::Iptables {
        return vec![format!(
            "-A OVN-PREROUTING -i ovn0 -m set --match-set {subnets} src -m set --match-set {} \
             dst {mark} 0x4000/0x4000",
            family.ovn_set("services")
        )];
    }
    let mut rules = vec![format!(
        "-A OVN-PREROUTING -i ovn0 -m set --match-set {subnets} src -m set --match-set {} dst,dst \
         {mark} 0x4000/0x4000",
        family.kube_set("CLUSTER-IP")
    )];
    for proto in ["tcp", "udp"] {
        let set = family.kube_set(&format!("NODE-PORT-LOCAL-{}", proto.to_uppercase()));
        rules.push(format!(
            "-A OVN-PREROUTING -p {proto} -m addrtype --dst-type LOCAL -m set --match-set {set} \
             dst {mark} 0x80000/0x80000"
        ));
        rules.push(format!(
            "-A OVN-PREROUTING -p {proto} -m set --match-set {} src -m set --match-set {set} dst \
             {mark} 0x4000/0x4000",
            family.ovn_set("other-node")
        ));
    }
    rules
}

/// Spec §5.1's sets, as `ipset list` prints the members (sorted).
fn spec_sets() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        (
            "ovn40subnets",
            vec!["10.16.0.0/16", "10.17.0.0/16", "100.64.0.0/16"],
        ),
        ("ovn40services", vec!["10.96.0.0/12"]),
        ("ovn40subnets-nat", vec!["10.16.0.0/16", "10.17.0.0/16"]),
        ("ovn40subnets-distributed-gw", vec!["10.16.0.0/16"]),
        ("ovn40other-node", vec!["192.168.0.12", "192.168.0.13"]),
        ("ovn60services", vec!["fd00:10:96::/112"]),
        ("ovn60other-node", vec!["fd00::12"]),
    ]
}

const JUMP: &str = kube_ovn::PREROUTING_JUMP;

/// The check results of one run.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
}

impl Tally {
    fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                println!("ok      {name}");
                self.passed += 1;
            }
            Err(e) => {
                println!("FAILED  {name}: {e:#}");
                self.failed.push(name.to_owned());
            }
        }
    }
}

fn test(variants: &[Variant]) -> Result<()> {
    ensure!(
        setup::is_root(),
        "cargo xtask kube-ovn test needs root: it creates network namespaces, ipsets and \
         iptables rules"
    );
    setup::ensure_apt_tools(&[
        ("iptables", "iptables"),
        ("ipset", "ipset"),
        ("ip", "iproute2"),
    ])?;
    cleanup::install_signal_handler();
    cleanup::remove_stale().context("removing what earlier runs left")?;
    let cluster = Cluster::fixture();
    let run_dir = tempdir()?;
    let cluster_file = run_dir.path.join("cluster.yaml");
    fs::write(&cluster_file, cluster.to_yaml())?;

    let mut tally = Tally::default();
    for variant in variants {
        let binary = build(variant)?;
        // The patched build is checked after the release it patches has run, as on an upgraded
        // node: the switch must remove what the release left.
        let release = variant
            .patched
            .then(|| build(&Variant::release(&variant.version)))
            .transpose()?;
        for mode in [KubeProxyMode::Ipvs, KubeProxyMode::Iptables] {
            let name = format!("kube-ovn {} {}", variant.name(), mode.flag());
            let ns = node_ns(&cluster, mode)?;
            if let Some(release) = &release {
                tally.check(
                    &format!("{name}: the release runs first"),
                    run_once(&ns, release, &cluster_file, &cluster),
                );
            }
            let ran = run_once(&ns, &binary, &cluster_file, &cluster);
            let ok = ran.is_ok();
            tally.check(&format!("{name}: one pass succeeds"), ran);
            if !ok {
                continue;
            }
            if variant.patched {
                tally.check(
                    &format!("{name}: no PREROUTING rule of Kube-OVN's"),
                    no_prerouting(&ns),
                );
            } else {
                tally.check(
                    &format!("{name}: nat OVN-PREROUTING is spec §1.2's"),
                    prerouting_is_spec(&ns, mode),
                );
                tally.check(
                    &format!("{name}: nat OVN-PREROUTING equals the transcription's"),
                    prerouting_matches_transcription(&ns, &cluster, mode),
                );
            }
            tally.check(
                &format!("{name}: ipsets hold spec §5.1's members"),
                sets_are_spec(&ns),
            );
            tally.check(
                &format!("{name}: POSTROUTING and filter guards are in place"),
                consumers_present(&ns, mode),
            );
            if !variant.patched {
                report_differences(&ns, &cluster, mode, &name)?;
            }
        }
        tally.check(
            &format!("kube-ovn {}: --enable-tproxy", variant.name()),
            tproxy(&binary, release.as_deref(), &cluster, &run_dir.path),
        );
        tally.check(
            &format!(
                "kube-ovn {}: the 3-s loop follows a changed cluster file",
                variant.name()
            ),
            loop_follows_changes(&binary, &cluster, &run_dir.path),
        );
    }
    println!(
        "kube-ovn test: {} passed, {} failed",
        tally.passed,
        tally.failed.len()
    );
    ensure!(tally.failed.is_empty(), "failed: {:?}", tally.failed);
    Ok(())
}

/// Pods for spec §5.3: p1 in the custom VPC on this node (readiness tcpSocket 8080, liveness
/// httpGet on the named port "http" = 8081, startup 9000); p2 the same on another node; p3 in
/// the default VPC on this node; p4 host-network on this node in the custom VPC.
const TPROXY_PODS: &str = r"---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: default, annotations: {ovn.kubernetes.io/logical_switch: vpc1-sub}}
spec:
  nodeName: node1
  containers:
  - name: app
    image: app
    ports: [{name: http, containerPort: 8081}]
    readinessProbe: {tcpSocket: {port: 8080}}
    livenessProbe: {httpGet: {port: http}}
    startupProbe: {tcpSocket: {port: 9000}}
status: {podIPs: [{ip: 10.0.1.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: default, annotations: {ovn.kubernetes.io/logical_switch: vpc1-sub}}
spec:
  nodeName: node2
  containers: [{name: app, image: app, readinessProbe: {tcpSocket: {port: 8080}}}]
status: {podIPs: [{ip: 10.0.1.6}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p3, namespace: default, annotations: {ovn.kubernetes.io/logical_switch: ovn-default}}
spec:
  nodeName: node1
  containers: [{name: app, image: app, readinessProbe: {tcpSocket: {port: 8080}}}]
status: {podIPs: [{ip: 10.16.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p4, namespace: default, annotations: {ovn.kubernetes.io/logical_switch: vpc1-sub}}
spec:
  nodeName: node1
  hostNetwork: true
  containers: [{name: app, image: app, readinessProbe: {tcpSocket: {port: 8090}}}]
status: {podIPs: [{ip: 192.168.0.11}]}
";

/// With `--enable-tproxy`: the release's mangle `OVN-PREROUTING` is spec §1.3's TPROXY rules for
/// p1's liveness and readiness ports only, with its `OVN-OUTPUT` marks; the patched build (run
/// after the release) leaves no mangle PREROUTING rule and keeps `OVN-OUTPUT`.
fn tproxy(binary: &Path, release: Option<&Path>, cluster: &Cluster, dir: &Path) -> Result<()> {
    let ns = node_ns(cluster, KubeProxyMode::Ipvs)?;
    let file = dir.join("cluster-tproxy.yaml");
    fs::write(&file, format!("{}{TPROXY_PODS}", cluster.to_yaml()))?;
    let flags = ["--enable-tproxy"];
    if let Some(release) = release {
        run_once_with(&ns, release, &file, cluster, &flags)?;
    }
    run_once_with(&ns, binary, &file, cluster, &flags)?;
    let tproxy = |port| {
        format!(
            "-A OVN-PREROUTING -d 10.0.1.5/32 -p tcp -m tcp --dport {port} -j TPROXY --on-port \
             8102 --on-ip 192.168.0.11 --tproxy-mark 0x90004/0x90004"
        )
    };
    let output = |port| {
        format!(
            "-A OVN-OUTPUT -d 10.0.1.5/32 -p tcp -m tcp --dport {port} -j MARK --set-xmark \
             0x90003/0x90003"
        )
    };
    let want_prerouting = if release.is_some() {
        Vec::new()
    } else {
        vec![tproxy(8080), tproxy(8081)]
    };
    let got = chain(&ns, Family::V4, "mangle", "OVN-PREROUTING")?;
    ensure!(
        got == want_prerouting,
        "mangle OVN-PREROUTING: got {got:#?}\nwant {want_prerouting:#?}"
    );
    let jumps = chain(&ns, Family::V4, "mangle", "PREROUTING")?;
    let want_jumps = usize::from(release.is_none());
    ensure!(
        jumps.iter().filter(|r| *r == JUMP).count() == want_jumps && jumps.len() == want_jumps,
        "mangle PREROUTING: {jumps:?}"
    );
    let got = chain(&ns, Family::V4, "mangle", "OVN-OUTPUT")?;
    let want = vec![output(8080), output(8081)];
    ensure!(
        got == want,
        "mangle OVN-OUTPUT: got {got:#?}\nwant {want:#?}"
    );
    Ok(())
}

/// Runs the harness in its loop mode, removes node3 from the cluster file and waits (bounded)
/// until kube-ovn-cni's next passes drop its address from `ovn40other-node`.
fn loop_follows_changes(binary: &Path, cluster: &Cluster, dir: &Path) -> Result<()> {
    let ns = node_ns(cluster, KubeProxyMode::Ipvs)?;
    let file = dir.join("cluster-loop.yaml");
    fs::write(&file, cluster.to_yaml())?;
    let log = dir.join("kovn-harness-loop.log");
    let _running = spawn(&ns, binary, &file, cluster, &log)?;
    let want_before = ["192.168.0.12", "192.168.0.13"];
    let got = set_members(&ns, "ovn40other-node")?;
    ensure!(got == want_before, "first pass: ovn40other-node = {got:?}");
    let mut smaller = cluster.clone();
    smaller.nodes.retain(|n| n.name != "node3");
    fs::write(&file, smaller.to_yaml())?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = set_members(&ns, "ovn40other-node")?;
        if got == ["192.168.0.12"] {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "ovn40other-node still {got:?} 15 s after node3 left the cluster file:\n{}",
            last_lines(&fs::read_to_string(&log).unwrap_or_default(), 10)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A throw-away node namespace with kube-proxy's side (`node::kube_proxy`) in `mode`, and
/// connection tracking on (a conntrack rule loads it and the nat table needs it).
fn node_ns(cluster: &Cluster, mode: KubeProxyMode) -> Result<NetNs> {
    let ns = NetNs::create(&format!("{}-kovn", cleanup::unique_stem()))?;
    ns.run("ip", &["link", "set", "lo", "up"])?;
    kube_proxy::install(&ns, cluster, mode).context("kube-proxy's side")?;
    Ok(ns)
}

fn prerouting_is_spec(ns: &NetNs, mode: KubeProxyMode) -> Result<()> {
    for family in Family::ALL {
        let got = chain(ns, family, "nat", "OVN-PREROUTING")?;
        let want = spec_prerouting(family, mode);
        ensure!(got == want, "{family}: got {got:#?}\nwant {want:#?}");
        let jumps = chain(ns, family, "nat", "PREROUTING")?
            .iter()
            .filter(|r| *r == JUMP)
            .count();
        ensure!(jumps == 1, "{family}: {jumps} jumps to OVN-PREROUTING");
    }
    Ok(())
}

/// The transcription's nat `OVN-PREROUTING`, installed in a twin namespace, is rule for rule the
/// real one.
fn prerouting_matches_transcription(
    ns: &NetNs,
    cluster: &Cluster,
    mode: KubeProxyMode,
) -> Result<()> {
    let twin = transcription_ns(cluster, mode)?;
    for family in Family::ALL {
        let real = chain(ns, family, "nat", "OVN-PREROUTING")?;
        let ours = chain(&twin, family, "nat", "OVN-PREROUTING")?;
        ensure!(
            real == ours,
            "{family}: real {real:#?}\ntranscription {ours:#?}"
        );
    }
    Ok(())
}

/// A namespace with kube-proxy's side and this project's transcription of Kube-OVN's rules.
fn transcription_ns(cluster: &Cluster, mode: KubeProxyMode) -> Result<NetNs> {
    let twin = node_ns(cluster, mode)?;
    kube_ovn::install_ipsets(&twin, cluster)?;
    kube_ovn::install_consumers(&twin, cluster)?;
    kube_ovn::install_prerouting(&twin, cluster)?;
    Ok(twin)
}

fn no_prerouting(ns: &NetNs) -> Result<()> {
    for family in Family::ALL {
        for table in ["nat", "mangle"] {
            let jumps: Vec<String> = chain(ns, family, table, "PREROUTING")?
                .into_iter()
                .filter(|r| r.contains("OVN-PREROUTING") || r.contains("kube-ovn"))
                .collect();
            ensure!(jumps.is_empty(), "{family} {table} PREROUTING: {jumps:?}");
            let rules = chain(ns, family, table, "OVN-PREROUTING")?;
            ensure!(
                rules.is_empty(),
                "{family} {table} OVN-PREROUTING: {rules:?}"
            );
        }
    }
    Ok(())
}

fn sets_are_spec(ns: &NetNs) -> Result<()> {
    for (set, want) in spec_sets() {
        let got = set_members(ns, set)?;
        ensure!(got == want, "{set}: got {got:?}, want {want:?}");
    }
    Ok(())
}

fn consumers_present(ns: &NetNs, mode: KubeProxyMode) -> Result<()> {
    for family in Family::ALL {
        let post = chain(ns, family, "nat", "POSTROUTING")?;
        ensure!(
            post.iter()
                .any(|r| r.contains("\"kube-ovn postrouting rules\" -j OVN-POSTROUTING")),
            "{family}: no POSTROUTING jump"
        );
        let ovn_post = chain(ns, family, "nat", "OVN-POSTROUTING")?;
        ensure!(
            ovn_post.len() >= 11,
            "{family}: OVN-POSTROUTING has {} rules",
            ovn_post.len()
        );
        let input = chain(ns, family, "filter", "INPUT")?;
        let accepts = input.iter().filter(|r| r.ends_with("-j ACCEPT")).count();
        ensure!(accepts >= 4, "{family}: {accepts} INPUT accept rules");
        let rejects = input.iter().filter(|r| r.contains("-j REJECT")).count();
        let want = usize::from(mode == KubeProxyMode::Ipvs);
        ensure!(
            rejects == want,
            "{family}: {rejects} INPUT REJECT guards, want {want}"
        );
    }
    Ok(())
}

/// Prints every rule only the real Kube-OVN or only the transcription installs (both on top of
/// the same kube-proxy side), and every set whose members differ. A report, not a check: the
/// lead decides which differences are deliberate (docs/kube-ovn-real.md lists them).
fn report_differences(
    ns: &NetNs,
    cluster: &Cluster,
    mode: KubeProxyMode,
    name: &str,
) -> Result<()> {
    let twin = transcription_ns(cluster, mode)?;
    let mut out = String::new();
    for family in Family::ALL {
        let real = all_rules(ns, family)?;
        let ours = all_rules(&twin, family)?;
        for rule in real.iter().filter(|r| !ours.contains(r)) {
            let _ = writeln!(out, "  only real Kube-OVN:   {rule}");
        }
        for rule in ours.iter().filter(|r| !real.contains(r)) {
            let _ = writeln!(out, "  only transcription:   {rule}");
        }
        for chain in order_differences(&real, &ours) {
            let _ = writeln!(out, "  order differs:        {chain}");
        }
    }
    let names = |ns: &NetNs| -> Result<BTreeSet<String>> {
        Ok(ns
            .run("ipset", &["list", "-n"])?
            .lines()
            .filter(|n| n.starts_with("ovn"))
            .map(str::to_owned)
            .collect())
    };
    let (real_sets, our_sets) = (names(ns)?, names(&twin)?);
    for set in real_sets.union(&our_sets) {
        let real = if real_sets.contains(set) {
            set_members(ns, set)?
        } else {
            vec!["(absent)".to_owned()]
        };
        let ours = if our_sets.contains(set) {
            set_members(&twin, set)?
                .into_iter()
                .map(|m| strip_host_prefix(&m))
                .collect()
        } else {
            vec!["(absent)".to_owned()]
        };
        if real != ours {
            let _ = writeln!(out, "  set {set}: real {real:?}, transcription {ours:?}");
        }
    }
    if out.is_empty() {
        println!("{name}: no difference from the transcription");
    } else {
        print!("{name}: differences from the transcription\n{out}");
    }
    Ok(())
}

fn strip_host_prefix(member: &str) -> String {
    member
        .strip_suffix("/32")
        .or_else(|| member.strip_suffix("/128"))
        .unwrap_or(member)
        .to_owned()
}

/// A private directory under target/, removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn tempdir() -> Result<TempDir> {
    let path = cmd::target_dir()
        .join("kube-ovn-harness")
        .join("run")
        .join(cleanup::unique_stem());
    fs::create_dir_all(&path)?;
    Ok(TempDir { path })
}

/// The releases `contrib/kube-ovn/` has patches for (its subdirectories), sorted.
fn patched_versions() -> Result<Vec<String>> {
    let dir = cmd::workspace_root().join(PATCH_DIR);
    let mut versions = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            versions.push(
                path.file_name()
                    .expect("a name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    versions.sort();
    Ok(versions)
}

/// Test names `go test -v` reported as failed.
fn failed_tests(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--- FAIL: "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `go test -v` in `src`; Ok(names of failed tests), Err when go could not run the tests at all.
fn go_test(src: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = exec::run_bounded(
        go().args(["test", "-count=1", "-v"])
            .args(args)
            .current_dir(src),
        None,
        BUILD_TIMEOUT,
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// For each release with patches: the patches apply to the module source, kube-ovn-cni builds,
/// Kube-OVN's own `pkg/daemon` tests pass with them (a test that also fails without them is
/// reported as such), and the patches' own tests ran — as root, none skipped.
fn patch_test() -> Result<()> {
    let mut tally = Tally::default();
    for version in patched_versions()? {
        let base = cmd::target_dir()
            .join("kube-ovn-harness")
            .join("patch-test")
            .join(&version);
        let unpatched = base.join("unpatched");
        let patched = base.join("patched");
        prepare_source(&version, false, &unpatched)?;
        let name = format!("patch-test {version}");
        let applied = prepare_source(&version, true, &patched);
        let ok = applied.is_ok();
        tally.check(&format!("{name}: the patches apply"), applied);
        if !ok {
            continue;
        }
        tally.check(
            &format!("{name}: kube-ovn-cni (cmd/daemon) builds"),
            go_output(
                go().args(["build", "-o", "/dev/null", "./cmd/daemon/"])
                    .current_dir(&patched),
            )
            .map(drop),
        );
        let started = Instant::now();
        let (_, before) = go_test(&unpatched, &["./pkg/daemon/..."])?;
        let failing_before = failed_tests(&before);
        let (passed, after) = go_test(&patched, &["./pkg/daemon/..."])?;
        eprintln!(
            "{name}: go test ./pkg/daemon/... twice in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        let failing_after = failed_tests(&after);
        let new_failures: Vec<&String> = failing_after
            .iter()
            .filter(|t| !failing_before.contains(t))
            .collect();
        if !failing_before.is_empty() {
            println!("{name}: failing without the patches too: {failing_before:?}");
        }
        tally.check(
            &format!("{name}: go test ./pkg/daemon/... passes with the patches"),
            if new_failures.is_empty() && (passed || !failing_before.is_empty()) {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "new failures {new_failures:?}\n{}",
                    last_lines(&after, 40)
                ))
            },
        );
        let own = [
            "TestValidatePreroutingDatapath",
            "TestPreroutingJumpRule",
            "TestReleasePrerouting",
        ];
        tally.check(
            &format!("{name}: the patches' own tests ran and passed"),
            own.iter().try_for_each(|t| {
                let pass = format!("--- PASS: {t} ");
                ensure!(
                    after.lines().any(|l| l.trim_start().starts_with(&pass)),
                    "{t} did not pass (root: {}; skipped without root)",
                    setup::is_root()
                );
                Ok(())
            }),
        );
    }
    println!(
        "kube-ovn patch-test: {} passed, {} failed",
        tally.passed,
        tally.failed.len()
    );
    ensure!(tally.failed.is_empty(), "failed: {:?}", tally.failed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn variants_parse() {
        assert_eq!(
            Variant::parse("v1.16.2").unwrap(),
            Variant::release("v1.16.2")
        );
        let patched = Variant::parse("patched").unwrap();
        assert!(patched.patched && patched.version == PATCHED_BASE);
        assert_eq!(patched.name(), "patched");
        for bad in ["1.16.2", "v1.16", "latest", "v1.x.2", ""] {
            assert!(Variant::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn positioning_generations() {
        assert_eq!(positioning_of("v1.13.0"), Positioning::V1_13_0);
        assert_eq!(positioning_of("v1.13.11"), Positioning::V1_13_0);
        assert_eq!(positioning_of("v1.13.13"), Positioning::V1_13_13);
        assert_eq!(positioning_of("v1.13.15"), Positioning::V1_13_15);
        assert_eq!(positioning_of("v1.14.10"), Positioning::V1_13_15);
        assert_eq!(positioning_of("v1.16.2"), Positioning::V1_13_15);
    }

    #[test]
    fn version_tags_follow_pkg_daemon() {
        assert_eq!(version_tags("v1.13.11"), ["kovnlegacy", "kovnnoservices"]);
        assert_eq!(version_tags("v1.13.13"), ["kovnlegacy", "kovnnoservices"]);
        assert_eq!(version_tags("v1.14.10"), ["kovnlegacy"]);
        for v in ["v1.15.0", "v1.16.2", "v2.0.0"] {
            assert!(version_tags(v).is_empty(), "{v}");
        }
    }

    #[test]
    fn order_differences_compare_common_rules_per_chain() {
        let real = strings(&[
            "IPv4 filter -A INPUT -j REJECT",
            "IPv4 filter -A INPUT -m set --match-set a src -j ACCEPT",
            "IPv4 filter -A FORWARD -s 10.16.0.0/16",
            "IPv4 filter -A FORWARD -j ACCEPT",
            "IPv4 filter -A FORWARD -j DROP",
        ]);
        let ours = strings(&[
            "IPv4 filter -A INPUT -m set --match-set a src -j ACCEPT",
            "IPv4 filter -A INPUT -j REJECT",
            "IPv4 filter -A FORWARD -j ACCEPT",
            "IPv4 filter -A FORWARD -j DROP",
        ]);
        assert_eq!(chain_of(&real[1]), "IPv4 filter -A INPUT");
        // FORWARD differs only by a rule one side lacks: not an order difference.
        assert_eq!(order_differences(&real, &ours), ["IPv4 filter -A INPUT"]);
        assert!(order_differences(&real, &real).is_empty());
    }

    #[test]
    fn failed_tests_are_read_from_go_test_output() {
        let out = "=== RUN   TestA\n--- FAIL: TestA (0.00s)\n    --- FAIL: TestA/sub (0.00s)\n--- PASS: TestB (0.01s)\nFAIL\n";
        assert_eq!(failed_tests(out), ["TestA", "TestA/sub"]);
    }

    #[test]
    fn host_prefixes_are_stripped() {
        assert_eq!(strip_host_prefix("192.168.0.12/32"), "192.168.0.12");
        assert_eq!(strip_host_prefix("fd00::12/128"), "fd00::12");
        assert_eq!(strip_host_prefix("10.16.0.0/16"), "10.16.0.0/16");
    }
}
