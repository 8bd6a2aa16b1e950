//! The machine a benchmark ran on, recorded in every result so a reader can judge the numbers.

/// `/proc/loadavg`'s three averages (NaN when unreadable).
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text.split_whitespace().filter_map(|v| v.parse().ok());
    [
        values.next().unwrap_or(f64::NAN),
        values.next().unwrap_or(f64::NAN),
        values.next().unwrap_or(f64::NAN),
    ]
}

/// Kernel, CPU model, cores and the CPU vulnerability mitigations in force (they set the cost of
/// every kernel entry, indirect call and return, i.e. of both hooks), as JSON object fields
/// `kernel`, `cpu`, `cores`, `vulnerabilities`; each benchmark adds its load figures.
pub fn facts() -> serde_json::Map<String, serde_json::Value> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
    };
    let mut vulnerabilities = serde_json::Map::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu/vulnerabilities") {
        let mut entries: Vec<_> = dir.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let value = std::fs::read_to_string(entry.path()).unwrap_or_default();
            vulnerabilities.insert(
                entry.file_name().to_string_lossy().into_owned(),
                value.trim().into(),
            );
        }
    }
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_default();
    let mut facts = serde_json::Map::new();
    facts.insert("kernel".into(), read("/proc/sys/kernel/osrelease").into());
    facts.insert("cpu".into(), cpu.into());
    facts.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, usize::from)
            .into(),
    );
    facts.insert("vulnerabilities".into(), vulnerabilities.into());
    facts
}
