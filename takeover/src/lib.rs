//! Moving a replicated container's service address from one host to another.
//!
//! On failover the backup *claims* the address: it adds it to an interface of the network
//! namespace the restored container will use, then announces it with gratuitous ARP so that
//! every neighbour (clients, routers) updates its cache to the backup's MAC at once instead of
//! sending to the dead primary until its entry goes stale. A primary that comes back, or a
//! primary that is fenced, *releases* the address (removes it), so it can never answer for it.
//!
//! It also *probes* for an address ([`probe`], RFC 5227 style ARP probes): a primary that lost
//! contact with its backup asks the network whether another host (the backup, having taken
//! over) now answers for its service address, in which case it must fence itself, or not (the
//! backup is dead), in which case it keeps serving.
//!
//! This crate owns only that: addresses, ARP announcements and ARP probes inside a given
//! network namespace. It changes nothing else in the namespace (routes, rules, links) and starts
//! no process but `ip` (iproute2).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Errors of address takeover.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The network namespace could not be entered.
    #[error("cannot enter network namespace {path}: {err}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// `ip` failed.
    #[error("ip {args} in {netns} failed: {stderr}")]
    Ip {
        /// The arguments.
        args: String,
        /// The namespace.
        netns: PathBuf,
        /// What ip said.
        stderr: String,
    },
    /// The interface does not exist or has no MAC address.
    #[error("interface {interface}: {err}")]
    Interface {
        /// The interface.
        interface: String,
        /// Why.
        err: std::io::Error,
    },
    /// Sending the announcement failed.
    #[error("gratuitous ARP for {addr} on {interface}: {err}")]
    Announce {
        /// The address.
        addr: Ipv4Addr,
        /// The interface.
        interface: String,
        /// Why.
        err: std::io::Error,
    },
    /// Probing for the address failed.
    #[error("ARP probe for {addr} on {interface}: {err}")]
    Probe {
        /// The address.
        addr: Ipv4Addr,
        /// The interface.
        interface: String,
        /// Why.
        err: std::io::Error,
    },
}

fn ip(netns: &Path, args: &[&str]) -> Result<(), TakeoverError> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| TakeoverError::Ip {
            args: args.join(" "),
            netns: netns.to_path_buf(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(TakeoverError::Ip {
        args: args.join(" "),
        netns: netns.to_path_buf(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Adds `addr/prefix` to `interface` in `netns` (already present is fine) and announces it with
/// `announcements` gratuitous ARP requests, `interval` apart.
pub fn claim(
    netns: &Path,
    interface: &str,
    addr: Ipv4Addr,
    prefix: u8,
    announcements: u32,
    interval: Duration,
) -> Result<(), TakeoverError> {
    let cidr = format!("{addr}/{prefix}");
    // `replace` adds the address or leaves it as it is.
    ip(netns, &["addr", "replace", &cidr, "dev", interface])?;
    announce(netns, interface, addr, announcements, interval)
}

/// Removes `addr/prefix` from `interface` in `netns` (absent is fine): from then on nothing in
/// that namespace answers for it.
pub fn release(
    netns: &Path,
    interface: &str,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), TakeoverError> {
    let cidr = format!("{addr}/{prefix}");
    match ip(netns, &["addr", "del", &cidr, "dev", interface]) {
        // Already gone (the wording depends on the iproute2 version).
        Err(TakeoverError::Ip { stderr, .. })
            if stderr.contains("Address not found")
                || stderr.contains("Cannot assign requested address") =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The Ethernet type of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// The length of an ARP frame for Ethernet and IPv4, Ethernet header included, padding excluded.
const ARP_FRAME_LEN: usize = 42;
/// The ARP operation "request".
const ARP_REQUEST: u16 = 1;
/// The ARP operation "reply".
const ARP_REPLY: u16 = 2;
/// The length of a `sockaddr_ll`.
const SLL_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;

/// A broadcast ARP request from `mac` with sender address `sender`, asking for `target`.
fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&sender.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&target.octets());
    f
}

/// A gratuitous ARP request for `addr` from `mac`: sender and target address both `addr`, sent
/// to the broadcast address. Neighbours that know `addr` update its entry to `mac`.
pub fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    arp_request(mac, addr, addr)
}

/// An ARP probe for `addr` from `mac` (RFC 5227): a broadcast request with sender address
/// 0.0.0.0 (so no neighbour caches anything from it) and target `addr`. Whoever holds `addr`
/// answers it with a reply whose sender is `addr` and its own MAC.
pub fn probe_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    arp_request(mac, Ipv4Addr::UNSPECIFIED, addr)
}

/// The operation (1 request, 2 reply), sender MAC and sender IPv4 address of an Ethernet frame
/// carrying ARP for Ethernet and IPv4. `None` for anything else: another Ethernet type, other
/// hardware or protocol types or lengths, or a frame shorter than 42 bytes. Trailing bytes
/// (Ethernet padding) are ignored.
pub fn arp_sender(frame: &[u8]) -> Option<(u16, [u8; 6], Ipv4Addr)> {
    let be16 = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?))
    };
    if frame.len() < ARP_FRAME_LEN
        || be16(12)? != ETH_P_ARP
        || be16(14)? != 1
        || be16(16)? != 0x0800
        || frame.get(18..20)? != [6, 4]
    {
        return None;
    }
    let mac: [u8; 6] = frame.get(22..28)?.try_into().ok()?;
    let ip: [u8; 4] = frame.get(28..32)?.try_into().ok()?;
    Some((be16(20)?, mac, Ipv4Addr::from(ip)))
}

/// Runs `f` on a thread of its own that has entered `netns`: a packet socket belongs to the
/// namespace of the thread that creates it, and no other thread of the process moves. `panicked`
/// is the error should `f` panic.
fn in_netns<T: Send>(
    netns: &Path,
    panicked: TakeoverError,
    f: impl FnOnce() -> Result<T, TakeoverError> + Send,
) -> Result<T, TakeoverError> {
    let ns = File::open(netns).map_err(|err| TakeoverError::Netns {
        path: netns.to_path_buf(),
        err,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns with a valid netns descriptor; it moves only this thread, which
            // ends with `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(TakeoverError::Netns {
                    path: netns.to_path_buf(),
                    err: std::io::Error::last_os_error(),
                });
            }
            f()
        })
        .join()
        .unwrap_or(Err(panicked))
    })
}

/// A packet socket bound to the ARP frames of one interface (it receives no other interface's),
/// with that interface's index and MAC address.
struct ArpSocket {
    fd: OwnedFd,
    index: i32,
    mac: [u8; 6],
}

impl ArpSocket {
    /// Opens it on `interface` in the calling thread's network namespace. `fail` makes the error
    /// of a failing socket call; a missing interface is a [`TakeoverError::Interface`].
    fn open(
        interface: &str,
        fail: &dyn Fn(std::io::Error) -> TakeoverError,
    ) -> Result<ArpSocket, TakeoverError> {
        let iface_err = |err| TakeoverError::Interface {
            interface: interface.to_string(),
            err,
        };
        // Protocol 0: it receives nothing until it is bound to the interface below, so no
        // frame of another interface gets queued in between.
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let name = interface.as_bytes();
        if name.is_empty() || name.len() >= req.ifr_name.len() {
            return Err(iface_err(std::io::Error::other("bad interface name")));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFINDEX on a live socket with a valid, NUL-terminated ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
            return Err(iface_err(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel filled ifru_ifindex for SIOCGIFINDEX.
        let index = unsafe { req.ifr_ifru.ifru_ifindex };
        // SAFETY: SIOCGIFHWADDR on a live socket with a valid ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
            return Err(iface_err(std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel filled ifru_hwaddr for SIOCGIFHWADDR.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *d = *s as u8;
        }

        let sock = ArpSocket { fd, index, mac };
        let at = sock.broadcast();
        // SAFETY: binds a live socket to a valid sockaddr_ll of the given length.
        let r = unsafe { libc::bind(sock.fd.as_raw_fd(), std::ptr::addr_of!(at).cast(), SLL_LEN) };
        if r < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        Ok(sock)
    }

    /// The link-layer broadcast address of the interface, for ARP.
    fn broadcast(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        to
    }

    /// Sends `frame` (Ethernet header included) to the broadcast address.
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let to = self.broadcast();
        // SAFETY: sends a live buffer of its length to a valid sockaddr_ll of the given length.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                SLL_LEN,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until `deadline` for a frame the interface received (frames it sent, ours or any
    /// other socket's, are skipped) and reads it into `buf`: `Some(its length)` (cut to
    /// `buf`'s), or `None` at the deadline.
    fn recv_until(&self, buf: &mut [u8], deadline: Instant) -> std::io::Result<Option<usize>> {
        loop {
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = SLL_LEN;
            // SAFETY: receives into a live buffer of its length and a sockaddr_ll of `from_len`
            // bytes; MSG_DONTWAIT never blocks.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    std::ptr::addr_of_mut!(from).cast(),
                    &mut from_len,
                )
            };
            if let Ok(n) = usize::try_from(n) {
                if from.sll_pkttype != libc::PACKET_OUTGOING {
                    return Ok(Some(n.min(buf.len())));
                }
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::WouldBlock => {}
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Whole milliseconds, rounded up: rounding down would spin through the last one.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// Sends gratuitous ARP for `addr` on `interface` of `netns`, `count` times, `interval` apart.
pub fn announce(
    netns: &Path,
    interface: &str,
    addr: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<(), TakeoverError> {
    let announce_err = |err| TakeoverError::Announce {
        addr,
        interface: interface.to_string(),
        err,
    };
    let panicked = announce_err(std::io::Error::other("announcing thread panicked"));
    in_netns(netns, panicked, || {
        let sock = ArpSocket::open(interface, &announce_err)?;
        let frame = garp_frame(sock.mac, addr);
        for i in 0..count {
            if i > 0 {
                std::thread::sleep(interval);
            }
            sock.send(&frame).map_err(announce_err)?;
        }
        Ok(())
    })
}

/// Asks the network who else holds `addr`: sends `tries` ARP probes (RFC 5227 style: sender IP
/// 0.0.0.0, sender MAC = the interface's, target IP = `addr`, to broadcast), `interval` apart, on
/// `interface` in `netns`, and listens until `interval` after the last one for an ARP reply (or
/// request) whose sender IP is `addr` and sender MAC is not this interface's. Returns that MAC
/// as soon as one arrives, or `None` after about `tries × interval`; `tries` = 0 sends nothing
/// and returns `None` at once.
///
/// This interface itself never counts, even if `addr` is assigned to it: a host can probe its
/// own service address to find out whether another host has claimed it too (fencing). Another
/// interface of the same namespace on the same link does count. Note that a host answers ARP
/// for every address assigned to any of its interfaces, also while its firewall drops all IP
/// input; only removing the address ([`release`]) makes it silent.
pub fn probe(
    netns: &Path,
    interface: &str,
    addr: Ipv4Addr,
    tries: u32,
    interval: Duration,
) -> Result<Option<[u8; 6]>, TakeoverError> {
    let probe_err = |err| TakeoverError::Probe {
        addr,
        interface: interface.to_string(),
        err,
    };
    let panicked = probe_err(std::io::Error::other("probing thread panicked"));
    in_netns(netns, panicked, || {
        let sock = ArpSocket::open(interface, &probe_err)?;
        let frame = probe_frame(sock.mac, addr);
        let mut buf = [0u8; 256];
        for _ in 0..tries {
            sock.send(&frame).map_err(probe_err)?;
            let deadline = Instant::now().checked_add(interval).ok_or_else(|| {
                probe_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "interval too long",
                ))
            })?;
            while let Some(n) = sock.recv_until(&mut buf, deadline).map_err(probe_err)? {
                let Some((op, mac, ip)) = buf.get(..n).and_then(arp_sender) else {
                    continue;
                };
                if ip == addr && mac != sock.mac && (op == ARP_REQUEST || op == ARP_REPLY) {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_layout() {
        let f = garp_frame([2, 0, 0, 0, 0, 9], Ipv4Addr::new(198, 18, 1, 50));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 9], "sender MAC");
        assert_eq!(&f[28..32], &[198, 18, 1, 50], "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC unknown");
        assert_eq!(&f[38..42], &[198, 18, 1, 50], "target IP = sender IP");
    }

    fn reply(mac: [u8; 6], addr: Ipv4Addr) -> Vec<u8> {
        let mut f = garp_frame(mac, addr).to_vec();
        f[20..22].copy_from_slice(&ARP_REPLY.to_be_bytes());
        f.resize(60, 0); // padded to the Ethernet minimum, as received
        f
    }

    #[test]
    fn probe_layout() {
        let f = probe_frame([2, 0, 0, 0, 0, 9], Ipv4Addr::new(198, 18, 1, 50));
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 9], "source MAC");
        assert_eq!(&f[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&f[14..20], &[0, 1, 0x08, 0x00, 6, 4], "Ethernet, IPv4");
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[22..28], &[2, 0, 0, 0, 0, 9], "sender MAC");
        assert_eq!(&f[28..32], &[0; 4], "sender IP unspecified");
        assert_eq!(&f[32..38], &[0; 6], "target MAC unknown");
        assert_eq!(&f[38..42], &[198, 18, 1, 50], "target IP");
    }

    #[test]
    fn senders_of_arp_frames() {
        let (mac, addr) = ([2, 0, 0, 0, 0, 9], Ipv4Addr::new(198, 18, 1, 50));
        assert_eq!(
            arp_sender(&probe_frame(mac, addr)),
            Some((1, mac, Ipv4Addr::UNSPECIFIED))
        );
        assert_eq!(arp_sender(&garp_frame(mac, addr)), Some((1, mac, addr)));
        assert_eq!(arp_sender(&reply(mac, addr)), Some((2, mac, addr)));
    }

    #[test]
    fn malformed_frames_have_no_sender() {
        let good = reply([2, 0, 0, 0, 0, 9], Ipv4Addr::new(198, 18, 1, 50));
        // Every truncation short of the target address.
        for len in 0..ARP_FRAME_LEN {
            assert_eq!(arp_sender(&good[..len]), None, "{len} bytes");
        }
        assert!(arp_sender(&good[..ARP_FRAME_LEN]).is_some());
        // Every header field that makes it something else.
        for (at, value) in [
            (13, 0x00), // Ethernet type IPv4: not ARP
            (12, 0x86), // Ethernet type 0x8606
            (15, 6),    // hardware type IEEE 802
            (16, 0x86), // protocol type IPv6
            (18, 8),    // hardware address length
            (19, 16),   // protocol address length
        ] {
            let mut bad = good.clone();
            bad[at] = value;
            assert_eq!(arp_sender(&bad), None, "byte {at} = {value:#x}");
        }
        // Garbage of every length up to a full frame: no panic.
        for len in 0..=128 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(arp_sender(&junk), None);
            assert_eq!(arp_sender(&vec![0xff; len]), None);
        }
    }

    #[test]
    fn probing_a_missing_namespace_fails() {
        let r = probe(
            Path::new("/nonexistent/netns"),
            "eth0",
            Ipv4Addr::new(198, 18, 1, 50),
            1,
            Duration::from_millis(1),
        );
        assert!(matches!(r, Err(TakeoverError::Netns { .. })), "{r:?}");
    }
}
