//! Enforce or shadow, and the Node label that picks one per node.

/// `enforce` writes marks; `shadow` classifies and counts only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Shadow,
}

/// The Node label that overrides `--mode` on one node (`kubectl label node N
/// kube-ovn-ebpf.io/mode=shadow`), so a rollout can canary enforce on a few nodes.
pub const MODE_LABEL: &str = "kube-ovn-ebpf.io/mode";

/// The mode in force on this node: its Node's [`MODE_LABEL`] when that says `enforce` or
/// `shadow`, else `flag`. Returns the mode, where it came from (`node label` or `flag`), and a
/// complaint about a label value that is neither (the flag's mode is used then).
pub fn node_mode(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    flag: Mode,
) -> (Mode, &'static str, Option<String>) {
    match labels.and_then(|l| l.get(MODE_LABEL)).map(String::as_str) {
        None => (flag, "flag", None),
        Some("enforce") => (Mode::Enforce, "node label", None),
        Some("shadow") => (Mode::Shadow, "node label", None),
        Some(other) => (
            flag,
            "flag",
            Some(format!(
                "label {MODE_LABEL}={other:?} is neither `enforce` nor `shadow`; using --mode"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_label_overrides_the_mode_flag() {
        let labels = |value: &str| {
            std::collections::BTreeMap::from([(MODE_LABEL.to_owned(), value.to_owned())])
        };
        assert_eq!(
            node_mode(None, Mode::Enforce),
            (Mode::Enforce, "flag", None)
        );
        assert_eq!(
            node_mode(Some(&labels("shadow")), Mode::Enforce),
            (Mode::Shadow, "node label", None)
        );
        assert_eq!(
            node_mode(Some(&labels("enforce")), Mode::Shadow),
            (Mode::Enforce, "node label", None)
        );
        let (mode, from, complaint) = node_mode(Some(&labels("Shadow ")), Mode::Enforce);
        assert_eq!((mode, from), (Mode::Enforce, "flag"));
        assert!(complaint.unwrap().contains("\"Shadow \""));
        let other = std::collections::BTreeMap::from([("a".to_owned(), "b".to_owned())]);
        assert_eq!(node_mode(Some(&other), Mode::Shadow).0, Mode::Shadow);
    }
}
