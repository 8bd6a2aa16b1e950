//! Keeps the operator docs true to the binary: every `--flag` written in `docs/` or the README is
//! either one of the agent's own flags (any subcommand, from the same clap definition `--help`
//! prints) or a flag of a named other program. A renamed or removed agent flag, or a typo, fails
//! here instead of in an operator's shell.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use kube_ovn_agent::cli::Cli;
use libtest_mimic::{Arguments, Failed, Trial};

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
    ];
    libtest_mimic::run(&args, tests).exit();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate is inside the workspace")
        .to_path_buf()
}

/// Every long flag of every subcommand, as clap renders them in `--help`.
fn agent_flags() -> BTreeSet<String> {
    fn walk(command: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                out.insert(long.to_owned());
            }
            for alias in arg.get_all_aliases().into_iter().flatten() {
                out.insert(alias.to_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::from(["help".to_owned(), "version".to_owned()]);
    walk(&Cli::command(), &mut out);
    out
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

/// `file:line: --flag` for every flag that is neither the agent's nor a listed foreign one.
fn unknown_flags(files: &[(String, String)]) -> Vec<String> {
    let ours = agent_flags();
    let foreign: BTreeMap<&str, &str> = FOREIGN.iter().copied().collect();
    let mut out = Vec::new();
    for (name, text) in files {
        for (line, flag) in flags_in(text) {
            if !ours.contains(&flag) && !foreign.contains_key(flag.as_str()) {
                out.push(format!("{name}:{line}: --{flag}"));
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
            "flags in the docs that `kube-ovn-agent --help` (any subcommand) does not have and \
             that are not listed as another program's in tests/docs.rs:\n{}",
            unknown.join("\n")
        )
        .into())
    }
}

fn the_check_catches_an_unknown_flag() -> Result<(), Failed> {
    let text = "run `kube-ovn-agent run --bpffs-root /x --no-such-flag` — a rule: ----\n\
                `iptables -m set --match-set s src`";
    let found = unknown_flags(&[("x.md".into(), text.into())]);
    if found == ["x.md:1: --no-such-flag"] {
        Ok(())
    } else {
        Err(format!("expected exactly the unknown flag, got {found:?}").into())
    }
}
