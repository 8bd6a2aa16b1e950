//! A point-to-point link without an Ethernet header between two namespaces: a tun device in each
//! (`IFF_TUN | IFF_NO_PI`, so the kernel hands the agent's program bare IP packets at TC ingress,
//! `skb->mac_len == 0`) and a thread that copies every packet one side sends to the other side.
//! This kernel has no ipip/gre/wireguard modules; tun is the non-Ethernet link it has. Both
//! devices go away with their file descriptors, when the link is dropped.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, ensure};

use crate::node::netns::NetNs;

pub struct TunLink {
    stop: Arc<AtomicBool>,
    relay: Option<JoinHandle<()>>,
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates `name` in `ns` (a tun device owned by the returned file).
fn open_tun(ns: &NetNs, name: &str) -> Result<File> {
    let name = name.to_owned();
    ns.enter(move || -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        // struct ifreq: 16 bytes of name, then the flags (short) in the union.
        let mut ifreq = [0u8; 40];
        ensure!(name.len() < 16, "interface name {name:?} too long");
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        let flags =
            u16::try_from(libc::IFF_TUN | libc::IFF_NO_PI).expect("tun flags fit ifr_flags");
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: the fd is open; ifreq is a 40-byte buffer laid out as struct ifreq, which
        // TUNSETIFF reads and writes within its size.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
        ensure!(
            rc == 0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        Ok(file)
    })?
}

impl TunLink {
    /// `name` in `a` and in `b`, joined by the relay. The caller configures addresses and brings
    /// the devices up.
    pub fn create(a: &NetNs, b: &NetNs, name: &str) -> Result<Self> {
        let left = open_tun(a, name)?;
        let right = open_tun(b, name)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let relay = std::thread::spawn(move || relay(&left, &right, &flag));
        Ok(Self {
            stop,
            relay: Some(relay),
        })
    }
}

/// Copies packets both ways until `stop`; polls with a 100 ms timeout so it notices `stop`.
fn relay(left: &File, right: &File, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: left.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: right.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n <= 0 {
            continue;
        }
        for (i, (mut from, mut to)) in [(left, right), (right, left)].into_iter().enumerate() {
            if fds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            // A tun read returns exactly one packet; a failed write drops it, like a lossy link.
            if let Ok(len) = from.read(&mut buf) {
                let _ = to.write(&buf[..len]);
            }
        }
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}
