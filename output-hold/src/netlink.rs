//! A minimal NFQUEUE client over netfilter netlink: bind a queue, receive packet ids (or, bound
//! with [`NfQueue::bind_copy`], ids and packets), and release them with one batch verdict
//! (every packet up to an id). The output hold copies only metadata (`NFQNL_COPY_META`): it
//! never looks at payloads; the recorder's ingress log copies whole packets.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_CFG_F_GSO: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_NO_ENOBUFS: libc::c_int = 5;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message being built.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(kind: u16, flags: u16, queue: u16) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        buf[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        // nfgenmsg: family AF_UNSPEC, version 0, resource id = queue (big endian).
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&queue.to_be_bytes());
        Msg { buf }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// A bound NFQUEUE.
pub struct NfQueue {
    fd: OwnedFd,
    queue: u16,
    buf: Vec<u8>,
}

impl AsFd for NfQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl NfQueue {
    /// Opens a netfilter netlink socket in the calling thread's network namespace and binds
    /// queue `queue`, metadata only, holding up to `max_len` packets.
    pub fn bind(queue: u16, max_len: u32) -> std::io::Result<NfQueue> {
        NfQueue::bind_mode(queue, max_len, None)
    }

    /// Like [`bind`](Self::bind), but every packet is copied to user space whole (up to
    /// 65535 bytes: GSO packets arrive whole); receive them with
    /// [`recv_packets`](Self::recv_packets).
    pub fn bind_copy(queue: u16, max_len: u32) -> std::io::Result<NfQueue> {
        NfQueue::bind_mode(queue, max_len, Some(0xffff))
    }

    fn bind_mode(queue: u16, max_len: u32, copy: Option<u32>) -> std::io::Result<NfQueue> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: raw is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value (kernel assigns the port).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or(16);
        let addr_len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(12);
        // SAFETY: addr is a valid sockaddr_nl of the given length, fd an open socket.
        check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), addr_len) })?;
        let one: libc::c_int = 1;
        let int_len = u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
        // SAFETY: setsockopt with a pointer to a live c_int of the given size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_NO_ENOBUFS,
                std::ptr::addr_of!(one).cast(),
                int_len,
            )
        })?;
        let rcvbuf: libc::c_int = 8 << 20;
        // SAFETY: as above. Best effort (needs CAP_NET_ADMIN); the default buffer also works.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::addr_of!(rcvbuf).cast(),
                int_len,
            )
        };
        let mut q = NfQueue {
            fd,
            queue,
            buf: vec![0u8; if copy.is_some() { 1 << 20 } else { 256 * 1024 }],
        };
        // Unbind first: a queue left bound by a dead holder would refuse the bind.
        let _ = q.config_cmd(NFQNL_CFG_CMD_UNBIND);
        q.config_cmd(NFQNL_CFG_CMD_BIND)?;
        // copy_range (u32 BE) + copy_mode: metadata only, or whole packets.
        let mut params = copy.unwrap_or(0).to_be_bytes().to_vec();
        params.push(if copy.is_some() {
            NFQNL_COPY_PACKET
        } else {
            NFQNL_COPY_META
        });
        q.request(Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, queue).attr(NFQA_CFG_PARAMS, &params))?;
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, queue)
                .attr(NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
        )?;
        // GSO packets are queued whole (fewer messages); never fail open.
        q.request(
            Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, queue)
                .attr(NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes())
                .attr(NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes()),
        )?;
        Ok(q)
    }

    fn config_cmd(&mut self, cmd: u8) -> std::io::Result<()> {
        // nfqnl_msg_config_cmd: command, pad, pf (BE, 0 = any).
        let body = [cmd, 0, 0, 0];
        self.request(Msg::new(NFQNL_MSG_CONFIG, NLM_F_ACK, self.queue).attr(NFQA_CFG_CMD, &body))
    }

    fn send(&self, msg: Msg) -> std::io::Result<()> {
        let bytes = msg.finish();
        // SAFETY: sends a live buffer of the given length on an open socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends a request and waits (briefly) for its acknowledgement. Packets that arrive in
    /// between are not expected: requests are made before the iptables rule exists.
    fn request(&mut self, msg: Msg) -> std::io::Result<()> {
        self.send(msg)?;
        let mut fds = [libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polls one valid pollfd.
        check(unsafe { libc::poll(fds.as_mut_ptr(), 1, 2000) })?;
        let n = self.recv_raw()?;
        let buf = &self.buf[..n];
        if buf.len() >= NLMSG_HDRLEN + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if errno != 0 {
                return Err(std::io::Error::from_raw_os_error(-errno));
            }
            return Ok(());
        }
        Err(std::io::Error::other("no acknowledgement from nfnetlink"))
    }

    fn recv_raw(&mut self) -> std::io::Result<usize> {
        // SAFETY: receives into a live buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// Receives every message available now (non-blocking) and hands the body of each
    /// queued-packet message to `packet`.
    fn recv_packet_bodies(&mut self, mut packet: impl FnMut(&[u8])) -> std::io::Result<()> {
        loop {
            let n = match self.recv_raw() {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let b = &self.buf[off..n];
                let len =
                    usize::try_from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
                if len < NLMSG_HDRLEN || len > b.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                if kind == ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET) {
                    packet(&b[NLMSG_HDRLEN..len]);
                }
                off += align4(len);
            }
        }
    }

    /// Receives every queued packet id available now (non-blocking), appending to `ids`.
    pub fn recv_ids(&mut self, ids: &mut Vec<u32>) -> std::io::Result<()> {
        self.recv_packet_bodies(|body| ids.extend(packet_id(body)))
    }

    /// Receives every queued packet available now (non-blocking), appending (id, packet) to
    /// `out`; for a queue bound with [`bind_copy`](Self::bind_copy).
    pub fn recv_packets(&mut self, out: &mut Vec<(u32, Vec<u8>)>) -> std::io::Result<()> {
        self.recv_packet_bodies(|body| {
            if let Some(id) = packet_id(body) {
                let data = attribute(body, NFQA_PAYLOAD).unwrap_or_default();
                out.push((id, data.to_vec()));
            }
        })
    }

    /// Accepts every queued packet with an id up to `id`, in one message.
    pub fn accept_upto(&self, id: u32) -> std::io::Result<()> {
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        self.send(Msg::new(NFQNL_MSG_VERDICT_BATCH, 0, self.queue).attr(NFQA_VERDICT_HDR, &hdr))
    }
}

impl Drop for NfQueue {
    fn drop(&mut self) {
        let _ = self.config_cmd(NFQNL_CFG_CMD_UNBIND);
    }
}

/// The data of attribute `want` in an NFQNL_MSG_PACKET body (after the nfgenmsg header).
fn attribute(body: &[u8], want: u16) -> Option<&[u8]> {
    let mut off = 4;
    while off + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[off], body[off + 1]]));
        let kind = u16::from_ne_bytes([body[off + 2], body[off + 3]]) & 0x3fff;
        if len < 4 || off + len > body.len() {
            return None;
        }
        if kind == want {
            return Some(&body[off + 4..off + len]);
        }
        off += align4(len);
    }
    None
}

/// The packet id in an NFQNL_MSG_PACKET body (after the nfgenmsg header): the first four
/// bytes (big endian) of its packet header attribute.
fn packet_id(body: &[u8]) -> Option<u32> {
    let d = attribute(body, NFQA_PACKET_HDR)?;
    d.get(..4)
        .map(|id| u32::from_be_bytes([id[0], id[1], id[2], id[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_verdict_batch_and_parses_packet_ids() {
        let m = Msg::new(NFQNL_MSG_VERDICT_BATCH, 0, 7)
            .attr(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 42])
            .finish();
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[18..20], &7u16.to_be_bytes());

        // A packet message body: nfgenmsg, then an unrelated attribute, then the packet header.
        let mut body = vec![0, 0, 0, 7];
        body.extend_from_slice(&6u16.to_ne_bytes());
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&[1, 2, 0, 0]);
        body.extend_from_slice(&11u16.to_ne_bytes());
        body.extend_from_slice(&NFQA_PACKET_HDR.to_ne_bytes());
        body.extend_from_slice(&[0, 0, 1, 2, 8, 0, 3, 0]);
        assert_eq!(packet_id(&body), Some(258));
        assert_eq!(packet_id(&body[..10]), None);
        assert_eq!(packet_id(&[0, 0, 0, 7, 255, 255, 1, 0]), None);

        // The payload attribute after the header; absent in a metadata-only message.
        let mut with_payload = body.clone();
        with_payload.extend_from_slice(&7u16.to_ne_bytes());
        with_payload.extend_from_slice(&NFQA_PAYLOAD.to_ne_bytes());
        with_payload.extend_from_slice(&[0x45, 0, 9, 0]);
        assert_eq!(
            attribute(&with_payload, NFQA_PAYLOAD),
            Some(&[0x45, 0, 9][..])
        );
        assert_eq!(attribute(&body, NFQA_PAYLOAD), None);
        // A length running past the end is refused, not read.
        let mut bad = body.clone();
        bad.extend_from_slice(&200u16.to_ne_bytes());
        bad.extend_from_slice(&NFQA_PAYLOAD.to_ne_bytes());
        assert_eq!(attribute(&bad, NFQA_PAYLOAD), None);
    }
}
