//! Moving a replicated container's service address from one host to another.
//!
//! On failover the backup *claims* the address: it adds it to an interface of the network
//! namespace the restored container will use, then announces it with gratuitous ARP so that
//! every neighbour (clients, routers) updates its cache to the backup's MAC at once instead of
//! sending to the dead primary until its entry goes stale. A primary that comes back, or a
//! primary that is fenced, *releases* the address (removes it), so it can never answer for it.
//!
//! This crate owns only that: addresses and ARP announcements inside a given network namespace.
//! It changes nothing else in the namespace (routes, rules, links) and starts no process but
//! `ip` (iproute2).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

/// A gratuitous ARP request for `addr` from `mac`: sender and target address both `addr`, sent
/// to the broadcast address. Neighbours that know `addr` update its entry to `mac`.
pub fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&addr.octets());
    // target hardware address stays zero
    f[38..42].copy_from_slice(&addr.octets());
    f
}

/// Sends gratuitous ARP for `addr` on `interface` of `netns`, `count` times, `interval` apart.
pub fn announce(
    netns: &Path,
    interface: &str,
    addr: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<(), TakeoverError> {
    let ns = File::open(netns).map_err(|err| TakeoverError::Netns {
        path: netns.to_path_buf(),
        err,
    })?;
    let (netns, interface) = (netns.to_path_buf(), interface.to_string());
    // A thread of our own enters the namespace: the packet socket must be created there.
    std::thread::spawn(move || {
        // SAFETY: setns with a valid netns descriptor; it moves only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(TakeoverError::Netns {
                path: netns,
                err: std::io::Error::last_os_error(),
            });
        }
        send_garps(&interface, addr, count, interval)
    })
    .join()
    .unwrap_or_else(|_| {
        Err(TakeoverError::Announce {
            addr,
            interface: String::new(),
            err: std::io::Error::other("announcing thread panicked"),
        })
    })
}

fn send_garps(
    interface: &str,
    addr: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<(), TakeoverError> {
    let iface_err = |err| TakeoverError::Interface {
        interface: interface.to_string(),
        err,
    };
    let announce_err = |err| TakeoverError::Announce {
        addr,
        interface: interface.to_string(),
        err,
    };
    let proto = 0x0806u16.to_be();
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if raw < 0 {
        return Err(announce_err(std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

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
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
        return Err(iface_err(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled ifru_ifindex for SIOCGIFINDEX.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    // SAFETY: SIOCGIFHWADDR on a live socket with a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(iface_err(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled ifru_hwaddr for SIOCGIFHWADDR.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    let frame = garp_frame(mac, addr);

    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    to.sll_protocol = proto;
    to.sll_ifindex = index;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let to_len = u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        // SAFETY: sends a live 42-byte frame to a valid sockaddr_ll of the given length.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                to_len,
            )
        };
        if n < 0 {
            return Err(announce_err(std::io::Error::last_os_error()));
        }
    }
    Ok(())
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
}
