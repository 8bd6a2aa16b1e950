//! What `cargo xtask` and the node simulator (`nodesim/`, which xtask builds and runs) share:
//! running commands and installing prerequisites.

pub mod cmd;
pub mod setup;
