//! `cargo xtask bench-tables [--check]`: BENCHMARKS.md's result tables rendered from the JSON of
//! the cited run, committed under `bench-results/`. Each generated block sits between
//! `<!-- begin generated from bench-results/<file> -->` and `<!-- end generated -->`; everything
//! else in BENCHMARKS.md is prose and stays as written. `--check` fails instead of writing when a
//! block differs, so a table cannot drift from its JSON.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{cmd, traffic};

const END: &str = "<!-- end generated -->";

/// Renders the Markdown of one or more result files (in the order listed).
type Render = fn(&[Value]) -> String;

/// The traffic variant runs (kube-proxy modes, iptables backends, padding prefix lengths), one
/// table each.
const VARIANTS: &[&str] = &[
    "traffic-variant-default-amplified.json",
    "traffic-variant-prefixes-16-amplified.json",
    "traffic-variant-legacy-amplified.json",
    "traffic-variant-kp-iptables.json",
    "traffic-variant-kp-nftables.json",
    "traffic-variant-ipv6-amplified.json",
    "traffic-variant-udp-default-amplified.json",
    "traffic-variant-udp-prefixes-16-amplified.json",
    "traffic-variant-udp-legacy-amplified.json",
];
/// The variant runs with an amplified phase: the quick ones, then the longer new-flow runs.
const VARIANTS_AMPLIFIED: &[&str] = &[
    "traffic-variant-default-amplified.json",
    "traffic-variant-prefixes-16-amplified.json",
    "traffic-variant-legacy-amplified.json",
    "traffic-variant-ipv6-amplified.json",
    "traffic-variant-udp-default-amplified.json",
    "traffic-variant-udp-prefixes-16-amplified.json",
    "traffic-variant-udp-legacy-amplified.json",
];

/// The committed result files and the renderer of each block. A block rendered from several
/// files is marked with all of them: `bench-results/a.json + bench-results/b.json`.
const SOURCES: &[(&[&str], Render)] = &[
    (&["traffic.json"], |j| traffic::markdown(&j[0])),
    (&["traffic-amplified.json"], |j| {
        traffic::amplified_markdown(&j[0])
    }),
    (&["traffic-amplified-tcp.json"], |j| {
        traffic::amplified_markdown(&j[0])
    }),
    (VARIANTS, traffic::variants_markdown),
    (VARIANTS_AMPLIFIED, traffic::variants_amplified_markdown),
    (&["control-plane.json"], |j| control_plane(&j[0])),
    (&["datapath-old.json", "datapath-new.json"], datapath),
    (&["memory.json"], |j| memory(&j[0])),
];

pub fn run(check: bool) -> Result<()> {
    let root = cmd::workspace_root();
    let doc_path = root.join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&doc_path).context("reading BENCHMARKS.md")?;
    let mut out = doc.clone();
    for (files, render) in SOURCES {
        let json = files
            .iter()
            .map(|file| load(&root.join("bench-results").join(file)))
            .collect::<Result<Vec<_>>>()?;
        out = splice(&out, &files.join(" + bench-results/"), &render(&json))?;
    }
    if out == doc {
        println!("bench-tables: BENCHMARKS.md matches bench-results/");
        return Ok(());
    }
    if check {
        bail!(
            "BENCHMARKS.md's generated tables differ from bench-results/: run `cargo xtask bench-tables`"
        );
    }
    std::fs::write(&doc_path, out).context("writing BENCHMARKS.md")?;
    println!("bench-tables: BENCHMARKS.md regenerated from bench-results/");
    Ok(())
}

fn load(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `doc` with the block generated from `file` replaced by `body`.
fn splice(doc: &str, file: &str, body: &str) -> Result<String> {
    let begin = format!("<!-- begin generated from bench-results/{file} -->");
    let Some(start) = doc.find(&begin) else {
        bail!("BENCHMARKS.md has no `{begin}` marker");
    };
    let after = start + begin.len();
    let Some(len) = doc[after..].find(END) else {
        bail!("BENCHMARKS.md: `{begin}` is not closed by `{END}`");
    };
    Ok(format!(
        "{}\n\n{}\n{}",
        &doc[..after],
        body.trim_end(),
        &doc[after + len..]
    ))
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `median (min–max)` of a `{median, min, max}` object.
fn spread(v: &Value) -> String {
    format!(
        "{} ({}–{})",
        traffic::num(number(&v["median"])),
        traffic::num(number(&v["min"])),
        traffic::num(number(&v["max"]))
    )
}

/// The control-plane benchmark's tables (`kube-ovn-agent/benches/control_plane.rs`).
fn control_plane(j: &Value) -> String {
    let mut s = String::new();
    let m = &j["machine"];
    let vulnerable = traffic::vulnerable(m);
    let load = |key: &str| traffic::load_averages(m, key);
    let first = &j["results"][0];
    let _ = writeln!(
        s,
        "Kernel {}, {} ({} cores); load average {} before, {} after. Mitigations in force: {}. \
         Objects as served: Service {} B, Node {} B, Subnet {} B (JSON, with managedFields, \
         annotations, labels; Nodes with conditions and {} images). {} rounds per scale; \
         one change: {} changes one at a time.\n",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        load("loadavg_before"),
        load("loadavg_after"),
        if vulnerable.is_empty() {
            "none reported".to_owned()
        } else {
            vulnerable.join("; ")
        },
        j["object_bytes"]["service"],
        j["object_bytes"]["node"],
        j["object_bytes"]["subnet"],
        j["object_bytes"]["node_images"],
        first["cold_rounds"],
        first["changes"],
    );
    let _ = writeln!(
        s,
        "End to end, per round: the agent started → `/readyz`, then `ipset restore` + \
         `iptables-restore` of the same state; median (min–max) over the rounds.\n\n\
         | Services (ports) | agent start → ready (ms) | restore (ms) | restore / agent, per round \
         | one change → map p50 / p99 / max (ms) | burst of 100 → maps (ms) | RSS ready / after \
         changes (MiB) | agent CPU per change (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let results = j["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for r in results {
        let c = &r["change_to_map_ms"];
        let _ = writeln!(
            s,
            "| {} ({}) | {} | {} | {} | {} / {} / {} | {} | {} / {} | {} |",
            traffic::group(number(&r["services"])),
            traffic::group(number(&r["service_ports"])),
            spread(&r["cold_start_spread_ms"]),
            spread(&r["ipset_iptables_cold_ms"]),
            spread(&r["restore_over_agent_cold_spread"]),
            traffic::num(number(&c["p50"])),
            traffic::num(number(&c["p99"])),
            traffic::num(number(&c["max"])),
            spread(&r["burst_spread_ms"]),
            traffic::num(number(&r["rss_mib_ready"])),
            traffic::num(number(&r["rss_mib_after_changes"])),
            traffic::num(number(&r["agent_cpu_per_change_ms"])),
        );
    }
    let _ = writeln!(
        s,
        "\nIn process, the same rounds: translation and the agent's batched map write into \
         freshly loaded maps, against the restore; one change as the agent applies it (the \
         changed object into the incremental translation, then the keys it touched written) and \
         as one `ipset restore` swapping one member.\n\n\
         | Services | translate (ms) | map write (ms) | restore (ms) | one change: map sync p50 / \
         p99 (ms) | one change: `ipset restore` p50 / p99 (ms) |\n|---|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} / {} | {} / {} |",
            traffic::group(number(&r["services"])),
            spread(&r["translate_ms"]),
            spread(&r["map_write_cold_ms"]),
            spread(&r["ipset_iptables_cold_ms"]),
            traffic::num(number(&r["map_sync_one_change_ms"]["p50"])),
            traffic::num(number(&r["map_sync_one_change_ms"]["p99"])),
            traffic::num(number(&r["ipset_one_change_ms"]["p50"])),
            traffic::num(number(&r["ipset_one_change_ms"]["p99"])),
        );
    }
    control_plane_startup(&mut s, results);
    s
}

/// The memory benchmark's table (`kube-ovn-agent/benches/memory.rs`): the agent with the file
/// source, per scale.
fn memory(j: &Value) -> String {
    let mut s = String::new();
    let m = &j["machine"];
    let load = |key: &str| traffic::load_averages(m, key);
    let results = j["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rounds = results
        .first()
        .and_then(|r| r["rounds"].as_array())
        .map_or(0, Vec::len);
    let _ = writeln!(
        s,
        "Kernel {}, {} ({} cores); load average {} before, {} after. Release build, `--source \
         file:`; {rounds} round(s) per scale, median (min–max); {} reloads per round.\n\n\
         | Services | file (MiB) | start → ready (ms) | RSS 3 s after ready (MiB) | peak (MiB) | \
         RSS after the reloads (MiB) | peak over the reloads (MiB) |\n\
         |---:|---:|---:|---:|---:|---:|---:|",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        load("loadavg_before"),
        load("loadavg_after"),
        j["reloads"],
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            traffic::group(number(&r["services"])),
            traffic::num(number(&r["file_mib"])),
            spread(&r["ready_ms"]),
            spread(&r["rss_ready_mib"]),
            spread(&r["peak_mib"]),
            spread(&r["rss_after_reloads_mib"]),
            spread(&r["peak_after_reloads_mib"]),
        );
    }
    s
}

/// The restart (pinned program reused) beside the cold start, the agent's own CPU to ready,
/// memory, and where each start spent its time; absent from runs before they were measured.
fn control_plane_startup(s: &mut String, results: &[Value]) {
    let measured: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("restart_spread_ms").is_some())
        .collect();
    if measured.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nRestart: after each round's cold start and changes the agent is stopped and started \
         again on the same pins and API server (the pinned program is this build's: reused, not \
         loaded). Agent CPU: its threads' schedstat from spawn to ready. Kernel maps: the summed \
         `memlock` of the pinned maps.\n\n\
         | Services | restart → ready (ms) | restore / restart | program | agent CPU to ready: \
         cold / restart (ms) | RSS peak (MiB) | kernel maps (MiB) |\n|---|---:|---:|---|---:|---:|---:|"
    );
    for r in &measured {
        let programs: Vec<&str> = r["restart_program"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut distinct = programs.clone();
        distinct.dedup();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} ({} of {}) | {} / {} | {} | {} |",
            traffic::group(number(&r["services"])),
            spread(&r["restart_spread_ms"]),
            spread(&r["restore_over_agent_restart_spread"]),
            distinct.join(", "),
            programs.iter().filter(|p| **p == "reused").count(),
            programs.len(),
            spread(&r["cold_start_agent_cpu_ms"]),
            spread(&r["restart_agent_cpu_ms"]),
            traffic::num(number(&r["rss_hwm_mib"])),
            traffic::num(number(&r["kernel_map_mib"])),
        );
    }
    let _ = writeln!(
        s,
        "\nWhere the time goes (the agent's `/status` `startup` phases): per phase its duration, \
         median (min–max) over the rounds, and in brackets when it began (median ms after the \
         agent's `main`). `list` (the source's first complete list of every kind) runs beside \
         `datapath` (program load and verification, or reuse, and adopting the pinned maps); \
         `snapshot`, `attach`, `translate` and `map_write` are the first complete pass; \
         `exec_and_poll` is the rest of the measured time (spawn before `main`, the 2 ms \
         `/readyz` poll).\n"
    );
    for r in &measured {
        for (what, key) in [("cold start", "cold_phases"), ("restart", "restart_phases")] {
            let phases = r[key].as_array().map(Vec::as_slice).unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} Services, {what} | {} |\n|---|{}",
                traffic::group(number(&r["services"])),
                phases
                    .iter()
                    .map(|p| p["name"].as_str().unwrap_or("?").replace('_', " "))
                    .collect::<Vec<_>>()
                    .join(" | "),
                "---:|".repeat(phases.len()),
            );
            let _ = writeln!(
                s,
                "| ms | {} |\n",
                phases
                    .iter()
                    .map(|p| format!(
                        "{} [{}]",
                        spread(&p["took_ms"]),
                        traffic::num(number(&p["start_ms"]["median"]))
                    ))
                    .collect::<Vec<_>>()
                    .join(" | "),
            );
        }
    }
}

/// The datapath benchmark's old-vs-new tables (`kube-ovn-agent/benches/datapath.rs`): one run
/// of the datapath before a change and one after, same benchmark.
fn datapath(runs: &[Value]) -> String {
    let mut s = datapath_runs(runs);
    s.push_str(&datapath_hot(runs));
    s.push_str(&datapath_cold(runs));
    s
}

/// Nanoseconds, whole (the benchmark's resolution).
fn ns(v: f64) -> String {
    if v.is_finite() {
        traffic::group(v)
    } else {
        "–".to_owned()
    }
}

/// `median (min–max)` of a `{median, min, max}` object of nanoseconds.
fn ns_spread(v: &Value) -> String {
    format!(
        "{} ({}–{})",
        ns(number(&v["median"])),
        ns(number(&v["min"])),
        ns(number(&v["max"]))
    )
}

/// The datapath a run measured: the first file is the old one.
fn old_new(i: usize) -> &'static str {
    if i == 0 { "old" } else { "new" }
}

/// A run's results of one kind (`hot`, `cold`), per run.
fn datapath_rows<'a>(runs: &'a [Value], key: &str) -> Vec<&'a [Value]> {
    runs.iter()
        .map(|j| j[key].as_array().map(Vec::as_slice).unwrap_or_default())
        .collect()
}

/// One line per run: what was measured, where and under what load.
fn datapath_runs(runs: &[Value]) -> String {
    let mut s = String::new();
    for (i, j) in runs.iter().enumerate() {
        let m = &j["machine"];
        let load = |key: &str| {
            m[key]
                .as_str()
                .unwrap_or("?")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            s,
            "- **{}**: {} (commit `{}`); kernel {}, {} ({} cores); load average {} before, {} \
             after; verifier-processed instructions {}; {} rounds, {} runs per hot call, {} cold \
             packets.",
            old_new(i),
            j["label"].as_str().unwrap_or("?"),
            j["commit"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["cpu"].as_str().unwrap_or("?"),
            m["cores"],
            load("loadavg_before"),
            load("loadavg_after"),
            j["verified_instructions"],
            j["rounds"],
            j["repeat"],
            j["cold_packets"],
        );
    }
    s
}

/// Hot: one row per case and run, one column per set size.
fn datapath_hot(runs: &[Value]) -> String {
    let mut s = String::new();
    let hot = datapath_rows(runs, "hot");
    let mut entries: Vec<u64> = Vec::new();
    let mut cases: Vec<&str> = Vec::new();
    for row in hot.iter().flat_map(|r| r.iter()) {
        let n = row["entries"].as_u64().unwrap_or_default();
        if !entries.contains(&n) {
            entries.push(n);
        }
        let case = row["case"].as_str().unwrap_or("?");
        if !cases.contains(&case) {
            cases.push(case);
        }
    }
    let _ = write!(
        s,
        "\nHot, gross ns per run, median (min–max) over the rounds:\n\n| case | datapath |"
    );
    for n in &entries {
        let _ = write!(
            s,
            " {} |",
            traffic::group(f64::from(u32::try_from(*n).unwrap_or(u32::MAX)))
        );
    }
    let _ = write!(s, "\n|---|---|");
    for _ in &entries {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for case in &cases {
        for (i, run) in hot.iter().enumerate() {
            let name = if i == 0 {
                format!("`{case}`")
            } else {
                String::new()
            };
            let _ = write!(s, "| {name} | {} |", old_new(i));
            for n in &entries {
                let cell = run
                    .iter()
                    .find(|r| r["case"] == *case && r["entries"].as_u64() == Some(*n))
                    .map_or_else(|| "–".to_owned(), |r| ns_spread(&r["ns"]));
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }
    s
}

/// Cold: one row per case, set size and run, with the controls.
fn datapath_cold(runs: &[Value]) -> String {
    let mut s = String::new();
    let cold = datapath_rows(runs, "cold");
    let _ = writeln!(
        s,
        "\nCold (repeat 1, distinct packets), gross ns per run: the per-round median (median and \
         range over rounds), p90 and fastest packet over all rounds, and the two controls' \
         medians.\n\n| case | entries | datapath | median (round range) | p90 | fastest | empty \
         program | same frame, repeat 1 |\n|---|---:|---|---:|---:|---:|---:|---:|"
    );
    let Some(first) = cold.first() else {
        return s;
    };
    for row in *first {
        for (i, run) in cold.iter().enumerate() {
            let Some(r) = run
                .iter()
                .find(|r| r["case"] == row["case"] && r["entries"] == row["entries"])
            else {
                continue;
            };
            let (case, n) = if i == 0 {
                (
                    format!("`{}`", r["case"].as_str().unwrap_or("?")),
                    traffic::group(number(&r["entries"])),
                )
            } else {
                (String::new(), String::new())
            };
            let _ = writeln!(
                s,
                "| {case} | {n} | {} | {} | {} | {} | {} | {} |",
                old_new(i),
                ns_spread(&r["ns"]),
                ns(number(&r["p90_ns"])),
                ns(number(&r["min_ns"])),
                ns(number(&r["empty_program_ns"]["median"])),
                ns(number(&r["same_frame_ns"]["median"])),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_pairs_each_case_old_over_new() {
        let run = |median: f64, cold: f64| {
            serde_json::json!({
                "label": "x", "commit": "c", "rounds": 5, "repeat": 10, "cold_packets": 4,
                "verified_instructions": 1,
                "machine": {"kernel": "k", "cpu": "c", "cores": 2,
                            "loadavg_before": "1.00 2.00 3.00 1/2 3", "loadavg_after": "1 2 3"},
                "hot": [{"case": "r1", "entries": 1000,
                         "ns": {"median": median, "min": 40.0, "max": 90.0}}],
                "cold": [{"case": "r1", "entries": 1000,
                          "ns": {"median": cold, "min": cold, "max": cold},
                          "min_ns": 80.0, "p90_ns": 1500.0,
                          "empty_program_ns": {"median": 50.0}, "same_frame_ns": {"median": 90.0}}]
            })
        };
        let md = datapath(&[run(55.4, 1264.0), run(46.0, 485.0)]);
        assert!(md.contains("| 1\u{2009}000 |"), "{md}");
        assert!(
            md.contains("| `r1` | old | 55 (40–90) |\n|  | new | 46 (40–90) |"),
            "{md}"
        );
        assert!(
            md.contains("|  |  | new | 485 (485–485) | 1\u{2009}500 | 80 | 50 | 90 |"),
            "{md}"
        );
        assert!(md.contains("load average 1.00 2.00 3.00 before"), "{md}");
    }

    #[test]
    fn splice_replaces_only_the_named_block() {
        let doc = "intro\n<!-- begin generated from bench-results/a.json -->\nold\n<!-- end generated -->\nprose\n";
        let out = splice(doc, "a.json", "new table\n").unwrap();
        assert_eq!(
            out,
            "intro\n<!-- begin generated from bench-results/a.json -->\n\nnew table\n<!-- end generated -->\nprose\n"
        );
        // Idempotent: rendering twice changes nothing.
        assert_eq!(splice(&out, "a.json", "new table\n").unwrap(), out);
        assert!(splice(doc, "b.json", "x").is_err());
    }
}
