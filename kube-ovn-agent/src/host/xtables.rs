//! Kube-OVN's iptables rules as the kernel holds them, read and changed through the iptables
//! tools of every backend present (`iptables-nft*`, `iptables-legacy*`, and `ip6tables`), for
//! `verify` and `cleanup-iptables`. Nothing here guesses a rule: it reads `*-save` output and
//! deletes by exact rule spec.

use std::{collections::BTreeMap, fmt, path::Path, process::Command, time::Duration};

use serde::Serialize;

/// How long one iptables command may take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// The chain Kube-OVN keeps its PREROUTING rules in (nat, and mangle with `--enable-tproxy`).
pub const OVN_PREROUTING: &str = "OVN-PREROUTING";

/// Kube-OVN's jump from the built-in PREROUTING chain, as `iptables-save` words (spec §1.1,
/// §1.3): the same in nat and mangle, IPv4 and IPv6, every v1.13.x release and master.
pub const JUMP_SPEC: [&str; 6] = [
    "-m",
    "comment",
    "--comment",
    "kube-ovn prerouting rules",
    "-j",
    OVN_PREROUTING,
];

#[derive(Debug, thiserror::Error)]
pub enum XtablesError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

pub type Result<T, E = XtablesError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub const ALL: [Self; 2] = [Self::V4, Self::V6];

    /// Kube-OVN's ipset name for this family: `ovn40<id>` / `ovn60<id>`.
    pub fn ovn_set(self, id: &str) -> String {
        match self {
            Self::V4 => format!("ovn40{id}"),
            Self::V6 => format!("ovn60{id}"),
        }
    }

    /// kube-proxy's ipset name for this family: `KUBE-<id>` / `KUBE-6-<id>`.
    pub fn kube_set(self, id: &str) -> String {
        match self {
            Self::V4 => format!("KUBE-{id}"),
            Self::V6 => format!("KUBE-6-{id}"),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
    /// The plain `iptables` name, used only where neither backend-specific tool exists.
    Default,
}

/// One iptables tool set: `iptables-nft`, `ip6tables-legacy`, …
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Tool {
    pub family: IpFamily,
    pub backend: Backend,
}

impl Tool {
    /// The command that changes rules (`iptables-nft`).
    pub fn command(self) -> String {
        let base = match self.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        match self.backend {
            Backend::Nft => format!("{base}-nft"),
            Backend::Legacy => format!("{base}-legacy"),
            Backend::Default => base.to_owned(),
        }
    }

    pub fn save_command(self) -> String {
        format!("{}-save", self.command())
    }

    pub fn restore_command(self) -> String {
        format!("{}-restore", self.command())
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.command())
    }
}

/// The tools installed here: per family the nft and the legacy variant, or the plain name when
/// neither exists. A backend nobody uses simply shows no rules.
pub fn available() -> Vec<Tool> {
    let mut tools = Vec::new();
    for family in IpFamily::ALL {
        let specific: Vec<Tool> = [Backend::Nft, Backend::Legacy]
            .into_iter()
            .map(|backend| Tool { family, backend })
            .filter(|t| on_path(&t.save_command()))
            .collect();
        if specific.is_empty() {
            let plain = Tool {
                family,
                backend: Backend::Default,
            };
            if on_path(&plain.save_command()) {
                tools.push(plain);
            }
        } else {
            tools.extend(specific);
        }
    }
    tools
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(name)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One rule of a chain, with its counters when the save was taken with `-c`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// The rule as `iptables-save` prints it, without `-A CHAIN`.
    pub spec: String,
    /// `spec` split into words, quotes removed.
    #[serde(skip)]
    pub words: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

impl Rule {
    pub fn is(&self, words: &[&str]) -> bool {
        self.words.len() == words.len() && self.words.iter().zip(words).all(|(a, b)| a == b)
    }
}

/// table → chain → rules, in order. Chains declared without rules are present and empty.
pub type Ruleset = BTreeMap<String, BTreeMap<String, Vec<Rule>>>;

/// Parses `iptables-save` output, with or without `-c` counters.
pub fn parse_save(text: &str) -> Ruleset {
    let mut tables = Ruleset::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            name.trim().clone_into(&mut table);
            tables.entry(table.clone()).or_default();
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            tables
                .entry(table.clone())
                .or_default()
                .entry(chain.to_owned())
                .or_default();
            continue;
        }
        let (packets, bytes, rest) = match line.strip_prefix('[') {
            Some(counted) => {
                let Some((counters, rest)) = counted.split_once(']') else {
                    continue;
                };
                let (p, b) = counters.split_once(':').unwrap_or((counters, "0"));
                (
                    p.parse().unwrap_or(0),
                    b.parse().unwrap_or(0),
                    rest.trim_start(),
                )
            }
            None => (0, 0, line),
        };
        let Some(rest) = rest.strip_prefix("-A ") else {
            continue;
        };
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        let spec = spec.trim().to_owned();
        tables
            .entry(table.clone())
            .or_default()
            .entry(chain.to_owned())
            .or_default()
            .push(Rule {
                words: split_words(&spec),
                spec,
                packets,
                bytes,
            });
    }
    tables
}

/// Splits a rule spec into words the way iptables-restore does: whitespace separates, double
/// quotes group, a backslash escapes the next character inside quotes.
pub fn split_words(spec: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Joins words back into restore syntax, quoting those that need it.
pub fn join_words<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| {
            let w = w.as_ref();
            if w.is_empty() || w.contains(|c: char| c.is_whitespace() || c == '"') {
                format!("\"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""))
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything the tool's backend holds, with packet and byte counters. Legacy tools are run
/// without `-t` so they never instantiate a table that is not in use.
pub fn save(tool: Tool) -> Result<Ruleset> {
    let output = run(&tool.save_command(), &["-c"], None)?;
    Ok(parse_save(&output))
}

/// Runs an iptables command with the `xtables` lock wait; returns its stdout.
pub fn change(tool: Tool, args: &[&str]) -> Result<String> {
    let mut all = vec!["-w", "10"];
    all.extend_from_slice(args);
    run(&tool.command(), &all, None)
}

/// Feeds `script` to `<tool>-restore --noflush`.
pub fn restore(tool: Tool, script: &str) -> Result<()> {
    run(
        &tool.restore_command(),
        &["--noflush", "-w", "10"],
        Some(script),
    )
    .map(drop)
}

/// Runs `program args` bounded by [`TOOL_TIMEOUT`]; fails on a non-zero exit with its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    run_within(program, args, stdin, TOOL_TIMEOUT)
}

/// [`run`] with another bound.
pub fn run_within(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let finished = super::exec::run(
        Command::new(program).args(args),
        stdin.map(str::as_bytes),
        Some(timeout),
    )
    .map_err(|e| match e {
        super::exec::RunError::Spawn(source) => XtablesError::Spawn {
            command: command.clone(),
            source,
        },
        super::exec::RunError::Timeout(timeout) => XtablesError::Timeout {
            command: command.clone(),
            timeout,
        },
    })?;
    if finished.status.success() {
        Ok(String::from_utf8_lossy(&finished.stdout).into_owned())
    } else {
        Err(XtablesError::Failed {
            command,
            status: finished.status.to_string(),
            stderr: String::from_utf8_lossy(&finished.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn output_larger_than_a_pipe_buffer_does_not_stall_the_tool() {
        // A big ruleset's save output is megabytes; a pipe holds 64 KiB.
        let started = Instant::now();
        let out = run_within(
            "head",
            &["-c", "1000000", "/dev/zero"],
            None,
            Duration::from_secs(5),
        )
        .expect("head finishes");
        assert_eq!(out.len(), 1_000_000);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_bound_holds_for_a_tool_that_does_not_read_a_large_ruleset() {
        // `iptables-restore -w` reads its input only once it holds the xtables lock; a ruleset
        // larger than a pipe must not block the caller past the bound meanwhile.
        let ruleset = "x".repeat(1 << 22);
        let started = Instant::now();
        let outcome = run_within("sleep", &["30"], Some(&ruleset), Duration::from_millis(300));
        assert!(
            matches!(outcome, Err(XtablesError::Timeout { .. })),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [5:300]
:OVN-PREROUTING - [0:0]
:EMPTY - [0:0]
[12:720] -A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING
[3:180] -A OVN-PREROUTING -i ovn0 -m set --match-set ovn40subnets src -m set --match-set ovn40services dst -j MARK --set-xmark 0x4000/0x4000
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p udp -m comment --comment \"say \\\"hi\\\"\"
COMMIT
";

    #[test]
    fn save_output_parses_with_counters_and_empty_chains() {
        let tables = parse_save(SAVE);
        let nat = &tables["nat"];
        assert!(nat["EMPTY"].is_empty());
        let jump = &nat["PREROUTING"][0];
        assert_eq!((jump.packets, jump.bytes), (12, 720));
        assert!(jump.is(&JUMP_SPEC));
        assert_eq!(nat["OVN-PREROUTING"][0].packets, 3);
        let raw = &tables["raw"]["PREROUTING"][0];
        assert_eq!(raw.packets, 0, "no counters without -c");
        assert_eq!(
            raw.words,
            ["-p", "udp", "-m", "comment", "--comment", "say \"hi\""]
        );
    }

    #[test]
    fn words_round_trip_through_restore_quoting() {
        for spec in [
            "-m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING",
            "-p tcp -m comment --comment \"a \\\"quoted\\\" word\" -j ACCEPT",
            "-m comment --comment \"\" -j RETURN",
        ] {
            let words = split_words(spec);
            assert_eq!(split_words(&join_words(&words)), words, "{spec}");
        }
        assert_eq!(
            join_words(&JUMP_SPEC),
            "-m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING"
        );
    }

    #[test]
    fn a_jump_with_extra_matches_is_not_kube_ovns() {
        let tables = parse_save(
            "*nat\n-A PREROUTING -i eth0 -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING\n\
             -A PREROUTING -m comment --comment \"kube-ovn prerouting rules\" -j OVN-PREROUTING2\nCOMMIT\n",
        );
        assert!(
            tables["nat"]["PREROUTING"]
                .iter()
                .all(|r| !r.is(&JUMP_SPEC))
        );
    }

    #[test]
    fn tool_names_follow_the_backends() {
        let tool = Tool {
            family: IpFamily::V6,
            backend: Backend::Legacy,
        };
        assert_eq!(tool.save_command(), "ip6tables-legacy-save");
        assert_eq!(tool.restore_command(), "ip6tables-legacy-restore");
        let plain = Tool {
            family: IpFamily::V4,
            backend: Backend::Default,
        };
        assert_eq!(plain.command(), "iptables");
        assert_eq!(IpFamily::V6.kube_set("CLUSTER-IP"), "KUBE-6-CLUSTER-IP");
        assert_eq!(IpFamily::V4.ovn_set("other-node"), "ovn40other-node");
    }
}
