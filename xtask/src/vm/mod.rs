//! `cargo xtask vm-test`: the privileged suites on other kernels, each booted under QEMU (TCG) from
//! a busybox initramfs, and optionally on the host kernel. See docs/kernel-matrix.md.

mod binaries;
mod boot;
mod complexity;
mod initramfs;
mod kernel;
mod report;
mod tools;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// What runs when no `--kernel` is given.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1"];
/// Runs the suites directly on the running kernel instead of in a guest.
const HOST: &str = "host";

/// Modules the suites need that Debian builds as modules; their dependencies (`nfnetlink`,
/// `x_tables`, `ip_set`, …) are added from each module's `depends=`. `sch_ingress` provides both
/// the `ingress` and `clsact` qdiscs, `cls_bpf` the BPF classifier that netlink attachment uses,
/// `veth` the namespace pairs; the netns suite also adds a foreign `u32` filter, counts marks
/// with iptables-nft rules (`nf_tables`, with `nft_compat` and the `xt_` matches for what
/// iptables-nft does not translate natively) and creates kube-proxy's ipsets.
const MODULES: &[&str] = &[
    "sch_ingress",
    "cls_bpf",
    "veth",
    "cls_u32",
    "nf_tables",
    // A module of its own before 6.x; later part of nf_tables.
    "nft_counter?",
    "nft_compat",
    "xt_mark",
    "xt_tcpudp",
    "ip_set_hash_ipport",
    "ip_set_bitmap_port",
    // Connection tracking (with nf_conntrack and the defrag modules it depends on): the netns
    // suite's `nf_conntrack_tcp_loose` test and its `-m conntrack` counting rules, which carry
    // `-m comment`.
    "xt_conntrack",
    "xt_comment",
];

/// Host programs the suites call inside the guest, with the Debian package providing each.
/// Busybox supplies the rest (`mount`, `kill`, `cat`, …): its `ip` cannot do `netns`, and its
/// `sh` runs its own applets before searching `PATH`, so the suites' `sh -c "ip …"` needs a
/// shell that does not (dash, found as `/usr/bin/sh` before busybox's `/bin/sh`).
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("sh", "dash"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("iptables-save", "iptables"),
    ("ip6tables-save", "iptables"),
    ("iptables-nft-save", "iptables"),
    ("ip6tables-nft-save", "iptables"),
    ("ipset", "ipset"),
    // kube-proxy's nftables tables and native mark rules (the netns suite's nftables test).
    ("nft", "nftables"),
    // Agents the suites start run with only the DaemonSet's capabilities, as on the host.
    ("setpriv", "util-linux"),
];
/// Where iptables loads its match and target extensions from.
const PLUGIN_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables"];
/// Workspace directories the suites read through compiled-in paths (`CARGO_MANIFEST_DIR/..`).
const GUEST_DATA: &[&str] = &["deploy"];

/// Property-test cases per guest: the datapath suite's default (100 000) is sized for native
/// speed; under TCG this keeps each kernel's run to a few minutes (docs/kernel-matrix.md).
const PROPTEST_CASES: u32 = 20_000;

/// `KOVN_TEST_TIME_SCALE` in the guests: the datapath suite takes ~10 s on the host and 55–90 s
/// under TCG, so suites with wall-clock deadlines (the netns suite's "within a second") stretch
/// them by this factor there.
const TIME_SCALE: u32 = 10;

/// Per test binary: the datapath and netns suites take 6–12 min under TCG with other work on
/// the machine; `/init` kills a binary past it and records a failure, then runs the next.
const TEST_TIMEOUT: Duration = Duration::from_mins(20);
/// Boot (~5 s), module loading and the reset, on top of the binaries' budgets.
const BOOT_ALLOWANCE: Duration = Duration::from_mins(2);

/// Validates a `--kernel` value.
pub fn parse_kernel(value: &str) -> Result<String, String> {
    if value == HOST || kernel::LINES.iter().any(|l| l.key == value) {
        Ok(value.to_owned())
    } else {
        let known: Vec<&str> = kernel::LINES.iter().map(|l| l.key).collect();
        Err(format!("expected one of {known:?} or \"{HOST}\""))
    }
}

/// One kernel's outcome, for the summary.
struct Outcome {
    key: String,
    passed: bool,
    release: String,
    elapsed: Duration,
    report: report::Report,
    /// Why the run failed before or outside the suites (fetch error, timeout, missing line).
    problem: Option<String>,
    features: Vec<String>,
}

/// `bless`: record the measured verifier complexity as the new baseline instead of comparing.
pub fn run(kernels: Vec<String>, bless: bool) -> Result<()> {
    let started = Instant::now();
    let mut kernels: Vec<String> = if kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
    } else {
        kernels
    };
    let mut seen = std::collections::HashSet::new();
    kernels.retain(|k| seen.insert(k.clone()));
    let vm_dir = cmd::workspace_root().join("target").join("vm");
    fs::create_dir_all(vm_dir.join("logs"))?;
    let guests = kernels.iter().any(|k| k != HOST);
    if guests {
        ensure_guest_tools()?;
    }
    setup::ensure_apt_tools(&[("strip", "binutils")])?;

    let build_started = Instant::now();
    let binaries::Built {
        tests,
        programs,
        missing,
    } = binaries::build(&vm_dir.join("bin"))?;
    let extra = if guests {
        guest_files(&programs)?
    } else {
        tools::Members::new()
    };
    eprintln!(
        "vm-test: built {:?} for {} in {} s",
        tests.iter().map(|t| &t.name).collect::<Vec<_>>(),
        binaries::TARGET,
        build_started.elapsed().as_secs()
    );
    for name in &missing {
        eprintln!(
            "vm-test: NOTE: privileged suite {name:?} is listed but kube-ovn-agent has no such \
             test target yet: not run"
        );
    }

    let mut guest_results = run_guests(&vm_dir, &kernels, &tests, &extra);
    let mut outcomes = Vec::new();
    for key in &kernels {
        let outcome = if key == HOST {
            run_host(&vm_dir, &tests)
        } else {
            let at = guest_results
                .iter()
                .position(|(k, _)| k == key)
                .expect("every guest ran");
            guest_results.swap_remove(at).1
        };
        let outcome = outcome.unwrap_or_else(|e| Outcome {
            key: key.clone(),
            passed: false,
            release: "?".into(),
            elapsed: Duration::ZERO,
            report: report::Report::default(),
            problem: Some(format!("{e:#}")),
            features: Vec::new(),
        });
        let mut outcome = outcome;
        if !bless && outcome.passed {
            check_complexity(&mut outcome);
        }
        eprintln!(
            "vm-test: {key}: {} in {} s",
            verdict(outcome.passed),
            outcome.elapsed.as_secs()
        );
        outcomes.push(outcome);
    }
    print_summary(&outcomes, &missing, started.elapsed());
    if bless {
        let measured: Vec<_> = outcomes
            .iter()
            .filter(|o| o.passed && !o.report.verifier.is_empty())
            .map(|o| complexity::Measured {
                key: o.key.clone(),
                release: o.release.clone(),
                programs: o.report.verifier.clone(),
            })
            .collect();
        complexity::bless(&measured)?;
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.key.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test failed on {failed:?}; logs in {}",
            vm_dir.join("logs").display()
        );
    }
    Ok(())
}

/// Fails a kernel whose verifier walked more instructions than its recorded baseline.
fn check_complexity(outcome: &mut Outcome) {
    if outcome.report.verifier.is_empty() {
        outcome.passed = false;
        outcome.problem = Some("no KOVN-VERIFIER line: the verifier suite did not report".into());
        return;
    }
    match complexity::compare(&outcome.key, &outcome.release, &outcome.report.verifier) {
        Ok(found) => {
            outcome.report.notes.extend(found.notes);
            if !found.problems.is_empty() {
                outcome.passed = false;
                outcome.problem = Some(found.problems.join("; "));
            }
        }
        Err(e) => {
            outcome.passed = false;
            outcome.problem = Some(format!("{e:#}"));
        }
    }
}

fn verdict(passed: bool) -> &'static str {
    if passed { "PASS" } else { "FAIL" }
}

fn ensure_guest_tools() -> Result<()> {
    setup::ensure_apt_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dpkg-deb", "dpkg"),
        ("tar", "tar"),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
        ("ldd", "libc-bin"),
    ])?;
    setup::ensure_apt_tools(GUEST_TOOLS)?;
    ensure_package("busybox-static")
}

/// Everything besides busybox, modules and suites that the guest needs, at host paths.
fn guest_files(programs: &[(PathBuf, PathBuf)]) -> Result<tools::Members> {
    let mut members = tools::Members::new();
    let names: Vec<&str> = GUEST_TOOLS.iter().map(|(name, _)| *name).collect();
    tools::collect(&mut members, &names, PLUGIN_DIRS)?;
    let root = cmd::workspace_root();
    for dir in GUEST_DATA {
        let dir = root.join(dir);
        if dir.is_dir() {
            tools::tree(&mut members, &dir)?;
        }
    }
    // Suites reach data as `CARGO_MANIFEST_DIR/../deploy/…`, from the agent's crate and from the
    // test kit's (`kube_ovn_testkit::netns::example_cluster`).
    for package in [binaries::PACKAGE, "testkit"] {
        members.insert(tools::guest_path(&root.join(package))?, tools::Member::Dir);
    }
    for (path, stripped) in programs {
        members.insert(
            tools::guest_path(path)?,
            tools::Member::File(stripped.clone()),
        );
    }
    Ok(members)
}

/// Installs a Debian package that provides no distinctive command (busybox's command also comes
/// from the dynamically linked `busybox` package, which cannot run in the initramfs).
fn ensure_package(package: &str) -> Result<()> {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .context("starting dpkg-query")?;
    if String::from_utf8_lossy(&status.stdout).contains("install ok installed") {
        return Ok(());
    }
    if !setup::is_root() {
        bail!("missing package {package}; install it (apt-get install {package}) or run as root");
    }
    eprintln!("vm-test: installing {package} with apt-get");
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// busybox-static's binary (`/bin/busybox`; the same file under /usr/bin on merged-/usr systems).
fn busybox() -> Result<PathBuf> {
    let files = cmd::output(Command::new("dpkg").args(["-L", "busybox-static"]))?;
    files
        .lines()
        .find(|l| l.ends_with("/bin/busybox"))
        .map(PathBuf::from)
        .context("busybox-static ships no bin/busybox")
}

fn vm_timeout(tests: usize) -> Duration {
    if let Some(secs) = std::env::var("KOVN_VM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Duration::from_secs(secs);
    }
    BOOT_ALLOWANCE + TEST_TIMEOUT * u32::try_from(tests).unwrap_or(u32::MAX)
}

/// Runs every guest kernel of `kernels` side by side: each is one TCG vCPU (one host core) and
/// 512 MiB, and they share nothing but read-only inputs (per-kernel apt, kernel, initramfs and
/// log paths). The host suites run after them, alone.
fn run_guests(
    vm_dir: &Path,
    kernels: &[String],
    tests: &[binaries::TestBinary],
    extra: &tools::Members,
) -> Vec<(String, Result<Outcome>)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = kernels
            .iter()
            .filter(|k| *k != HOST)
            .map(|key| {
                (
                    key.clone(),
                    scope.spawn(move || run_guest(vm_dir, key, tests, extra)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(key, handle)| {
                let result = handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the {key} guest's thread panicked")));
                (key, result)
            })
            .collect()
    })
}

fn run_guest(
    vm_dir: &Path,
    key: &str,
    tests: &[binaries::TestBinary],
    extra: &tools::Members,
) -> Result<Outcome> {
    let fetch_started = Instant::now();
    let kernel = kernel::fetch(vm_dir, key, MODULES)?;
    eprintln!(
        "vm-test: {key}: kernel ready in {} s",
        fetch_started.elapsed().as_secs()
    );
    let initramfs = vm_dir.join(format!("initramfs-{key}.cpio.gz"));
    let busybox = busybox()?;
    initramfs::write(
        &initramfs,
        &initramfs::Plan {
            kernel: &kernel,
            busybox: &busybox,
            tests,
            test_timeout_secs: TEST_TIMEOUT.as_secs(),
            proptest_cases: PROPTEST_CASES,
            time_scale: TIME_SCALE,
            extra,
        },
    )?;
    let log = vm_dir.join("logs").join(format!("{key}.log"));
    let timeout = vm_timeout(tests.len());
    let run = boot::qemu(&kernel, &initramfs, &log, timeout)?;
    let _ = fs::remove_file(&initramfs);
    let text =
        fs::read(&log).with_context(|| format!("reading the serial log {}", log.display()))?;
    let report = report::parse(&String::from_utf8_lossy(&text));
    let mut problem = None;
    if run.timed_out {
        problem = Some(format!(
            "the VM did not finish within {} s (hung or too slow); killed",
            timeout.as_secs()
        ));
    } else if report.passed.is_none() {
        problem = Some("the guest printed no KOVN-VM-RESULT line (crashed or panicked?)".into());
    }
    let passed = problem.is_none() && report.passed == Some(true);
    if !passed {
        print_tail(&log, &String::from_utf8_lossy(&text));
    }
    Ok(Outcome {
        key: key.to_owned(),
        passed,
        release: report
            .release
            .clone()
            .unwrap_or_else(|| kernel.release.clone()),
        elapsed: fetch_started.elapsed(),
        report,
        problem,
        features: features(&kernel),
    })
}

fn run_host(vm_dir: &Path, tests: &[binaries::TestBinary]) -> Result<Outcome> {
    let log = vm_dir.join("logs").join("host.log");
    let run = boot::host(tests, PROPTEST_CASES, &log, TEST_TIMEOUT)?;
    let text = fs::read_to_string(&log)?;
    let report = report::parse(&text);
    let problem = run
        .timed_out
        .then(|| format!("a suite ran past {} s; killed", TEST_TIMEOUT.as_secs()));
    let passed = problem.is_none() && report.passed == Some(true);
    if !passed {
        print_tail(&log, &text);
    }
    Ok(Outcome {
        key: HOST.into(),
        passed,
        release: report.release.clone().unwrap_or_else(|| "?".into()),
        elapsed: run.elapsed,
        report,
        problem,
        features: Vec::new(),
    })
}

/// The kernel facts, read from the kernel's own config, that decide which attach path and
/// program features the agent can use there.
fn features(kernel: &kernel::Kernel) -> Vec<String> {
    let set = |name: &str| kernel.config_value(name);
    let mut out = Vec::new();
    out.push(match set("NET_XGRESS") {
        Some(v) => format!("tcx: available (CONFIG_NET_XGRESS={v})"),
        None => "tcx: NOT available (no CONFIG_NET_XGRESS: tcx needs Linux 6.6); the agent \
                 attaches with netlink clsact + cls_bpf"
            .into(),
    });
    for (name, what) in [
        ("NET_SCH_INGRESS", "clsact qdisc"),
        ("NET_CLS_BPF", "cls_bpf classifier"),
        ("DEBUG_INFO_BTF", "kernel BTF"),
        ("BPF_JIT", "BPF JIT"),
    ] {
        out.push(match set(name) {
            Some(v) => format!("{what}: CONFIG_{name}={v}"),
            None => format!("{what}: NOT set (CONFIG_{name})"),
        });
    }
    if !kernel.builtin.is_empty() {
        out.push(format!("built in: {}", kernel.builtin.join(", ")));
    }
    out
}

fn print_tail(log: &Path, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    eprintln!("--- last {} lines of {} ---", tail.len(), log.display());
    for line in tail {
        eprintln!("{}", line.trim_end_matches('\r'));
    }
    eprintln!("---");
}

fn print_summary(outcomes: &[Outcome], missing: &[String], elapsed: Duration) {
    let mut out = String::new();
    let _ = writeln!(out, "\nvm-test summary ({} s in all)", elapsed.as_secs());
    for o in outcomes {
        let verifier: Vec<String> = o
            .report
            .verifier
            .iter()
            .map(|(program, n)| format!("{program}={n}"))
            .collect();
        let _ = writeln!(
            out,
            "KOVN-VM-SUMMARY kernel={} release={} {} time={}s processed_insns: {}",
            o.key,
            o.release,
            verdict(o.passed),
            o.elapsed.as_secs(),
            if verifier.is_empty() {
                "none reported".to_owned()
            } else {
                verifier.join(" ")
            }
        );
        if let Some(problem) = &o.problem {
            let _ = writeln!(out, "    problem: {problem}");
        }
        for failure in &o.report.module_failures {
            let _ = writeln!(out, "    {failure}");
        }
        for test in &o.report.tests {
            let _ = writeln!(
                out,
                "    {} {} (rc {}): {}",
                test.name,
                verdict(test.passed),
                test.rc,
                test.summary.as_deref().unwrap_or("no libtest summary")
            );
            for ignored in &test.ignored {
                let _ = writeln!(out, "        {ignored}");
            }
            if !test.passed {
                for line in &test.failures {
                    let _ = writeln!(out, "        | {line}");
                }
            }
        }
        for note in &o.report.notes {
            let _ = writeln!(out, "    {note}");
        }
        for feature in &o.features {
            let _ = writeln!(out, "    {feature}");
        }
    }
    for name in missing {
        let _ = writeln!(out, "NOTE: suite {name:?} not in this checkout: not run");
    }
    print!("{out}");
}
