//! One-shot commands an operator runs next to the agent: `verify`, `cleanup-iptables`,
//! `preflight`.

pub mod cleanup;
pub mod preflight;
pub mod verify;
