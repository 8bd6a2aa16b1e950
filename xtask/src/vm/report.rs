//! The result lines a run leaves in its log (guest serial console or host log).

/// One test binary's outcome.
pub struct TestOutcome {
    pub name: String,
    pub passed: bool,
    pub rc: String,
    /// libtest's `test result: …` line.
    pub summary: Option<String>,
    /// `test … ignored` lines: suites skip what the kernel lacks, naming the feature.
    pub ignored: Vec<String>,
    /// libtest's `failures:` section, for the summary.
    pub failures: Vec<String>,
}

impl TestOutcome {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            passed: false,
            rc: "?".into(),
            summary: None,
            ignored: Vec::new(),
            failures: Vec::new(),
        }
    }
}

/// Lines of a failing binary's `failures:` section kept for the summary.
const FAILURE_LINES: usize = 60;

#[derive(Default)]
pub struct Report {
    /// `uname -r` as the guest printed it.
    pub release: Option<String>,
    /// The final `KOVN-VM-RESULT` verdict; `None` when the line is missing.
    pub passed: Option<bool>,
    pub tests: Vec<TestOutcome>,
    /// `(program, processed_insns)` from `KOVN-VERIFIER` lines.
    pub verifier: Vec<(String, u64)>,
    /// Other `KOVN-…` lines the suites print for the summary (verifier details, features).
    pub notes: Vec<String>,
    pub module_failures: Vec<String>,
}

/// `key=value` from a `KOVN-…` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

pub fn parse(log: &str) -> Report {
    let mut report = Report::default();
    let mut current: Option<TestOutcome> = None;
    for line in log.lines().map(|l| l.trim_end_matches('\r')) {
        let line = &strip_ansi(line);
        // Console output can interleave kernel messages with a line; take the marker onwards.
        let Some(at) = line.find("KOVN-") else {
            if let Some(test) = current.as_mut() {
                let text = line.trim();
                if text.starts_with("test result:") {
                    test.summary = Some(text.to_owned());
                } else if text.starts_with("test ") && text.contains(" ... ignored") {
                    test.ignored.push(text.to_owned());
                } else if (text == "failures:" || !test.failures.is_empty())
                    && test.failures.len() < FAILURE_LINES
                {
                    test.failures.push(line.to_owned());
                }
            }
            continue;
        };
        let marker = &line[at..];
        let kind = marker.split_whitespace().next().unwrap_or_default();
        match kind {
            "KOVN-VM-BOOT" => report.release = field(marker, "kernel").map(str::to_owned),
            "KOVN-VM-TEST-BEGIN" => {
                current = Some(TestOutcome::new(field(marker, "test").unwrap_or("?")));
            }
            "KOVN-VM-TEST" => {
                let mut test = current
                    .take()
                    .unwrap_or_else(|| TestOutcome::new(field(marker, "test").unwrap_or("?")));
                field(marker, "rc").unwrap_or("?").clone_into(&mut test.rc);
                test.passed = marker.split_whitespace().any(|w| w == "PASS");
                report.tests.push(test);
            }
            "KOVN-VM-RESULT" => {
                report.release = report
                    .release
                    .take()
                    .or_else(|| field(marker, "kernel").map(str::to_owned));
                report.passed = Some(marker.split_whitespace().any(|w| w == "PASS"));
            }
            "KOVN-VM-MODULE" if marker.ends_with("FAIL") => {
                report.module_failures.push(marker.to_owned());
            }
            "KOVN-VM-MODULE" => {}
            "KOVN-VERIFIER" => {
                if let (Some(program), Some(n)) = (
                    field(marker, "program"),
                    field(marker, "processed_insns").and_then(|n| n.parse().ok()),
                ) {
                    report.verifier.push((program.to_owned(), n));
                }
                report.notes.push(marker.to_owned());
            }
            _ => report.notes.push(marker.to_owned()),
        }
    }
    // A binary that started but never reported (guest hung or died in it).
    if let Some(test) = current {
        report.tests.push(test);
    }
    report
}

/// Drops ANSI escape sequences (colours), in case a suite colours its output anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_guest_log() {
        let log = "\
[    1.0] random kernel line\r
KOVN-VM-BOOT kernel=5.10.0-46-cloud-amd64 uptime=1.2\r
KOVN-VM-MODULE kernel=5.10.0-46-cloud-amd64 module=veth.ko loaded\r
KOVN-VM-TEST-BEGIN kernel=5.10.0-46-cloud-amd64 test=verifier uptime=1.3\r
KOVN-VERIFIER kernel=5.10.0-46-cloud-amd64 program=kovn_ingress processed_insns=4242 x=1\r
test verifier_stats_kovn_ingress ... ok\r
test result: \u{1b}[32mok\u{1b}[0m. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\r
KOVN-VM-TEST kernel=5.10.0-46-cloud-amd64 test=verifier rc=0 PASS uptime=2\r
KOVN-VM-TEST-BEGIN kernel=5.10.0-46-cloud-amd64 test=netns uptime=2\r
test attach_tcx ... ignored, needs tcx (kernel >= 6.6)\r
failures:\r
\r
---- attach_netlink stdout ----\r
boom\r
test result: FAILED. 0 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\r
KOVN-VM-TEST kernel=5.10.0-46-cloud-amd64 test=netns rc=1 FAIL uptime=3\r
KOVN-VM-RESULT kernel=5.10.0-46-cloud-amd64 FAIL\r
";
        let r = parse(log);
        assert_eq!(r.release.as_deref(), Some("5.10.0-46-cloud-amd64"));
        assert_eq!(r.passed, Some(false));
        assert_eq!(r.verifier, vec![("kovn_ingress".to_owned(), 4242)]);
        assert_eq!(r.tests.len(), 2);
        assert!(r.tests[0].passed);
        assert!(
            r.tests[0]
                .summary
                .as_deref()
                .unwrap()
                .starts_with("test result: ok")
        );
        assert!(!r.tests[1].passed);
        assert_eq!(r.tests[1].rc, "1");
        assert_eq!(r.tests[1].ignored.len(), 1);
        assert_eq!(r.tests[1].failures.len(), 4);
        assert!(r.tests[1].summary.as_deref().unwrap().contains("FAILED"));
        assert!(r.tests[0].failures.is_empty());
    }

    #[test]
    fn a_missing_result_line_is_no_verdict() {
        let r = parse("KOVN-VM-BOOT kernel=6.1.0\nKOVN-VM-TEST-BEGIN kernel=6.1.0 test=datapath\n");
        assert_eq!(r.passed, None);
        assert_eq!(r.tests.len(), 1);
        assert!(!r.tests[0].passed);
    }
}
