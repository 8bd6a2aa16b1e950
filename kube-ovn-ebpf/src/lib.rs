//! Host-side stub: the agent lists this crate as a build-dependency so cargo rebuilds the eBPF
//! object when it changes. The program itself is the `kube-ovn-ebpf` binary (`src/main.rs`),
//! built for `bpfel-unknown-none` by the agent's build script.
#![no_std]
