//! The PREROUTING hook under test, one per node: nothing at all (`baseline`, which shows what
//! each scenario does without Kube-OVN's marks), Kube-OVN's own nat rules (`iptables`), or the
//! eBPF agent (`ebpf`). Everything else on the node is identical across the three.

use std::fmt;

use anyhow::{Context as _, Result};

use super::{
    NodeSpec,
    agent::{Agent, AgentConfig},
    kube_ovn,
    netns::NetNs,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookKind {
    Baseline,
    Iptables,
    Ebpf,
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Baseline => "baseline",
            Self::Iptables => "iptables",
            Self::Ebpf => "ebpf",
        })
    }
}

/// What installing a hook needs beyond the node itself.
#[derive(Clone, Debug, Default)]
pub struct HookOptions {
    /// How to run the agent, for `ebpf`; `None` when no agent binary is available.
    pub agent: Option<AgentConfig>,
}

pub enum Hook {
    Baseline,
    Iptables,
    Ebpf(Agent),
}

impl Hook {
    pub(super) fn install(
        kind: HookKind,
        node: &NetNs,
        spec: &NodeSpec,
        options: &HookOptions,
    ) -> Result<Self> {
        match kind {
            HookKind::Baseline => Ok(Self::Baseline),
            HookKind::Iptables => {
                kube_ovn::install_prerouting(node, &spec.cluster)
                    .context("installing Kube-OVN's nat PREROUTING rules")?;
                Ok(Self::Iptables)
            }
            HookKind::Ebpf => {
                let config = options
                    .agent
                    .as_ref()
                    .context("agent not available: no agent binary given")?;
                Ok(Self::Ebpf(Agent::start(node.name(), spec, config)?))
            }
        }
    }

    /// Fails if the hook stopped working on its own (the agent exited).
    pub fn check(&mut self) -> Result<()> {
        match self {
            Self::Ebpf(agent) => agent.check_alive(),
            _ => Ok(()),
        }
    }

    pub fn agent(&self) -> Option<&Agent> {
        match self {
            Self::Ebpf(agent) => Some(agent),
            _ => None,
        }
    }

    pub fn agent_mut(&mut self) -> Option<&mut Agent> {
        match self {
            Self::Ebpf(agent) => Some(agent),
            _ => None,
        }
    }
}
