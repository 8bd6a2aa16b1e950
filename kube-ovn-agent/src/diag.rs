//! Errors as an operator reads them: one line, each cause once, control characters escaped, and
//! the capability to grant when the kernel said "Operation not permitted".

use std::{error::Error, io};

use crate::faults::escape;

/// `outer: cause: cause …`, skipping a cause whose text an outer message already contains (our
/// error types print their source inline, and also expose it as `source()`).
pub fn render<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let chain: Vec<&(dyn Error + 'static)> = chain.into_iter().collect();
    let mut line = String::new();
    for cause in &chain {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    if let Some(hint) = capability_hint(&chain, &line) {
        line.push_str(" — ");
        line.push_str(hint);
    }
    escape(&line).into_owned()
}

/// [`render`] of `error` and its sources.
pub fn render_error(error: &(dyn Error + 'static)) -> String {
    render(std::iter::successors(Some(error), |&e| e.source()))
}

/// What to grant when some cause is `EPERM`, judged by what failed.
fn capability_hint(chain: &[&(dyn Error + 'static)], text: &str) -> Option<&'static str> {
    let eperm = chain.iter().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            == Some(libc::EPERM)
    });
    if !eperm {
        return None;
    }
    let text = text.to_ascii_lowercase();
    Some(if text.contains("mount") {
        "mounting a bpffs needs CAP_SYS_ADMIN"
    } else if text.contains("netlink") || text.contains("tc filter") || text.contains("qdisc") {
        "needs CAP_NET_ADMIN (tc filters and qdiscs)"
    } else if ["bpf", "map", "program", "pin", "link", "attach"]
        .iter()
        .any(|word| text.contains(word))
    {
        "needs CAP_BPF (or CAP_SYS_ADMIN on kernels < 5.8), and CAP_NET_ADMIN to load and \
         attach a TC program; if the process has them, seccomp or AppArmor is refusing bpf() \
         (docs/install.md)"
    } else {
        "a capability is missing, or seccomp/AppArmor refuses the call (docs/install.md)"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading the datapath: {source}")]
    struct Outer {
        #[source]
        source: Inner,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("creating map kovn_subnets4: {source}")]
    struct Inner {
        #[source]
        source: io::Error,
    }

    fn chain<'a>(error: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
        std::iter::successors(Some(error), |&e| e.source()).collect()
    }

    #[test]
    fn each_cause_is_printed_once_and_eperm_names_the_capability() {
        let error = Outer {
            source: Inner {
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
        };
        let line = render(chain(&error));
        assert_eq!(line.matches("Operation not permitted").count(), 1, "{line}");
        assert_eq!(line.matches("kovn_subnets4").count(), 1, "{line}");
        assert!(
            line.contains("CAP_BPF (or CAP_SYS_ADMIN on kernels < 5.8)"),
            "{line}"
        );
    }

    #[test]
    fn causes_not_shown_inline_are_appended() {
        #[derive(Debug, thiserror::Error)]
        #[error("starting the file source")]
        struct Context {
            #[source]
            source: io::Error,
        }
        let error = Context {
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        let line = render(chain(&error));
        assert!(
            line.starts_with("starting the file source: No such file"),
            "{line}"
        );
        assert!(!line.contains("CAP_"), "no hint without EPERM: {line}");
    }

    #[test]
    fn the_hint_follows_what_failed() {
        for (what, want) in [
            ("mounting bpffs on /sys/fs/bpf", "CAP_SYS_ADMIN"),
            ("listing tc filters on eth0: netlink", "CAP_NET_ADMIN"),
        ] {
            #[derive(Debug, thiserror::Error)]
            #[error("{what}")]
            struct Failed {
                what: &'static str,
                #[source]
                source: io::Error,
            }
            let error = Failed {
                what,
                source: io::Error::from_raw_os_error(libc::EPERM),
            };
            let line = render(chain(&error));
            assert!(line.contains(want), "{line}");
        }
    }

    #[test]
    fn control_characters_in_errors_are_escaped() {
        let error = io::Error::other("Subnet evil\nFORGED");
        assert_eq!(render(chain(&error)), "Subnet evil\\nFORGED");
    }
}
