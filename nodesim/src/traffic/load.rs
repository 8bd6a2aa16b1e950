//! Traffic: the benchmark's own servers behind its two Services (in the pods namespace) and the
//! generators. Generators are threads that joined a client namespace; each stops at a flag, a
//! packet/connection count and a hard deadline, whichever comes first. Counters are atomics the
//! coordinator samples at the window's edges, so warm-up traffic is never counted.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use super::state;
use crate::node::{
    netns::{self, NetNs},
    traffic::set_int_opt,
};

/// Request and response size of the connection and request/response workloads.
const MESSAGE: usize = 64;
/// First byte of a connection: what the server should do with it.
const KIND_CONNECT: u8 = b'C';
const KIND_BULK: u8 = b'B';
const KIND_RR: u8 = b'R';
/// Payload of each generated UDP datagram (a small packet: 46 bytes of IP).
const UDP_PAYLOAD: usize = 18;
/// How long one blocking socket call may take before the generator counts a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct ServerCounters {
    pub bulk_bytes: AtomicU64,
    pub udp_packets: AtomicU64,
}

/// The servers behind the benchmark Services in one node's pods namespace: a TCP listener on
/// the backend's port (two accept threads; connection handling by the first byte) and a UDP
/// sink that counts datagrams. Stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    spawned: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub counters: Arc<ServerCounters>,
}

/// The benchmark's TCP listener and UDP sink on `backend` (one per family).
fn bind_servers(backend: IpAddr) -> Result<(TcpListener, UdpSocket)> {
    let domain = Domain::for_address(SocketAddr::new(backend, 0));
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&SocketAddr::new(backend, state::TCP_PORT).into())
        .with_context(|| format!("binding the benchmark TCP server on {backend}"))?;
    tcp.listen(4096)?;
    tcp.set_nonblocking(true)?;
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Large enough that a burst never overflows while the sink thread waits for a CPU;
    // FORCE because net.core.rmem_max is a host-wide setting we do not touch.
    set_int_opt(&udp, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20)?;
    udp.bind(&SocketAddr::new(backend, state::UDP_PORT).into())
        .with_context(|| format!("binding the benchmark UDP sink on {backend}"))?;
    udp.set_nonblocking(true)?;
    Ok((tcp.into(), udp.into()))
}

impl Servers {
    pub fn start(pods: &NetNs) -> Result<Self> {
        let sockets = pods.enter(|| -> Result<Vec<(TcpListener, UdpSocket)>> {
            [IpAddr::V4(state::BACKEND), IpAddr::V6(state::BACKEND6)]
                .into_iter()
                .map(bind_servers)
                .collect()
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ServerCounters::default());
        let spawned = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (family, (listener, udp)) in sockets.into_iter().enumerate() {
            let listener = Arc::new(listener);
            for i in 0..2 {
                let (listener, stop, counters, spawned) = (
                    Arc::clone(&listener),
                    Arc::clone(&stop),
                    Arc::clone(&counters),
                    Arc::clone(&spawned),
                );
                threads.push(
                    thread::Builder::new()
                        .name(format!("bench-accept-{family}-{i}"))
                        .spawn(move || {
                            pin();
                            accept_loop(&listener, &stop, &counters, &spawned);
                        })?,
                );
            }
            let (stop2, counters2) = (Arc::clone(&stop), Arc::clone(&counters));
            threads.push(
                thread::Builder::new()
                    .name(format!("bench-udp-sink-{family}"))
                    .spawn(move || {
                        pin();
                        udp_sink(&udp, &stop2, &counters2);
                    })?,
            );
        }
        Ok(Self {
            stop,
            threads,
            spawned,
            counters,
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let spawned = std::mem::take(
            &mut *self
                .spawned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in spawned {
            let _ = t.join();
        }
    }
}

fn poll_in(fd: i32, millis: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&raw mut p, 1, millis) > 0 }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    counters: &Arc<ServerCounters>,
    spawned: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !poll_in(listener.as_raw_fd(), 50) {
            continue;
        }
        while let Ok((stream, _)) = listener.accept() {
            // Errors only concern that one client, which counts them itself.
            let _ = serve(stream, stop, counters, spawned);
        }
    }
}

fn serve(
    mut stream: TcpStream,
    stop: &Arc<AtomicBool>,
    counters: &Arc<ServerCounters>,
    spawned: &Mutex<Vec<JoinHandle<()>>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind)?;
    match kind[0] {
        KIND_CONNECT => {
            let mut request = [0u8; MESSAGE - 1];
            stream.read_exact(&mut request)?;
            stream.write_all(&[b'r'; MESSAGE])?;
            // The client closes first and keeps TIME_WAIT. Were the server to close first, its
            // TIME_WAIT sockets would meet new connections the node masquerades onto the same
            // (address, port) — with per-connection timestamp offsets PAWS rejects those SYNs
            // and each costs a 1 s retransmission, which is the benchmark measuring itself.
            let mut eof = [0u8; 1];
            let _ = stream.read(&mut eof);
        }
        KIND_BULK | KIND_RR => {
            let (counters, stop) = (Arc::clone(counters), Arc::clone(stop));
            let handle = thread::spawn(move || {
                pin();
                let _ = if kind[0] == KIND_BULK {
                    sink(stream, &stop, &counters)
                } else {
                    echo(stream, &stop)
                };
            });
            spawned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(handle);
        }
        _ => {}
    }
    Ok(())
}

fn sink(
    mut stream: TcpStream,
    stop: &AtomicBool,
    counters: &ServerCounters,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        counters.bulk_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; MESSAGE];
    while !stop.load(Ordering::Relaxed) {
        match stream.read_exact(&mut buf) {
            Ok(()) => stream.write_all(&buf)?,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn udp_sink(socket: &UdpSocket, stop: &AtomicBool, counters: &ServerCounters) {
    const BATCH: usize = 128;
    let mut bufs = vec![[0u8; 64]; BATCH];
    while !stop.load(Ordering::Relaxed) {
        if !poll_in(socket.as_raw_fd(), 50) {
            continue;
        }
        loop {
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: all-zero mmsghdrs are valid; each points at one live iovec below.
            let mut msgs: Vec<libc::mmsghdr> =
                (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `msgs` holds BATCH headers whose buffers outlive the call.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    u32::try_from(BATCH).expect("small batch"),
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break;
            }
            counters
                .udp_packets
                .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
        }
    }
}

/// The CPU every benchmark thread runs on: the last one. One core pays for each operation
/// end to end (with veth the whole path runs in the sending thread's softirq), with no
/// cross-CPU wakeups — each an IPI and a VM exit here, whose cost depends on where the scheduler
/// happened to put client and server and swamped the hooks' difference. The other cores take
/// the rest of the machine (the agent, other users' builds).
pub fn bench_cpu() -> usize {
    thread::available_parallelism().map_or(1, usize::from) - 1
}

/// Pins the calling thread to [`bench_cpu`].
pub fn pin() {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the index is below CPU_SETSIZE (a VM with a handful of cores).
    unsafe { libc::CPU_SET(bench_cpu(), &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size given; 0 means the calling thread.
    // Failure (a restricted cpuset) only loses the pinning, not correctness.
    let _ = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
}

/// Counters the generators share with the coordinator.
#[derive(Default)]
pub struct ClientCounters {
    /// Completed connections, sent datagrams or completed transactions.
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Set by the coordinator while the window is open: request/response latencies are only
    /// recorded then.
    pub measuring: AtomicBool,
    pub first_error: Mutex<Option<String>>,
}

impl ClientCounters {
    fn fail(&self, e: &std::io::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// Where a generator runs and what it targets.
#[derive(Clone, Debug)]
pub struct Target {
    /// `/run/netns/<name>` of the client namespace.
    pub ns_path: String,
    /// Source address (bound, or written into raw packets).
    pub src: IpAddr,
    pub dst: SocketAddr,
}

impl Target {
    pub fn new(ns: &NetNs, src: IpAddr, dst: SocketAddr) -> Self {
        Self {
            ns_path: format!("/run/netns/{}", ns.name()),
            src,
            dst,
        }
    }
}

/// What a generator does.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// `threads` clients, each: connect, send a request, read the response, close; repeat.
    Connections { threads: usize },
    /// Raw UDP datagrams, each from a new (source address, source port).
    NewFlows,
    /// One connection streaming as fast as it can.
    Bulk,
    /// One connection, one 64-byte request in flight at a time.
    RequestResponse,
}

/// Running generator threads; [`Generator::finish`] stops and joins them.
pub struct Generator {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<u32>>>,
    pub counters: Arc<ClientCounters>,
}

impl Generator {
    /// Starts `load` against `target`; every thread gives up at `deadline` or after `max_ops`
    /// operations in total.
    pub fn start(load: Load, target: &Target, deadline: Instant, max_ops: u64) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ClientCounters::default());
        let threads = match load {
            Load::Connections { threads } => threads,
            _ => 1,
        };
        let mut handles = Vec::new();
        for i in 0..threads {
            let (stop, counters, target) =
                (Arc::clone(&stop), Arc::clone(&counters), target.clone());
            let limits = Limits {
                stop,
                deadline,
                max_ops,
            };
            handles.push(
                thread::Builder::new()
                    .name(format!("bench-gen-{i}"))
                    .spawn(move || {
                        pin();
                        if let Err(e) = netns::join(&target.ns_path) {
                            counters.fail(&std::io::Error::other(format!("{e:#}")));
                            return Vec::new();
                        }
                        match load {
                            Load::Connections { .. } => {
                                connections(&target, &limits, &counters);
                                Vec::new()
                            }
                            Load::NewFlows => {
                                if let Err(e) = new_flows(&target, &limits, &counters) {
                                    counters.fail(&e);
                                }
                                Vec::new()
                            }
                            Load::Bulk => {
                                if let Err(e) = bulk(&target, &limits) {
                                    counters.fail(&e);
                                }
                                Vec::new()
                            }
                            Load::RequestResponse => request_response(&target, &limits, &counters)
                                .unwrap_or_else(|e| {
                                    counters.fail(&e);
                                    Vec::new()
                                }),
                        }
                    })
                    .context("spawning a generator thread")?,
            );
        }
        Ok(Self {
            stop,
            threads: handles,
            counters,
        })
    }

    /// Stops the threads and returns the latencies (ns) recorded while measuring.
    pub fn finish(mut self) -> Result<Vec<u32>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(l) => latencies.extend(l),
                Err(_) => bail!("a generator thread panicked"),
            }
        }
        Ok(latencies)
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Limits {
    stop: Arc<AtomicBool>,
    deadline: Instant,
    max_ops: u64,
}

impl Limits {
    fn done(&self, counters: &ClientCounters) -> bool {
        self.stop.load(Ordering::Relaxed)
            || counters.ok.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed)
                >= self.max_ops
            || Instant::now() >= self.deadline
    }
}

fn connected(target: &Target) -> std::io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target.dst),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // Choose the source port at connect time, by the full 4-tuple, rather than at bind time
    // from the ports no socket holds: the ephemeral range is then shared across destinations.
    set_int_opt(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(&SocketAddr::from((target.src, 0)).into())?;
    socket
        .connect_timeout(&target.dst.into(), IO_TIMEOUT)
        .map_err(|e| std::io::Error::new(e.kind(), format!("connect: {e}")))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn one_connection(target: &Target) -> std::io::Result<()> {
    let mut stream = connected(target)?;
    let mut request = [b'q'; MESSAGE];
    request[0] = KIND_CONNECT;
    stream.write_all(&request)?;
    let mut response = [0u8; MESSAGE];
    stream
        .read_exact(&mut response)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading the response: {e}")))?;
    // Dropping closes first (see `serve`).
    Ok(())
}

fn connections(target: &Target, limits: &Limits, counters: &ClientCounters) {
    while !limits.done(counters) {
        match one_connection(target) {
            Ok(()) => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => counters.fail(&e),
        }
    }
}

/// IPv4 + UDP header and payload with the checksum fields zero: the kernel fills the IP
/// checksum, length and id of `IPPROTO_RAW` packets, and a zero UDP checksum means "none".
fn datagram(src: Ipv4Addr, sport: u16, dst: SocketAddrV4) -> [u8; 28 + UDP_PAYLOAD] {
    let mut p = [0u8; 28 + UDP_PAYLOAD];
    p[0] = 0x45;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    let udp_len = u16::try_from(8 + UDP_PAYLOAD).expect("small");
    p[24..26].copy_from_slice(&udp_len.to_be_bytes());
    p
}

/// IPv6 + UDP header and payload. Unlike IPv4's, the kernel fills nothing in a header-included
/// IPv6 packet, and IPv6 forbids a zero UDP checksum: both lengths and the checksum are set here.
fn datagram6(src: Ipv6Addr, sport: u16, dst: SocketAddrV6) -> [u8; 48 + UDP_PAYLOAD] {
    let mut p = [0u8; 48 + UDP_PAYLOAD];
    let udp_len = u16::try_from(8 + UDP_PAYLOAD).expect("small");
    p[0] = 0x60;
    p[4..6].copy_from_slice(&udp_len.to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.ip().octets());
    p[40..42].copy_from_slice(&sport.to_be_bytes());
    p[42..44].copy_from_slice(&dst.port().to_be_bytes());
    p[44..46].copy_from_slice(&udp_len.to_be_bytes());
    let checksum = udp6_checksum(&p[8..40], &p[40..]);
    p[46..48].copy_from_slice(&checksum.to_be_bytes());
    p
}

/// RFC 8200 §8.1: the one's-complement sum over the pseudo-header (addresses, upper-layer
/// length, next header 17) and the UDP datagram (checksum field zero); 0 is sent as 0xffff.
fn udp6_checksum(addresses: &[u8], udp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).copied().map_or(0, u32::from);
        }
    };
    add(addresses);
    add(&u32::try_from(udp.len()).expect("small").to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !u16::try_from(sum).expect("folded") {
        0 => 0xffff,
        c => c,
    }
}

/// One `IPPROTO_RAW` socket of `domain`: the packets written carry their own IP header (Linux
/// sets header inclusion for this protocol in both families).
fn raw_socket(domain: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raw datagrams, each with a 5-tuple conntrack has not seen: the source port walks
/// 1024..65535 and then the source address moves to the next one after `target.src`.
fn new_flows(target: &Target, limits: &Limits, counters: &ClientCounters) -> std::io::Result<()> {
    const PORTS: u64 = 65_536 - 1024;
    let flow = |n: u64| {
        let host = u32::try_from(n / PORTS).unwrap_or(0) % 200;
        let sport = u16::try_from(1024 + n % PORTS).expect("port range");
        (host, sport)
    };
    match (target.src, target.dst) {
        (IpAddr::V4(src), SocketAddr::V4(dst)) => {
            let fd = raw_socket(libc::AF_INET)?;
            let to = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET"),
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            send_flows(&fd, &to, limits, counters, |n| {
                let (host, sport) = flow(n);
                datagram(Ipv4Addr::from(u32::from(src) + host), sport, dst)
            })
        }
        (IpAddr::V6(src), SocketAddr::V6(dst)) => {
            let fd = raw_socket(libc::AF_INET6)?;
            // SAFETY: an all-zero sockaddr_in6 is valid; family and address are set below.
            let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            to.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6");
            to.sin6_addr.s6_addr = dst.ip().octets();
            send_flows(&fd, &to, limits, counters, |n| {
                let (host, sport) = flow(n);
                datagram6(
                    Ipv6Addr::from(u128::from(src) + u128::from(host)),
                    sport,
                    dst,
                )
            })
        }
        _ => Err(std::io::Error::other(
            "source and destination of different families",
        )),
    }
}

/// Sends `packet(n)` for n = 0, 1, … in batches of 32 to `to` until `limits` says stop.
fn send_flows<A, const N: usize>(
    fd: &OwnedFd,
    to: &A,
    limits: &Limits,
    counters: &ClientCounters,
    packet: impl Fn(u64) -> [u8; N],
) -> std::io::Result<()> {
    const BATCH: usize = 32;
    let mut n: u64 = 0;
    let mut packets = vec![[0u8; N]; BATCH];
    while !limits.done(counters) {
        for p in &mut packets {
            *p = packet(n);
            n += 1;
        }
        let mut iovs: Vec<libc::iovec> = packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: all-zero mmsghdrs are valid; the pointers set below outlive the call.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_name = std::ptr::from_ref(to).cast_mut().cast();
            m.msg_hdr.msg_namelen = libc::socklen_t::try_from(size_of::<A>()).expect("small");
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` describes BATCH live packets.
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                u32::try_from(BATCH).expect("small"),
                0,
            )
        };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            // A full queue somewhere on the path: count it, keep going.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Err(e);
        }
        counters
            .ok
            .fetch_add(u64::try_from(sent).unwrap_or(0), Ordering::Relaxed);
    }
    Ok(())
}

fn bulk(target: &Target, limits: &Limits) -> std::io::Result<()> {
    let mut stream = connected(target)?;
    stream.write_all(&[KIND_BULK])?;
    let chunk = vec![b'b'; 128 * 1024];
    while !limits.stop.load(Ordering::Relaxed) && Instant::now() < limits.deadline {
        stream.write_all(&chunk)?;
    }
    Ok(())
}

fn request_response(
    target: &Target,
    limits: &Limits,
    counters: &ClientCounters,
) -> std::io::Result<Vec<u32>> {
    let mut stream = connected(target)?;
    stream.write_all(&[KIND_RR])?;
    let mut latencies = Vec::with_capacity(1 << 20);
    let request = [b'q'; MESSAGE];
    let mut response = [0u8; MESSAGE];
    while !limits.done(counters) {
        let started = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut response)?;
        let took = started.elapsed();
        if counters.measuring.load(Ordering::Relaxed) {
            latencies.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
            counters.ok.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(latencies)
}

/// One connection of the connection workload from a fresh thread in the target's namespace:
/// the smoke test that a node really serves the path before it is measured.
pub fn check_connection(target: &Target) -> Result<()> {
    let target = target.clone();
    thread::spawn(move || -> Result<()> {
        netns::join(&target.ns_path)?;
        one_connection(&target).with_context(|| {
            format!(
                "{} → {}: connect, request, response",
                target.src, target.dst
            )
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the check thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum a receiver verifies: summing the pseudo-header and the datagram with its
    /// checksum in place gives 0xffff.
    #[test]
    fn ipv6_datagrams_carry_a_valid_udp_checksum() {
        let dst = SocketAddrV6::new("fd00:10:96::41".parse().unwrap(), 9000, 0, 0);
        for sport in [1024, 4242, 65535] {
            let p = datagram6("fd00:10:16::1:1".parse().unwrap(), sport, dst);
            assert_eq!(p[0] >> 4, 6);
            assert_eq!(
                u16::from_be_bytes([p[4], p[5]]),
                u16::try_from(8 + UDP_PAYLOAD).unwrap()
            );
            let mut sum: u32 = 0;
            for pair in p[8..40].chunks(2).chain(p[40..].chunks(2)) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
            sum += u32::try_from(p.len() - 40).unwrap() + 17;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            assert_eq!(sum, 0xffff, "sport {sport}");
        }
        // A known vector: all-zero addresses and payload.
        assert_eq!(
            udp6_checksum(&[0; 32], &[0, 1, 0, 2, 0, 8, 0, 0]),
            !(1 + 2 + 8 + 8 + 17)
        );
    }
}
