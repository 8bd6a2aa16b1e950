//! Dev-only test helpers that need nothing of the agent: a real Kubernetes control plane
//! ([`control_plane`]) built by `cargo xtask testbed build` (docs/testbed.md), and private
//! network namespaces and bpffs mounts ([`netns`]) for the agent's tests and the e2e code.

pub mod control_plane;
pub mod netns;
