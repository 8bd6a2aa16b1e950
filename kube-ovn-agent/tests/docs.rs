//! Keeps the operator docs true to the binaries: every `--flag` written in `docs/` or the README
//! is in the `--help` output of the program it is written for — `kubectl kovn`'s on a line that
//! runs the plugin, else `kube-ovn-agent`'s (any subcommand) — or a flag of a named other
//! program. A renamed or removed flag, or a typo, fails here instead of in an operator's shell.
//! Also: the map count operations.md states is the number of maps the eBPF object declares.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use libtest_mimic::{Arguments, Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-kovn");

/// Flags the docs mention that belong to other programs, with the program they belong to.
const FOREIGN: &[(&str, &str)] = &[
    // iptables / ip6tables rule syntax (Kube-OVN's rules, quoted in spec.md and migration.md).
    ("comment", "iptables"),
    ("ctorigdst", "iptables"),
    ("ctstate", "iptables"),
    ("dport", "iptables"),
    ("dst-type", "iptables"),
    ("mark", "iptables"),
    ("match-set", "iptables"),
    ("noflush", "iptables-restore"),
    ("on-ip", "iptables TPROXY"),
    ("on-port", "iptables TPROXY"),
    ("random-fully", "iptables"),
    ("set-xmark", "iptables"),
    ("to-source", "iptables"),
    ("tproxy-mark", "iptables TPROXY"),
    ("state", "iptables"),
    ("tcp-flags", "iptables"),
    // kube-ovn-cni's flags, which ours mirror or which the docs discuss.
    ("cluster-router", "kube-ovn-cni"),
    ("enable-tproxy", "kube-ovn-cni"),
    ("non-primary-cni-mode", "kube-ovn-cni"),
    ("service-cluster-ip-range", "kube-ovn-cni"),
    ("cluster-cidr", "kube-proxy"),
    ("iptables-masquerade-bit", "kube-proxy"),
    ("nodeport-addresses", "kube-proxy"),
    // Kube-OVN's kube-ovn-cni with the hand-over patch (contrib/kube-ovn), and our harness of
    // its gateway code (go/kube-ovn-harness).
    ("prerouting-datapath", "kube-ovn-cni (patched)"),
    ("cluster", "kovn-harness"),
    ("interval", "kovn-harness"),
    ("once", "kovn-harness"),
    ("passes", "kovn-harness"),
    ("protocol", "kovn-harness"),
    // kube-apiserver as the testbed starts it.
    ("allow-privileged", "kube-apiserver"),
    ("authorization-mode", "kube-apiserver"),
    ("cert-dir", "kube-apiserver"),
    ("etcd-compaction-interval", "kube-apiserver"),
    ("runtime-config", "kube-apiserver"),
    ("token-auth-file", "kube-apiserver"),
    // Helm, podman.
    ("namespace", "helm/kubectl"),
    ("reuse-values", "helm"),
    ("no-hooks", "helm uninstall"),
    ("set", "helm"),
    ("network", "podman"),
    ("build-arg", "podman/docker build"),
    // kubectl, cargo, xtask and the test harness.
    ("as", "kubectl"),
    ("dry-run", "kubectl"),
    ("list", "kubectl auth can-i"),
    ("overwrite", "kubectl label"),
    ("kube-ovn", "cargo xtask e2e"),
    ("kube-ovn-coexist", "cargo xtask e2e"),
    ("versions", "cargo xtask kube-ovn"),
    ("image", "kubectl debug"),
    ("profile", "kubectl debug"),
    ("bless", "cargo xtask vm-test"),
    ("kernel", "cargo xtask vm-test"),
    ("quick", "cargo xtask e2e/bench"),
    ("ci", "cargo xtask image"),
    ("agent", "cargo xtask e2e"),
    ("only", "cargo xtask e2e"),
    ("rebuilt-agent", "cargo xtask e2e"),
    ("color", "cargo"),
    ("bin", "cargo"),
    ("lib", "cargo test"),
    ("locked", "cargo"),
    ("message-format", "cargo"),
    ("no-run", "cargo"),
    ("release", "cargo"),
    ("target", "cargo"),
    ("test", "cargo"),
    ("test-threads", "libtest"),
];

fn main() {
    let args = Arguments::from_args();
    let tests = vec![
        Trial::test(
            "every_flag_in_the_docs_exists",
            every_flag_in_the_docs_exists,
        ),
        Trial::test(
            "the_check_catches_an_unknown_flag",
            the_check_catches_an_unknown_flag,
        ),
        Trial::test(
            "the_map_count_in_the_docs_is_the_objects",
            the_map_count_is_the_objects,
        ),
    ];
    libtest_mimic::run(&args, tests).exit();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is inside the workspace")
        .to_path_buf()
}

/// `PROGRAM ARGS --help`'s text.
fn help(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands a `--help` text lists under `Commands:`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// Every long flag in the `--help` output of `program` and of each of its subcommands.
fn help_flags(program: &str) -> BTreeSet<String> {
    let top = help(program, &[]);
    let mut texts = vec![top.clone()];
    for sub in subcommands(&top) {
        texts.push(help(program, &[&sub]));
    }
    let mut out = BTreeSet::new();
    for text in texts {
        // Option lines start with `-x, --name` or `--name`.
        for line in text
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with('-'))
        {
            out.extend(flags_in(line).into_iter().map(|(_, flag)| flag).take(1));
        }
    }
    out
}

fn agent_flags() -> &'static BTreeSet<String> {
    static FLAGS: OnceLock<BTreeSet<String>> = OnceLock::new();
    FLAGS.get_or_init(|| help_flags(AGENT))
}

fn plugin_flags() -> &'static BTreeSet<String> {
    static FLAGS: OnceLock<BTreeSet<String>> = OnceLock::new();
    FLAGS.get_or_init(|| help_flags(PLUGIN))
}

/// `--name` tokens of a text, with their line numbers.
fn flags_in(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(at) = line[i..].find("--") {
            let start = i + at;
            // `---` (rules, diff markers) and a word glued before the dashes are not flags.
            let glued =
                start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-');
            let name: String = line[start + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if !glued && name.starts_with(|c: char| c.is_ascii_lowercase()) {
                out.push((number + 1, name.trim_end_matches('-').to_owned()));
            }
            i = start + 2 + name.len();
        }
    }
    out
}

/// `file:line: --flag` for every flag that is neither the program's nor a listed foreign one.
/// A line that runs `kubectl kovn` (and not the agent) is checked against the plugin's flags.
fn unknown_flags(files: &[(String, String)]) -> Vec<String> {
    let foreign: BTreeMap<&str, &str> = FOREIGN.iter().copied().collect();
    let mut out = Vec::new();
    for (name, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        for (line, flag) in flags_in(text) {
            let here = lines[line - 1];
            let (ours, program) =
                if here.contains("kubectl kovn") && !here.contains("kube-ovn-agent") {
                    (plugin_flags(), "kubectl kovn")
                } else {
                    (agent_flags(), "kube-ovn-agent")
                };
            if !ours.contains(&flag) && !foreign.contains_key(flag.as_str()) {
                out.push(format!(
                    "{name}:{line}: --{flag} (not in `{program} --help`)"
                ));
            }
        }
    }
    out
}

fn doc_files() -> Vec<(String, String)> {
    let mut paths = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let name = p.strip_prefix(repo()).unwrap_or(&p).display().to_string();
            (name, text)
        })
        .collect()
}

fn every_flag_in_the_docs_exists() -> Result<(), Failed> {
    let files = doc_files();
    assert!(files.len() > 3, "expected README.md and the docs/ pages");
    let unknown = unknown_flags(&files);
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "flags in the docs that the `--help` of the program they are written for (any \
             subcommand) does not list, and that tests/docs.rs does not list as another \
             program's:\n{}",
            unknown.join("\n")
        )
        .into())
    }
}

fn the_check_catches_an_unknown_flag() -> Result<(), Failed> {
    let text = "run `kube-ovn-agent run --bpffs-root /x --no-such-flag` — a rule: ----\n\
                `iptables -m set --match-set s src`\n\
                `kubectl kovn verify --window 1m --bpffs-root /x`\n\
                `kubectl kovn -n ns status --namespace ns`";
    let found = unknown_flags(&[("x.md".into(), text.into())]);
    let expected = [
        "x.md:1: --no-such-flag (not in `kube-ovn-agent --help`)",
        "x.md:3: --bpffs-root (not in `kubectl kovn --help`)",
    ];
    if found == expected {
        Ok(())
    } else {
        Err(format!("expected exactly {expected:?}, got {found:?}").into())
    }
}

/// operations.md's `every map (N)` against the `#[btf_map(name = "kovn_…")]` declarations.
fn the_map_count_is_the_objects() -> Result<(), Failed> {
    let maps = std::fs::read_to_string(repo().join("kube-ovn-ebpf/src/maps.rs"))
        .map_err(|e| e.to_string())?;
    let declared = maps.matches("#[btf_map(name = \"kovn_").count();
    let docs =
        std::fs::read_to_string(repo().join("docs/operations.md")).map_err(|e| e.to_string())?;
    let stated: Vec<usize> = docs
        .match_indices("every map (")
        .filter_map(|(at, m)| {
            let rest = &docs[at + m.len()..];
            rest[..rest.find(')')?].parse().ok()
        })
        .collect();
    if declared > 0 && stated == [declared] {
        Ok(())
    } else {
        Err(format!(
            "kube-ovn-ebpf/src/maps.rs declares {declared} maps, docs/operations.md says {stated:?}"
        )
        .into())
    }
}
