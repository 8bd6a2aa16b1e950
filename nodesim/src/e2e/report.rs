//! Printing the results as plain-text tables, and the list of failures that decides the exit
//! status.

use std::{fmt::Write as _, time::Duration};

use super::{
    coexist::{CoexistResult, VectorResult},
    faults::{Attach, FaultResults},
    migration::MigrationResult,
    scenarios::Scenario,
};
use crate::node::{HookKind, KubeProxyMode, Outcome};

/// One hook's outcomes for the scenarios that apply to a kube-proxy mode, or why it did not run.
pub type Column = Result<Vec<Outcome>, String>;

pub struct Differential {
    pub title: String,
    pub mode: KubeProxyMode,
    pub calico_raw: bool,
    pub scenarios: Vec<Scenario>,
    pub columns: Vec<(HookKind, Column)>,
}

#[derive(Default)]
pub struct Report {
    pub differentials: Vec<Differential>,
    pub vectors: Option<Result<Vec<VectorResult>, String>>,
    pub coexistence: Vec<(String, Result<CoexistResult, String>)>,
    /// One run per attach mode; empty when the eBPF hook was not selected.
    pub faults: Vec<(Attach, Result<FaultResults, String>)>,
    /// `None` unless both hooks were selected.
    pub migration: Option<Result<MigrationResult, String>>,
    pub notes: Vec<String>,
}

/// Pads to `width` characters (not bytes: the tables contain arrows).
fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

fn table(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(s, w)| pad(s, *w)).collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
}

fn cell(want: &Outcome, got: &Outcome) -> String {
    if want == got {
        format!("✓ {got}")
    } else {
        format!("✗ {got}")
    }
}

impl Differential {
    fn render(&self, out: &mut String, failures: &mut Vec<String>) {
        let _ = writeln!(out, "\n== {} ==", self.title);
        let mut header = vec![
            "vec".to_owned(),
            "scenario".into(),
            "probe".into(),
            "mark".into(),
            "expected: no hook".into(),
            "expected: hook".into(),
        ];
        header.extend(self.columns.iter().map(|(hook, _)| hook.to_string()));
        let mut rows = vec![header];
        for (i, scenario) in self.scenarios.iter().enumerate() {
            let expect = scenario
                .expect(self.mode)
                .expect("only applicable scenarios");
            let mut row = vec![
                scenario.vector.to_owned(),
                scenario.what.to_owned(),
                scenario.probe.to_string(),
                if expect.mark == 0 {
                    "—".into()
                } else {
                    format!("{:#x}", expect.mark)
                },
                expect.unmarked.to_string(),
                expect.marked.to_string(),
            ];
            for (hook, column) in &self.columns {
                let want = expect.for_hook(*hook, self.calico_raw);
                row.push(match column {
                    Ok(outcomes) => {
                        let got = &outcomes[i];
                        if got != want {
                            failures.push(format!(
                                "{} / {hook}: vector {} {} [{}]: want {want}, got {got}",
                                self.title, scenario.vector, scenario.what, scenario.probe
                            ));
                        }
                        cell(want, got)
                    }
                    Err(_) => "— not run".into(),
                });
            }
            rows.push(row);
        }
        table(out, &rows);
        let sensitive = self
            .scenarios
            .iter()
            .filter(|s| {
                s.expect(self.mode)
                    .is_some_and(super::scenarios::Expect::sensitive)
            })
            .count();
        let _ = writeln!(
            out,
            "  {sensitive} of {} scenarios depend on the marks (their two expected columns differ).",
            self.scenarios.len()
        );
        for (hook, column) in &self.columns {
            if let Err(e) = column {
                let _ = writeln!(out, "  {hook} did not run: {e}");
                failures.push(format!(
                    "{} / {hook}: did not run: {}",
                    self.title,
                    first_line(e)
                ));
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn render_vectors(
    out: &mut String,
    vectors: &Result<Vec<VectorResult>, String>,
    failures: &mut Vec<String>,
) {
    let _ = writeln!(
        out,
        "\n== Kube-OVN's jump positioning, one pass on a fixed nat PREROUTING (spec §5.4) =="
    );
    let vectors = match vectors {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(out, "  did not run: {e}");
            failures.push(format!(
                "control-plane vectors did not run: {}",
                first_line(e)
            ));
            return;
        }
    };
    let mut rows = vec![vec![
        String::new(),
        "family".into(),
        "version".into(),
        "start".into(),
        "expected".into(),
        "got".into(),
        "iptables error".into(),
    ]];
    for v in vectors {
        if !v.ok {
            failures.push(format!(
                "vector {} {} ({}): want {:?}{}, got {:?} error {:?}",
                v.id,
                v.family,
                v.version.label(),
                v.expected,
                v.expected_error
                    .map(|e| format!(" and {e:?}"))
                    .unwrap_or_default(),
                v.got,
                v.error
            ));
        }
        rows.push(vec![
            format!("{} {}", if v.ok { "✓" } else { "✗" }, v.id),
            v.family.to_string(),
            v.version.label().into(),
            format!("[{}]", v.start.join(", ")),
            format!("[{}]", v.expected.join(", ")),
            format!("[{}]", v.got.join(", ")),
            v.error.as_deref().map_or_else(
                || "—".to_owned(),
                |e| e.rsplit(": ").next().unwrap_or(e).to_owned(),
            ),
        ]);
    }
    table(out, &rows);
}

fn render_coexistence(
    out: &mut String,
    runs: &[(String, Result<CoexistResult, String>)],
    failures: &mut Vec<String>,
) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n== Coexistence: kube-proxy IPVS mode; Calico re-inserts its jump at 1, kube-proxy re-asserts \
         KUBE-SERVICES, every 100 ms ± 50 % =="
    );
    let mut rows = vec![vec![
        "hook".to_owned(),
        "connections".into(),
        "wrong outcomes".into(),
        "'Index of deletion too big'".into(),
        "KUBE-SERVICES jump deleted".into(),
        "cali jump deleted".into(),
        "max ovn copies".into(),
        "time".into(),
    ]];
    for (label, run) in runs {
        match run {
            Ok(r) => {
                let count = |what: &str| -> usize {
                    r.actors.iter().filter_map(|a| a.counts.get(what)).sum()
                };
                let too_big: usize = r
                    .actors
                    .iter()
                    .flat_map(|a| &a.errors)
                    .filter(|(e, _)| e.contains("Index of deletion too big"))
                    .map(|(_, n)| n)
                    .sum();
                rows.push(vec![
                    label.clone(),
                    r.connections.to_string(),
                    r.wrong_total().to_string(),
                    too_big.to_string(),
                    count("KUBE-SERVICES jump found deleted, re-appended").to_string(),
                    count("cali-PREROUTING jump found deleted").to_string(),
                    r.actors
                        .iter()
                        .map(|a| a.max_ovn_copies)
                        .max()
                        .unwrap_or(0)
                        .to_string(),
                    format!("{:.1} s", r.elapsed.as_secs_f64()),
                ]);
                if r.connections < r.requested {
                    failures.push(format!(
                        "coexistence {label}: only {} of {} connections before the deadline",
                        r.connections, r.requested
                    ));
                }
                if r.hook == HookKind::Ebpf && r.wrong_total() > 0 {
                    failures.push(format!(
                        "coexistence {label}: {} wrong outcomes",
                        r.wrong_total()
                    ));
                }
            }
            Err(e) => {
                rows.push(vec![label.clone(), "— not run".into()]);
                failures.push(format!(
                    "coexistence {label}: did not run: {}",
                    first_line(e)
                ));
            }
        }
    }
    table(out, &rows);
    for (label, run) in runs {
        let _ = writeln!(out, "\n  {label}:");
        match run {
            Ok(r) => render_coexistence_detail(out, r),
            Err(e) => {
                let _ = writeln!(out, "    did not run: {e}");
            }
        }
    }
}

fn render_coexistence_detail(out: &mut String, r: &CoexistResult) {
    for (what, n) in &r.wrong {
        let _ = writeln!(out, "    wrong ×{n}: {what}");
    }
    for actor in &r.actors {
        let counts: Vec<String> = actor
            .counts
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect();
        let errors: Vec<String> = actor
            .errors
            .iter()
            .map(|(k, v)| format!("\"{k}\" ×{v}"))
            .collect();
        let _ = writeln!(
            out,
            "    {}: {} passes{}{}",
            actor.name,
            actor.passes,
            if counts.is_empty() {
                String::new()
            } else {
                format!("; {}", counts.join(", "))
            },
            if errors.is_empty() {
                String::new()
            } else {
                format!("; errors {}", errors.join(", "))
            },
        );
    }
    let _ = writeln!(
        out,
        "    nat PREROUTING (IPv4) at the end: [{}]",
        r.final_chain.join(", ")
    );
    let samples: Vec<&String> = r.actors.iter().flat_map(|a| &a.samples).collect();
    if !samples.is_empty() {
        let _ = writeln!(out, "    first events:");
        let mut samples = samples;
        samples.sort();
        for s in samples.iter().take(12) {
            let _ = writeln!(out, "      {s}");
        }
    }
}

fn render_faults(
    out: &mut String,
    attach: Attach,
    faults: &Result<FaultResults, String>,
    failures: &mut Vec<String>,
) {
    let _ = writeln!(
        out,
        "\n== Faults: kube-proxy IPVS mode, eBPF agent attached with {attach}, 100 new \
         connections/s of the mark-dependent scenarios =="
    );
    let results = match faults {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "  did not run: {e}");
            failures.push(format!("faults ({attach}): did not run: {}", first_line(e)));
            return;
        }
    };
    let mut rows = vec![vec![
        String::new(),
        "fault".to_owned(),
        "connections".into(),
        "wrong outcomes".into(),
        "link ids kept".into(),
        "time to resume".into(),
    ]];
    for row in &results.rows {
        rows.push(vec![
            if row.failures.is_empty() {
                "✓"
            } else {
                "✗"
            }
            .into(),
            row.fault.clone(),
            row.connections.clone(),
            row.wrong.to_string(),
            row.links_kept.clone(),
            row.resume.clone(),
        ]);
        failures.extend(
            row.failures
                .iter()
                .map(|f| format!("faults ({}): {f}", results.attach)),
        );
    }
    table(out, &rows);
    for row in &results.rows {
        for note in &row.notes {
            let _ = writeln!(out, "    {note}");
        }
    }
    if let Some(e) = &results.error {
        let _ = writeln!(out, "  stopped early: {e}");
        failures.push(format!(
            "faults ({attach}): stopped early: {}",
            first_line(e)
        ));
    }
    let _ = writeln!(out, "  faults took {:.1} s", results.elapsed.as_secs_f64());
}

fn render_migration(
    out: &mut String,
    migration: &Result<MigrationResult, String>,
    failures: &mut Vec<String>,
) {
    let _ = writeln!(
        out,
        "\n== Migration (docs/migration.md): kube-proxy IPVS mode, Kube-OVN's iptables hook, then \
         the agent; every scenario after each step =="
    );
    let result = match migration {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "  did not run: {e}");
            failures.push(format!("migration: did not run: {}", first_line(e)));
            return;
        }
    };
    let mut rows = vec![vec![
        String::new(),
        "step".to_owned(),
        "connections".into(),
        "wrong outcomes".into(),
        "result".into(),
    ]];
    for step in &result.steps {
        let ok = step.wrong.is_empty() && step.failures.is_empty();
        rows.push(vec![
            if ok { "✓" } else { "✗" }.into(),
            step.name.clone(),
            step.connections.to_string(),
            step.wrong.len().to_string(),
            step.detail.clone(),
        ]);
        for w in &step.wrong {
            failures.push(format!("migration: {}: {w}", step.name));
        }
        for f in &step.failures {
            failures.push(format!("migration: {}: {f}", step.name));
        }
    }
    table(out, &rows);
    let _ = writeln!(
        out,
        "  migration took {:.1} s",
        result.elapsed.as_secs_f64()
    );
}

impl Report {
    /// Prints everything; returns the failures.
    pub fn print(&self, elapsed: Duration) -> Vec<String> {
        let mut out = String::new();
        let mut failures = Vec::new();
        for d in &self.differentials {
            d.render(&mut out, &mut failures);
        }
        if let Some(vectors) = &self.vectors {
            render_vectors(&mut out, vectors, &mut failures);
        }
        render_coexistence(&mut out, &self.coexistence, &mut failures);
        for (attach, faults) in &self.faults {
            render_faults(&mut out, *attach, faults, &mut failures);
        }
        if let Some(migration) = &self.migration {
            render_migration(&mut out, migration, &mut failures);
        }
        for note in &self.notes {
            let _ = writeln!(out, "\nnote: {note}");
        }
        let _ = writeln!(out, "\ne2e finished in {:.1} s", elapsed.as_secs_f64());
        if failures.is_empty() {
            let _ = writeln!(out, "e2e: every check passed");
        } else {
            let _ = writeln!(out, "e2e: {} FAILURES:", failures.len());
            for f in &failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        print!("{out}");
        failures
    }
}
