//! Raw `bpf(2)` for what the fault tests need and no installed tool offers: a foreign tcx program
//! (loaded and linked by this process, alive as long as it holds the fds), the tcx programs on an
//! interface (bpftool 7.1 predates tcx), and whether a program id still exists.
//!
//! Program and link ids are global, but ifindexes are per namespace: [`ForeignTcx::attach`] and
//! [`tcx_ingress`] must run on a thread inside the node's namespace ([`super::netns::NetNs::enter`]).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `BPF_STATS_RUN_TIME`: count runs and run time of every program while the fd is open.
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr`, as much of it as these commands use (the kernel accepts a shorter attr and
/// requires the bytes it does not know to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn read_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-padded buffer of the size passed; every pointer stored in it
    // by the callers outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size_of::<Attr>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    let raw = i32::try_from(rc).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn ptr_u64<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a buffer of `len` bytes.
fn info(fd: &OwnedFd, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut attr = Attr::new();
    attr.u32(0, u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?)
        .u32(4, u32::try_from(len).map_err(io::Error::other)?)
        .u64(8, ptr_u64(buf.as_mut_ptr()));
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(buf)
}

fn read_u32(buf: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(buf[offset..offset + 4].try_into().expect("4 bytes"))
}

/// Opens a program by id: `Ok(None)` once the kernel has freed it.
pub fn prog_by_id(id: u32) -> io::Result<Option<OwnedFd>> {
    let mut attr = Attr::new();
    attr.u32(0, id);
    match sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
        Ok(rc) => fd(rc).map(Some),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a program with this id is still loaded anywhere in the kernel.
pub fn prog_exists(id: u32) -> io::Result<bool> {
    Ok(prog_by_id(id)?.is_some())
}

/// A program's name (`bpf_prog_info.name`), `None` if it no longer exists.
pub fn prog_name(id: u32) -> io::Result<Option<String>> {
    let Some(fd) = prog_by_id(id)? else {
        return Ok(None);
    };
    // struct bpf_prog_info: name[16] at offset 64.
    let buf = info(&fd, 80)?;
    let name = &buf[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(Some(String::from_utf8_lossy(&name[..end]).into_owned()))
}

/// A program's run count (`bpf_prog_info.run_cnt`), `None` if it no longer exists. The kernel
/// only counts while some [`enable_stats`] fd is open.
pub fn prog_run_count(id: u32) -> io::Result<Option<u64>> {
    let Some(fd) = prog_by_id(id)? else {
        return Ok(None);
    };
    // struct bpf_prog_info: run_time_ns at offset 192, run_cnt at 200.
    let buf = info(&fd, 208)?;
    Ok(Some(u64::from_ne_bytes(
        buf[200..208].try_into().expect("8 bytes"),
    )))
}

/// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)`: programs count their runs while the returned fd is
/// open (reference counted in the kernel; closing the last fd turns counting off again, so no
/// sysctl is touched and nothing outlives this process).
pub fn enable_stats() -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_STATS_RUN_TIME);
    fd(sys_bpf(BPF_ENABLE_STATS, &mut attr)?)
}

fn ifindex(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// The tcx ingress programs of `ifname` in this thread's namespace, in run order: (program id,
/// link id).
pub fn tcx_ingress(ifname: &str) -> io::Result<Vec<(u32, u32)>> {
    let mut prog_ids = [0u32; 64];
    let mut link_ids = [0u32; 64];
    let mut attr = Attr::new();
    attr.u32(0, ifindex(ifname)?)
        .u32(4, BPF_TCX_INGRESS)
        .u64(16, ptr_u64(prog_ids.as_mut_ptr()))
        .u32(24, 64)
        .u64(40, ptr_u64(link_ids.as_mut_ptr()));
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = usize::try_from(attr.read_u32(24)).map_err(io::Error::other)?;
    Ok(prog_ids
        .iter()
        .zip(&link_ids)
        .take(count.min(64))
        .map(|(p, l)| (*p, *l))
        .collect())
}

/// Loads `r0 = TCX_NEXT (-1, also TC_ACT_UNSPEC); exit` as a classifier named `name` (at
/// most 15 bytes): a program that lets traffic go on to whatever runs after it.
pub fn load_next(name: &str) -> io::Result<OwnedFd> {
    load_returning(name, -1)
}

/// Loads `r0 = verdict; exit` as a classifier named `name` (at most 15 bytes).
pub fn load_returning(name: &str, verdict: i32) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm verdict; BPF_JMP | BPF_EXIT.
    let mut insns: [u8; 16] = [
        0xb7, 0, 0, 0, 0, 0, 0, 0, //
        0x95, 0, 0, 0, 0, 0, 0, 0,
    ];
    insns[4..8].copy_from_slice(&verdict.to_le_bytes());
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, 2)
        .u64(8, ptr_u64(insns.as_ptr()))
        .u64(16, ptr_u64(license.as_ptr()));
    let name = &name.as_bytes()[..name.len().min(15)];
    attr.0[48..48 + name.len()].copy_from_slice(name);
    fd(sys_bpf(BPF_PROG_LOAD, &mut attr)?)
}

/// A program's id (`bpf_prog_info.id`).
pub fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
    Ok(read_u32(&info(prog, 8)?, 4))
}

/// Pins `fd` at `path` on a bpffs (`BPF_OBJ_PIN`), for tools that take a pinned program.
pub fn pin(fd: &OwnedFd, path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr::new();
    attr.u64(0, ptr_u64(path.as_ptr()))
        .u32(8, u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?);
    sys_bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// Another component's tcx program: `r0 = TCX_NEXT; exit`, so traffic goes on to whatever runs
/// after it. Linked at ingress with no ordering flags (appended), unpinned: it lives exactly as
/// long as this value holds its fds.
pub struct ForeignTcx {
    pub prog_id: u32,
    pub link_id: u32,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// The foreign program's name, as the kernel reports it.
pub const FOREIGN_PROG_NAME: &str = "e2e_foreign";

impl ForeignTcx {
    /// Loads and links the program on `ifname` of this thread's namespace.
    pub fn attach(ifname: &str) -> io::Result<Self> {
        Self::attach_named(ifname, FOREIGN_PROG_NAME)
    }

    /// [`ForeignTcx::attach`] under another program name (at most 15 bytes).
    pub fn attach_named(ifname: &str, name: &str) -> io::Result<Self> {
        let prog = load_next(name)?;
        let mut attr = Attr::new();
        attr.u32(
            0,
            u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?,
        )
        .u32(4, ifindex(ifname)?)
        .u32(8, BPF_TCX_INGRESS);
        let link = fd(sys_bpf(BPF_LINK_CREATE, &mut attr)?)?;
        // struct bpf_prog_info / bpf_link_info: id at offset 4.
        let prog_id = read_u32(&info(&prog, 8)?, 4);
        let link_id = read_u32(&info(&link, 8)?, 4);
        Ok(Self {
            prog_id,
            link_id,
            _prog: prog,
            _link: link,
        })
    }
}
