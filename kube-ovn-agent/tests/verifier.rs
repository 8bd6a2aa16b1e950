//! The verifier's processed-instruction count for every program of the datapath object, on the
//! running kernel. Prints one `KOVN-VERIFIER kernel=… program=… processed_insns=N …` line per
//! program, which `cargo xtask vm-test` collects per kernel (docs/kernel-matrix.md). Needs root;
//! skips loudly otherwise.
//!
//! `bpf_prog_info.verified_insns` only exists from 5.16 on, and aya hands `BPF_PROG_LOAD` a log
//! buffer only after a failed load, so a successful load says nothing on 5.10. This test loads the
//! object through the agent (maps created and finalised as in production), relocates a second
//! parse of the same object against those maps the way aya's loader does, and loads each program
//! once more itself with `log_level = BPF_LOG_STATS`: the kernel then ends the log with
//! `processed N insns`, the same `insn_processed` counter that `verified_insns` reports. Where
//! both exist they must agree, which checks the method on every kernel ≥ 5.16 that runs it.

use std::{
    collections::{HashMap, HashSet},
    ffi::c_char,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::{
    Btf,
    maps::{MapFd, MapInfo},
    programs::Program,
};
use aya_obj::{
    EbpfSectionKind, Object, ProgramSection,
    generated::{bpf_attr, bpf_cmd, bpf_prog_type},
};
use kube_ovn_agent::datapath::object;
use libtest_mimic::{Failed, Trial};

/// `BPF_LOG_STATS` (since 5.2): only the summary lines, whatever the program's size.
const BPF_LOG_STATS: u32 = 4;

fn main() {
    let object = Object::parse(object::OBJECT).expect("parsing the embedded object");
    let mut programs: Vec<String> = object.programs.keys().cloned().collect();
    programs.sort();
    let trials = programs
        .into_iter()
        .map(|name| Trial::test(format!("verifier_stats_{name}"), move || measure(&name)))
        .collect();
    kube_ovn_testkit::privileged::main("verifier statistics", trials);
}

fn measure(name: &str) -> Result<(), Failed> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("reading the kernel release: {e}"))?;
    let kernel = kernel.trim();
    // The default frozen values (every rule possible, every packet classified): the most the
    // verifier walks; other values only prune.
    let loaded = object::load(None, object::LoadConfig::default())
        .map_err(|e| format!("loading the datapath: {e}"))?;
    let program = loaded
        .program(name)
        .ok_or_else(|| format!("program {name} missing after loading"))?;
    let info = program
        .info()
        .map_err(|e| format!("{name}: not loaded by object::load ({e}); load it there first"))?;
    let maps = map_fds(program)?;
    let (instructions, log) = load_with_stats(name, &maps)?;
    let processed = processed_insns(&log).ok_or_else(|| {
        format!("{name}: no `processed N insns` line in the verifier log:\n{log}")
    })?;
    let from_info = info.verified_instruction_count();
    if let Some(from_info) = from_info
        && from_info != processed
    {
        return Err(format!(
            "{name}: the log says {processed} processed instructions but bpf_prog_info says \
             {from_info}: the second load does not verify the program aya loaded"
        )
        .into());
    }
    let from_info =
        from_info.map_or_else(|| "unavailable:kernel<5.16".to_owned(), |n| n.to_string());
    let stats = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    println!(
        "KOVN-VERIFIER kernel={kernel} program={name} processed_insns={processed} \
         object_insns={instructions} prog_info_verified_insns={from_info} log=\"{stats}\""
    );
    Ok(())
}

/// The maps `program` was relocated against by the agent's load, by (kernel) name.
fn map_fds(program: &Program) -> Result<HashMap<String, MapFd>, Failed> {
    let ids = program
        .info()
        .and_then(|info| info.map_ids())
        .map_err(|e| format!("reading the program's map ids: {e}"))?
        .unwrap_or_default();
    ids.into_iter()
        .map(|id| {
            let info = MapInfo::from_id(id).map_err(|e| format!("map id {id}: {e}"))?;
            let name = info
                .name_as_str()
                .ok_or_else(|| format!("map id {id} has no UTF-8 name"))?
                .to_owned();
            let fd = info.fd().map_err(|e| format!("map {name}: {e}"))?;
            Ok((name, fd))
        })
        .collect()
}

/// Relocates a fresh parse of the object as aya's `EbpfLoader::load` does (BTF fix-up, CO-RE,
/// maps, calls, helper sanitising) and loads `name` with a stats log. Returns the number of
/// instructions handed to the kernel and the log.
fn load_with_stats(name: &str, maps: &HashMap<String, MapFd>) -> Result<(usize, String), Failed> {
    let features = aya::features();
    let mut object = Object::parse(object::OBJECT).map_err(|e| format!("parsing: {e}"))?;
    let btf_fd = match features.btf() {
        Some(btf_features) => match object
            .fixup_and_sanitize_btf(btf_features)
            .map_err(|e| format!("BTF fix-up: {e}"))?
        {
            Some(btf) => Some(load_btf(&btf.to_bytes())?),
            None => None,
        },
        None => None,
    };
    if let Ok(kernel_btf) = Btf::from_sys_fs() {
        object
            .relocate_btf(&kernel_btf)
            .map_err(|e| format!("CO-RE relocation: {e}"))?;
    }
    let global_data = features.bpf_global_data();
    let object_maps: Vec<(String, aya_obj::Map)> = object
        .maps
        .drain()
        .filter(|(_, map)| {
            global_data
                || !matches!(
                    map.section_kind(),
                    EbpfSectionKind::Bss | EbpfSectionKind::Data | EbpfSectionKind::Rodata
                )
        })
        .collect();
    // The kernel keeps the first 15 bytes of a map's name.
    let fd_of = |map_name: &str| {
        maps.get(map_name.get(..15).unwrap_or(map_name))
            .map(|fd| fd.as_fd().as_raw_fd())
    };
    let relocatable: Vec<(&str, i32, &aya_obj::Map)> = object_maps
        .iter()
        .filter_map(|(map_name, map)| Some((map_name.as_str(), fd_of(map_name)?, map)))
        .collect();
    let text_sections: HashSet<usize> = object.functions.keys().map(|(s, _)| *s).collect();
    object
        .relocate_maps(relocatable.into_iter(), &text_sections)
        .map_err(|e| format!("map relocation: {e}"))?;
    object
        .relocate_calls(&text_sections)
        .map_err(|e| format!("call relocation: {e}"))?;
    object.sanitize_functions(features);

    let program = &object.programs[name];
    let prog_type = match program.section {
        ProgramSection::SchedClassifier => bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
        ref other => {
            return Err(format!(
                "{name}: section {other:?} is not handled by this test; add its program type"
            )
            .into());
        }
    };
    let function = &object.functions[&program.function_key()];
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    let mut log = vec![0u8; 64 * 1024];

    // SAFETY: bpf_attr is a plain C union; all-zero is its documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: BPF_PROG_LOAD reads the `__bindgen_anon_3` member of the union.
    let load = unsafe { &mut attr.__bindgen_anon_3 };
    if features.bpf_name() {
        for (dst, src) in load.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = c_char::from_ne_bytes([src]);
        }
    }
    load.prog_type = prog_type as u32;
    load.insns = function.instructions.as_ptr() as u64;
    load.insn_cnt = u32::try_from(function.instructions.len()).expect("instruction count");
    load.license = program.license.as_ptr() as u64;
    load.kern_version = program.kernel_version.unwrap_or_else(|| {
        aya::util::KernelVersion::current().map_or(0, aya::util::KernelVersion::code)
    });
    if let Some(btf_fd) = &btf_fd {
        load.prog_btf_fd = u32::try_from(btf_fd.as_raw_fd()).expect("fd");
        if function.func_info_rec_size > 0 {
            load.func_info = func_info.as_ptr() as u64;
            load.func_info_cnt = u32::try_from(function.func_info.len()).expect("count");
            load.func_info_rec_size = u32::try_from(function.func_info_rec_size).expect("size");
        }
        if function.line_info_rec_size > 0 {
            load.line_info = line_info.as_ptr() as u64;
            load.line_info_cnt = u32::try_from(function.line_info.len()).expect("count");
            load.line_info_rec_size = u32::try_from(function.line_info_rec_size).expect("size");
        }
    }
    load.log_level = BPF_LOG_STATS;
    load.log_buf = log.as_mut_ptr() as u64;
    load.log_size = u32::try_from(log.len()).expect("log size");
    let result = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr);
    let log =
        String::from_utf8_lossy(log.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    result.map_err(|e| format!("{name}: BPF_PROG_LOAD with a stats log: {e}\n{log}"))?;
    Ok((function.instructions.len(), log))
}

fn load_btf(raw: &[u8]) -> Result<OwnedFd, Failed> {
    // SAFETY: as above; BPF_BTF_LOAD reads `__bindgen_anon_7`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let btf = unsafe { &mut attr.__bindgen_anon_7 };
    btf.btf = raw.as_ptr() as u64;
    btf.btf_size = u32::try_from(raw.len()).expect("BTF size");
    sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)
        .map_err(|e| format!("BPF_BTF_LOAD of the object's BTF: {e}").into())
}

/// A `bpf()` command that returns a new file descriptor.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the size passed; every pointer in it
    // refers to a buffer that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).expect("fd fits in an int");
    // SAFETY: the kernel just returned this new descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `N` from the verifier's `processed N insns (limit …) …` summary line.
fn processed_insns(log: &str) -> Option<u32> {
    log.lines()
        .find_map(|line| line.strip_prefix("processed "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}
