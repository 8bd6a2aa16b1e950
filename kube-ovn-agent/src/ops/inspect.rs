//! `status`, `dump` and `detach`: they read (or remove) what `run` pinned, without loading a
//! program.

use std::{
    fmt::Write as _,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    datapath::attach::AttachError,
    datapath::attach::{self, Attachment},
    datapath::pins::{BpffsError, PinRoot},
    datapath::sys,
    host::{clobber, netlink},
    ops::pinned::{PinnedError, PinnedView},
    state::{FamilyState, MapState, rule_names},
};
use aya_obj::generated::bpf_prog_info;
use kube_ovn_ebpf_common::{counter, names, rule};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error("opening rtnetlink")]
    Rtnetlink(#[source] io::Error),
    #[error(
        "refusing to detach under a running agent (it would keep reporting healthy while \
         nothing marks, and fail to re-attach). Stop it first (e.g. remove the DaemonSet or \
         keep it off this node), or pass --force"
    )]
    InUse(#[source] BpffsError),
    #[error(transparent)]
    Pins(#[from] BpffsError),
    #[error("detaching from {ifname}")]
    Detach {
        ifname: String,
        #[source]
        source: AttachError,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What `status` and `dump` read, and how they print it.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// The directory on a bpffs holding our pins.
    pub bpffs_root: PathBuf,
    /// JSON instead of text.
    pub json: bool,
}

/// What `detach` removes, and when it may.
#[derive(Clone, Debug)]
pub struct DetachOptions {
    /// The directory on a bpffs holding our pins.
    pub bpffs_root: PathBuf,
    /// Detach even under a running agent.
    pub force: bool,
    /// Finding nothing of ours is success, not an error.
    pub if_present: bool,
}

fn read_tables(root: &Path) -> Result<(PinnedView, Vec<u64>)> {
    let view = PinnedView::open(&PinRoot::new(root))?;
    let counters = view.counters()?;
    Ok((view, counters))
}

#[derive(Serialize)]
struct Status {
    /// This binary's version and commit.
    version: &'static str,
    /// What the running agent reports on its `/status`; `None` when it did not answer.
    agent: Option<crate::metrics::AgentStatus>,
    agent_error: Option<String>,
    kernel: String,
    bpffs_root: String,
    program: Option<ProgramStatus>,
    mode: &'static str,
    rules_v4: Vec<&'static str>,
    rules_v6: Vec<&'static str>,
    service_match_v4: &'static str,
    service_match_v6: &'static str,
    attachments: Vec<Attachment>,
    counters: Vec<(&'static str, u64)>,
    maps: Vec<(&'static str, usize)>,
    /// Each map's capacity (`max_entries`), in the order of `maps`.
    map_capacity: Vec<(&'static str, usize)>,
    mark_clobber: clobber::Report,
}

#[derive(Serialize)]
struct ProgramStatus {
    name: &'static str,
    id: u32,
    tag: String,
    verified_instructions: Option<u32>,
}

/// R1's form as a `--service-match` value, read back from the rules in force.
fn service_match(rules: u32) -> &'static str {
    if rules & rule::bit(rule::R1A) != 0 {
        "ip-port (kube-proxy IPVS sets present or forced)"
    } else if rules & rule::bit(rule::R1B) != 0 {
        "cidr (no kube-proxy IPVS sets, or forced)"
    } else {
        "none"
    }
}

pub async fn status(args: &ReadOptions, agent_addr: std::net::SocketAddr) -> Result<()> {
    let pins = PinRoot::new(&args.bpffs_root);
    let (view, counters) = read_tables(&args.bpffs_root)?;
    let tables = &view.tables;
    let current = tables.current();
    let program = pinned_program(&pins).map(|info| ProgramStatus {
        name: names::PROGRAM,
        id: info.id,
        tag: format!("{:016x}", u64::from_be_bytes(info.tag)),
        verified_instructions: (info.verified_insns > 0).then_some(info.verified_insns),
    });
    let rtnl = netlink::connect().map_err(Error::Rtnetlink)?;
    let attachments = attach::list(&pins, &rtnl).await;
    let mark_clobber = tokio::task::spawn_blocking(|| clobber::check(Duration::from_secs(10)))
        .await
        .unwrap_or_default();
    let fetched = tokio::task::spawn_blocking(move || {
        crate::metrics::fetch_status(agent_addr, Duration::from_secs(3))
    })
    .await;
    let (agent, agent_error) = match fetched {
        Ok(Ok(agent)) => (Some(agent), None),
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(e) => (None, Some(format!("asking the agent: {e}"))),
    };
    let status = Status {
        version: crate::cli::LONG_VERSION,
        agent,
        agent_error,
        kernel: kernel_release(),
        bpffs_root: pins.root.display().to_string(),
        program,
        mode: if current.shadow { "shadow" } else { "enforce" },
        rules_v4: rule_names(current.v4.rules),
        rules_v6: rule_names(current.v6.rules),
        service_match_v4: service_match(current.v4.rules),
        service_match_v6: service_match(current.v6.rules),
        attachments,
        counters: counter::NAMES.iter().copied().zip(counters).collect(),
        maps: tables.sizes(),
        map_capacity: tables.capacities(),
        mark_clobber,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status_text(&status));
    }
    Ok(())
}

/// The pinned program's info, through a read-only open of its pin (works on a read-only bpffs,
/// and with `CAP_BPF` alone).
fn pinned_program(pins: &PinRoot) -> Option<bpf_prog_info> {
    let fd = sys::open_pin_read_only(&pins.program(names::PROGRAM)).ok()?;
    sys::program_info(fd.as_fd()).ok()
}

fn status_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "version       {}", s.version);
    match (&s.agent, &s.agent_error) {
        (Some(agent), _) => out.push_str(&agent.text(unix_now())),
        (None, error) => {
            let _ = writeln!(
                out,
                "agent         not reachable: {}",
                error.as_deref().unwrap_or("unknown")
            );
        }
    }
    let _ = writeln!(out, "kernel        {}", s.kernel);
    let _ = writeln!(out, "bpffs root    {}", s.bpffs_root);
    match &s.program {
        Some(p) => {
            let _ = writeln!(
                out,
                "program       {} id {} tag {} ({} verified instructions)",
                p.name,
                p.id,
                p.tag,
                p.verified_instructions
                    .map_or_else(|| "unknown".into(), |n| n.to_string())
            );
        }
        None => out.push_str("program       not pinned\n"),
    }
    let _ = writeln!(out, "mode          {}", s.mode);
    let _ = writeln!(
        out,
        "IPv4 rules    {} — service match {}",
        join(&s.rules_v4),
        s.service_match_v4
    );
    let _ = writeln!(
        out,
        "IPv6 rules    {} — service match {}",
        join(&s.rules_v6),
        s.service_match_v6
    );
    if s.attachments.is_empty() {
        out.push_str("attachments   none\n");
    }
    for (i, a) in s.attachments.iter().enumerate() {
        let detail = match (a.link_id, a.filter) {
            (Some(link), _) => format!("tcx link {link}"),
            (None, Some((prio, handle))) => format!("netlink prio {prio} handle {handle:#x}"),
            _ => String::new(),
        };
        let label = if i == 0 { "attachments" } else { "" };
        let _ = writeln!(
            out,
            "{label:<13} {:<15} {detail:<28} program {}",
            a.ifname, a.program_id
        );
    }
    out.push_str("counters     ");
    for (name, value) in &s.counters {
        let _ = write!(out, " {name}={value}");
    }
    out.push('\n');
    out.push_str("map entries  ");
    for ((name, len), (_, capacity)) in s.maps.iter().zip(&s.map_capacity) {
        let _ = write!(out, " {name}={len}/{capacity}");
    }
    out.push('\n');
    if s.mark_clobber.findings.is_empty() {
        let _ = writeln!(
            out,
            "mark clobber  none found (checked: {})",
            if s.mark_clobber.checked.is_empty() {
                "no iptables-save tool available".to_owned()
            } else {
                s.mark_clobber.checked.join(", ")
            }
        );
    } else {
        for finding in &s.mark_clobber.findings {
            let _ = writeln!(out, "mark clobber  {}", finding.summary());
        }
        let _ = writeln!(out, "              mitigation: {}", clobber::MITIGATION);
    }
    out
}

fn join(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

pub fn dump(args: &ReadOptions) -> Result<()> {
    let (view, _) = read_tables(&args.bpffs_root)?;
    let current = view.tables.current();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&current)?);
    } else {
        print!("{}", dump_text(&current));
    }
    Ok(())
}

fn dump_text(d: &MapState) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (mode {})",
        names::CONFIG,
        if d.shadow { "shadow" } else { "enforce" }
    );
    let _ = writeln!(out, "  IPv4 rules: {}", join(&rule_names(d.v4.rules)));
    let _ = writeln!(out, "  IPv6 rules: {}", join(&rule_names(d.v6.rules)));
    let _ = writeln!(out, "{} (ifindex → roles)", names::IFACES);
    for (ifindex, roles) in &d.ifaces {
        let _ = writeln!(
            out,
            "  {ifindex}: {}",
            crate::state::role_names(*roles).join(", ")
        );
    }
    family_text(&mut out, "4", &d.v4);
    family_text(&mut out, "6", &d.v6);
    out
}

fn family_text<N: std::fmt::Display + Ord, A: std::fmt::Display + Ord + Copy>(
    out: &mut String,
    v: &str,
    f: &FamilyState<N, A>,
) {
    let mut section = |name: String, items: Vec<String>| {
        let _ = writeln!(out, "{name} ({} entries)", items.len());
        for item in items {
            let _ = writeln!(out, "  {item}");
        }
    };
    let strings = |i: &mut dyn Iterator<Item = String>| i.collect::<Vec<_>>();
    section(
        format!("kovn_subnets{v}"),
        strings(&mut f.subnets.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_svccidr{v}"),
        strings(&mut f.service_cidrs.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_svcport{v}"),
        strings(&mut f.service_ports.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_othernode{v}"),
        strings(&mut f.other_nodes.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_local{v}"),
        strings(&mut f.local.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_nplocal (IPv{v} tcp)"),
        strings(&mut f.nodeport_local_tcp.iter().map(ToString::to_string)),
    );
    section(
        format!("kovn_nplocal (IPv{v} udp)"),
        strings(&mut f.nodeport_local_udp.iter().map(ToString::to_string)),
    );
    let listener = f
        .tproxy_listener
        .map_or_else(|| "no listener".to_owned(), |a| format!("listener {a}"));
    section(
        format!("kovn_tproxy{v} ({listener})"),
        strings(&mut f.probe_targets.iter().map(ToString::to_string)),
    );
}

pub async fn detach(args: &DetachOptions) -> Result<()> {
    let pins = PinRoot::new(&args.bpffs_root);
    // Held while removing, so no agent starts on this root halfway through.
    let _lock = if pins.root.is_dir() {
        match pins.lock() {
            Ok(lock) => Some(lock),
            Err(BpffsError::InUse { .. }) if args.force => {
                tracing::warn!(
                    root = %pins.root.display(),
                    "an agent holds this root; removing its datapath anyway (--force): it \
                     will report unhealthy and stop attaching until it restarts"
                );
                None
            }
            Err(e @ BpffsError::InUse { .. }) => return Err(Error::InUse(e)),
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let rtnl = netlink::connect().map_err(Error::Rtnetlink)?;
    let attachments = attach::list(&pins, &rtnl).await;
    for attachment in &attachments {
        attach::remove(&pins, attachment).map_err(|source| Error::Detach {
            ifname: attachment.ifname.clone(),
            source,
        })?;
        println!(
            "detached {} ({})",
            attachment.ifname,
            match attachment.mode {
                attach::AttachMode::Tcx => "tcx",
                attach::AttachMode::Netlink => "netlink",
            }
        );
    }
    let removed = pins.remove_all()?;
    for path in &removed {
        println!("unpinned {}", path.display());
    }
    if attachments.is_empty() && removed.is_empty() {
        if args.if_present {
            println!("nothing of ours under {}", pins.root.display());
            return Ok(());
        }
        return Err(BpffsError::NothingOurs { path: pins.root }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixture;
    use kube_ovn_testkit::agent as kit;

    /// The test kit's typed `status --json`/`dump --json` (what the privileged suites and the
    /// node simulator read) keeps up with what these commands print.
    #[test]
    fn the_test_kit_reads_status_and_dump_json() {
        let mut desired = fixture::desired(fixture::Mode::A, kube_ovn_ebpf_common::role::OVN0);
        desired.v4.tproxy_listener_opaque = true;
        let dump: kit::Dump =
            serde_json::from_str(&serde_json::to_string_pretty(&desired).unwrap()).unwrap();
        assert_eq!(dump.v4.rules, rule_names(desired.v4.rules));
        assert_eq!(dump.v6.rules, rule_names(desired.v6.rules));
        assert_eq!(
            dump.v4.subnets,
            desired
                .v4
                .subnets
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        assert_eq!(dump.v4.service_ports.len(), desired.v4.service_ports.len());
        assert!(dump.v4.tproxy_listener_opaque && !dump.v6.tproxy_listener_opaque);
        assert_eq!(dump.ifaces.len(), desired.ifaces.len());

        let status = Status {
            version: crate::cli::LONG_VERSION,
            agent: Some(crate::metrics::AgentStatus {
                node: "n1".into(),
                mode: "shadow".into(),
                ready: true,
                ..Default::default()
            }),
            agent_error: None,
            kernel: "6.1.0".into(),
            bpffs_root: "/sys/fs/bpf/kube-ovn".into(),
            program: Some(ProgramStatus {
                name: names::PROGRAM,
                id: 42,
                tag: "00ff".into(),
                verified_instructions: Some(7),
            }),
            mode: "shadow",
            rules_v4: rule_names(desired.v4.rules),
            rules_v6: rule_names(desired.v6.rules),
            service_match_v4: service_match(desired.v4.rules),
            service_match_v6: service_match(desired.v6.rules),
            attachments: vec![Attachment {
                ifname: "ovn0".into(),
                mode: attach::AttachMode::Netlink,
                program_id: 42,
                link_id: None,
                filter: Some((1, 0x4b4f)),
            }],
            counters: counter::NAMES.iter().copied().zip(1..).collect(),
            maps: vec![(names::CONFIG, 1)],
            map_capacity: vec![(names::CONFIG, 1)],
            mark_clobber: clobber::Report::default(),
        };
        let read: kit::Status =
            serde_json::from_str(&serde_json::to_string_pretty(&status).unwrap()).unwrap();
        assert_eq!(read.counter(counter::NAMES[1]), Some(2));
        assert_eq!(read.attached(), ["ovn0"]);
        assert_eq!(read.attachments[0].filter, Some((1, 0x4b4f)));
        assert_eq!(read.attachments[0].mode, "netlink");
        assert_eq!(
            read.program.map(|p| (p.id, p.tag)),
            Some((42, "00ff".into()))
        );
        assert_eq!(
            read.agent.map(|a| (a.node, a.mode)),
            Some(("n1".into(), "shadow".into()))
        );
        assert_eq!(
            (read.mode.as_str(), read.rules_v4.len()),
            ("shadow", status.rules_v4.len())
        );
    }
}
