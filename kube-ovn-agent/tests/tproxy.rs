//! The TPROXY replacement's edges, with real sockets in private network namespaces: Kube-OVN's
//! default listener (one dual-stack `[::]:8102` socket, `IP_TRANSPARENT` set through `SOL_IP`,
//! as Go's `ListenTCP("tcp", 0.0.0.0:8102)` opens it) takes IPv4 and IPv6 probes; a listener
//! without `IP_TRANSPARENT` is never handed a probe; and a probe with no transparent socket is
//! dropped, as Kube-OVN's TPROXY target drops it. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use kube_ovn_agent::testing::{
    agent::{Agent, Node, wait_for},
    netns::{NetNs, TempPath, example_cluster, veth},
};
use libtest_mimic::{Failed, Trial};

const AGENT: &str = env!("CARGO_BIN_EXE_kube-ovn-agent");
const LISTEN_PORT: u16 = 8102;

fn main() {
    let trials = vec![
        Trial::test(
            "a_dual_stack_transparent_listener_takes_ipv4_and_ipv6_probes",
            dual_stack,
        ),
        Trial::test(
            "a_listener_without_ip_transparent_is_never_handed_a_probe",
            opaque_listener,
        ),
        Trial::test(
            "a_probe_without_a_transparent_socket_is_dropped_as_kube_ovn_does",
            no_listener,
        ),
    ];
    kube_ovn_testkit::privileged::main("TPROXY tests", trials);
}

/// Spec §5.3's custom-VPC pod p1 on n1 (10.0.1.5, `fd00:1::5`): readiness tcp 8080.
const P1: &str = "apiVersion: v1
kind: Pod
metadata:
  name: p1
  namespace: default
  annotations:
    ovn.kubernetes.io/logical_switch: vpc1-sub
spec:
  nodeName: n1
  containers:
  - name: app
    image: registry.example/app
    readinessProbe:
      tcpSocket:
        port: 8080
status:
  podIPs:
  - ip: 10.0.1.5
  - ip: fd00:1::5
";

/// Node n1 with Kube-OVN's TPROXY companions for p1 in both families (mangle OUTPUT 0x90003,
/// the fwmark rules and table 10001's local default routes), and its agent with
/// `--enable-tproxy`, ready.
struct Setup {
    node: Node,
    _peer: NetNs,
    _cluster: TempPath,
    agent: Agent,
}

fn setup() -> Result<Setup, Failed> {
    let node = Node::new("kovn-tpn-");
    let peer = NetNs::new("kovn-tpp-").expect("create namespace");
    veth(&node.ns, "eth0", &peer, "eth0").expect("veth pair");
    node.ns.sh(
        "ip addr add 192.168.0.11/24 dev eth0; ip addr add fd00::11/64 dev eth0 nodad; \
         ip route add 10.0.1.0/24 dev eth0; ip -6 route add fd00:1::/64 dev eth0; \
         iptables -t mangle -A OUTPUT -d 10.0.1.5/32 -p tcp --dport 8080 -j MARK --set-xmark 0x90003/0x90003; \
         ip6tables -t mangle -A OUTPUT -d fd00:1::5/128 -p tcp --dport 8080 -j MARK --set-xmark 0x90003/0x90003; \
         for v in -4 -6; do \
           ip $v rule add fwmark 0x90003/0x90003 lookup 10001; \
           ip $v rule add fwmark 0x90004/0x90004 lookup 10001; \
         done; \
         ip route replace local 0.0.0.0/0 dev lo table 10001; \
         ip -6 route replace local ::/0 dev lo table 10001",
    ).expect("shell in namespace");
    peer.sh("ip addr add 192.168.0.12/24 dev eth0; ip addr add fd00::12/64 dev eth0 nodad")
        .expect("shell in namespace");
    let cluster = TempPath::new("kovn-tpcluster-", "yaml");
    let mut text = std::fs::read_to_string(example_cluster()).expect("example cluster");
    text.push_str("\n---\n");
    text.push_str(P1);
    std::fs::write(&*cluster, text).expect("cluster file");
    let mut agent = node.agent(AGENT, &cluster, &["--enable-tproxy"]);
    node.wait_ready(AGENT, &mut agent, &["eth0", "lo"])?;
    Ok(Setup {
        node,
        _peer: peer,
        _cluster: cluster,
        agent,
    })
}

/// A listening socket on `[::]:8102` (`v6`, `IPV6_V6ONLY` off: one dual-stack socket, like
/// Go's) or `0.0.0.0:8102`, with or without `IP_TRANSPARENT` (set through `SOL_IP` either way,
/// as Go's tproxy listener does).
fn listener(v6: bool, transparent: bool) -> TcpListener {
    use std::os::fd::FromRawFd as _;
    let set = |fd: libc::c_int, level: libc::c_int, option: libc::c_int, value: libc::c_int| {
        let size = u32::try_from(size_of::<libc::c_int>()).expect("fits");
        // SAFETY: a valid fd and a c_int option value.
        let rc = unsafe { libc::setsockopt(fd, level, option, (&raw const value).cast(), size) };
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    };
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket syscalls; the fd is handed to the TcpListener, which owns it.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if transparent {
            set(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
        }
        let rc = if v6 {
            set(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            addr.sin6_family = u16::try_from(libc::AF_INET6).expect("fits");
            addr.sin6_port = LISTEN_PORT.to_be();
            let len = u32::try_from(size_of::<libc::sockaddr_in6>()).expect("fits");
            libc::bind(fd, (&raw const addr).cast(), len)
        } else {
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = u16::try_from(libc::AF_INET).expect("fits");
            addr.sin_port = LISTEN_PORT.to_be();
            let len = u32::try_from(size_of::<libc::sockaddr_in>()).expect("fits");
            libc::bind(fd, (&raw const addr).cast(), len)
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(
            libc::listen(fd, 16),
            0,
            "listen: {}",
            std::io::Error::last_os_error()
        );
        TcpListener::from_raw_fd(fd)
    }
}

fn probe_targets() -> [SocketAddr; 2] {
    [
        "10.0.1.5:8080".parse().expect("address"),
        "[fd00:1::5]:8080".parse().expect("address"),
    ]
}

/// Whether the agent's `dump` says its check found the listener of both families without
/// `IP_TRANSPARENT` (`want`).
fn opaque_in_dump(s: &Setup, want: bool) -> bool {
    s.node
        .dump(AGENT)
        .is_some_and(|d| d.v4.tproxy_listener_opaque == want && d.v6.tproxy_listener_opaque == want)
}

/// Kubelet's probe to each of p1's addresses reaches the one dual-stack listener, which sees the
/// pod's address as its local end, and data after the handshake reaches the accepted socket.
fn dual_stack() -> Result<(), Failed> {
    let s = setup()?;
    let seen = s
        .node
        .ns
        .enter(|| -> Result<Vec<String>, String> {
            let listener = listener(true, true);
            let mut seen = Vec::new();
            for target in probe_targets() {
                let mut kubelet = TcpStream::connect_timeout(&target, Duration::from_secs(3))
                    .map_err(|e| format!("kubelet probe to {target}: {e}"))?;
                let (mut proxied, _) = listener.accept().map_err(|e| e.to_string())?;
                kubelet.write_all(b"ping").map_err(|e| e.to_string())?;
                proxied
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .map_err(|e| e.to_string())?;
                let mut buffer = [0u8; 4];
                proxied
                    .read_exact(&mut buffer)
                    .map_err(|e| format!("data after the handshake: {e}"))?;
                let local = proxied.local_addr().map_err(|e| e.to_string())?;
                seen.push(format!("{local} {}", String::from_utf8_lossy(&buffer)));
            }
            Ok(seen)
        })
        .expect("enter namespace");
    let seen = seen.map_err(|e| format!("{e}\n{}", s.agent.log_text()))?;
    // The dual-stack socket reports IPv4 peers as v4-mapped IPv6 addresses.
    let want = ["[::ffff:10.0.1.5]:8080 ping", "[fd00:1::5]:8080 ping"];
    if seen != want {
        return Err(format!("the listener saw {seen:?}, want {want:?}").into());
    }
    let steered = s.node.counter(AGENT, "TPROXY");
    if steered < 4 {
        return Err(
            format!("TPROXY counter {steered}, want ≥ 4 (2 probes × SYN, ACK, data)").into(),
        );
    }
    Ok(())
}

/// A `[::]:8102` listener without `IP_TRANSPARENT`: once the agent has seen it (its periodic
/// listener check), probes are not handed to it — they are dropped, counted `tproxy_no_socket`,
/// and the listener never accepts a connection.
fn opaque_listener() -> Result<(), Failed> {
    let s = setup()?;
    s.node
        .ns
        .enter(|| -> Result<(), Failed> {
            let listener = listener(true, false);
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            wait_for(Duration::from_secs(10), || opaque_in_dump(&s, true)).map_err(|e| {
                format!(
                    "the agent did not report the listener without IP_TRANSPARENT: {e}\n{}",
                    s.agent.log_text()
                )
            })?;
            let dropped = s.node.counter(AGENT, "tproxy_no_socket");
            for target in probe_targets() {
                let outcome = TcpStream::connect_timeout(&target, Duration::from_millis(700));
                if outcome.is_ok() {
                    return Err(format!("the probe to {target} connected").into());
                }
                if let Ok((stream, _)) = listener.accept() {
                    return Err(format!(
                        "the listener without IP_TRANSPARENT accepted {:?}",
                        stream.local_addr()
                    )
                    .into());
                }
            }
            let dropped = s.node.counter(AGENT, "tproxy_no_socket") - dropped;
            if dropped < 2 {
                return Err(format!("tproxy_no_socket moved by {dropped}, want ≥ 2").into());
            }
            drop(listener);
            // Replaced by a transparent one: steering resumes at the next check.
            let _transparent = transparent_listener_resumes_steering(&s)?;
            Ok(())
        })
        .expect("enter namespace")
}

/// Opens a transparent dual-stack listener, waits until the agent no longer reports an opaque
/// one, and checks that a probe reaches it; returns the listener.
fn transparent_listener_resumes_steering(s: &Setup) -> Result<TcpListener, Failed> {
    let transparent = listener(true, true);
    wait_for(Duration::from_secs(10), || opaque_in_dump(s, false)).map_err(|e| {
        format!(
            "the agent still reports an opaque listener: {e}\n{}",
            s.agent.log_text()
        )
    })?;
    let target = probe_targets()[0];
    TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| format!("probe to {target} after the transparent listener came: {e}"))?;
    Ok(transparent)
}

/// No listener at all: Kube-OVN's TPROXY target finds no transparent socket and drops the
/// probe, so kubelet's connect times out; it is not refused (as it would be if the SYN went on
/// to the local stack, where nothing listens on the pod's address).
fn no_listener() -> Result<(), Failed> {
    let s = setup()?;
    let dropped = s.node.counter(AGENT, "tproxy_no_socket");
    let outcomes = s
        .node
        .ns
        .enter(|| {
            probe_targets().map(|target| {
                TcpStream::connect_timeout(&target, Duration::from_millis(700))
                    .map_err(|e| e.kind())
            })
        })
        .expect("enter namespace");
    for (target, outcome) in probe_targets().iter().zip(&outcomes) {
        if !matches!(outcome, Err(std::io::ErrorKind::TimedOut)) {
            return Err(format!(
                "probe to {target}: {outcome:?}, want a timeout (dropped)\n{}",
                s.agent.log_text()
            )
            .into());
        }
    }
    let dropped = s.node.counter(AGENT, "tproxy_no_socket") - dropped;
    if dropped < 2 {
        return Err(format!("tproxy_no_socket moved by {dropped}, want ≥ 2").into());
    }
    Ok(())
}
