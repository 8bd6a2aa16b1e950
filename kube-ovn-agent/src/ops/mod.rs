//! One-shot commands an operator runs next to the agent: `status`, `dump`, `detach`, `verify`,
//! `cleanup-iptables`.

pub mod cleanup;
pub mod inspect;
pub mod pinned;
pub mod verify;
