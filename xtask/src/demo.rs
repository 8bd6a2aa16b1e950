//! `cargo xtask demo`: builds the agent and runs `kube-ovn-agent/examples/demo.rs`, which builds a
//! throw-away node in private network namespaces, marks one packet of each kind and cleans up.

use anyhow::Result;

use crate::{cmd, setup};

pub fn run() -> Result<()> {
    setup::ensure_all()?;
    // The demo reads each probe's mark back from conntrack.
    setup::ensure_apt_tools(&[("conntrack", "conntrack")])?;
    cmd::cargo(&["build", "--release", "--package", "kube-ovn-agent"])?;
    let agent = cmd::target_dir().join("release/kube-ovn-agent");
    let agent = agent.to_string_lossy();
    cmd::cargo(&[
        "run",
        "--quiet",
        "--release",
        "--package",
        "kube-ovn-agent",
        "--example",
        "demo",
        "--",
        "--agent",
        &agent,
    ])
}
