//! The `main` of a privileged test binary (libtest-mimic, `harness = false`): loading BPF
//! programs and creating network namespaces need root. Without it every trial is reported
//! ignored, said loudly on stderr, or the binary fails when CI demands the suite run.

use libtest_mimic::{Arguments, Trial};

/// Why privileged tests cannot run here, if they cannot.
pub fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| {
        format!(
            "running as uid {euid}: loading BPF programs and creating network namespaces \
             needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
        )
    })
}

/// Whether a skip must be a failure: `KOVN_REQUIRE_PRIVILEGED` set to a non-empty value, or
/// `CI` set to anything but `false`.
pub fn required() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "false");
    set("KOVN_REQUIRE_PRIVILEGED") || set("CI")
}

/// Runs `trials` (the privileged `suite`, named in the skip message) and exits with libtest's
/// status. Not root: every trial is ignored, or, when [`required`], the process exits 1 before
/// running any.
pub fn main(suite: &str, trials: Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    let skip = missing_privilege();
    if let Some(why) = &skip {
        eprintln!("\n*** SKIPPING the privileged {suite}: {why} ***\n");
        if required() {
            eprintln!("CI or KOVN_REQUIRE_PRIVILEGED is set: refusing to skip");
            std::process::exit(1);
        }
    }
    let trials = trials
        .into_iter()
        .map(|trial| {
            if skip.is_some() {
                trial.with_ignored_flag(true)
            } else {
                trial
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
