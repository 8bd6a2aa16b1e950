//! The agent's raw `bpf(2)` calls, for what aya 0.14 lacks, all through [`sys_bpf`]: batched map
//! writes and reads, opening pins read-only, a program's id, and detaching a link.
//!
//! A cold start writes tens of thousands of entries; one syscall each is most of the cost of
//! programming the datapath (issue: benchmark §5), so `BPF_MAP_UPDATE_BATCH` writes many in one
//! call. Hash and array maps have had the command since Linux 5.6; where a map type lacks it (LPM
//! tries on older kernels) the caller falls back to single writes.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::Pod;
use aya_obj::generated::{BPF_F_RDONLY, bpf_attr, bpf_cmd, bpf_prog_info};

/// `bpf(cmd, attr, sizeof attr)`; the call's non-negative result, or the errno.
///
/// # Safety
/// `attr`'s member for `cmd` is filled in, and every buffer it points to is valid, for as long
/// as the call, for what the kernel reads from it or writes into it.
unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a whole bpf_attr; the rest is the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Why a batch stopped short.
#[derive(Debug)]
pub enum Stopped {
    /// The kernel has no batch update for this map type; nothing was written.
    Unsupported,
    /// Entries before `at` were written; entry `at` failed with `error`.
    At { at: usize, error: io::Error },
}

/// Writes `keys[i] → values[i]` for every `i` in order, stopping at the first failure.
pub fn update<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).expect("fewer than 2^32 entries");
    // SAFETY: bpf_attr is a plain C union; all-zero is its documented "unused" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing plain integers into the union member the command reads.
    let batch = unsafe { &mut attr.batch };
    batch.keys = keys.as_ptr() as u64;
    batch.values = values.as_ptr() as u64;
    batch.count = count;
    batch.map_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&map)).expect("fd ≥ 0");
    // SAFETY: the kernel reads `count` keys and values of the map's sizes from the two slices,
    // which live across the call; K and V are the map's key and value types (checked by aya
    // when the map handle was typed), and it writes back only `attr.batch.count`.
    let Err(error) = (unsafe { sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }) else {
        return Ok(());
    };
    // SAFETY: as above; the kernel reports the number of entries it processed here.
    let written = processed_before_error(unsafe { attr.batch.count }, keys.len());
    // EINVAL: the command is unknown (< 5.6); ENOTSUPP (524, kernel-internal but leaked to
    // user space) or EOPNOTSUPP: this map type has no batch operation.
    let unsupported = matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | 524 | libc::EOPNOTSUPP)
    );
    if written == 0 && unsupported {
        return Err(Stopped::Unsupported);
    }
    Err(Stopped::At { at: written, error })
}

/// How many entries a failed batch update wrote. The kernel writes the count back only once it
/// has started on the entries; a call refused before that (the map type has no batch operation,
/// as LPM tries on 5.10, or bad flags) leaves our own `count` in place, which would read as
/// "all written, then failed past the end". Nothing was written then.
fn processed_before_error(reported: u32, requested: usize) -> usize {
    let reported = reported as usize;
    if reported >= requested { 0 } else { reported }
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call; more than any hash bucket holds (the kernel
/// refuses a call whose room is smaller than the next bucket).
const LOOKUP_CHUNK: u32 = 8_192;

/// Every entry of the map, by batches: a 65 536-slot array is a few calls instead of 65 536.
pub fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>, Stopped> {
    // SAFETY: aya's Pod types are plain data for which all-zero bytes are a valid value.
    let (mut keys, mut values): (Vec<K>, Vec<V>) = unsafe {
        (
            vec![std::mem::zeroed(); LOOKUP_CHUNK as usize],
            vec![std::mem::zeroed(); LOOKUP_CHUNK as usize],
        )
    };
    // The position token is a bucket index (u32) for hashes and a key for other maps; 64 bytes
    // hold either for every key this agent uses.
    let (mut position, mut next) = ([0u64; 8], [0u64; 8]);
    assert!(
        size_of::<K>() <= size_of_val(&position),
        "key fits the token"
    );
    let mut entries = Vec::new();
    for call in 0.. {
        // SAFETY: as in `update`.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: plain integers into the member the command reads.
        let batch = unsafe { &mut attr.batch };
        batch.in_batch = if call == 0 {
            0
        } else {
            position.as_ptr() as u64
        };
        batch.out_batch = next.as_mut_ptr() as u64;
        batch.keys = keys.as_mut_ptr() as u64;
        batch.values = values.as_mut_ptr() as u64;
        batch.count = LOOKUP_CHUNK;
        batch.map_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&map)).expect("fd ≥ 0");
        // SAFETY: the kernel writes at most `count` keys and values into the two buffers, which
        // hold that many of the map's key and value types, and a token into `next`.
        let error = (unsafe { sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) }).err();
        // SAFETY: as above; the kernel reports how many entries it copied.
        let copied = (unsafe { attr.batch.count }).min(LOOKUP_CHUNK) as usize;
        entries.extend(
            keys[..copied]
                .iter()
                .copied()
                .zip(values[..copied].iter().copied()),
        );
        match error.as_ref().and_then(io::Error::raw_os_error) {
            None => position = next,
            // The end of the map, possibly after a last partial chunk.
            Some(libc::ENOENT) => return Ok(entries),
            Some(libc::EINVAL | 524 | libc::EOPNOTSUPP) if call == 0 && copied == 0 => {
                return Err(Stopped::Unsupported);
            }
            Some(_) => {
                return Err(Stopped::At {
                    at: entries.len(),
                    error: error.expect("an error"),
                });
            }
        }
    }
    unreachable!("the loop returns")
}

/// Opens a pinned object for reading only (`BPF_OBJ_GET` with `BPF_F_RDONLY`). aya opens pins
/// read-write, which a read-only bpffs mount refuses (`EROFS`); `status` and `dump` only read.
pub fn open_pin_read_only(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is the union's unused state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: plain integers into the member BPF_OBJ_GET reads.
    let get = unsafe { &mut attr.__bindgen_anon_4 };
    get.pathname = c_path.as_ptr() as u64;
    get.file_flags = BPF_F_RDONLY;
    // SAFETY: the kernel reads the NUL-terminated path, which outlives the call.
    let rc = unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The kernel id of the program behind `fd` (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn program_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    program_info(fd).map(|info| info.id)
}

/// The kernel's info on the program behind `fd` (`BPF_OBJ_GET_INFO_BY_FD`): needs only the fd,
/// where aya's `loaded_programs` walks every program by id and so needs `CAP_SYS_ADMIN`.
pub fn program_info(fd: BorrowedFd<'_>) -> io::Result<bpf_prog_info> {
    // SAFETY: all-zero is a valid (empty) bpf_prog_info and the union's unused state.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: plain integers into the member the command reads.
    let get = unsafe { &mut attr.info };
    get.bpf_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("fd ≥ 0");
    get.info_len = u32::try_from(size_of::<bpf_prog_info>()).expect("small");
    get.info = (&raw mut info) as u64;
    // SAFETY: the kernel writes at most info_len bytes into `info`.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// `BPF_LINK_DETACH` (Linux 5.9): detaches the link behind `fd` even while it is still pinned
/// or held.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as in `program_id`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: a plain integer into the member the command reads.
    let detach = unsafe { &mut attr.link_detach };
    detach.link_fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("fd ≥ 0");
    // SAFETY: the command reads only the link's fd.
    unsafe { sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::processed_before_error;

    #[test]
    fn a_count_left_untouched_by_a_refused_call_means_nothing_was_written() {
        assert_eq!(
            processed_before_error(3, 3),
            0,
            "refused before the first entry"
        );
        assert_eq!(processed_before_error(0, 3), 0);
        assert_eq!(processed_before_error(2, 3), 2, "entry 2 failed");
        assert_eq!(processed_before_error(u32::MAX, 3), 0);
    }
}
