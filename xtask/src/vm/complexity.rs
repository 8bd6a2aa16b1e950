//! The verifier's processed-instruction count per kernel, stored in the repository and compared on
//! every matrix run: growth fails, as Cilium's complexity tests do, so a change that makes the
//! verifier walk more of the program is noticed (and accepted on purpose with `--bless`) before it
//! meets an older kernel's limit.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::PathBuf};

use anyhow::{Context as _, Result};

use crate::cmd;

/// `kernel=KEY release=MAJOR.MINOR program=NAME processed_insns=N`, one line per (kernel,
/// program); `#` starts a comment.
pub fn baseline_path() -> PathBuf {
    cmd::workspace_root().join("kube-ovn-ebpf/verifier-complexity.txt")
}

/// (kernel key, program) → (release `MAJOR.MINOR`, processed instructions).
type Baseline = BTreeMap<(String, String), (String, u64)>;

fn parse(text: &str) -> Result<Baseline> {
    let mut out = Baseline::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .with_context(|| format!("line {}: no `{key}=`", number + 1))
        };
        let insns = field("processed_insns")?
            .parse()
            .with_context(|| format!("line {}: processed_insns is not a number", number + 1))?;
        out.insert(
            (field("kernel")?.to_owned(), field("program")?.to_owned()),
            (field("release")?.to_owned(), insns),
        );
    }
    Ok(out)
}

/// `6.18.44-fc-v1252` → `6.18`: counts are compared only within one kernel line.
pub fn major_minor(release: &str) -> String {
    release.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// One kernel's measured counts against the baseline: problems (growth, a program the baseline
/// lacks) and notes (shrinkage, another kernel line than recorded).
#[derive(Default)]
pub struct Verdict {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub fn compare(key: &str, release: &str, measured: &[(String, u64)]) -> Result<Verdict> {
    let path = baseline_path();
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let baseline = parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    let release = major_minor(release);
    let mut verdict = Verdict::default();
    for (program, now) in measured {
        match baseline.get(&(key.to_owned(), program.clone())) {
            None => verdict.problems.push(format!(
                "verifier complexity: {program} on {key} has no baseline in {}; record it with \
                 `cargo xtask vm-test --kernel {key} --bless`",
                path.display()
            )),
            Some((recorded, _)) if *recorded != release => verdict.notes.push(format!(
                "verifier complexity: {program} on {key}: baseline is for {recorded}, this is \
                 {release}: not compared ({now} processed)"
            )),
            Some((_, before)) if now > before => verdict.problems.push(format!(
                "verifier complexity: {program} on {key} grew {before} → {now} processed \
                 instructions (+{} per mille); if intended, accept it with `cargo xtask vm-test \
                 --kernel {key} --bless`",
                (now - before) * 1000 / before
            )),
            Some((_, before)) if now < before => verdict.notes.push(format!(
                "verifier complexity: {program} on {key} shrank {before} → {now}; `--bless` \
                 records it"
            )),
            Some(_) => {}
        }
    }
    Ok(verdict)
}

/// One kernel's measurement: its key, `uname -r`, and (program, processed instructions).
pub struct Measured {
    pub key: String,
    pub release: String,
    pub programs: Vec<(String, u64)>,
}

/// Rewrites the baseline entries of the kernels measured in this run, keeping the others.
pub fn bless(measured: &[Measured]) -> Result<()> {
    let path = baseline_path();
    let mut baseline = match fs::read_to_string(&path) {
        Ok(text) => parse(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Baseline::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for Measured {
        key,
        release,
        programs,
    } in measured
    {
        baseline.retain(|(k, _), _| k != key);
        for (program, insns) in programs {
            baseline.insert(
                (key.clone(), program.clone()),
                (major_minor(release), *insns),
            );
        }
    }
    let mut out = String::from(
        "# The verifier's processed-instruction count per kernel and program, compared by\n\
         # `cargo xtask vm-test` (growth fails). Rewritten by `cargo xtask vm-test --bless`.\n",
    );
    for ((key, program), (release, insns)) in &baseline {
        let _ = writeln!(
            out,
            "kernel={key} release={release} program={program} processed_insns={insns}"
        );
    }
    fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "vm-test: recorded verifier complexity in {}",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_ignores_comments() {
        let b =
            parse("# c\nkernel=5.10 release=5.10 program=kovn_ingress processed_insns=68184 # x\n")
                .unwrap();
        assert_eq!(
            b[&("5.10".into(), "kovn_ingress".into())],
            ("5.10".into(), 68_184)
        );
        assert!(parse("kernel=5.10 program=p processed_insns=1\n").is_err());
    }

    #[test]
    fn major_minor_of_a_release() {
        assert_eq!(major_minor("6.18.44-fc-v1252"), "6.18");
        assert_eq!(major_minor("5.10.0-46-cloud-amd64"), "5.10");
    }
}
