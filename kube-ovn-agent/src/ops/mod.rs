//! One-shot commands an operator runs next to the agent: `verify`, `cleanup-iptables`.

pub mod cleanup;
pub mod inspect;
pub mod verify;
