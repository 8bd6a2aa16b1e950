//! Dev-only test helpers that need nothing of the agent: a real Kubernetes control plane
//! ([`control_plane`]) built by `cargo xtask testbed build` (docs/testbed.md), private network
//! namespaces and bpffs mounts ([`netns`]), commands bounded in time ([`exec`]), the agent
//! process under test with its `status`/`dump` read into types ([`agent`]), the `main` of every
//! privileged suite ([`privileged`]) and strict reading of manifests into types ([`typed`]).
//! Shared by the agent's tests and the node simulator.

pub mod agent;
pub mod control_plane;
pub mod exec;
pub mod machine;
pub mod netns;
pub mod privileged;
pub mod typed;
