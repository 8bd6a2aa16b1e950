//! Dev-only test helpers that need nothing of the agent: a real Kubernetes control plane
//! ([`control_plane`]) built by `cargo xtask testbed build` (docs/testbed.md).

pub mod control_plane;
