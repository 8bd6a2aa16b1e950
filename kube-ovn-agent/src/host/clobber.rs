//! Mark-clobber check. TC ingress runs before netfilter, so a rule in raw, mangle or nat
//! PREROUTING that rewrites mark bits (Calico's `cali-PREROUTING -j MARK --set-xmark 0x0/0xf0000`
//! is the known case) erases bits we set. In iptables mode Kube-OVN set its bits after those
//! rules, so this is new exposure; we detect it and say so. Rules come from every iptables
//! backend's `*-save` and from native nftables (`nft -j list ruleset`): base chains on the
//! prerouting hook at priority ≤ nat (-100), netdev/inet ingress chains (which also run after
//! TC ingress), and every chain they jump to.

use std::time::Duration;

use kube_ovn_ebpf_common::mark;
use serde::Serialize;

use crate::host::xtables;

/// A rule that can clear some of our mark bits on a packet it matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The `*-save` tool whose output showed it (`iptables-nft-save`, `ip6tables-legacy-save`, …).
    pub source: String,
    pub table: String,
    pub chain: String,
    pub rule: String,
    /// Which of our bits the rule clears when it matches.
    pub cleared_bits: u32,
}

impl Finding {
    pub fn summary(&self) -> String {
        format!(
            "{} {}/{}: `{}` clears mark bits {:#x}",
            self.source, self.table, self.chain, self.rule, self.cleared_bits
        )
    }
}

/// What operators should do about a finding (design doc, spec §6.8).
pub const MITIGATION: &str = "restrict the other component's mark mask so it excludes bits 0x4000, \
     0x80000 and 0x90004 (Calico: FELIX_IPTABLESMARKMASK, e.g. 0xff000000), or keep Kube-OVN's R2 \
     rule in iptables on such nodes; see docs/operations.md#mark-clobber";

/// Chains that run after TC ingress and before Kube-OVN's consumers.
const HOOK_CHAINS: [(&str, &str); 3] = [
    ("raw", "PREROUTING"),
    ("mangle", "PREROUTING"),
    ("nat", "PREROUTING"),
];

/// Parses `iptables-save` output and returns the rules reachable from raw/mangle/nat PREROUTING
/// that can clear any of our mark bits.
pub fn scan(source: &str, save_output: &str) -> Vec<Finding> {
    let tables = xtables::parse_save(save_output);
    let mut findings = Vec::new();
    for (table, hook) in HOOK_CHAINS {
        let Some(chains) = tables.get(table) else {
            continue;
        };
        let mut pending = vec![hook.to_owned()];
        let mut seen = std::collections::BTreeSet::new();
        while let Some(chain) = pending.pop() {
            if !seen.insert(chain.clone()) {
                continue;
            }
            for rule in chains.get(&chain).into_iter().flatten() {
                let words: Vec<&str> = rule.words.iter().map(String::as_str).collect();
                if let Some(target) = target(&words)
                    && chains.contains_key(target)
                {
                    pending.push(target.to_owned());
                }
                let cleared = cleared_bits(&words) & mark::ALL;
                if cleared != 0 {
                    findings.push(Finding {
                        source: source.to_owned(),
                        table: table.to_owned(),
                        chain: chain.clone(),
                        rule: rule.spec.clone(),
                        cleared_bits: cleared,
                    });
                }
            }
        }
    }
    findings
}

fn target<'a>(words: &[&'a str]) -> Option<&'a str> {
    words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g" || w[0] == "--jump" || w[0] == "--goto")
        .map(|w| w[1])
}

fn option<'a>(words: &[&'a str], name: &str) -> Option<&'a str> {
    words.windows(2).find(|w| w[0] == name).map(|w| w[1])
}

fn number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// `V/M` → (V, M); a bare `V` has mask `default_mask`.
fn value_mask(text: &str, default_mask: u32) -> Option<(u32, u32)> {
    match text.split_once('/') {
        Some((v, m)) => Some((number(v)?, number(m)?)),
        None => Some((number(text)?, default_mask)),
    }
}

/// Bits a MARK or CONNMARK target can turn from 1 to 0.
fn cleared_bits(words: &[&str]) -> u32 {
    match target(words) {
        Some("MARK") => {
            // xt_MARK: mark = (mark & ~mask) ^ value. A bit we set ends up 0 when the mask
            // covers it and the value does not set it, or the mask skips it and the value flips it.
            if let Some((value, mask)) =
                option(words, "--set-xmark").and_then(|t| value_mask(t, u32::MAX))
            {
                return value ^ mask;
            }
            if let Some((value, mask)) =
                option(words, "--set-mark").and_then(|t| value_mask(t, u32::MAX))
            {
                return mask & !value;
            }
            if let Some(bits) = option(words, "--and-mark").and_then(number) {
                return !bits;
            }
            if let Some(bits) = option(words, "--xor-mark").and_then(number) {
                return bits;
            }
            0
        }
        // Restoring from the connection's mark replaces the nfmask bits.
        Some("CONNMARK") if words.contains(&"--restore-mark") => option(words, "--nfmask")
            .and_then(number)
            .unwrap_or(u32::MAX),
        _ => 0,
    }
}

/// Result of running the check.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Tools that ran.
    pub checked: Vec<String>,
    pub findings: Vec<Finding>,
}

/// Runs the save tool of every iptables backend present and `nft -j list ruleset` (each
/// bounded by `timeout`) and scans their output.
pub fn check(timeout: Duration) -> Report {
    let mut report = Report::default();
    let mut compat = Vec::new();
    for tool in xtables::available() {
        let name = tool.save_command();
        match xtables::run_within(&name, &[], None, timeout) {
            Ok(output) => {
                report.findings.extend(scan(&name, &output));
                report.checked.push(name);
                if tool.backend != xtables::Backend::Legacy {
                    compat.push(tool.family);
                }
            }
            Err(e @ xtables::XtablesError::Timeout { .. }) => {
                tracing::warn!(error = %e, "mark-clobber check skipped a tool");
            }
            // A backend whose kernel side is missing: nothing of ours to clobber there.
            Err(_) => {}
        }
    }
    match xtables::run_within(NFT, &["-j", "list", "ruleset"], None, timeout) {
        Ok(output) => match scan_nft(&output, &compat) {
            Ok(findings) => {
                report.findings.extend(findings);
                report.checked.push(NFT.to_owned());
            }
            Err(e) => tracing::warn!(error = %e, "mark-clobber check could not read nft's JSON"),
        },
        Err(e @ xtables::XtablesError::Timeout { .. }) => {
            tracing::warn!(error = %e, "mark-clobber check skipped nft");
        }
        // No nft binary, or no nf_tables in the kernel: no native rules.
        Err(_) => {}
    }
    report
}

const NFT: &str = "nft";

/// nftables' `NF_IP_PRI_NAT_DST`: base chains at this priority or lower on the prerouting hook
/// run before Kube-OVN's nat `PREROUTING` would have set its bits.
const NAT_PRIORITY: i64 = -100;

/// The tables iptables-nft keeps its chains in; its `*-save` tool reads them already.
const XTABLES_COMPAT_TABLES: [&str; 5] = ["raw", "mangle", "nat", "filter", "security"];

/// Parses `nft -j list ruleset` and returns the rules reachable from chains that run between
/// TC ingress and Kube-OVN's nat PREROUTING which can clear any of our mark bits. Tables of
/// iptables-nft are skipped for the families in `compat` (their `*-save` was read).
pub fn scan_nft(
    json: &str,
    compat: &[xtables::IpFamily],
) -> Result<Vec<Finding>, serde_json::Error> {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    let ruleset: Value = serde_json::from_str(json)?;
    let items = ruleset["nftables"].as_array().cloned().unwrap_or_default();
    let skipped = |family: &str, table: &str| {
        let family = match family {
            "ip" => xtables::IpFamily::V4,
            "ip6" => xtables::IpFamily::V6,
            _ => return false,
        };
        compat.contains(&family) && XTABLES_COMPAT_TABLES.contains(&table)
    };
    // (family, table) → chain → rules, and the hook chains to start from.
    let mut rules: BTreeMap<(String, String), BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    let mut starts: Vec<(String, String, String)> = Vec::new();
    for item in &items {
        if let Some(chain) = item.get("chain") {
            let (Some(family), Some(table), Some(name)) = (
                chain["family"].as_str(),
                chain["table"].as_str(),
                chain["name"].as_str(),
            ) else {
                continue;
            };
            let hook = chain["hook"].as_str().unwrap_or_default();
            let priority = chain["prio"].as_i64().unwrap_or(i64::MAX);
            let early = match (family, hook) {
                ("ip" | "ip6" | "inet", "prerouting") => priority <= NAT_PRIORITY,
                ("netdev" | "inet", "ingress") => true,
                _ => false,
            };
            if early && !skipped(family, table) {
                starts.push((family.to_owned(), table.to_owned(), name.to_owned()));
            }
        } else if let Some(rule) = item.get("rule") {
            let (Some(family), Some(table), Some(chain)) = (
                rule["family"].as_str(),
                rule["table"].as_str(),
                rule["chain"].as_str(),
            ) else {
                continue;
            };
            rules
                .entry((family.to_owned(), table.to_owned()))
                .or_default()
                .entry(chain.to_owned())
                .or_default()
                .push(rule.clone());
        }
    }
    let mut findings = Vec::new();
    let mut seen = BTreeSet::new();
    let mut pending = starts;
    while let Some((family, table, chain)) = pending.pop() {
        if !seen.insert((family.clone(), table.clone(), chain.clone())) {
            continue;
        }
        let key = (family.clone(), table.clone());
        for rule in rules
            .get(&key)
            .and_then(|c| c.get(&chain))
            .into_iter()
            .flatten()
        {
            let expr = &rule["expr"];
            let mut targets = Vec::new();
            jump_targets(expr, &mut targets);
            pending.extend(
                targets
                    .into_iter()
                    .map(|t| (family.clone(), table.clone(), t)),
            );
            for statement in expr.as_array().into_iter().flatten() {
                let Some(mangle) = statement.get("mangle") else {
                    continue;
                };
                if mangle["key"]["meta"]["key"].as_str() != Some("mark") {
                    continue;
                }
                let cleared = MarkValue::of(&mangle["value"]).cleared() & mark::ALL;
                if cleared != 0 {
                    findings.push(Finding {
                        source: NFT.to_owned(),
                        table: format!("{family} {table}"),
                        chain: chain.clone(),
                        rule: format!(
                            "handle {}: meta mark set {}",
                            rule["handle"], mangle["value"]
                        ),
                        cleared_bits: cleared,
                    });
                }
            }
        }
    }
    Ok(findings)
}

/// Every `jump`/`goto` target anywhere in a rule (verdict maps included).
fn jump_targets(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                if (key == "jump" || key == "goto")
                    && let Some(target) = inner["target"].as_str()
                {
                    out.push(target.to_owned());
                }
                jump_targets(inner, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                jump_targets(item, out);
            }
        }
        _ => {}
    }
}

/// What a `meta mark set <expr>` leaves in each bit of the mark, bit by bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MarkValue {
    /// Bits equal to the old mark's.
    same: u32,
    /// Bits equal to the old mark's, inverted.
    inverted: u32,
    ones: u32,
    zeros: u32,
    /// Anything else (another key's value, arithmetic we do not follow).
    unknown: u32,
}

impl MarkValue {
    const UNKNOWN: Self = Self {
        same: 0,
        inverted: 0,
        ones: 0,
        zeros: 0,
        unknown: u32::MAX,
    };

    fn of(expr: &serde_json::Value) -> Self {
        if let Some(n) = expr.as_u64().and_then(|n| u32::try_from(n).ok()) {
            return Self {
                ones: n,
                zeros: !n,
                ..Self::UNKNOWN
            }
            .known();
        }
        if expr["meta"]["key"].as_str() == Some("mark") {
            return Self {
                same: u32::MAX,
                ..Self::UNKNOWN
            }
            .known();
        }
        for op in ["&", "|", "^"] {
            let Some([left, right]) = expr[op].as_array().map(Vec::as_slice) else {
                continue;
            };
            let (value, constant) = match (right.as_u64(), left.as_u64()) {
                (Some(c), _) => (Self::of(left), c),
                (None, Some(c)) => (Self::of(right), c),
                (None, None) => return Self::UNKNOWN,
            };
            let Ok(c) = u32::try_from(constant) else {
                return Self::UNKNOWN;
            };
            return value.apply(op, c);
        }
        Self::UNKNOWN
    }

    /// Clears `unknown` where another class claims the bit.
    fn known(mut self) -> Self {
        self.unknown &= !(self.same | self.inverted | self.ones | self.zeros);
        self
    }

    fn apply(self, op: &str, c: u32) -> Self {
        match op {
            "&" => Self {
                same: self.same & c,
                inverted: self.inverted & c,
                ones: self.ones & c,
                zeros: self.zeros | !c,
                unknown: self.unknown & c,
            },
            "|" => Self {
                same: self.same & !c,
                inverted: self.inverted & !c,
                ones: self.ones | c,
                zeros: self.zeros & !c,
                unknown: self.unknown & !c,
            },
            _ => Self {
                same: (self.same & !c) | (self.inverted & c),
                inverted: (self.inverted & !c) | (self.same & c),
                ones: (self.ones & !c) | (self.zeros & c),
                zeros: (self.zeros & !c) | (self.ones & c),
                unknown: self.unknown,
            },
        }
    }

    /// Bits that can end up 0 where the old mark had 1.
    fn cleared(self) -> u32 {
        self.zeros | self.inverted | self.unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO_RAW: &str = "\
# Generated by iptables-nft-save v1.8.9
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:cali-PREROUTING - [0:0]
:cali-from-host-endpoint - [0:0]
-A PREROUTING -m comment --comment \"cali:6gwbT8clXdHdC1b1\" -j cali-PREROUTING
-A cali-PREROUTING -m comment --comment \"cali:6BJqBjBC7crtA-7-\" -j MARK --set-xmark 0x0/0xf0000
-A cali-PREROUTING -i cali+ -m comment --comment \"cali:EWMPb0zVROM-woQp\" -j MARK --set-xmark 0x40000/0x40000
-A cali-PREROUTING -m mark --mark 0x0/0x40000 -j cali-from-host-endpoint
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j MARK --and-mark 0xffffbfff
-A PREROUTING -j MARK --set-xmark 0x4000/0x4000
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MARK --set-xmark 0x0/0xffffffff
COMMIT
";

    #[test]
    fn finds_calicos_raw_clear_and_reports_the_bits() {
        let findings = scan("iptables-nft-save", CALICO_RAW);
        let summary: Vec<(String, String, u32)> = findings
            .iter()
            .map(|f| (f.table.clone(), f.chain.clone(), f.cleared_bits))
            .collect();
        assert_eq!(
            summary,
            [
                ("raw".into(), "cali-PREROUTING".into(), 0x9_0000),
                ("mangle".into(), "PREROUTING".into(), 0x4000),
            ]
        );
        assert!(findings[0].rule.contains("--set-xmark 0x0/0xf0000"));
    }

    #[test]
    fn or_style_marks_and_unreachable_chains_are_harmless() {
        let text = "*mangle\n:PREROUTING ACCEPT [0:0]\n:orphan - [0:0]\n\
                    -A PREROUTING -j MARK --set-xmark 0x4000/0x4000\n\
                    -A PREROUTING -j MARK --or-mark 0x80000\n\
                    -A orphan -j MARK --set-xmark 0x0/0xffffffff\nCOMMIT\n";
        assert!(scan("t", text).is_empty());
    }

    #[test]
    fn mark_arithmetic_follows_xt_mark() {
        let bits = |rule: &str| cleared_bits(&rule.split_whitespace().collect::<Vec<_>>());
        assert_eq!(bits("-j MARK --set-xmark 0x0/0xf0000"), 0xf0000);
        assert_eq!(bits("-j MARK --set-xmark 0x80000/0xf0000"), 0x70000);
        assert_eq!(
            bits("-j MARK --set-xmark 0x4000/0x0"),
            0x4000,
            "xor flips a set bit"
        );
        assert_eq!(bits("-j MARK --set-mark 0x1"), 0xffff_fffe);
        assert_eq!(bits("-j MARK --xor-mark 0x4000"), 0x4000);
        assert_eq!(
            bits("-j CONNMARK --restore-mark --nfmask 0xf0000 --ctmask 0xf0000"),
            0xf0000
        );
        assert_eq!(bits("-j CONNMARK --save-mark"), 0);
        assert_eq!(bits("-j ACCEPT"), 0);
    }

    /// `nft -j list ruleset` (nftables 1.0.6) of a native table with the ways a rule can set the
    /// mark, plus an iptables-nft `mangle` table.
    const NFT_RULESET: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "calico", "handle": 1}}, {"chain": {"family": "inet", "table": "calico", "name": "pre", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}}, {"chain": {"family": "inet", "table": "calico", "name": "sub", "handle": 2}}, {"chain": {"family": "inet", "table": "calico", "name": "sub2", "handle": 3}}, {"chain": {"family": "inet", "table": "calico", "name": "orphan", "handle": 4}}, {"chain": {"family": "inet", "table": "calico", "name": "late", "handle": 5, "type": "filter", "hook": "prerouting", "prio": -90, "policy": "accept"}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 6, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4293984255]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 7, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"&": [{"meta": {"key": "mark"}}, 4294246399]}, 262144]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 8, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 16384]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 9, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 10, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 11, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"^": [{"meta": {"key": "mark"}}, 16384]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 12, "expr": [{"jump": {"target": "sub"}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "pre", "handle": 14, "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": [["lo", {"jump": {"target": "sub2"}}]]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "sub", "handle": 15, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4294950911]}}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "sub2", "handle": 16, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "orphan", "handle": 17, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}]}}, {"rule": {"family": "inet", "table": "calico", "chain": "late", "handle": 18, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}]}}, {"table": {"family": "ip", "name": "kube-proxy", "handle": 2}}, {"chain": {"family": "ip", "table": "kube-proxy", "name": "x", "handle": 1}}, {"table": {"family": "ip", "name": "mangle", "handle": 3}}, {"chain": {"family": "ip", "table": "mangle", "name": "PREROUTING", "handle": 1, "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}, {"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING", "handle": 2, "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}]}}]}"#;

    #[test]
    fn native_nftables_rules_on_early_prerouting_chains_are_found() {
        let findings = scan_nft(NFT_RULESET, &[xtables::IpFamily::V4]).unwrap();
        let summary: Vec<(&str, &str, u32)> = findings
            .iter()
            .map(|f| {
                (
                    f.chain.as_str(),
                    f.rule.split(':').next().unwrap(),
                    f.cleared_bits,
                )
            })
            .collect();
        let mut summary = summary;
        summary.sort_unstable();
        assert_eq!(
            summary,
            [
                // `& 0xfff0ffff`, then `| 0x40000` on top of it.
                ("pre", "handle 10", 0x9_4004),
                ("pre", "handle 11", 0x4000),
                ("pre", "handle 6", 0x9_0000),
                ("pre", "handle 7", 0x9_0000),
                // `meta mark set ct mark`: anything.
                ("pre", "handle 9", 0x9_4004),
                // Reached by `jump` and through a verdict map.
                ("sub", "handle 15", 0x4000),
                ("sub2", "handle 16", 0x9_4004),
            ],
            "{findings:#?}"
        );
        assert!(
            findings
                .iter()
                .all(|f| f.source == "nft" && f.table == "inet calico")
        );
        // Without iptables-nft-save's view, its tables are read here too.
        let all = scan_nft(NFT_RULESET, &[]).unwrap();
        assert_eq!(all.len(), findings.len() + 1);
        assert!(all.iter().any(|f| f.table == "ip mangle"));
        assert!(scan_nft("not json", &[]).is_err());
    }

    #[test]
    fn mark_values_follow_nft_arithmetic() {
        let cleared = |json: &str| MarkValue::of(&serde_json::from_str(json).unwrap()).cleared();
        assert_eq!(cleared(r#"{"|": [{"meta": {"key": "mark"}}, 16384]}"#), 0);
        assert_eq!(
            cleared(r#"{"&": [{"meta": {"key": "mark"}}, 4294950911]}"#),
            0x4000
        );
        assert_eq!(
            cleared(r#"{"^": [{"^": [{"meta": {"key": "mark"}}, 16384]}, 16384]}"#),
            0
        );
        assert_eq!(
            cleared(r#"{"|": [{"meta": {"key": "mark"}}, {"ct": {"key": "mark"}}]}"#),
            u32::MAX
        );
        assert_eq!(cleared("4294967295"), 0);
    }

    #[test]
    fn cycles_between_chains_terminate() {
        let text = "*raw\n:PREROUTING ACCEPT [0:0]\n:a - [0:0]\n:b - [0:0]\n\
                    -A PREROUTING -j a\n-A a -j b\n-A b -j a\n-A b -j MARK --and-mark 0x0\nCOMMIT\n";
        assert_eq!(scan("t", text).len(), 1);
    }
}
