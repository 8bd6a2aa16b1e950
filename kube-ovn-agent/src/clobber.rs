//! Mark-clobber check. TC ingress runs before netfilter, so a rule in raw, mangle or nat
//! PREROUTING that rewrites mark bits (Calico's `cali-PREROUTING -j MARK --set-xmark 0x0/0xf0000`
//! is the known case) erases bits we set. In iptables mode Kube-OVN set its bits after those
//! rules, so this is new exposure; we detect it and say so.

use std::time::Duration;

use kube_ovn_ebpf_common::mark;
use serde::Serialize;

use crate::xtables;

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

/// Runs the save tool of every iptables backend present (each bounded by `timeout`) and scans
/// its output.
pub fn check(timeout: Duration) -> Report {
    let mut report = Report::default();
    for tool in xtables::available() {
        let name = tool.save_command();
        match xtables::run_within(&name, &[], None, timeout) {
            Ok(output) => {
                report.findings.extend(scan(&name, &output));
                report.checked.push(name);
            }
            Err(e @ xtables::XtablesError::Timeout { .. }) => {
                tracing::warn!(error = %e, "mark-clobber check skipped a tool");
            }
            // A backend whose kernel side is missing: nothing of ours to clobber there.
            Err(_) => {}
        }
    }
    report
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

    #[test]
    fn cycles_between_chains_terminate() {
        let text = "*raw\n:PREROUTING ACCEPT [0:0]\n:a - [0:0]\n:b - [0:0]\n\
                    -A PREROUTING -j a\n-A a -j b\n-A b -j a\n-A b -j MARK --and-mark 0x0\nCOMMIT\n";
        assert_eq!(scan("t", text).len(), 1);
    }
}
