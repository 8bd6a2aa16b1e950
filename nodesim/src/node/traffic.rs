//! Backends that tell each client which source address they saw, and clients that turn what
//! happened to one connection into an [`Outcome`]. Every wait is bounded.

use std::{
    fmt,
    io::{ErrorKind, Read as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::{Family, Host, L4, netns::NetNs};

/// What the receiving side of one connection attempt experienced.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A backend accepted it and saw this source address (after any NAT).
    Seen(IpAddr),
    /// Connection refused: TCP RST or ICMP port unreachable (e.g. Kube-OVN's REJECT guard).
    Refused,
    /// No answer within the deadline.
    Timeout,
    /// ICMP host/network unreachable.
    Unreachable,
    /// Anything else, with the error text.
    Failed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seen(addr) => write!(f, "src {addr}"),
            Self::Refused => f.write_str("refused"),
            Self::Timeout => f.write_str("timeout"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Failed(e) => write!(f, "error: {e}"),
        }
    }
}

/// One connection attempt: from `src` on `from`'s namespace to `dst`.
#[derive(Clone, Debug)]
pub struct Probe {
    pub from: Host,
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub proto: L4,
    /// UDP payload size; above the link MTU the datagram leaves as fragments.
    pub payload: usize,
}

impl Probe {
    pub fn tcp(from: Host, src: impl Into<IpAddr>, dst: impl Into<IpAddr>, port: u16) -> Self {
        Self {
            from,
            src: src.into(),
            dst: SocketAddr::new(dst.into(), port),
            proto: L4::Tcp,
            payload: 64,
        }
    }

    pub fn udp(from: Host, src: impl Into<IpAddr>, dst: impl Into<IpAddr>, port: u16) -> Self {
        Self {
            proto: L4::Udp,
            ..Self::tcp(from, src, dst, port)
        }
    }

    #[must_use]
    pub fn with_payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    pub fn family(&self) -> Family {
        Family::of(self.dst.ip())
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}/{}", self.src, self.dst, self.proto.name())?;
        if self.payload > 1500 {
            write!(f, " ({} B, fragmented)", self.payload)?;
        }
        Ok(())
    }
}

const REPLY_PREFIX: &str = "peer=";

/// Runs `probe` from the current thread, which must already be in the client's namespace.
pub fn probe(probe: &Probe, timeout: Duration) -> Outcome {
    let result = match probe.proto {
        L4::Tcp => tcp_probe(probe, timeout),
        L4::Udp => udp_probe(probe, timeout),
    };
    result.unwrap_or_else(|e| classify(&e))
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Outcome::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Outcome::Unreachable,
        _ => Outcome::Failed(e.to_string()),
    }
}

fn socket(probe: &Probe, kind: Type, proto: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(probe.dst), kind, Some(proto))?;
    socket.bind(&SocketAddr::new(probe.src, 0).into())?;
    Ok(socket)
}

fn parse_reply(reply: &str) -> Outcome {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(REPLY_PREFIX))
        .and_then(|a| a.parse::<IpAddr>().ok())
        .map_or_else(
            || Outcome::Failed(format!("unexpected reply {reply:?}")),
            |a| Outcome::Seen(a.to_canonical()),
        )
}

fn tcp_probe(probe: &Probe, timeout: Duration) -> std::io::Result<Outcome> {
    let socket = socket(probe, Type::STREAM, Protocol::TCP)?;
    connect(&socket, probe, timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(parse_reply(&reply))
}

/// Connects with a deadline, reporting an ICMP error for the SYN at once.
///
/// On veth the whole round trip can run in the softirq that the SYN's own transmission
/// triggers, while `connect()` still holds the socket lock. An ICMP "port unreachable" (Kube-OVN's
/// REJECT guard) that arrives then is only a soft error, and the kernel reports it after the SYN
/// retransmission a second later. With `IP_RECVERR` the ICMP error is queued on the socket at
/// once, so it is read here instead of waiting for the retransmission.
fn connect(socket: &Socket, probe: &Probe, timeout: Duration) -> std::io::Result<()> {
    let (level, name) = match probe.family() {
        Family::V4 => (libc::IPPROTO_IP, libc::IP_RECVERR),
        Family::V6 => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    set_int_opt(socket, level, name, 1)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&probe.dst.into()) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fd` is one live pollfd.
    let ready = unsafe { libc::poll(&raw mut fd, 1, millis) };
    if ready < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if ready == 0 {
        return Err(ErrorKind::TimedOut.into());
    }
    if let Some(e) = socket.take_error()? {
        return Err(e);
    }
    if fd.revents & libc::POLLERR != 0 {
        return Err(queued_error(socket)?);
    }
    Ok(())
}

/// The errno of the first ICMP error queued on the socket (`MSG_ERRQUEUE`).
fn queued_error(socket: &Socket) -> std::io::Result<std::io::Error> {
    let mut data = [0u8; 256];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` describes live buffers of the sizes given.
    if unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_ERRQUEUE) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CMSG_* walk the control buffer the kernel just filled, within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` points into `control`; IP(V6)_RECVERR data starts with
        // `struct sock_extended_err`, whose first field is the u32 `ee_errno`.
        let (level, kind, errno) = unsafe {
            let header = &*cmsg;
            let errno = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u32>());
            (header.cmsg_level, header.cmsg_type, errno)
        };
        if (level, kind) == (libc::IPPROTO_IP, libc::IP_RECVERR)
            || (level, kind) == (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        {
            return Ok(std::io::Error::from_raw_os_error(
                i32::try_from(errno).unwrap_or(libc::EIO),
            ));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Ok(std::io::Error::other("POLLERR without a queued error"))
}

fn udp_probe(probe: &Probe, timeout: Duration) -> std::io::Result<Outcome> {
    let socket = socket(probe, Type::DGRAM, Protocol::UDP)?;
    if probe.dst.is_ipv4() {
        // Send datagrams above the MTU as fragments, without DF.
        set_int_opt(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )?;
    }
    socket.connect(&probe.dst.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(timeout))?;
    socket.send(&vec![b'x'; probe.payload])?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(parse_reply(&String::from_utf8_lossy(&buf[..n])))
}

/// `setsockopt` of one `c_int` option (socket2 has no setter for some of the options used).
pub fn set_int_opt(socket: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the fd is open for the call; the option value is a live c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<i32>()).expect("c_int size fits"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `FragCreates` of this thread's namespace for `family` (`/proc/thread-self/net/snmp[6]`).
pub fn frag_creates(family: Family) -> Result<u64> {
    match family {
        Family::V4 => {
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
            let (names, values) = (
                ip.next().context("Ip header")?,
                ip.next().context("Ip values")?,
            );
            let index = names
                .split_whitespace()
                .position(|n| n == "FragCreates")
                .context("FragCreates column")?;
            Ok(values
                .split_whitespace()
                .nth(index)
                .context("value")?
                .parse()?)
        }
        Family::V6 => {
            let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
            let line = snmp6
                .lines()
                .find(|l| l.starts_with("Ip6FragCreates"))
                .context("Ip6FragCreates")?;
            Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
        }
    }
}

/// Listeners on every address of one namespace (dual-stack sockets), answering each TCP
/// connection and UDP datagram with `peer=<source address> local=<address:port>` and closing.
/// One thread, polling; stopped and joined on drop.
pub struct Backends {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backends {
    /// TCP listens on `[::]` (an accepted socket answers from the address the client reached);
    /// UDP binds each address of `udp` (a wildcard socket would answer from the outgoing
    /// interface's address, which conntrack cannot match to the flow after DNAT).
    pub fn start(ns: &NetNs, tcp_ports: &[u16], udp: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = format!("/run/netns/{}", ns.name());
        let (tcp_ports, udp) = (tcp_ports.to_vec(), udp.to_vec());
        let thread_stop = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(format!("backends-{}", ns.name()))
            .spawn(move || {
                let listeners = super::netns::join(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| bind_all(&tcp_ports, &udp));
                match listeners {
                    Ok(listeners) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(&listeners, &thread_stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawning the backend thread")?;
        let backends = Self {
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("backends did not start")?
            .with_context(|| format!("starting backends in {}", ns.name()))?;
        Ok(backends)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn dual_stack(kind: Type, proto: Protocol, port: u16) -> Result<Socket> {
    let socket = Socket::new(Domain::IPV6, kind, Some(proto))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())
        .with_context(|| format!("binding [::]:{port}"))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn bind_all(tcp_ports: &[u16], udp: &[SocketAddr]) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for &port in tcp_ports {
        let socket = dual_stack(Type::STREAM, Protocol::TCP, port)?;
        socket.listen(1024)?;
        listeners.push(Listener::Tcp(socket.into()));
    }
    for addr in udp {
        let socket = Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket
            .bind(&(*addr).into())
            .with_context(|| format!("binding {addr}/udp"))?;
        socket.set_nonblocking(true)?;
        listeners.push(Listener::Udp(socket.into()));
    }
    Ok(listeners)
}

fn serve(listeners: &[Listener], stop: &AtomicBool) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: match l {
                Listener::Tcp(t) => t.as_raw_fd(),
                Listener::Udp(u) => u.as_raw_fd(),
            },
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let nfds = libc::nfds_t::try_from(fds.len()).expect("few listeners");
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a live array of `nfds` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, 50) };
        if ready <= 0 {
            continue;
        }
        for (fd, listener) in fds.iter_mut().zip(listeners) {
            if fd.revents != 0 {
                fd.revents = 0;
                answer(listener, &mut buf);
            }
        }
    }
}

fn reply_text(peer: SocketAddr, local: Option<SocketAddr>) -> String {
    let local = local.map_or_else(String::new, |l| {
        format!(" local={}:{}", l.ip().to_canonical(), l.port())
    });
    format!("{REPLY_PREFIX}{}{local}\n", peer.ip().to_canonical())
}

/// Serves everything pending on one listener. Errors only concern that one client (it sees a
/// reset or a timeout), so they are not fatal to the backend.
fn answer(listener: &Listener, buf: &mut [u8]) {
    match listener {
        Listener::Tcp(l) => {
            while let Ok((mut stream, peer)) = l.accept() {
                let text = reply_text(peer, stream.local_addr().ok());
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = std::io::Write::write_all(&mut stream, text.as_bytes());
            }
        }
        Listener::Udp(u) => {
            while let Ok((_, peer)) = u.recv_from(buf) {
                let _ = u.send_to(reply_text(peer, None).as_bytes(), peer);
            }
        }
    }
}
