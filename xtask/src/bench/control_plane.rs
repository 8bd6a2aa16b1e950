//! `cargo xtask bench control-plane`: runs `kube-ovn-agent/benches/control_plane.rs` (the agent
//! against a list/watch API server in a private namespace, and map sync vs ipset/iptables-restore).

use std::path::Path;

use anyhow::Result;

use crate::cmd;

pub fn run(quick: bool, out: &Path) -> Result<()> {
    let json = out.join("control-plane.json");
    let json = json.to_string_lossy();
    let mut args = vec![
        "bench",
        "-p",
        "kube-ovn-agent",
        "--bench",
        "control_plane",
        "--",
        "--out",
        &json,
    ];
    if quick {
        args.push("--quick");
    }
    cmd::cargo(&args)
}
