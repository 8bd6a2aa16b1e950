//! The classifier under `BPF_PROG_TEST_RUN`: spec §5.2 vectors, odd and malformed packets, and a
//! seeded property test against the reference model. Needs root; skips loudly otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuValues, lpm_trie::Key};
use kube_ovn_agent::{
    datapath::Datapath,
    datapath::maps::read_counters,
    datapath::object::LoadConfig,
    datapath::pins::PinRoot,
    state::{MapState, ProbeTarget, Proto, ServicePort},
    testing::{
        TestDatapath, VERDICT_CONTINUE,
        fixture::{self, Mode, TEST_RUN_IFINDEX, Vector},
        netns::Bpffs,
        oracle as model,
        packet::{L4, Packet, TCP_ACK, TCP_SYN, TPID_8021AD, TPID_8021Q, ext},
    },
};
use kube_ovn_ebpf_common::{
    ServicePortV4, capacity, counter, iface_flag, ipproto, mark, names, role, rule,
};
use libtest_mimic::{Failed, Trial};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// `TC_ACT_SHOT` as `BPF_PROG_TEST_RUN` reports it.
const TC_ACT_SHOT: u32 = 2;

/// A bit no Kube-OVN rule uses; it must survive every packet.
const FOREIGN_MARK: u32 = 0x0100_0000;

fn main() {
    let mut trials: Vec<Trial> = fixture::vectors()
        .into_iter()
        .map(|v| Trial::test(format!("spec_vector_{}", v.id), move || check_vector(&v)))
        .collect();
    trials.extend([
        Trial::test(
            "foreign_marks_survive_and_bits_are_only_ored",
            foreign_marks,
        ),
        Trial::test("shadow_mode_counts_without_marking", shadow_mode),
        Trial::test("ipv4_options_are_skipped", ipv4_options),
        Trial::test("qinq_and_vlan_tags_in_the_frame", vlan_tags),
        Trial::test("truncated_at_every_length_passes_untouched", truncated),
        Trial::test("malformed_headers_pass_untouched", malformed),
        Trial::test(
            "ipv6_extension_header_walk_is_bounded",
            ipv6_extension_limit,
        ),
        Trial::test("non_ip_and_tiny_frames_pass_untouched", non_ip),
        Trial::test("interface_without_role_is_not_classified", no_role),
        Trial::test("sctp_cluster_ip_matches_r1a", sctp_cluster_ip),
        Trial::test("program_agrees_with_the_reference_model", property),
        Trial::test(
            "batched_map_writes_land_exactly_and_a_full_map_keeps_what_fits",
            batched_writes,
        ),
        Trial::test(
            "tproxy_vectors_without_a_transparent_socket",
            tproxy_without_socket,
        ),
        Trial::test(
            "an_upgrade_keeps_each_counters_meaning",
            upgrade_keeps_counters,
        ),
        Trial::test(
            "spec_vectors_read_from_the_network_header_on_links_without_ethernet",
            no_ethernet,
        ),
        Trial::test(
            "a_frame_for_another_mac_is_left_to_the_interface_that_takes_it",
            other_host,
        ),
        Trial::test(
            "syn_only_skips_exactly_tcp_without_syn_off_lo",
            syn_only_vectors,
        ),
        Trial::test(
            "a_pinned_program_is_adopted_only_with_the_same_frozen_values",
            frozen_values_decide_adoption,
        ),
        Trial::test(
            "array_fronts_answer_ipv4_hits_and_overflow_to_the_authority",
            array_fronts,
        ),
    ]);
    kube_ovn_testkit::privileged::main("datapath tests", trials);
}

/// Runs `frame` and checks the verdict, that the frame is untouched, the mark (foreign bits kept,
/// exactly `rules`' bits added) and that each counter moved by exactly what `rules`/`skipped`
/// say. Returns an error naming `what` on mismatch.
fn expect(
    dp: &mut TestDatapath,
    desired: &MapState,
    what: &str,
    frame: &[u8],
    rules: u32,
    skipped: Option<u32>,
) -> Result<(), Failed> {
    let before = dp.counters();
    let Some(result) = dp.run(frame, FOREIGN_MARK) else {
        // The kernel refuses to test-run IP frames shorter than the IP header (see
        // `testing::run`); `tests/netns.rs` injects those on a real veth instead.
        return Ok(());
    };
    let after = dp.counters();
    let mark_expected = if desired.shadow {
        FOREIGN_MARK
    } else {
        FOREIGN_MARK | rule::mark_for(rules)
    };
    if result.verdict != VERDICT_CONTINUE {
        return Err(format!("{what}: verdict {:#x}, want TC_ACT_UNSPEC", result.verdict).into());
    }
    if !result.unchanged {
        return Err(format!("{what}: packet data was modified").into());
    }
    if result.mark != mark_expected {
        return Err(format!(
            "{what}: mark {:#x}, want {mark_expected:#x} (rules {:?})",
            result.mark,
            kube_ovn_agent::state::rule_names(rules)
        )
        .into());
    }
    for slot in 0..counter::USED {
        let rule_of_slot = (0..rule::COUNT).find(|r| counter::of_rule(*r) == slot);
        let want = u64::from(match (slot, rule_of_slot) {
            (_, Some(r)) => rules & rule::bit(r) != 0,
            (counter::MARKED, None) => rules != 0,
            (counter::PASSED, None) => rules == 0 && skipped.is_none(),
            (s, None) => skipped == Some(s),
        });
        let delta = after[slot as usize] - before[slot as usize];
        if delta != want {
            return Err(format!(
                "{what}: counter {} moved by {delta}, want {want}",
                counter::NAMES[slot as usize]
            )
            .into());
        }
    }
    let model = model::evaluate(desired, TEST_RUN_IFINDEX, frame);
    if model.hits() != rules {
        return Err(
            format!("{what}: reference model says {model:?}, test expects {rules:#x}").into(),
        );
    }
    Ok(())
}

fn check_vector(v: &Vector) -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let desired = fixture::desired(v.mode, v.roles);
    dp.apply(&desired);
    let what = format!("vector {} ({})", v.id, v.note);
    expect(
        &mut dp,
        &desired,
        &what,
        &v.packet.frame(),
        v.rules,
        v.skipped,
    )
}

fn loaded(mode: Mode, roles: u32) -> (TestDatapath, MapState) {
    let mut dp = TestDatapath::load();
    let desired = fixture::desired(mode, roles);
    dp.apply(&desired);
    (dp, desired)
}

fn foreign_marks() -> Result<(), Failed> {
    let (mut dp, _) = loaded(Mode::A, role::NODE_NIC);
    let frame = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    for preset in [0, 0x4000, 0x8_4000, 0xffff_ffff, 0xf_0000, 0x1234_0001] {
        let result = dp.run(&frame, preset).expect("a full frame runs");
        if result.mark != preset | 0x8_4000 {
            return Err(format!("preset {preset:#x} became {:#x}", result.mark).into());
        }
    }
    Ok(())
}

fn shadow_mode() -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let mut desired = fixture::desired(Mode::A, role::NODE_NIC);
    desired.shadow = true;
    dp.apply(&desired);
    let frame = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    let rules = rule::bit(rule::R2T) | rule::bit(rule::R3T);
    expect(&mut dp, &desired, "shadow vector 13", &frame, rules, None)
}

fn ipv4_options() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::NODE_NIC);
    let rules = rule::bit(rule::R2T) | rule::bit(rule::R3T);
    for options in [4, 8, 20, 40] {
        let mut p = Packet::tcp("192.168.0.12", "192.168.0.11", 30080);
        p.ipv4_options = options;
        expect(
            &mut dp,
            &desired,
            &format!("IHL with {options} option bytes"),
            &p.frame(),
            rules,
            None,
        )?;
    }
    Ok(())
}

fn vlan_tags() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::OVN0);
    let base = Packet::tcp("10.16.0.5", "10.96.0.1", 443);
    let r1a = rule::bit(rule::R1A);
    expect(
        &mut dp,
        &desired,
        "802.1Q",
        &base.clone().vlan(TPID_8021Q).frame(),
        r1a,
        None,
    )?;
    expect(
        &mut dp,
        &desired,
        "802.1ad",
        &base.clone().vlan(TPID_8021AD).frame(),
        r1a,
        None,
    )?;
    let qinq = base.clone().vlan(TPID_8021AD).vlan(TPID_8021Q);
    expect(&mut dp, &desired, "QinQ", &qinq.frame(), r1a, None)?;
    let three = qinq.vlan(TPID_8021Q);
    expect(
        &mut dp,
        &desired,
        "three tags",
        &three.frame(),
        0,
        Some(counter::NOT_IP),
    )
}

/// Every prefix of a few frames, from the bare Ethernet header to one byte short.
fn truncated() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::OVN0 | role::NODE_NIC);
    let frames = [
        Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame(),
        Packet::tcp("10.16.0.5", "10.96.0.1", 443)
            .vlan(TPID_8021Q)
            .frame(),
        Packet::udp("fd00:10:16::5", "fd00:10:96::1", 443)
            .ext(ext::HOP_BY_HOP)
            .ext(ext::AUTH)
            .frame(),
    ];
    for frame in &frames {
        for len in 14..frame.len() {
            let what = format!("{}-byte frame truncated to {len}", frame.len());
            expect(
                &mut dp,
                &desired,
                &what,
                &frame[..len],
                0,
                Some(counter::NOT_PARSED),
            )?;
        }
    }
    Ok(())
}

fn malformed() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::NODE_NIC);
    let good = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    let both = rule::bit(rule::R2T) | rule::bit(rule::R3T);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = good.clone();
        f(&mut frame);
        frame
    };
    let set_total_len =
        |len: u16| move |f: &mut Vec<u8>| f[16..18].copy_from_slice(&len.to_be_bytes());
    let cases: [(&str, Vec<u8>, u32, Option<u32>); 7] = [
        (
            "IHL 4",
            edit(&|f| f[14] = 0x44),
            0,
            Some(counter::NOT_PARSED),
        ),
        (
            "IHL 0",
            edit(&|f| f[14] = 0x40),
            0,
            Some(counter::NOT_PARSED),
        ),
        (
            "version 6 in an IPv4 frame",
            edit(&|f| f[14] = 0x65),
            0,
            Some(counter::NOT_PARSED),
        ),
        (
            "total length beyond the frame",
            edit(&set_total_len(41)),
            0,
            Some(counter::NOT_PARSED),
        ),
        (
            "total length below IHL",
            edit(&set_total_len(12)),
            0,
            Some(counter::NOT_PARSED),
        ),
        // Ethernet padding after the IP packet is normal and must not matter.
        (
            "trailing padding",
            edit(&|f| f.extend_from_slice(&[0; 18])),
            both,
            None,
        ),
        (
            "IHL pointing past the frame",
            edit(&|f| f[14] = 0x4f),
            0,
            Some(counter::NOT_PARSED),
        ),
    ];
    for (what, frame, rules, skipped) in cases {
        expect(&mut dp, &desired, what, &frame, rules, skipped)?;
    }
    let mut v6 = Packet::tcp("fd00::12", "fd00::11", 30080).frame();
    v6[18..20].copy_from_slice(&200u16.to_be_bytes());
    expect(
        &mut dp,
        &desired,
        "IPv6 payload length beyond the frame",
        &v6,
        0,
        Some(counter::NOT_PARSED),
    )
}

fn ipv6_extension_limit() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::NODE_NIC);
    let both = rule::bit(rule::R2T) | rule::bit(rule::R3T);
    let with = |n: usize| {
        let mut p = Packet::tcp("fd00::12", "fd00::11", 30080);
        for i in 0..n {
            p = p.ext(if i % 2 == 0 {
                ext::DEST_OPTS
            } else {
                ext::ROUTING
            });
        }
        p.frame()
    };
    let limit = model::MAX_IPV6_EXT_HEADERS;
    expect(
        &mut dp,
        &desired,
        "extension headers at the limit",
        &with(limit),
        both,
        None,
    )?;
    for n in [limit + 1, 8, 12] {
        let what = format!("{n} extension headers");
        expect(
            &mut dp,
            &desired,
            &what,
            &with(n),
            0,
            Some(counter::NOT_PARSED),
        )?;
    }
    let mut atomic = Packet::tcp("fd00::12", "fd00::11", 30080).ext(ext::FRAGMENT);
    expect(
        &mut dp,
        &desired,
        "atomic fragment header",
        &atomic.frame(),
        both,
        None,
    )?;
    atomic.fragment_offset = 16;
    expect(
        &mut dp,
        &desired,
        "IPv6 non-first fragment",
        &atomic.frame(),
        0,
        Some(counter::FRAGMENT),
    )
}

fn non_ip() -> Result<(), Failed> {
    let (mut dp, desired) = loaded(Mode::A, role::NODE_NIC);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    expect(&mut dp, &desired, "ARP", &arp, 0, Some(counter::NOT_IP))?;
    expect(
        &mut dp,
        &desired,
        "14-byte ARP frame",
        &arp[..14],
        0,
        Some(counter::NOT_IP),
    )?;
    let mut bare_ipv4 = arp[..14].to_vec();
    bare_ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
    expect(
        &mut dp,
        &desired,
        "14-byte IPv4 frame",
        &bare_ipv4,
        0,
        Some(counter::NOT_PARSED),
    )
}

fn no_role() -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let mut desired = fixture::desired(Mode::A, role::OVN0);
    desired.ifaces.clear();
    dp.apply(&desired);
    let frame = Packet::tcp("10.16.0.5", "10.96.0.1", 443).frame();
    expect(
        &mut dp,
        &desired,
        "unknown ifindex",
        &frame,
        0,
        Some(counter::NO_ROLE),
    )
}

fn sctp_cluster_ip() -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let mut desired = fixture::desired(Mode::A, role::OVN0);
    desired.v4.service_ports.insert(ServicePort {
        addr: Ipv4Addr::new(10, 96, 0, 20),
        proto: Proto::Sctp,
        port: 3868,
    });
    dp.apply(&desired);
    let r1a = rule::bit(rule::R1A);
    let frame = Packet::sctp("10.16.0.5", "10.96.0.20", 3868).frame();
    expect(&mut dp, &desired, "sctp ClusterIP port", &frame, r1a, None)?;
    let frame = Packet::tcp("10.16.0.5", "10.96.0.20", 3868).frame();
    expect(
        &mut dp,
        &desired,
        "tcp to an sctp-only port",
        &frame,
        0,
        None,
    )
}

/// Random map contents × random (often malformed) frames: the program's mark must equal the
/// reference model's, foreign bits kept, verdict "continue", data untouched.
fn property() -> Result<(), Failed> {
    let seed = std::env::var("KOVN_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let cases: usize = std::env::var("KOVN_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let per_state = 2_000;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dp = TestDatapath::load();
    let mut done = 0;
    let mut refused = 0;
    while done < cases {
        let desired = random_state(&mut rng);
        dp.apply(&desired);
        for _ in 0..per_state.min(cases - done) {
            let frame = random_frame(&mut rng, &desired);
            let mark_in: u32 = rng.random::<u32>() & !rule::mark_for(u32::MAX);
            let want = mark_in | model::evaluate(&desired, TEST_RUN_IFINDEX, &frame).mark();
            done += 1;
            let Some(got) = dp.run(&frame, mark_in) else {
                refused += 1;
                continue;
            };
            if got.mark != want || got.verdict != VERDICT_CONTINUE || !got.unchanged {
                return Err(format!(
                    "seed {seed} (rerun with KOVN_PROPTEST_SEED={seed}), case {done}: program \
                     {got:?}, model mark {want:#x}\nframe {frame:02x?}\nstate {desired:#?}"
                )
                .into());
            }
        }
    }
    eprintln!(
        "property test: {} cases agreed, {refused} frames too short for the kernel's test-run \
         (seed {seed})",
        cases - refused
    );
    Ok(())
}

const V4_POOL: [&str; 8] = [
    "10.16.0.5",
    "10.96.0.1",
    "10.96.0.10",
    "192.168.0.11",
    "192.168.0.12",
    "100.64.0.2",
    "203.0.113.7",
    "127.0.0.1",
];
const V6_POOL: [&str; 6] = [
    "fd00:10:16::5",
    "fd00:10:96::1",
    "fd00::11",
    "fd00::12",
    "2001:db8::7",
    "::1",
];
const PORT_POOL: [u16; 6] = [443, 53, 30080, 30053, 8080, 3868];

fn random_state(rng: &mut StdRng) -> MapState {
    let mut d = MapState::default();
    let v4 = |rng: &mut StdRng| {
        V4_POOL
            .choose(rng)
            .expect("pool")
            .parse::<Ipv4Addr>()
            .expect("addr")
    };
    let v6 = |rng: &mut StdRng| {
        V6_POOL
            .choose(rng)
            .expect("pool")
            .parse::<Ipv6Addr>()
            .expect("addr")
    };
    let proto = |rng: &mut StdRng| {
        *[Proto::Tcp, Proto::Udp, Proto::Sctp]
            .choose(rng)
            .expect("protos")
    };
    for _ in 0..rng.random_range(0..4) {
        let len = *[8u8, 12, 16, 20, 24, 28, 32].choose(rng).expect("lens");
        d.v4.subnets
            .insert(ipnet::Ipv4Net::new(v4(rng), len).expect("len").trunc());
        d.v4.service_cidrs
            .insert(ipnet::Ipv4Net::new(v4(rng), len).expect("len").trunc());
        d.v4.local.insert(
            ipnet::Ipv4Net::new(v4(rng), len.max(24))
                .expect("len")
                .trunc(),
        );
        let len6 = *[48u8, 64, 112, 128].choose(rng).expect("lens");
        d.v6.subnets
            .insert(ipnet::Ipv6Net::new(v6(rng), len6).expect("len").trunc());
        d.v6.service_cidrs
            .insert(ipnet::Ipv6Net::new(v6(rng), len6).expect("len").trunc());
        // Mostly /128s (the exact-match front), sometimes a prefix only the trie answers.
        let local6 = *[64u8, 128, 128].choose(rng).expect("lens");
        d.v6.local
            .insert(ipnet::Ipv6Net::new(v6(rng), local6).expect("len").trunc());
    }
    for _ in 0..rng.random_range(0..6) {
        let port = *PORT_POOL.choose(rng).expect("ports");
        d.v4.service_ports.insert(ServicePort {
            addr: v4(rng),
            proto: proto(rng),
            port,
        });
        d.v6.service_ports.insert(ServicePort {
            addr: v6(rng),
            proto: proto(rng),
            port,
        });
        d.v4.other_nodes.insert(v4(rng));
        d.v6.other_nodes.insert(v6(rng));
        let sets = [
            &mut d.v4.nodeport_local_tcp,
            &mut d.v4.nodeport_local_udp,
            &mut d.v6.nodeport_local_tcp,
            &mut d.v6.nodeport_local_udp,
        ];
        let i = rng.random_range(0..sets.len());
        sets.into_iter()
            .nth(i)
            .expect("index in range")
            .insert(port);
    }
    d.v4.rules = rng.random::<u32>() & rule::NAT_RULES;
    d.v6.rules = rng.random::<u32>() & rule::NAT_RULES;
    if rng.random_bool(0.95) {
        d.ifaces
            .insert(TEST_RUN_IFINDEX, rng.random::<u32>() & role::ALL);
    }
    d
}

fn random_frame(rng: &mut StdRng, _desired: &MapState) -> Vec<u8> {
    let v6 = rng.random_bool(0.4);
    let pick = |rng: &mut StdRng| -> IpAddr {
        if v6 {
            V6_POOL.choose(rng).expect("pool").parse().expect("addr")
        } else {
            V4_POOL.choose(rng).expect("pool").parse().expect("addr")
        }
    };
    let port = |rng: &mut StdRng| {
        if rng.random_bool(0.8) {
            *PORT_POOL.choose(rng).expect("ports")
        } else {
            rng.random()
        }
    };
    let l4 = match rng.random_range(0..6) {
        0 | 1 => L4::Tcp {
            sport: rng.random(),
            dport: port(rng),
            flags: rng.random(),
        },
        2 | 3 => L4::Udp {
            sport: rng.random(),
            dport: port(rng),
        },
        4 => L4::Sctp {
            sport: rng.random(),
            dport: port(rng),
        },
        _ => *[L4::Echo, L4::Other(47), L4::Other(59)]
            .choose(rng)
            .expect("l4"),
    };
    let mut p = Packet::new(pick(rng), pick(rng), l4);
    for _ in 0..rng.random_range(0..4usize).saturating_sub(1) {
        p = p.vlan(*[TPID_8021Q, TPID_8021AD].choose(rng).expect("tpids"));
    }
    if v6 {
        for _ in 0..rng.random_range(0..10usize).saturating_sub(4) {
            let headers = [
                ext::HOP_BY_HOP,
                ext::ROUTING,
                ext::DEST_OPTS,
                ext::AUTH,
                ext::FRAGMENT,
            ];
            p = p.ext(*headers.choose(rng).expect("headers"));
        }
    } else if rng.random_bool(0.2) {
        p.ipv4_options = rng.random_range(0..=40);
    }
    if rng.random_bool(0.1) {
        p.more_fragments = rng.random();
        p.fragment_offset = if rng.random() {
            0
        } else {
            rng.random_range(1..100)
        };
    }
    p.payload_len = rng.random_range(0..40);
    let mut frame = p.frame();
    if rng.random_bool(0.1) {
        let len = rng.random_range(14..=frame.len());
        frame.truncate(len);
    }
    if rng.random_bool(0.1) {
        let at = rng.random_range(12..frame.len().min(80));
        frame[at] = rng.random();
    }
    frame
}

/// Spec §5.3 under test-run, where no transparent socket exists (the socket path runs in
/// `tests/netns.rs` and `tests/tproxy.rs`): T1's packet is recognised as a probe and dropped
/// unmarked (counted `tproxy_no_socket`), as Kube-OVN's TPROXY target drops it, also when the
/// agent reports the listener without `IP_TRANSPARENT`; T3/T4/T6 are not probes, T5 on a node
/// NIC is not looked at (only `lo` carries probes, design §1), and shadow mode counts T1 as
/// steered without touching or dropping it.
fn tproxy_without_socket() -> Result<(), Failed> {
    let state = |roles: u32, shadow: bool| {
        let mut d = fixture::desired(Mode::A, roles);
        d.v4.rules |= rule::bit(rule::TPROXY);
        d.v4.tproxy_listener = Some(Ipv4Addr::new(192, 168, 0, 11));
        d.tproxy_port = kube_ovn_ebpf_common::TPROXY_LISTEN_PORT;
        d.v4.probe_targets
            .extend([8080, 8081].map(|port| ProbeTarget {
                addr: Ipv4Addr::new(10, 0, 1, 5),
                port,
            }));
        d.shadow = shadow;
        d
    };
    let mut dp = TestDatapath::load();
    let run = |dp: &mut TestDatapath, what: &str, frame: &[u8], slot: u32| -> Result<(), Failed> {
        let before = dp.counters();
        let result = dp.run(frame, FOREIGN_MARK).ok_or("frame refused")?;
        let after = dp.counters();
        let verdict = if slot == counter::TPROXY_NO_SOCKET {
            TC_ACT_SHOT
        } else {
            VERDICT_CONTINUE
        };
        if result.verdict != verdict || result.mark != FOREIGN_MARK || !result.unchanged {
            return Err(format!("{what}: {result:?}, want verdict {verdict:#x}").into());
        }
        if after[slot as usize] != before[slot as usize] + 1 {
            return Err(format!(
                "{what}: counter {} did not move",
                counter::NAMES[slot as usize]
            )
            .into());
        }
        Ok(())
    };
    dp.apply(&state(role::LOOPBACK, false));
    let probe = |port| Packet::tcp("192.168.0.11", "10.0.1.5", port).frame();
    run(
        &mut dp,
        "T1 without a listener",
        &probe(8080),
        counter::TPROXY_NO_SOCKET,
    )?;
    let mut opaque = state(role::LOOPBACK, false);
    opaque.v4.tproxy_listener_opaque = true;
    dp.apply(&opaque);
    run(
        &mut dp,
        "T1, the listener without IP_TRANSPARENT",
        &probe(8080),
        counter::TPROXY_NO_SOCKET,
    )?;
    dp.apply(&state(role::LOOPBACK, false));
    run(
        &mut dp,
        "T3 startup probe port",
        &probe(9000),
        counter::PASSED,
    )?;
    let udp = Packet::udp("192.168.0.11", "10.0.1.5", 8080).frame();
    run(&mut dp, "T4 udp", &udp, counter::PASSED)?;
    let default_vpc = Packet::tcp("192.168.0.11", "10.16.0.5", 8080).frame();
    run(&mut dp, "T6 default-VPC pod", &default_vpc, counter::PASSED)?;
    dp.apply(&state(role::NODE_NIC, false));
    let from_other_node = Packet::tcp("192.168.0.12", "10.0.1.5", 8080).frame();
    run(
        &mut dp,
        "T5 on a node NIC",
        &from_other_node,
        counter::PASSED,
    )?;
    dp.apply(&state(role::LOOPBACK, true));
    run(&mut dp, "T1 in shadow mode", &probe(8080), counter::TPROXY)
}

/// Cold-start-sized writes go through `BPF_MAP_UPDATE_BATCH` (hash, LPM trie and array maps):
/// what the kernel holds afterwards, read back entry by entry, is exactly the desired state. A
/// hash map filled past capacity keeps every entry that fits, reports each refused one as
/// "full", and once stale entries are pruned the refused ones are written.
fn batched_writes() -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let mut desired = fixture::desired(Mode::A, role::NODE_NIC);
    let v4 = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    desired.v4.subnets = (0..5_000)
        .map(|i| format!("{}/32", v4(i)).parse().unwrap())
        .collect();
    desired.v4.service_ports = (0..30_000)
        .map(|i| ServicePort {
            addr: v4(i / 3),
            proto: [Proto::Tcp, Proto::Udp, Proto::Sctp][(i % 3) as usize],
            port: u16::try_from(i % 60_000 + 1).unwrap(),
        })
        .collect();
    desired.v4.nodeport_local_tcp = (30_000..32_000).collect();
    dp.apply(&desired);
    dp.tables.refresh_all().map_err(|e| e.to_string())?;
    if dp.tables.current() != desired {
        return Err("the kernel maps do not hold the desired state after batched writes".into());
    }

    let capacity = usize::try_from(capacity::PROBE_TARGETS).unwrap();
    let target = |i: usize| ProbeTarget {
        addr: v4(u32::try_from(i).unwrap()),
        port: 8080,
    };
    desired.v4.probe_targets = (0..capacity + 16).map(target).collect();
    let report = dp.tables.apply(&desired, true);
    let full = report.errors.iter().filter(|e| e.is_full()).count();
    if (report.errors.len(), full) != (16, 16) {
        return Err(format!("expected 16 'full' errors, got {:?}", report.errors).into());
    }
    dp.tables.refresh_all().map_err(|e| e.to_string())?;
    let held = dp.tables.current().v4.probe_targets;
    if held.len() != capacity || !held.is_subset(&desired.v4.probe_targets) {
        return Err(format!(
            "the full map holds {} entries, not {capacity} of ours",
            held.len()
        )
        .into());
    }

    // Half replaced: the new half only fits once the stale half is gone.
    desired.v4.probe_targets = (capacity / 2..capacity / 2 + capacity)
        .map(target)
        .collect();
    let report = dp.tables.apply(&desired, true);
    if !report.errors.is_empty() {
        return Err(format!("replacing half of a full map: {:?}", report.errors).into());
    }
    dp.tables.refresh_all().map_err(|e| e.to_string())?;
    if dp.tables.current() != desired {
        return Err("after pruning, the refused entries were not written".into());
    }
    Ok(())
}

/// Today's counter numbering, as a pinned counter map written by this release's program holds
/// it. Later releases adopt the map with its values, so they must read every slot under the
/// same name.
const RELEASED_COUNTERS: [(u32, &str); 15] = [
    (0, "R1a"),
    (1, "R1b"),
    (2, "R2t"),
    (3, "R2u"),
    (4, "R3t"),
    (5, "R3u"),
    (6, "TPROXY"),
    (7, "passed"),
    (8, "not_parsed"),
    (9, "not_ip"),
    (10, "fragment"),
    (11, "no_role"),
    (12, "marked"),
    (13, "tproxy_no_socket"),
    (14, "other_host"),
];

/// An agent start over pinned maps (what an upgrade does) keeps the counter map's values, and
/// each value keeps its meaning: counts left in the released numbering read back under the
/// same names through `read_counters`, which `status` and the metrics use.
fn upgrade_keeps_counters() -> Result<(), Failed> {
    let bpffs = Bpffs::mount();
    let pins = PinRoot::new(bpffs.root());
    pins.prepare().map_err(|e| e.to_string())?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
    let count_of = |slot: u32| 1000 + u64::from(slot);
    {
        let mut before = Datapath::open(&pins, LoadConfig::default()).map_err(|e| e.to_string())?;
        let mut counters = before.take_counters().ok_or("no counter map")?;
        for (slot, _) in RELEASED_COUNTERS {
            let values =
                PerCpuValues::try_from(vec![count_of(slot); cpus]).map_err(|e| e.to_string())?;
            counters
                .set(slot, values, 0)
                .map_err(|e| format!("slot {slot}: {e}"))?;
        }
    }
    let mut after = Datapath::open(&pins, LoadConfig::default()).map_err(|e| e.to_string())?;
    let counters = after
        .take_counters()
        .ok_or("no counter map after restart")?;
    let values = read_counters(&counters).map_err(|e| e.to_string())?;
    let cpus = cpus as u64;
    for (slot, name) in RELEASED_COUNTERS {
        let index = counter::NAMES
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| format!("counter {name} is gone"))?;
        if values[index] != cpus * count_of(slot) {
            return Err(format!(
                "{name}: read {} after the restart, the released slot {slot} held {}",
                values[index],
                cpus * count_of(slot)
            )
            .into());
        }
    }
    Ok(())
}

/// With the interface flagged as having no Ethernet header, the program reads from the network
/// header the kernel set rather than from the start of the data. Test-run always builds an
/// Ethernet frame (network header 14 bytes in), so every spec vector must come out exactly as
/// on an Ethernet link: the reads really are relative to the network header. (A real tun
/// device, where the IP header is the first byte, is in `tests/interfaces.rs`.)
fn no_ethernet() -> Result<(), Failed> {
    let mut checked = 0;
    // One load (the verifier's pass dominates under TCG in the VM matrix); each vector's state is
    // synced over the previous one, stale entries pruned.
    let mut dp = TestDatapath::load();
    for v in fixture::vectors() {
        if !v.packet.vlan_tags.is_empty() {
            // skb->protocol is the VLAN TPID there; links without Ethernet carry no tags.
            continue;
        }
        let desired = fixture::desired(v.mode, v.roles | iface_flag::NO_ETHERNET);
        dp.apply(&desired);
        let what = format!("vector {} without Ethernet ({})", v.id, v.note);
        expect(
            &mut dp,
            &desired,
            &what,
            &v.packet.frame(),
            v.rules,
            v.skipped,
        )?;
        checked += 1;
    }
    if checked < 20 {
        return Err(format!("only {checked} vectors checked").into());
    }
    Ok(())
}

/// A frame whose destination MAC is not the interface's (`PACKET_OTHERHOST`: a macvlan above
/// takes it, or `ip_rcv` drops it) is not classified here: counted `other_host`, mark untouched.
fn other_host() -> Result<(), Failed> {
    let (mut dp, _) = loaded(Mode::A, role::NODE_NIC);
    let mut frame = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    let before = dp.counters();
    let result = dp.run(&frame, FOREIGN_MARK).ok_or("frame refused")?;
    let after = dp.counters();
    let moved: Vec<&str> = (0..counter::USED)
        .filter(|s| after[*s as usize] != before[*s as usize])
        .map(|s| counter::NAMES[s as usize])
        .collect();
    if result.mark != FOREIGN_MARK || result.verdict != VERDICT_CONTINUE || moved != ["other_host"]
    {
        return Err(format!("{result:?}, counters moved: {moved:?}").into());
    }
    Ok(())
}

/// Loaded with `frozen::SYN_ONLY` (a node with `nf_conntrack_tcp_loose=0`), every spec vector
/// comes out as with the default program, except a TCP segment without SYN arriving off `lo`:
/// that one is left unmarked and counted `tcp_no_syn`, and nothing else moves. The vectors
/// include ACKs of established flows, SYN-ACKs, UDP, SCTP and ICMP.
fn syn_only_vectors() -> Result<(), Failed> {
    let mut dp = TestDatapath::load_with(LoadConfig {
        syn_only: true,
        ..LoadConfig::default()
    });
    let (mut skipped_seen, mut classified_tcp) = (0, 0);
    for v in fixture::vectors() {
        let desired = fixture::desired(v.mode, v.roles);
        dp.apply(&desired);
        let what = format!("vector {} with SYN only ({})", v.id, v.note);
        let frame = v.packet.frame();
        let no_syn = matches!(v.packet.l4, L4::Tcp { flags, .. } if flags & TCP_SYN == 0);
        if !(no_syn && v.skipped.is_none() && v.roles & role::LOOPBACK == 0) {
            classified_tcp += usize::from(matches!(v.packet.l4, L4::Tcp { .. }));
            expect(&mut dp, &desired, &what, &frame, v.rules, v.skipped)?;
            continue;
        }
        let before = dp.counters();
        let Some(result) = dp.run(&frame, FOREIGN_MARK) else {
            continue;
        };
        let after = dp.counters();
        let moved: Vec<&str> = (0..counter::USED)
            .filter(|s| after[*s as usize] != before[*s as usize])
            .map(|s| counter::NAMES[s as usize])
            .collect();
        if result.mark != FOREIGN_MARK
            || result.verdict != VERDICT_CONTINUE
            || !result.unchanged
            || moved != ["tcp_no_syn"]
        {
            return Err(format!("{what}: {result:?}, counters moved: {moved:?}").into());
        }
        skipped_seen += 1;
    }
    if skipped_seen == 0 || classified_tcp == 0 {
        return Err(format!(
            "the vectors exercised {skipped_seen} skipped and {classified_tcp} classified TCP \
             segments: both kinds are needed"
        )
        .into());
    }
    // The same established segment on the default program is classified (and marked).
    let (mut default_dp, desired) = loaded(Mode::A, role::OVN0);
    let mut ack = Packet::tcp("10.16.0.5", "10.96.0.1", 443);
    ack.l4 = L4::Tcp {
        sport: 40000,
        dport: 443,
        flags: TCP_ACK,
    };
    expect(
        &mut default_dp,
        &desired,
        "ACK on the default program",
        &ack.frame(),
        rule::bit(rule::R1A),
        None,
    )
}

/// The program's tag does not cover its frozen values: a restart with other values must load
/// a new program rather than adopt the pinned one, and one with the same values adopts it.
fn frozen_values_decide_adoption() -> Result<(), Failed> {
    let bpffs = Bpffs::mount();
    let pins = PinRoot::new(bpffs.root());
    pins.prepare().map_err(|e| e.to_string())?;
    let open = |config: LoadConfig| {
        Datapath::open(&pins, config)
            .map(|d| d.program_id)
            .map_err(|e| e.to_string())
    };
    let strict = LoadConfig {
        syn_only: true,
        ..LoadConfig::default()
    };
    let first = open(LoadConfig::default())?;
    let same = open(LoadConfig::default())?;
    let other = open(strict)?;
    let other_again = open(strict)?;
    let back = open(LoadConfig::default())?;
    if same != first || other == first || other_again != other || back == other {
        return Err(format!(
            "program ids: default {first}, default again {same}, SYN only {other}, SYN only \
             again {other_again}, default again {back}: want the pinned program adopted exactly \
             when the frozen values match"
        )
        .into());
    }
    Ok(())
}

/// A second handle on one of the test program's maps, found by kernel name, for writes behind
/// the agent's back.
fn map_by_name(dp: &mut TestDatapath, name: &str) -> Map {
    let ids = dp
        .program()
        .info()
        .expect("program info")
        .map_ids()
        .expect("map ids")
        .expect("the kernel reports map ids");
    for id in ids {
        let info = MapInfo::from_id(id).expect("map info");
        if info.name_as_str() == Some(name) {
            let data = MapData::from_id(id).expect("map by id");
            return match info.map_type().expect("map type") {
                MapType::Hash => Map::HashMap(data),
                MapType::LpmTrie => Map::LpmTrie(data),
                other => panic!("{name}: unexpected map type {other:?}"),
            };
        }
    }
    panic!("the program uses no map {name}");
}

/// The IPv4 R1a, R2 and R3 hits are answered by the array fronts (`kovn_svc4_front`,
/// `kovn_loc4_front`, `kovn_oth4_front`): with the keys deleted from their hashes and tries
/// behind the agent's back the packets still hit, so the program read the fronts. Keys past a
/// set's four ways hit through the authority; a key the state drops leaves its front before
/// its authority, and then misses.
fn array_fronts() -> Result<(), Failed> {
    let mut dp = TestDatapath::load();
    let mut desired = fixture::desired(Mode::A, role::OVN0);
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 20);
    // Six ports of one ClusterIP: four fit its set, two stay in the hash only.
    let ports: Vec<u16> = (8080..8086).collect();
    for &port in &ports {
        desired.v4.service_ports.insert(ServicePort {
            addr: cluster_ip,
            proto: Proto::Tcp,
            port,
        });
    }
    dp.apply(&desired);
    let front = &dp.tables.fronts.service_ports_v4_array;
    let in_front: Vec<u16> = front
        .keys()
        .filter(|k| k.addr == cluster_ip)
        .map(|k| k.port)
        .collect();
    if in_front.len() != 4 {
        return Err(format!("{} of the six ports in the front, want 4", in_front.len()).into());
    }
    let r1a = rule::bit(rule::R1A);
    for &port in &ports {
        let frame = Packet::tcp("10.16.0.5", "10.96.0.20", port).frame();
        expect(
            &mut dp,
            &desired,
            &format!("port {port}"),
            &frame,
            r1a,
            None,
        )?;
    }

    // Behind the agent's back: the ClusterIP ports, the other node and the local address
    // leave their hashes and tries. What the fronts hold still hits.
    let mut hash: HashMap<MapData, ServicePortV4, u8> =
        map_by_name(&mut dp, names::SERVICE_PORTS_V4).try_into()?;
    for &port in &ports {
        hash.remove(&ServicePortV4 {
            addr: cluster_ip.octets(),
            port,
            proto: ipproto::TCP,
            pad: 0,
        })?;
    }
    let other_node = Ipv4Addr::new(192, 168, 0, 12);
    let mut others: HashMap<MapData, [u8; 4], u8> =
        map_by_name(&mut dp, names::OTHER_NODES_V4).try_into()?;
    others.remove(&other_node.octets())?;
    let local = Ipv4Addr::new(192, 168, 0, 11);
    let mut exact: HashMap<MapData, [u8; 4], u8> =
        map_by_name(&mut dp, names::LOCAL_ADDRS_V4_EXACT).try_into()?;
    exact.remove(&local.octets())?;
    let mut trie: LpmTrie<MapData, [u8; 4], u8> =
        map_by_name(&mut dp, names::LOCAL_ADDRS_V4).try_into()?;
    trie.remove(&Key::new(32, local.octets()))?;
    let run = |dp: &mut TestDatapath, frame: &[u8]| dp.run(frame, 0).map(|r| r.mark);
    for &port in &ports {
        let frame = Packet::tcp("10.16.0.5", "10.96.0.20", port).frame();
        let want = in_front.contains(&port).then_some(mark::MASQUERADE);
        let got = run(&mut dp, &frame).filter(|m| *m != 0);
        if got != want {
            return Err(format!(
                "port {port} without its hash entry: mark {got:x?}, want {want:x?} (the front \
                 holds {in_front:?})"
            )
            .into());
        }
    }
    let frame = Packet::tcp("192.168.0.12", "192.168.0.11", 30080).frame();
    let got = run(&mut dp, &frame);
    if got != Some(mark::MASQUERADE | mark::NODEPORT_LOCAL) {
        return Err(format!("R2/R3 from the fronts only: mark {got:x?}").into());
    }

    // The state drops the ClusterIP's ports: the front lets go of them with the prune pass,
    // and nothing hits any more.
    desired.v4.service_ports.retain(|k| k.addr != cluster_ip);
    dp.apply(&desired);
    for &port in &ports {
        let frame = Packet::tcp("10.16.0.5", "10.96.0.20", port).frame();
        expect(
            &mut dp,
            &desired,
            &format!("dropped port {port}"),
            &frame,
            0,
            None,
        )?;
    }
    if dp
        .tables
        .fronts
        .service_ports_v4_array
        .keys()
        .any(|k| k.addr == cluster_ip)
    {
        return Err("a dropped port stayed in the front".into());
    }
    Ok(())
}
