//! An established replication channel over one TCP connection.
//!
//! After the handshake, three tasks serve the connection: a writer (frames go out in sequence
//! order), a reader (checks every frame's checksum and sequence number, hands data to the
//! application, applies acknowledgements) and a heartbeat (sends one every `heartbeat`, and
//! declares the peer dead after `timeout` of silence). The first error closes the channel; every
//! later call returns it. A frame that fails a check is never delivered, and the peer is told why
//! with a `Reject` before the connection closes.
//!
//! Flow control: data frames count against a window of unacknowledged bytes; [`Channel::send`]
//! waits while the window is full (backpressure, no unbounded buffering). The receiver
//! acknowledges cumulatively with [`Channel::acknowledge`] once it has made the data safe.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Mutex, Notify};
use tokio::task::JoinHandle;

use crate::frame::{self, Frame, FrameError, Kind};
use crate::handshake::{
    decode_reject, encode_reject, proof, verify, Hello, RejectCode, Role, NONCE_LEN,
    PROTOCOL_VERSION,
};

/// Settings of one side.
#[derive(Clone)]
pub struct Config {
    /// The key shared by primary and backup.
    pub key: Vec<u8>,
    /// The replicated container's identity; both sides must agree.
    pub container_id: String,
    /// This side's role.
    pub role: Role,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which the peer is declared dead.
    pub timeout: Duration,
    /// Unacknowledged data bytes allowed in flight.
    pub window: usize,
    /// Protocol version announced (tests use another to check refusals).
    pub version: u16,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("key", &"<redacted>")
            .field("container_id", &self.container_id)
            .field("role", &self.role)
            .field("heartbeat", &self.heartbeat)
            .field("timeout", &self.timeout)
            .field("window", &self.window)
            .finish()
    }
}

impl Config {
    /// Defaults for everything but the key, container and role.
    pub fn new(key: Vec<u8>, container_id: &str, role: Role) -> Config {
        Config {
            key,
            container_id: container_id.to_string(),
            role,
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            window: 64 * 1024 * 1024,
            version: PROTOCOL_VERSION,
        }
    }
}

/// Everything that ends a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}; run the same rrc version on primary and backup")]
    VersionMismatch {
        /// This side's version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer did not prove knowledge of the shared key.
    #[error("authentication failed: the peer does not hold the same key (check auth-key-file on both sides)")]
    AuthFailed,
    /// The peer replicates another container.
    #[error("container mismatch: this side replicates {ours:?}, the peer {theirs:?}")]
    WrongContainer {
        /// This side's container.
        ours: String,
        /// The peer's container.
        theirs: String,
    },
    /// Both sides have the same role.
    #[error("both sides are {0:?}: a pair needs one primary and one backup")]
    SameRole(Role),
    /// The peer refused the connection.
    #[error("the peer refused the connection: {0}")]
    Rejected(String),
    /// A corrupt or malformed frame arrived.
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    /// A frame out of sequence: lost, duplicated or replayed.
    #[error("frame out of sequence: expected {expected}, got {got}")]
    OutOfOrder {
        /// The sequence number due.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A frame that makes no sense here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Nothing heard from the peer for too long.
    #[error("peer silent for {0:?}: presumed dead")]
    PeerTimeout(Duration),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// An I/O error on the connection.
    #[error("connection error: {0}")]
    Io(String),
    /// The handshake did not complete in time.
    #[error("handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
}

impl From<std::io::Error> for ChannelError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ChannelError::Closed
        } else {
            ChannelError::Io(e.to_string())
        }
    }
}

/// What the handshake learned about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its role.
    pub role: Role,
    /// Its protocol version.
    pub version: u16,
    /// Its address.
    pub addr: Option<std::net::SocketAddr>,
}

/// Data received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Frame sequence number, for [`Channel::acknowledge`].
    pub seq: u64,
    /// The application's stream byte.
    pub stream: u8,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Frame reader with its sequence check.
struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    next_seq: u64,
}

impl Reader {
    async fn next(&mut self) -> Result<Frame, ChannelError> {
        loop {
            if let Some((frame, used)) = frame::decode(&self.buf)? {
                self.buf.drain(..used);
                if frame.seq != self.next_seq {
                    return Err(ChannelError::OutOfOrder {
                        expected: self.next_seq,
                        got: frame.seq,
                    });
                }
                self.next_seq += 1;
                return Ok(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.half.read(&mut chunk).await?;
            if n == 0 {
                return Err(ChannelError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Frame writer with its sequence counter (used directly during the handshake).
struct Writer {
    half: OwnedWriteHalf,
    next_seq: u64,
}

impl Writer {
    async fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<u64, ChannelError> {
        let seq = self.next_seq;
        let bytes = frame::encode(kind, seq, payload)?;
        self.half.write_all(&bytes).await?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Best effort: tell the peer why, then give the error back.
    async fn reject(&mut self, code: RejectCode, err: ChannelError) -> ChannelError {
        let _ = self
            .send(Kind::Reject, &encode_reject(code, &err.to_string()))
            .await;
        let _ = self.half.shutdown().await;
        err
    }
}

/// Expects a frame of `kind`; a Reject becomes [`ChannelError::Rejected`].
async fn expect(r: &mut Reader, w: &mut Writer, kind: Kind) -> Result<Frame, ChannelError> {
    let f = match r.next().await {
        Ok(f) => f,
        Err(e @ (ChannelError::Frame(_) | ChannelError::OutOfOrder { .. })) => {
            return Err(w.reject(RejectCode::Protocol, e).await)
        }
        Err(e) => return Err(e),
    };
    match f.kind {
        k if k == kind => Ok(f),
        Kind::Reject => Err(ChannelError::Rejected(decode_reject(&f.payload))),
        other => {
            let e = ChannelError::Protocol(format!("expected {kind:?}, got {other:?}"));
            Err(w.reject(RejectCode::Protocol, e).await)
        }
    }
}

async fn handshake_inner(
    r: &mut Reader,
    w: &mut Writer,
    cfg: &Config,
) -> Result<Peer, ChannelError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| ChannelError::Io(format!("no randomness: {e}")))?;
    let hello = Hello {
        version: cfg.version,
        role: cfg.role,
        nonce,
        container_id: cfg.container_id.clone(),
    };
    w.send(Kind::Hello, &hello.encode()).await?;
    let f = expect(r, w, Kind::Hello).await?;
    let theirs = Hello::peek_version(&f.payload).unwrap_or(0);
    if theirs != cfg.version {
        let e = ChannelError::VersionMismatch {
            ours: cfg.version,
            theirs,
        };
        return Err(w.reject(RejectCode::Version, e).await);
    }
    let peer = match Hello::decode(&f.payload) {
        Ok(h) => h,
        Err(e) => {
            return Err(w
                .reject(RejectCode::Protocol, ChannelError::Protocol(e.to_string()))
                .await)
        }
    };
    if peer.container_id != cfg.container_id {
        let e = ChannelError::WrongContainer {
            ours: cfg.container_id.clone(),
            theirs: peer.container_id,
        };
        return Err(w.reject(RejectCode::Container, e).await);
    }
    if peer.role == cfg.role {
        return Err(w
            .reject(RejectCode::Role, ChannelError::SameRole(cfg.role))
            .await);
    }
    let mine = proof(&cfg.key, cfg.role, &cfg.container_id, &nonce, &peer.nonce);
    w.send(Kind::Proof, &mine).await?;
    let f = expect(r, w, Kind::Proof).await?;
    if !verify(
        &cfg.key,
        peer.role,
        &cfg.container_id,
        &peer.nonce,
        &nonce,
        &f.payload,
    ) {
        return Err(w.reject(RejectCode::Auth, ChannelError::AuthFailed).await);
    }
    w.send(Kind::Accept, &[]).await?;
    expect(r, w, Kind::Accept).await?;
    Ok(Peer {
        role: peer.role,
        version: theirs,
        addr: None,
    })
}

struct SendState {
    /// (sequence number, payload bytes) of data frames not yet acknowledged.
    unacked: VecDeque<(u64, usize)>,
    unacked_bytes: usize,
}

struct Shared {
    writer: Mutex<Writer>,
    state: StdMutex<SendState>,
    window_opened: Notify,
    acked: watch::Sender<u64>,
    error: StdMutex<Option<ChannelError>>,
    closed: watch::Sender<bool>,
    last_heard: StdMutex<Instant>,
}

impl Shared {
    /// Records the first error and closes the channel.
    fn fail(&self, e: ChannelError) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                tracing::warn!("replication channel closed: {e}");
                *slot = Some(e);
            }
        }
        let _ = self.closed.send(true);
        self.window_opened.notify_waiters();
    }

    fn error(&self) -> Option<ChannelError> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    async fn send_frame(&self, kind: Kind, payload: &[u8]) -> Result<u64, ChannelError> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let mut w = self.writer.lock().await;
        self.write(&mut w, kind, payload).await
    }

    /// Writes one frame, unless the channel closes first: a peer that went silent (a
    /// partition) stops reading, the socket's buffer fills, and the write would otherwise wait
    /// for TCP to give up, minutes after the peer was declared dead.
    async fn write(&self, w: &mut Writer, kind: Kind, payload: &[u8]) -> Result<u64, ChannelError> {
        let mut closed = self.closed.subscribe();
        let written = tokio::select! {
            r = w.send(kind, payload) => r,
            _ = closed.wait_for(|c| *c) => {
                return Err(self.error().unwrap_or(ChannelError::Closed));
            }
        };
        written.inspect_err(|e| self.fail(e.clone()))
    }
}

/// An established, authenticated channel. Dropping it closes the connection.
pub struct Channel {
    shared: Arc<Shared>,
    window: usize,
    incoming: mpsc::Receiver<Incoming>,
    peer: Peer,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("peer", &self.peer).finish()
    }
}

/// Runs the handshake on a connected stream and starts the channel.
pub async fn establish(stream: TcpStream, cfg: Config) -> Result<Channel, ChannelError> {
    let addr = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let (rh, wh) = stream.into_split();
    let mut reader = Reader {
        half: rh,
        buf: Vec::new(),
        next_seq: 1,
    };
    let mut writer = Writer {
        half: wh,
        next_seq: 1,
    };
    let limit = cfg.timeout.max(Duration::from_secs(5));
    let mut peer = tokio::time::timeout(limit, handshake_inner(&mut reader, &mut writer, &cfg))
        .await
        .map_err(|_| ChannelError::HandshakeTimeout(limit))??;
    peer.addr = addr;

    let (acked, _) = watch::channel(0);
    let (closed, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        writer: Mutex::new(writer),
        state: StdMutex::new(SendState {
            unacked: VecDeque::new(),
            unacked_bytes: 0,
        }),
        window_opened: Notify::new(),
        acked,
        error: StdMutex::new(None),
        closed,
        last_heard: StdMutex::new(Instant::now()),
    });
    let (tx, rx) = mpsc::channel(64);
    let tasks = vec![
        tokio::spawn(read_loop(reader, shared.clone(), tx)),
        tokio::spawn(heartbeat_loop(shared.clone(), cfg.heartbeat, cfg.timeout)),
    ];
    Ok(Channel {
        shared,
        window: cfg.window,
        incoming: rx,
        peer,
        tasks,
    })
}

/// Connects to a backup and runs the handshake.
pub async fn connect(addr: &str, cfg: Config) -> Result<Channel, ChannelError> {
    let stream = TcpStream::connect(addr).await?;
    establish(stream, cfg).await
}

/// How often a reader blocked on a full incoming queue notes the peer as alive.
const LIVENESS_TICK: Duration = Duration::from_millis(10);

async fn read_loop(mut r: Reader, shared: Arc<Shared>, tx: mpsc::Sender<Incoming>) {
    let mut closed = shared.closed.subscribe();
    loop {
        let f = tokio::select! {
            f = r.next() => f,
            _ = closed.wait_for(|c| *c) => return,
        };
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                if matches!(e, ChannelError::Frame(_) | ChannelError::OutOfOrder { .. }) {
                    let _ = shared
                        .send_frame(
                            Kind::Reject,
                            &encode_reject(RejectCode::Protocol, &e.to_string()),
                        )
                        .await;
                }
                shared.fail(e);
                return;
            }
        };
        if let Ok(mut t) = shared.last_heard.lock() {
            *t = Instant::now();
        }
        match f.kind {
            Kind::Heartbeat => {}
            Kind::Ack => {
                let Some(upto) = f.payload.get(..8).and_then(|b| b.try_into().ok()) else {
                    shared.fail(ChannelError::Protocol("short ack".into()));
                    return;
                };
                let upto = u64::from_le_bytes(upto);
                if let Ok(mut st) = shared.state.lock() {
                    while st.unacked.front().is_some_and(|(s, _)| *s <= upto) {
                        if let Some((_, n)) = st.unacked.pop_front() {
                            st.unacked_bytes -= n;
                        }
                    }
                }
                shared.acked.send_if_modified(|a| {
                    let grew = upto > *a;
                    if grew {
                        *a = upto;
                    }
                    grew
                });
                shared.window_opened.notify_waiters();
            }
            Kind::Data => {
                let Some((&stream, payload)) = f.payload.split_first() else {
                    shared.fail(ChannelError::Protocol("empty data frame".into()));
                    return;
                };
                let msg = Incoming {
                    seq: f.seq,
                    stream,
                    payload: payload.to_vec(),
                };
                // A full queue stops reading: TCP then pushes back on the sender. Meanwhile the
                // peer is not silent, this side is slow: the liveness clock keeps running, or
                // a consumer busy longer than the timeout (a large checkpoint being applied)
                // would declare a live peer dead. A peer that dies meanwhile is declared dead
                // once the queue drains and the frames it sent before dying are read.
                let permit = loop {
                    tokio::select! {
                        p = tx.reserve() => break p,
                        _ = tokio::time::sleep(LIVENESS_TICK) => {
                            if let Ok(mut t) = shared.last_heard.lock() {
                                *t = Instant::now();
                            }
                        }
                        _ = closed.wait_for(|c| *c) => return,
                    }
                };
                match permit {
                    Ok(p) => p.send(msg),
                    Err(_) => return,
                }
            }
            Kind::Reject => {
                shared.fail(ChannelError::Rejected(decode_reject(&f.payload)));
                return;
            }
            other => {
                shared.fail(ChannelError::Protocol(format!(
                    "unexpected {other:?} after the handshake"
                )));
                return;
            }
        }
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, every: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(every);
    let mut closed = shared.closed.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = closed.wait_for(|c| *c) => return,
        }
        let silent = shared
            .last_heard
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        if silent > timeout {
            shared.fail(ChannelError::PeerTimeout(silent));
            return;
        }
        if shared.send_frame(Kind::Heartbeat, &[]).await.is_err() {
            return;
        }
    }
}

impl Channel {
    /// The peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Sends `payload` on application stream `stream`; waits while the window of
    /// unacknowledged bytes is full (a frame larger than the window goes alone; concurrent
    /// senders may each overshoot by one frame). Returns the frame's sequence number.
    pub async fn send(&self, stream: u8, payload: &[u8]) -> Result<u64, ChannelError> {
        let len = payload.len();
        if len + 1 > frame::MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len).into());
        }
        let window = self.window;
        loop {
            let opened = self.shared.window_opened.notified();
            if let Some(e) = self.shared.error() {
                return Err(e);
            }
            let fits = self
                .shared
                .state
                .lock()
                .map(|st| st.unacked_bytes == 0 || st.unacked_bytes + len <= window)
                .unwrap_or(false);
            if fits {
                break;
            }
            opened.await;
        }
        let mut body = Vec::with_capacity(len + 1);
        body.push(stream);
        body.extend_from_slice(payload);
        // Hold the writer while recording the frame, so acks never race the bookkeeping.
        let mut w = self.shared.writer.lock().await;
        if let Some(e) = self.shared.error() {
            return Err(e);
        }
        let seq = w.next_seq;
        if let Ok(mut st) = self.shared.state.lock() {
            st.unacked.push_back((seq, len));
            st.unacked_bytes += len;
        }
        self.shared.write(&mut w, Kind::Data, &body).await
    }

    /// The next data from the peer; the channel's error once it is closed.
    pub async fn recv(&mut self) -> Result<Incoming, ChannelError> {
        match self.incoming.recv().await {
            Some(m) => Ok(m),
            None => Err(self.shared.error().unwrap_or(ChannelError::Closed)),
        }
    }

    /// Tells the peer that every data frame up to `seq` is safe on this side.
    pub async fn acknowledge(&self, seq: u64) -> Result<(), ChannelError> {
        self.shared
            .send_frame(Kind::Ack, &seq.to_le_bytes())
            .await
            .map(|_| ())
    }

    /// The highest sequence number the peer has acknowledged, as it changes.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.shared.acked.subscribe()
    }

    /// Waits until the peer has acknowledged `seq` (or the channel fails).
    pub async fn wait_acked(&self, seq: u64) -> Result<(), ChannelError> {
        let mut acked = self.acked();
        let mut closed = self.shared.closed.subscribe();
        tokio::select! {
            biased;
            r = acked.wait_for(|a| *a >= seq) => r.map(|_| ()).map_err(|_| ChannelError::Closed),
            _ = closed.wait_for(|c| *c) => {
                // An acknowledgement that arrived just before the peer closed still counts.
                if *self.shared.acked.borrow() >= seq {
                    Ok(())
                } else {
                    Err(self.shared.error().unwrap_or(ChannelError::Closed))
                }
            }
        }
    }

    /// The error that closed the channel, if it is closed.
    pub fn error(&self) -> Option<ChannelError> {
        self.shared.error()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let _ = self.shared.closed.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}
