//! `kube-ovn-agent cleanup-iptables`: removes Kube-OVN's PREROUTING jump rules once the datapath
//! enforces — in nat and mangle, IPv4 and IPv6, on every iptables backend present.
//!
//! Each rule goes by its exact spec (`iptables -D PREROUTING -m comment --comment "kube-ovn
//! prerouting rules" -j OVN-PREROUTING`), never by position: a position read from a listing is
//! stale as soon as Calico, kube-proxy or Kube-OVN itself changes the chain, which is exactly how
//! Kube-OVN ≤ v1.13.12 deleted other components' rules (spec §3.3). Every copy goes, so running
//! it again removes nothing. Kube-OVN's `OVN-PREROUTING` chains stay: without the jump they
//! match nothing, and Kube-OVN keeps reconciling them.
//!
//! The mangle jump leads to Kube-OVN's TPROXY rules (`--enable-tproxy`): while that chain holds
//! rules the jump is kept, and the reason printed, unless the enforcing datapath replaces TPROXY
//! too (the agent runs with `--enable-tproxy`).
//!
//! Removing the nat jump while the datapath is not enforcing would drop Kube-OVN's marks, so it
//! needs a pinned datapath in enforce mode with attachments, unless `force` says otherwise.

use std::{fmt::Write as _, path::Path};

use kube_ovn_ebpf_common::rule;
use serde::Serialize;

use crate::{
    datapath::attach,
    datapath::pins::PinRoot,
    host::netlink,
    host::xtables::{self, JUMP_SPEC, OVN_PREROUTING, Tool, XtablesError},
    ops::pinned::PinnedView,
};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("no iptables tools found (iptables-nft, iptables-legacy or iptables)")]
    NoIptables,
    #[error("reading {tool}'s rules: {source}")]
    Read {
        tool: Tool,
        #[source]
        source: XtablesError,
    },
    #[error(
        "refusing to remove Kube-OVN's nat jump: {why}. Without it and without an enforcing \
         datapath nothing sets Kube-OVN's marks. Switch the agent to enforce mode first \
         (docs/migration.md), point --bpffs-root at its pins, or pass --force"
    )]
    NotEnforcing { why: String },
}

pub type Result<T, E = CleanupError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Print what would be removed; change nothing.
    pub dry_run: bool,
    /// Skip the check that the datapath enforces.
    pub force: bool,
}

/// The pinned datapath, as far as the interlock needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatapathState {
    pub pinned: bool,
    pub enforcing: bool,
    /// The nat rules in force, IPv4 and IPv6 (`rule::bit` masks).
    pub rules: u32,
    pub attachments: usize,
    /// Why the pins could not be read, if they could not.
    pub error: Option<String>,
}

impl DatapathState {
    /// Whether the datapath steers kubelet probes itself (`run --enable-tproxy`).
    pub fn replaces_tproxy(&self) -> bool {
        self.refusal().is_none() && self.rules & rule::bit(rule::TPROXY) != 0
    }

    /// Why the nat jump may not go, if it may not.
    pub fn refusal(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(format!("the pinned datapath cannot be read ({e})"));
        }
        if !self.pinned {
            return Some("no datapath is pinned under --bpffs-root".into());
        }
        if !self.enforcing {
            return Some("the datapath is in shadow mode".into());
        }
        if self.rules & rule::NAT_RULES == 0 {
            return Some("the datapath has no rule in force".into());
        }
        if self.attachments == 0 {
            return Some("the datapath is attached to no interface".into());
        }
        None
    }
}

/// Reads mode, rules and attachments of the datapath pinned under `root`.
pub async fn datapath_state(root: &Path) -> DatapathState {
    let pins = PinRoot::new(root);
    if !pins.exists() {
        return DatapathState::default();
    }
    let current = PinnedView::open(&pins)
        .map(|view| view.tables.current())
        .map_err(|e| e.to_string());
    let current = match current {
        Ok(current) => current,
        Err(error) => {
            return DatapathState {
                pinned: true,
                error: Some(error),
                ..DatapathState::default()
            };
        }
    };
    let attachments = match netlink::connect() {
        Ok(rtnl) => attach::list(&pins, &rtnl).await.len(),
        Err(_) => 0,
    };
    DatapathState {
        pinned: true,
        enforcing: !current.shadow,
        rules: current.v4.rules | current.v6.rules,
        attachments,
        error: None,
    }
}

/// What was done (or would be) about Kube-OVN's jump in one table of one backend.
#[derive(Clone, Debug, Serialize)]
pub struct Action {
    pub tool: Tool,
    pub table: &'static str,
    /// Copies found.
    pub found: usize,
    /// Copies removed (0 in a dry run).
    pub removed: usize,
    /// Why the jump stays, when it does.
    pub kept: Option<String>,
    /// Copies present after removal (re-added meanwhile, or a removal failed).
    pub remaining: usize,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub dry_run: bool,
    pub checked: Vec<Tool>,
    pub actions: Vec<Action>,
}

const TABLES: [&str; 2] = ["nat", "mangle"];

/// Finds and (unless `dry_run`) removes every copy of Kube-OVN's jump.
pub fn run(options: Options, datapath: &DatapathState) -> Result<Outcome> {
    let tools = xtables::available();
    if tools.is_empty() {
        return Err(CleanupError::NoIptables);
    }
    let mut actions = Vec::new();
    for &tool in &tools {
        let saved = xtables::save(tool).map_err(|source| CleanupError::Read { tool, source })?;
        for table in TABLES {
            let Some(chains) = saved.get(table) else {
                continue;
            };
            let found = count_jumps(chains.get("PREROUTING"));
            if found == 0 {
                continue;
            }
            let tproxy = chains.get(OVN_PREROUTING).map_or(0, Vec::len);
            let kept =
                (table == "mangle" && tproxy > 0 && !datapath.replaces_tproxy()).then(|| {
                    format!(
                        "mangle {OVN_PREROUTING} holds {tproxy} TPROXY rule(s) (Kube-OVN \
                     --enable-tproxy) and the datapath does not replace them (run the agent \
                     with --enable-tproxy)"
                    )
                });
            actions.push(Action {
                tool,
                table,
                found,
                removed: 0,
                kept,
                remaining: found,
                error: None,
            });
        }
    }
    let removes_nat = actions.iter().any(|a| a.table == "nat" && a.kept.is_none());
    if removes_nat
        && !options.dry_run
        && !options.force
        && let Some(why) = datapath.refusal()
    {
        return Err(CleanupError::NotEnforcing { why });
    }
    if !options.dry_run {
        for action in actions.iter_mut().filter(|a| a.kept.is_none()) {
            remove(action);
        }
    }
    Ok(Outcome {
        dry_run: options.dry_run,
        checked: tools,
        actions,
    })
}

fn count_jumps(rules: Option<&Vec<xtables::Rule>>) -> usize {
    rules
        .into_iter()
        .flatten()
        .filter(|r| r.is(&JUMP_SPEC))
        .count()
}

fn remove(action: &mut Action) {
    let mut args = vec!["-t", action.table, "-D", "PREROUTING"];
    args.extend(JUMP_SPEC);
    // `-D` with a rule spec deletes the first rule equal to it, wherever it sits now.
    for _ in 0..action.found {
        match xtables::change(action.tool, &args) {
            Ok(_) => action.removed += 1,
            Err(e) => {
                action.error = Some(e.to_string());
                break;
            }
        }
    }
    action.remaining = match xtables::save(action.tool) {
        Ok(saved) => count_jumps(saved.get(action.table).and_then(|c| c.get("PREROUTING"))),
        Err(e) => {
            action.error.get_or_insert(e.to_string());
            action.found - action.removed
        }
    };
}

impl Outcome {
    /// Whether some removal failed.
    pub fn failed(&self) -> bool {
        self.actions.iter().any(|a| a.error.is_some())
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let spec = xtables::join_words(&JUMP_SPEC);
        let checked = self
            .checked
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if self.actions.is_empty() {
            let _ = writeln!(
                out,
                "nothing to remove: no Kube-OVN PREROUTING jump in nat or mangle (checked: {checked})"
            );
            return out;
        }
        for a in &self.actions {
            let place = format!(
                "{:<17} {:<6} PREROUTING {spec}",
                a.tool.to_string(),
                a.table
            );
            if let Some(why) = &a.kept {
                let _ = writeln!(out, "kept          {place} ×{}: {why}", a.found);
            } else if self.dry_run {
                for i in 1..=a.found {
                    let _ = writeln!(out, "would remove  {place} (copy {i} of {})", a.found);
                }
            } else {
                for i in 1..=a.removed {
                    let _ = writeln!(out, "removed       {place} (copy {i} of {})", a.found);
                }
            }
            if let Some(e) = &a.error {
                let _ = writeln!(out, "FAILED        {place}: {e}");
            }
            if !self.dry_run && a.kept.is_none() && a.remaining > 0 {
                let _ = writeln!(
                    out,
                    "present again {place} ×{}: re-added meanwhile (Kube-OVN's gateway loop \
                     re-inserts it every 3 s; see docs/migration.md)",
                    a.remaining
                );
            }
        }
        let removed: usize = self.actions.iter().map(|a| a.removed).sum();
        if self.dry_run {
            let would: usize = self
                .actions
                .iter()
                .filter(|a| a.kept.is_none())
                .map(|a| a.found)
                .sum();
            let _ = writeln!(
                out,
                "dry run: would remove {would} rule(s); nothing changed"
            );
        } else {
            let _ = writeln!(out, "removed {removed} rule(s) (checked: {checked})");
        }
        if removed > 0 || self.dry_run {
            out.push_str(
                "note: kube-ovn-cni v1.13 re-inserts its nat jump within 3 s; see \
                 docs/migration.md#what-kube-ovn-must-be-configured-with\n",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interlock_names_what_is_missing() {
        let ready = DatapathState {
            pinned: true,
            enforcing: true,
            rules: rule::bit(rule::R1A),
            attachments: 2,
            error: None,
        };
        assert_eq!(ready.refusal(), None);
        for (state, needle) in [
            (DatapathState::default(), "no datapath is pinned"),
            (
                DatapathState {
                    enforcing: false,
                    ..ready.clone()
                },
                "shadow",
            ),
            (
                DatapathState {
                    attachments: 0,
                    ..ready.clone()
                },
                "no interface",
            ),
            (
                DatapathState {
                    rules: rule::bit(rule::TPROXY),
                    ..ready.clone()
                },
                "no rule",
            ),
        ] {
            let why = state.refusal().expect("refused");
            assert!(why.contains(needle), "{why}");
        }
    }

    #[test]
    fn text_lists_each_copy_and_what_was_kept() {
        let tool = Tool {
            family: xtables::IpFamily::V4,
            backend: xtables::Backend::Nft,
        };
        let outcome = Outcome {
            dry_run: false,
            checked: vec![tool],
            actions: vec![
                Action {
                    tool,
                    table: "nat",
                    found: 2,
                    removed: 2,
                    kept: None,
                    remaining: 0,
                    error: None,
                },
                Action {
                    tool,
                    table: "mangle",
                    found: 1,
                    removed: 0,
                    kept: Some("TPROXY".into()),
                    remaining: 1,
                    error: None,
                },
            ],
        };
        let text = outcome.text();
        assert_eq!(
            text.matches("removed       iptables-nft").count(),
            2,
            "{text}"
        );
        assert!(text.contains("(copy 2 of 2)"), "{text}");
        assert!(
            text.contains("kept          iptables-nft      mangle"),
            "{text}"
        );
        assert!(!text.contains("present again"), "{text}");
        assert!(text.contains("removed 2 rule(s)"), "{text}");
    }
}
