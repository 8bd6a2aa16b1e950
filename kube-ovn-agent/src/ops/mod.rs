//! One-shot commands an operator runs next to the agent: `status`, `dump`, `detach`, `verify`,
//! `cleanup-iptables`, `preflight`, `uninstall-wait`.

pub mod cleanup;
pub mod inspect;
pub mod pinned;
pub mod preflight;
pub mod uninstall;
pub mod verify;
