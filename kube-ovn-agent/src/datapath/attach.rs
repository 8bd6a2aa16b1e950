//! Attaching the classifier at TC ingress: a pinned tcx link on kernels with tcx (≥ 6.6), a
//! netlink `clsact` filter at a fixed priority/handle elsewhere. Both survive the agent, both are
//! upgraded in place (`bpf_link_update` / filter replace), and only objects we created — pins
//! under our root, filters named `kovn_ingress` — are ever changed or removed.
//!
//! Everything here works with the agent Pod's capabilities (BPF, `NET_ADMIN`, PERFMON, `NET_RAW`):
//! our tcx links are found through their pins and the kernel's info on each link, never by
//! asking the interface for its programs' fds (that needs `CAP_SYS_ADMIN`); netlink filters are
//! found by a filter dump (`NET_ADMIN`), which names each filter and its program id.

use std::{io, path::Path};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info};
use futures::TryStreamExt;
use kube_ovn_ebpf_common::names;
use netlink_packet_route::tc::{TcAttribute, TcOption};
use serde::Serialize;

use crate::datapath::pins::PinRoot;

const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;

/// `--attach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachChoice {
    /// tcx where the kernel has it (≥ 6.6), netlink otherwise.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Netlink,
}

/// tcx (multi-program TC attachment through bpf links) arrived in Linux 6.6.
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl AttachChoice {
    pub fn resolve(self) -> AttachMode {
        match self {
            Self::Tcx => AttachMode::Tcx,
            Self::Netlink => AttachMode::Netlink,
            Self::Auto => {
                if tcx_supported() {
                    AttachMode::Tcx
                } else {
                    AttachMode::Netlink
                }
            }
        }
    }
}

/// `--tcx-order`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcxOrder {
    /// Before every other tcx program on the interface (marks are set before anyone looks).
    #[default]
    First,
    Last,
}

#[derive(Clone, Copy, Debug)]
pub struct AttachConfig {
    pub mode: AttachMode,
    pub tcx_order: TcxOrder,
    /// Netlink filter priority (lower runs first).
    pub priority: u16,
    /// Netlink filter handle.
    pub handle: u32,
}

impl Default for AttachConfig {
    fn default() -> Self {
        Self {
            mode: AttachMode::Tcx,
            tcx_order: TcxOrder::First,
            priority: 1,
            handle: DEFAULT_HANDLE,
        }
    }
}

/// "KO": a handle unlikely to collide with other tools' filters at the same priority.
pub const DEFAULT_HANDLE: u32 = 0x4b4f;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{op} on {ifname}: {source}")]
    Program {
        op: &'static str,
        ifname: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{op} {path}: {source}")]
    Pin {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{ifname}: a foreign tc filter ({name:?}, program {program_id}) holds priority {priority} \
         handle {handle:#x}; pick another --tc-priority/--tc-handle"
    )]
    Foreign {
        ifname: String,
        name: String,
        program_id: u32,
        priority: u16,
        handle: u32,
    },
    #[error("{op} on {ifname}: {source}")]
    Link {
        op: &'static str,
        ifname: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("listing tc filters on {ifname}: {source}")]
    Netlink {
        ifname: String,
        #[source]
        source: rtnetlink::Error,
    },
}

fn program_error(
    op: &'static str,
    ifname: &str,
) -> impl FnOnce(aya::programs::ProgramError) -> AttachError {
    let ifname = ifname.to_owned();
    move |source| AttachError::Program {
        op,
        ifname,
        source: Box::new(source),
    }
}

/// What `ensure` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Our program was already attached.
    Kept,
    /// A new attachment was created.
    Created,
    /// Our attachment ran another (older) program and now runs this one, atomically.
    Upgraded,
}

/// One of our attachments as found in the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attachment {
    pub ifname: String,
    pub mode: AttachMode,
    pub program_id: u32,
    /// tcx: the link id; netlink: none.
    pub link_id: Option<u32>,
    /// netlink: (priority, handle).
    pub filter: Option<(u16, u32)>,
}

/// What [`ensure`] does with an attachment of ours that runs another program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace the program in place (an upgrade).
    Replace,
    /// Leave it running (`Kept`): during a map-layout migration the old program keeps its own
    /// maps until the new ones hold the complete view.
    Keep,
}

/// Ensures `prog` (whose kernel id is `prog_id`) runs at ingress of `ifname`, or, with
/// [`Existing::Keep`], that some program of ours does.
pub async fn ensure(
    prog: &mut SchedClassifier,
    prog_id: u32,
    pins: &PinRoot,
    config: AttachConfig,
    rtnl: &rtnetlink::Handle,
    ifname: &str,
    existing: Existing,
) -> Result<Outcome, AttachError> {
    match config.mode {
        AttachMode::Tcx => ensure_tcx(prog, prog_id, &pins.link(ifname), config, ifname, existing),
        AttachMode::Netlink => ensure_netlink(prog, prog_id, config, rtnl, ifname, existing).await,
    }
}

fn ensure_tcx(
    prog: &mut SchedClassifier,
    prog_id: u32,
    pin: &Path,
    config: AttachConfig,
    ifname: &str,
    existing: Existing,
) -> Result<Outcome, AttachError> {
    if pin.exists() {
        match adopt_pinned(pin) {
            Ok(link) => match tcx_link_info(&link) {
                Ok(info) if info.runs_on(ifname) => {
                    if info.program_id == prog_id || existing == Existing::Keep {
                        return Ok(Outcome::Kept);
                    }
                    let id = prog
                        .attach_to_link(link)
                        .map_err(program_error("bpf_link_update", ifname))?;
                    // The pin still names the link; dropping our fd keeps it attached.
                    drop(
                        prog.take_link(id)
                            .map_err(program_error("taking the link", ifname))?,
                    );
                    return Ok(Outcome::Upgraded);
                }
                // The interface went away (and maybe came back): the link is defunct.
                Ok(_) => {
                    tracing::info!(ifname, pin = %pin.display(), "replacing a defunct tcx link");
                }
                Err(e) => {
                    tracing::warn!(ifname, error = %e, "unreadable pinned link; replacing it");
                }
            },
            Err(e) => tracing::warn!(ifname, error = %e, "unreadable pinned link; replacing it"),
        }
        std::fs::remove_file(pin).map_err(|source| AttachError::Pin {
            op: "removing stale pin",
            path: pin.display().to_string(),
            source,
        })?;
    }
    let order = match config.tcx_order {
        TcxOrder::First => LinkOrder::first(),
        TcxOrder::Last => LinkOrder::last(),
    };
    let op = if tcx_supported() {
        "tcx attach"
    } else {
        "tcx attach (tcx needs Linux >= 6.6; use --attach netlink or auto)"
    };
    let id = prog
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(order),
        )
        .map_err(program_error(op, ifname))?;
    let link = prog
        .take_link(id)
        .map_err(program_error("taking the link", ifname))?;
    let link: FdLink = link.try_into().map_err(|source| AttachError::Link {
        op: "converting the link",
        ifname: ifname.into(),
        source,
    })?;
    link.pin(pin).map_err(|e| AttachError::Pin {
        op: "pinning link",
        path: pin.display().to_string(),
        source: io::Error::other(e),
    })?;
    Ok(Outcome::Created)
}

/// Opens a pinned tcx link (`BPF_OBJ_GET`; `CAP_BPF` on the pin suffices).
fn adopt_pinned(pin: &Path) -> io::Result<SchedClassifierLink> {
    let pinned = PinnedLink::from_pin(pin).map_err(io::Error::other)?;
    SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(io::Error::other)
}

/// What the kernel says about one of our tcx links.
#[derive(Clone, Copy, Debug)]
struct TcxLinkInfo {
    id: u32,
    program_id: u32,
    /// 0 once the interface is gone (or the link was detached).
    ifindex: u32,
    attach_type: u32,
}

impl TcxLinkInfo {
    /// Whether the link is live at ingress of `ifname` as it exists now (a re-created
    /// interface has a new index; the old link is defunct).
    fn runs_on(&self, ifname: &str) -> bool {
        self.ifindex != 0
            && self.attach_type == bpf_attach_type::BPF_TCX_INGRESS as u32
            && ifindex(ifname) == Some(self.ifindex)
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` on the link: its id, program id and, for tcx, the interface and
/// direction. This is all the kernel needs the link's fd for; asking the interface instead
/// (`BPF_PROG_QUERY`, then `bpf_prog_get_fd_by_id` for each program, as aya's `query_tcx`
/// does) needs `CAP_SYS_ADMIN`, which the agent Pod does not grant.
fn tcx_link_info(link: &SchedClassifierLink) -> io::Result<TcxLinkInfo> {
    use std::os::fd::AsRawFd as _;
    let fd = aya::programs::MultiProgLink::fd(link)
        .map_err(io::Error::other)?
        .as_raw_fd();
    // SAFETY: all-zero is a valid bpf_link_info and the union's unused state.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: plain integers into the member the command reads.
    let get = unsafe { &mut attr.info };
    get.bpf_fd = u32::try_from(fd).map_err(io::Error::other)?;
    get.info_len = u32::try_from(size_of::<bpf_link_info>()).map_err(io::Error::other)?;
    get.info = (&raw mut info) as u64;
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SchedClassifierLink::try_from accepted only a tcx link, whose info fills `tcx`.
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    Ok(TcxLinkInfo {
        id: info.id,
        program_id: info.prog_id,
        ifindex: tcx.ifindex,
        attach_type: tcx.attach_type,
    })
}

/// A bpf tc filter as found by a netlink dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
    pub name: String,
    pub program_id: u32,
}

/// The bpf filters at ingress of `ifindex`.
pub async fn ingress_filters(
    rtnl: &rtnetlink::Handle,
    ifindex: u32,
) -> Result<Vec<BpfFilter>, rtnetlink::Error> {
    let Ok(index) = i32::try_from(ifindex) else {
        return Ok(Vec::new());
    };
    let handle = rtnl.clone();
    let mut stream = handle.traffic_filter(index).get().ingress().execute();
    let mut filters = Vec::new();
    while let Some(message) = stream.try_next().await? {
        let mut kind_is_bpf = false;
        let mut filter = BpfFilter {
            priority: u16::try_from(message.header.info >> 16).unwrap_or_default(),
            handle: (u32::from(message.header.handle.major) << 16)
                | u32::from(message.header.handle.minor),
            name: String::new(),
            program_id: 0,
        };
        for attribute in &message.attributes {
            match attribute {
                TcAttribute::Kind(kind) => kind_is_bpf = kind == "bpf",
                TcAttribute::Options(options) => {
                    for option in options {
                        let TcOption::Other(nla) = option else {
                            continue;
                        };
                        let mut value = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
                        netlink_packet_core::Nla::emit_value(nla, &mut value);
                        // netlink-packet-route has no cls_bpf parser: the TCA_OPTIONS nest
                        // arrives as one opaque attribute holding the TCA_BPF_* attributes.
                        for (kind, payload) in nested_attributes(&value) {
                            match kind {
                                TCA_BPF_NAME => {
                                    String::from_utf8_lossy(payload)
                                        .trim_end_matches('\0')
                                        .clone_into(&mut filter.name);
                                }
                                TCA_BPF_ID if payload.len() >= 4 => {
                                    filter.program_id = u32::from_ne_bytes(
                                        payload[..4].try_into().expect("4 bytes"),
                                    );
                                }
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // A filter's "header" entry (no handle) only describes the priority's classifier.
        if kind_is_bpf && filter.handle != 0 {
            filters.push(filter);
        }
    }
    Ok(filters)
}

/// Splits a buffer of netlink attributes into (type, payload) pairs.
fn nested_attributes(mut buffer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attributes = Vec::new();
    while buffer.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buffer[0], buffer[1]]));
        let kind = u16::from_ne_bytes([buffer[2], buffer[3]]) & 0x3fff;
        if len < 4 || len > buffer.len() {
            break;
        }
        attributes.push((kind, &buffer[4..len]));
        buffer = &buffer[len.next_multiple_of(4).min(buffer.len())..];
    }
    attributes
}

fn ifindex(ifname: &str) -> Option<u32> {
    let name = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

async fn ensure_netlink(
    prog: &mut SchedClassifier,
    prog_id: u32,
    config: AttachConfig,
    rtnl: &rtnetlink::Handle,
    ifname: &str,
    existing: Existing,
) -> Result<Outcome, AttachError> {
    if let Err(e) = tc::qdisc_add_clsact(ifname) {
        let exists =
            matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(program_error("adding clsact", ifname)(e.into()));
        }
    }
    let index = ifindex(ifname).unwrap_or_default();
    let filters = ingress_filters(rtnl, index)
        .await
        .map_err(|source| AttachError::Netlink {
            ifname: ifname.into(),
            source,
        })?;
    let options = || NlOptions {
        priority: config.priority,
        handle: TcHandle::from(config.handle),
        classid: None,
    };
    if let Some(found) = filters
        .iter()
        .find(|f| f.priority == config.priority && f.handle == config.handle)
    {
        if found.name != names::PROGRAM {
            return Err(AttachError::Foreign {
                ifname: ifname.into(),
                name: found.name.clone(),
                program_id: found.program_id,
                priority: config.priority,
                handle: config.handle,
            });
        }
        if found.program_id == prog_id || existing == Existing::Keep {
            return Ok(Outcome::Kept);
        }
        let link = SchedClassifierLink::attached(
            ifname,
            TcAttachType::Ingress,
            config.priority,
            TcHandle::from(config.handle),
            None,
        )
        .map_err(|e| {
            program_error("adopting the filter", ifname)(tc::TcError::IoError(e).into())
        })?;
        let id = prog
            .attach_to_link(link)
            .map_err(program_error("replacing the filter", ifname))?;
        // Dropping a netlink link deletes the filter: keep it in the kernel, forget it here.
        std::mem::forget(
            prog.take_link(id)
                .map_err(program_error("taking the link", ifname))?,
        );
        return Ok(Outcome::Upgraded);
    }
    let id = prog
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options()),
        )
        .map_err(program_error("netlink attach", ifname))?;
    std::mem::forget(
        prog.take_link(id)
            .map_err(program_error("taking the link", ifname))?,
    );
    Ok(Outcome::Created)
}

/// Every attachment of ours in this network namespace: pinned tcx links under `pins` and
/// netlink filters named like our program.
pub async fn list(pins: &PinRoot, rtnl: &rtnetlink::Handle) -> Vec<Attachment> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pins.links()) {
        for entry in entries.flatten() {
            let ifname = entry.file_name().to_string_lossy().into_owned();
            let info = adopt_pinned(&entry.path()).and_then(|link| tcx_link_info(&link));
            match info {
                Ok(info) if info.runs_on(&ifname) => found.push(Attachment {
                    ifname,
                    mode: AttachMode::Tcx,
                    program_id: info.program_id,
                    link_id: Some(info.id),
                    filter: None,
                }),
                Ok(_) => {}
                Err(e) => tracing::debug!(ifname, error = %e, "unreadable pinned link"),
            }
        }
    }
    let mut links = rtnl.link().get().execute();
    while let Ok(Some(link)) = links.try_next().await {
        let name = link.attributes.iter().find_map(|a| match a {
            netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let Some(ifname) = name else { continue };
        for filter in ingress_filters(rtnl, link.header.index)
            .await
            .unwrap_or_default()
        {
            if filter.name == names::PROGRAM {
                found.push(Attachment {
                    ifname: ifname.clone(),
                    mode: AttachMode::Netlink,
                    program_id: filter.program_id,
                    link_id: None,
                    filter: Some((filter.priority, filter.handle)),
                });
            }
        }
    }
    found.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    found
}

/// `BPF_LINK_DETACH` (Linux 5.9): detaches a link even while it is still pinned or held.
fn link_detach(link: &SchedClassifierLink) -> io::Result<()> {
    let fd = aya::programs::MultiProgLink::fd(link).map_err(io::Error::other)?;
    crate::datapath::sys::link_detach(fd)
}

/// Removes one attachment of ours. When the interface itself is gone, its tc filters went with
/// it and a tcx link is already defunct: only the pin is left to remove.
pub fn remove(pins: &PinRoot, attachment: &Attachment) -> Result<(), AttachError> {
    let gone = ifindex(&attachment.ifname).is_none();
    match attachment.mode {
        AttachMode::Tcx => {
            let pin = pins.link(&attachment.ifname);
            let pin_error = |op, source| AttachError::Pin {
                op,
                path: pin.display().to_string(),
                source,
            };
            if gone {
                return match std::fs::remove_file(&pin) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(pin_error("unpinning", e)),
                    _ => Ok(()),
                };
            }
            let link = PinnedLink::from_pin(&pin)
                .map_err(|e| pin_error("opening pinned link", io::Error::other(e)))?;
            // Releasing the last reference detaches only later, from a workqueue; detach now so
            // that marking has stopped when `detach` returns.
            let link = SchedClassifierLink::try_from(FdLink::from(link))
                .map_err(|e| pin_error("adopting pinned link", io::Error::other(e)))?;
            link_detach(&link).map_err(|e| pin_error("BPF_LINK_DETACH", e))?;
            std::fs::remove_file(&pin).map_err(|e| pin_error("unpinning", e))
        }
        AttachMode::Netlink if gone => Ok(()),
        AttachMode::Netlink => {
            let (priority, handle) = attachment.filter.unwrap_or((0, 0));
            let link = SchedClassifierLink::attached(
                &attachment.ifname,
                TcAttachType::Ingress,
                priority,
                TcHandle::from(handle),
                None,
            )
            .map_err(|e| {
                program_error("finding the filter", &attachment.ifname)(
                    tc::TcError::IoError(e).into(),
                )
            })?;
            // Dropping an adopted netlink link deletes exactly that filter.
            drop(link);
            Ok(())
        }
    }
}
