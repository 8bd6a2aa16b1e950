//! One-shot commands an operator runs next to the agent: `status`, `dump`, `detach`, `verify`,
//! `cleanup-iptables`, `preflight`, `uninstall-wait`, and `probe`, the traffic `verify` can
//! compare.

pub mod cleanup;
pub mod inspect;
pub mod pinned;
pub mod preflight;
pub mod probe;
pub mod uninstall;
pub mod verify;
