//! Channel tests over real loopback TCP connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::frame::{self, Kind};
use crate::{connect, establish, Channel, ChannelError, Config, Role};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn cfg(key: &[u8], id: &str, role: Role) -> Config {
    let mut c = Config::new(key.to_vec(), id, role);
    c.heartbeat = Duration::from_millis(20);
    c.timeout = Duration::from_millis(400);
    c
}

/// Connects `a` (client) to `b` (server) through `via` if given.
async fn pair_at(
    listener: TcpListener,
    dial: SocketAddr,
    a: Config,
    b: Config,
) -> (Result<Channel, ChannelError>, Result<Channel, ChannelError>) {
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        establish(s, b).await
    });
    let client = connect(&dial.to_string(), a).await;
    let server = server.await.expect("server task");
    (client, server)
}

async fn pair(
    a: Config,
    b: Config,
) -> (Result<Channel, ChannelError>, Result<Channel, ChannelError>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    pair_at(l, addr, a, b).await
}

fn ok(r: Result<Channel, ChannelError>) -> Channel {
    r.expect("channel established")
}

#[tokio::test]
async fn data_flows_in_order_and_acks_come_back() {
    let (p, b) = pair(
        cfg(KEY, "redis-1", Role::Primary),
        cfg(KEY, "redis-1", Role::Backup),
    )
    .await;
    let (p, mut b) = (ok(p), ok(b));
    assert_eq!(p.peer().role, Role::Backup);
    let mut last = 0;
    for i in 0..200u32 {
        last = p.send(1, &i.to_le_bytes()).await.expect("send");
    }
    for i in 0..200u32 {
        let m = b.recv().await.expect("recv");
        assert_eq!((m.stream, m.payload), (1, i.to_le_bytes().to_vec()));
        if i == 199 {
            assert_eq!(m.seq, last);
            b.acknowledge(m.seq).await.expect("ack");
        }
    }
    tokio::time::timeout(Duration::from_secs(2), p.wait_acked(last))
        .await
        .expect("ack arrives")
        .expect("acked");
    assert_eq!(*p.acked().borrow(), last);
}

#[tokio::test]
async fn wrong_key_is_refused_on_both_sides() {
    let (p, b) = pair(
        cfg(KEY, "c", Role::Primary),
        cfg(b"another key, also 32 bytes long!", "c", Role::Backup),
    )
    .await;
    assert_eq!(p.expect_err("primary refuses"), ChannelError::AuthFailed);
    assert_eq!(b.expect_err("backup refuses"), ChannelError::AuthFailed);
}

#[tokio::test]
async fn other_protocol_version_is_refused_on_both_sides() {
    let mut newer = cfg(KEY, "c", Role::Backup);
    newer.version = crate::PROTOCOL_VERSION + 1;
    let (p, b) = pair(cfg(KEY, "c", Role::Primary), newer).await;
    let v = crate::PROTOCOL_VERSION;
    assert_eq!(
        p.expect_err("primary refuses"),
        ChannelError::VersionMismatch {
            ours: v,
            theirs: v + 1
        }
    );
    let e = b.expect_err("backup refuses");
    assert_eq!(
        e,
        ChannelError::VersionMismatch {
            ours: v + 1,
            theirs: v
        }
    );
    assert!(e.to_string().contains("same rrc version"), "{e}");
}

#[tokio::test]
async fn other_container_and_same_role_are_refused() {
    let (p, b) = pair(
        cfg(KEY, "redis-1", Role::Primary),
        cfg(KEY, "redis-2", Role::Backup),
    )
    .await;
    assert!(
        matches!(p, Err(ChannelError::WrongContainer { .. })),
        "{p:?}"
    );
    assert!(
        matches!(b, Err(ChannelError::WrongContainer { .. })),
        "{b:?}"
    );
    let (p, b) = pair(cfg(KEY, "c", Role::Primary), cfg(KEY, "c", Role::Primary)).await;
    assert_eq!(
        p.expect_err("refused"),
        ChannelError::SameRole(Role::Primary)
    );
    assert_eq!(
        b.expect_err("refused"),
        ChannelError::SameRole(Role::Primary)
    );
}

#[tokio::test]
async fn another_protocol_is_refused_and_told_why() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        establish(s, cfg(KEY, "c", Role::Backup)).await
    });
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let err = server.await.expect("task").expect_err("refused");
    assert!(
        matches!(err, ChannelError::Frame(frame::FrameError::BadMagic(_))),
        "{err}"
    );
    // The peer gets the server's Hello, then a Reject saying why.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut got)).await;
    let (hello, used) = frame::decode(&got).expect("frame").expect("complete");
    assert_eq!(hello.kind, Kind::Hello);
    let (reject, _) = frame::decode(&got[used..])
        .expect("frame")
        .expect("complete");
    assert_eq!(reject.kind, Kind::Reject);
    assert!(String::from_utf8_lossy(&reject.payload).contains("magic"));
}

/// A TCP relay between a client and a server that can corrupt or swallow traffic.
struct Relay {
    listener: TcpListener,
    addr: SocketAddr,
    corrupt_next: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
}

impl Relay {
    async fn new() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        Relay {
            listener,
            addr,
            corrupt_next: Arc::new(AtomicBool::new(false)),
            blackhole: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Relays the next client to `target`; client→server chunks may be corrupted.
    fn start(self, target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicBool>) {
        let (addr, corrupt, hole) = (self.addr, self.corrupt_next.clone(), self.blackhole.clone());
        let (c2, h2) = (corrupt.clone(), hole.clone());
        tokio::spawn(async move {
            let (client, _) = self.listener.accept().await.expect("accept");
            let server = TcpStream::connect(target).await.expect("connect");
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, Some(c2), h2.clone()));
            tokio::spawn(pump(sr, cw, None, h2));
        });
        (addr, corrupt, hole)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    corrupt: Option<Arc<AtomicBool>>,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if hole.load(Ordering::SeqCst) {
            continue;
        }
        if corrupt
            .as_ref()
            .is_some_and(|c| c.swap(false, Ordering::SeqCst))
        {
            // The last byte of a chunk belongs to a frame's checksum.
            buf[n - 1] ^= 0x5a;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn relayed_pair() -> (Channel, Channel, Arc<AtomicBool>, Arc<AtomicBool>) {
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = server.local_addr().expect("addr");
    let (dial, corrupt, hole) = Relay::new().await.start(target);
    let (p, b) = pair_at(
        server,
        dial,
        cfg(KEY, "c", Role::Primary),
        cfg(KEY, "c", Role::Backup),
    )
    .await;
    (ok(p), ok(b), corrupt, hole)
}

#[tokio::test]
async fn corrupt_frame_is_never_delivered_and_both_sides_learn_why() {
    let (p, mut b, corrupt, _) = relayed_pair().await;
    p.send(2, b"before").await.expect("send");
    assert_eq!(b.recv().await.expect("recv").payload, b"before");
    corrupt.store(true, Ordering::SeqCst);
    let _ = p.send(2, b"poisoned").await;
    let err = tokio::time::timeout(Duration::from_secs(2), b.recv())
        .await
        .expect("backup notices")
        .expect_err("nothing delivered after corruption");
    assert!(
        matches!(
            err,
            ChannelError::Frame(frame::FrameError::BadChecksum { .. })
        ),
        "{err}"
    );
    // The primary is told, through a Reject, and fails every later call.
    let mut p = p;
    let err = tokio::time::timeout(Duration::from_secs(2), p.recv())
        .await
        .expect("primary notices")
        .expect_err("closed");
    assert!(
        matches!(&err, ChannelError::Rejected(r) if r.contains("checksum")),
        "{err}"
    );
    assert!(p.send(2, b"after").await.is_err());
}

#[tokio::test]
async fn silent_peer_is_declared_dead() {
    let (mut p, mut b, _, hole) = relayed_pair().await;
    p.send(0, b"x").await.expect("send");
    b.recv().await.expect("recv");
    hole.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(3), p.recv())
        .await
        .expect("timeout detected")
        .expect_err("dead");
    assert!(matches!(err, ChannelError::PeerTimeout(_)), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let err = tokio::time::timeout(Duration::from_secs(3), b.recv())
        .await
        .expect("timeout detected")
        .expect_err("dead");
    assert!(matches!(err, ChannelError::PeerTimeout(_)), "{err}");
}

#[tokio::test]
async fn a_slow_consumer_does_not_take_its_peer_for_dead() {
    // The backup's queue fills while it is busy (longer than the 400 ms timeout); the
    // primary keeps sending. Neither side may declare the other dead.
    let (p, b) = pair(cfg(KEY, "c", Role::Primary), cfg(KEY, "c", Role::Backup)).await;
    let (p, mut b) = (Arc::new(ok(p)), ok(b));
    let sender = {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..200u32 {
                p.send(0, &i.to_le_bytes()).await?;
            }
            Ok::<(), ChannelError>(())
        })
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    for i in 0..200u32 {
        let m = tokio::time::timeout(Duration::from_secs(2), b.recv())
            .await
            .expect("a message")
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(m.payload, i.to_le_bytes());
        b.acknowledge(m.seq).await.expect("ack");
    }
    sender.await.expect("task").expect("all sent");
    assert!(b.error().is_none(), "{:?}", b.error());
    assert!(p.error().is_none(), "{:?}", p.error());
}

#[tokio::test]
async fn a_full_window_makes_the_sender_wait() {
    let mut pc = cfg(KEY, "c", Role::Primary);
    pc.window = 1000;
    let (p, b) = pair(pc, cfg(KEY, "c", Role::Backup)).await;
    let (p, mut b) = (Arc::new(ok(p)), ok(b));
    p.send(0, &[1; 600]).await.expect("first fits");
    let p2 = p.clone();
    let second = tokio::spawn(async move { p2.send(0, &[2; 600]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "600 + 600 bytes exceed the 1000-byte window"
    );
    let first = b.recv().await.expect("recv");
    b.acknowledge(first.seq).await.expect("ack");
    let seq = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("window opens")
        .expect("task")
        .expect("sent");
    assert_eq!(b.recv().await.expect("recv").seq, seq);
}

#[tokio::test]
async fn peer_closing_ends_the_channel() {
    let (p, b) = pair(cfg(KEY, "c", Role::Primary), cfg(KEY, "c", Role::Backup)).await;
    let (mut p, b) = (ok(p), ok(b));
    drop(b);
    let err = tokio::time::timeout(Duration::from_secs(2), p.recv())
        .await
        .expect("noticed")
        .expect_err("closed");
    assert!(
        matches!(err, ChannelError::Closed | ChannelError::Io(_)),
        "{err}"
    );
}

#[tokio::test]
async fn an_ack_just_before_close_still_counts() {
    for _ in 0..20 {
        let (p, b) = pair(cfg(KEY, "c", Role::Primary), cfg(KEY, "c", Role::Backup)).await;
        let (p, mut b) = (ok(p), ok(b));
        let seq = p.send(0, b"last").await.expect("send");
        let m = b.recv().await.expect("recv");
        b.acknowledge(m.seq).await.expect("ack");
        drop(b);
        tokio::time::timeout(Duration::from_secs(2), p.wait_acked(seq))
            .await
            .expect("answered")
            .expect("the ack counts although the peer closed right after");
    }
}
