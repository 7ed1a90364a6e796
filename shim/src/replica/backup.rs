//! The backup's side of passive mode.
//!
//! A backup container does not run its application. Create mounts its rootfs and prepares the
//! bundle; Start launches a standby process (the task's pid while it waits, so `ctr task ls`
//! shows it RUNNING) and this loop: listen for the primary, check it (the channel's handshake:
//! version, key, container id), keep its committed checkpoints, and acknowledge each one once
//! committed.
//!
//! When the primary goes silent past `failover-timeout-ms` (or its connection ends without a
//! goodbye and it does not come back within that time), the backup fails over:
//!
//! 1. drops every packet entering or leaving the container's network namespace, removes rules
//!    and destroys TCP sockets a killed container left there (they would block the restore);
//! 2. puts the primary's service addresses on its interfaces;
//! 3. restores the last committed checkpoint (`runc restore`, established TCP connections
//!    included), the container's streams on new pipes copied to containerd's FIFOs or log;
//! 4. lets packets in again and announces the addresses (gratuitous ARP);
//! 5. makes the restored init the task's pid (the standby exits unreported) and publishes
//!    TaskStart with it.
//!
//! The status file records each phase's duration.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use containerd_shim::protos::events::task::TaskStart;
use rrc_channel::{Channel, ChannelError, Role as ChannelRole};
use rrc_checkpoint::{Piece, RestoreOptions, RestoreStdio, Store};
use rrc_config::Mode;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

use super::net::{self, ServiceAddr};
use super::primary::ms;
use super::wire::{decode_log, Control, LogCut, STREAM_CHECKPOINT, STREAM_CONTROL, STREAM_LOG};
use super::{channel_config, checkpointer, ReplicaCtx, ReplicaHandle, StatusFile, STORE_DIR};
use crate::container::Container;
use crate::io::{replica_streams, Stdio};
use crate::status::{FailoverRecord, Role, State};
use crate::task::{send_event, EventSender};

/// What the backup's loop needs.
pub struct BackupCtx {
    /// The container.
    pub replica: ReplicaCtx,
    /// The init's streams as containerd gave them.
    pub stdio: Stdio,
    /// The shim's containers, to adopt the restored init.
    pub containers: Arc<Mutex<HashMap<String, Container>>>,
    /// containerd's event queue.
    pub events: EventSender,
}

impl std::ops::Deref for BackupCtx {
    type Target = ReplicaCtx;

    fn deref(&self) -> &ReplicaCtx {
        &self.replica
    }
}

/// Starts the standby process: the task's pid until a failover. It runs this binary's
/// `standby` subcommand, which waits for a signal.
pub fn spawn_standby() -> containerd_shim::Result<i32> {
    let exe = std::env::current_exe()
        .map_err(|e| containerd_shim::Error::Other(format!("find own binary: {e}")))?;
    let child = std::process::Command::new(exe)
        .arg("standby")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| containerd_shim::Error::Other(format!("start the standby process: {e}")))?;
    // The shim's reaper collects its exit.
    i32::try_from(child.id())
        .map_err(|_| containerd_shim::Error::Other("standby pid out of range".into()))
}

/// Listens for the primary. Fails (nothing started) if the listen address cannot be bound.
pub async fn start(ctx: BackupCtx) -> containerd_shim::Result<ReplicaHandle> {
    let listen = ctx
        .config
        .listen
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| format!("0.0.0.0:{}", rrc_config::DEFAULT_LISTEN_PORT));
    let listener = TcpListener::bind(&listen).await.map_err(|e| {
        containerd_shim::Error::Other(format!(
            "rrc: the backup cannot listen on {listen} (io.containerd.rrc.listen): {e}"
        ))
    })?;
    let store = Store::open(&ctx.bundle.join(STORE_DIR))
        .map_err(|e| containerd_shim::Error::Other(format!("rrc: checkpoint store: {e}")))?;
    tracing::info!(id = %ctx.id, "backup listening on {listen}");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(run(ctx, listener, store, rx, listen));
    Ok(ReplicaHandle::new(tx, task))
}

/// Hybrid mode: the event log received from the primary, in
/// [`super::hybrid::RECEIVED_LOG_FILE`] in the bundle, at the same offsets as in the primary's
/// log (a sparse file), acknowledged once written.
///
/// Each pairing starts afresh: the primary sends its log from the cut of the checkpoint it
/// takes at pairing (a segment header). Every byte is decoded as it arrives (rrc-eventlog's
/// streaming decoder: framing, checksums, dense sequence numbers): a log that does not decode
/// is refused with where and why, and the bytes are not acknowledged. Once a checkpoint is
/// committed, every byte before its cut is dropped (a hole is punched): replay needs only the
/// log from the last committed checkpoint on.
struct ReceivedLog {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    /// The first offset still held.
    base: u64,
    /// The offset after the last byte stored.
    len: u64,
    /// Bytes before this offset are not needed (a committed checkpoint's cut).
    keep_from: u64,
    decoder: rrc_eventlog::Decoder,
}

impl ReceivedLog {
    fn new(bundle: &std::path::Path) -> ReceivedLog {
        ReceivedLog {
            path: bundle.join(super::hybrid::RECEIVED_LOG_FILE),
            file: None,
            base: 0,
            len: 0,
            keep_from: 0,
            decoder: rrc_eventlog::Decoder::new(),
        }
    }

    /// A new pairing: the next log message starts a new log.
    fn reset(&mut self) {
        self.file = None;
        self.base = 0;
        self.len = 0;
        self.keep_from = 0;
        self.decoder = rrc_eventlog::Decoder::new();
    }

    /// Appends `bytes`, which start at `offset` of the primary's log.
    fn append(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        if self.file.is_none() {
            let f = std::fs::File::create(&self.path)
                .map_err(|e| format!("cannot create {}: {e}", self.path.display()))?;
            self.file = Some(f);
            self.base = offset;
            self.len = offset;
            self.keep_from = offset;
        }
        if offset != self.len {
            return Err(format!(
                "protocol error: log bytes at offset {offset}, but the log stored ends at {}: \
                 it would have a gap or an overlap",
                self.len
            ));
        }
        self.decoder.push(bytes);
        loop {
            match self.decoder.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "the primary's log does not decode after byte {} of this pairing's log \
                         ({e}); it is not stored or acknowledged: the primary's recorder or the \
                         transfer is at fault",
                        self.decoder.offset()
                    ))
                }
            }
        }
        if let Some(f) = self.file.as_ref() {
            f.write_all_at(bytes, offset)
                .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        }
        self.len += bytes.len() as u64;
        self.drop_unneeded();
        Ok(())
    }

    /// A checkpoint whose cut is at `offset` is committed: drop what is before it.
    fn committed_cut(&mut self, offset: u64) {
        self.keep_from = self.keep_from.max(offset);
        self.drop_unneeded();
    }

    fn drop_unneeded(&mut self) {
        let upto = self.keep_from.min(self.len);
        if upto <= self.base {
            return;
        }
        if let Some(f) = self.file.as_ref() {
            if let Err(e) = super::punch_hole(f, self.base, upto - self.base) {
                tracing::warn!(
                    "dropping the log before {upto} in {}: {e}",
                    self.path.display()
                );
                return;
            }
        }
        self.base = upto;
    }
}

/// How a session with a primary ended.
enum SessionEnd {
    /// It said goodbye.
    Goodbye(String),
    /// It went silent for the failover timeout.
    Silent(String),
    /// Its connection ended, or it sent something wrong.
    Broken(String),
}

async fn run(
    ctx: BackupCtx,
    listener: TcpListener,
    mut store: Store,
    mut stop: watch::Receiver<bool>,
    listen: String,
) {
    let mut status = StatusFile::new(&ctx.bundle, &ctx.id, &ctx.namespace, Role::Backup, None);
    status.set(
        State::Standby,
        Some(format!("waiting for a primary on {listen}")),
    );
    let mut addresses: Vec<ServiceAddr> = Vec::new();
    let mut instance: Option<u64> = None;
    let mut log = ReceivedLog::new(&ctx.bundle);
    // Set when a primary we hold a checkpoint of was lost: fail over at this instant unless it
    // comes back.
    let mut deadline: Option<(Instant, Instant, String)> = None;
    loop {
        let accept = tokio::select! {
            r = listener.accept() => Some(r),
            _ = sleep_until(deadline.as_ref().map(|d| d.1)) => None,
            _ = stop.changed() => return,
        };
        let (stream, from) = match accept {
            None => {
                let Some((lost_at, _, why)) = deadline.take() else {
                    continue;
                };
                failover(&ctx, &store, &addresses, lost_at, &why, &mut status).await;
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(id = %ctx.id, "accept: {e}");
                continue;
            }
            Some(Ok(s)) => s,
        };
        let cfg = channel_config(&ctx.setup, &ctx.config, &ctx.id, ChannelRole::Backup);
        let mut ch = match rrc_channel::establish(stream, cfg).await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::error!(id = %ctx.id, "refused a primary at {from}: {e}");
                continue;
            }
        };
        tracing::info!(id = %ctx.id, "paired with the primary at {from}");
        status.status.peer = Some(from.to_string());
        status.set(
            State::Standby,
            Some("paired; waiting for the first checkpoint".into()),
        );
        let end = tokio::select! {
            e = session(&mut ch, &mut store, &mut log, &mut addresses, &mut instance, &mut status, &ctx) => e,
            _ = stop.changed() => return,
        };
        store.abandon();
        drop(ch);
        match end {
            SessionEnd::Goodbye(reason) => {
                tracing::info!(id = %ctx.id, "the primary stopped ({reason}); not taking over");
                deadline = None;
                status.set(
                    State::Standby,
                    Some(format!("the primary stopped: {reason}")),
                );
            }
            SessionEnd::Silent(why) | SessionEnd::Broken(why)
                if ctx.config.mode == Mode::Hybrid =>
            {
                let held = match store.committed() {
                    Some((epoch, dir)) => format!(
                        "checkpoint {epoch} ({}) and the log after its cut (bytes {} to {} of {})",
                        dir.display(),
                        log.base,
                        log.len,
                        log.path.display()
                    ),
                    None => format!(
                        "no committed checkpoint, and log bytes {} to {} of {}",
                        log.base,
                        log.len,
                        log.path.display()
                    ),
                };
                let msg = format!(
                    "lost the primary ({why}). NOT TAKING OVER: hybrid mode fails over by \
                     replaying the log on a checkpoint, and this build has no replayer yet; \
                     restoring without it would lose what the primary acknowledged. Kept: \
                     {held}; waiting for the primary to come back"
                );
                tracing::error!(id = %ctx.id, "{msg}");
                deadline = None;
                status.set(State::Failed, Some(msg));
            }
            SessionEnd::Silent(why) | SessionEnd::Broken(why) if store.committed().is_none() => {
                tracing::warn!(id = %ctx.id, "lost the primary before its first checkpoint committed ({why}); nothing to take over");
                status.set(
                    State::Standby,
                    Some(format!("lost the primary before a checkpoint: {why}")),
                );
            }
            SessionEnd::Silent(why) => {
                // The channel already waited the failover timeout.
                let now = Instant::now();
                let lost_at = now.checked_sub(ctx.config.failover_timeout).unwrap_or(now);
                failover(&ctx, &store, &addresses, lost_at, &why, &mut status).await;
                return;
            }
            SessionEnd::Broken(why) => {
                let now = Instant::now();
                tracing::warn!(id = %ctx.id, "lost the primary ({why}); taking over in {:?} unless it comes back", ctx.config.failover_timeout);
                deadline = Some((now, now + ctx.config.failover_timeout, why));
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    ch: &mut Channel,
    store: &mut Store,
    log: &mut ReceivedLog,
    addresses: &mut Vec<ServiceAddr>,
    instance: &mut Option<u64>,
    status: &mut StatusFile,
    ctx: &BackupCtx,
) -> SessionEnd {
    loop {
        let inc = match ch.recv().await {
            Ok(i) => i,
            Err(ChannelError::PeerTimeout(d)) => {
                return SessionEnd::Silent(format!("nothing heard from the primary for {d:?}"))
            }
            Err(e) => return SessionEnd::Broken(e.to_string()),
        };
        match inc.stream {
            STREAM_CONTROL => match Control::decode(&inc.payload) {
                Ok(Control::Pair {
                    addresses: a,
                    instance: i,
                    mode,
                    ..
                }) => {
                    let ours = ctx.config.mode.as_str();
                    if mode != ours {
                        let msg = format!(
                            "refused the primary: it runs mode {mode}, this backup mode {ours}; \
                             set the same io.containerd.rrc.mode on both sides"
                        );
                        tracing::error!(id = %ctx.id, "{msg}");
                        status.set(State::Failed, Some(msg.clone()));
                        return SessionEnd::Goodbye(msg);
                    }
                    if instance.is_some_and(|old| old != i) {
                        // A new run of the primary: its epochs start again.
                        tracing::info!(id = %ctx.id, "a new primary instance; dropping the previous one's checkpoint");
                        let root = ctx.bundle.join(STORE_DIR);
                        let _ = std::fs::remove_dir_all(&root);
                        match Store::open(&root) {
                            Ok(s) => *store = s,
                            Err(e) => return SessionEnd::Broken(format!("checkpoint store: {e}")),
                        }
                        status.status.last_committed_epoch = None;
                    }
                    *instance = Some(i);
                    *addresses = a;
                    // The primary sends its log afresh, from the cut of its next checkpoint.
                    log.reset();
                    if let Err(e) = ch.acknowledge(inc.seq).await {
                        return SessionEnd::Broken(e.to_string());
                    }
                }
                Ok(Control::Goodbye { reason }) => {
                    let _ = ch.acknowledge(inc.seq).await;
                    return SessionEnd::Goodbye(reason);
                }
                Err(e) => return SessionEnd::Broken(e),
            },
            STREAM_CHECKPOINT => {
                let applied = Piece::decode(&inc.payload).and_then(|p| store.apply(p));
                match applied {
                    Ok(None) => {}
                    Ok(Some(epoch)) => {
                        // The writable layer the checkpoint carries goes onto the rootfs
                        // before the commit is acknowledged.
                        if let Some((_, dir)) = store.committed() {
                            let rootfs = ctx.bundle.join("rootfs");
                            if let Err(e) = super::fs::apply_committed(&dir, &rootfs) {
                                tracing::error!(id = %ctx.id, epoch, "{e}");
                                return SessionEnd::Broken(e);
                            }
                            if ctx.config.mode == Mode::Hybrid {
                                match LogCut::read(&dir) {
                                    Ok(Some(cut)) => {
                                        log.committed_cut(cut.offset);
                                        let figures = status
                                            .status
                                            .log
                                            .get_or_insert_with(crate::status::LogFigures::default);
                                        figures.kept_from = log.base;
                                    }
                                    Ok(None) => {
                                        let e = format!(
                                            "checkpoint {epoch} of a hybrid primary names no log cut ({})",
                                            super::wire::CUT_FILE
                                        );
                                        tracing::error!(id = %ctx.id, "{e}");
                                        return SessionEnd::Broken(e);
                                    }
                                    Err(e) => {
                                        tracing::error!(id = %ctx.id, epoch, "{e}");
                                        return SessionEnd::Broken(e);
                                    }
                                }
                            }
                        }
                        if let Err(e) = ch.acknowledge(inc.seq).await {
                            return SessionEnd::Broken(e.to_string());
                        }
                        status.status.checkpoints += 1;
                        status.status.last_committed_epoch = Some(epoch);
                        status.set(State::InSync, None);
                    }
                    Err(e) => {
                        tracing::error!(id = %ctx.id, "refused a checkpoint from the primary: {e}");
                        return SessionEnd::Broken(format!("refused a checkpoint: {e}"));
                    }
                }
            }
            STREAM_LOG if ctx.config.mode == Mode::Hybrid => {
                let stored = decode_log(&inc.payload).and_then(|(off, b)| log.append(off, b));
                if let Err(e) = stored {
                    tracing::error!(id = %ctx.id, "refused the primary's log: {e}");
                    return SessionEnd::Broken(format!("refused the log: {e}"));
                }
                if let Err(e) = ch.acknowledge(inc.seq).await {
                    return SessionEnd::Broken(e.to_string());
                }
                let figures = status
                    .status
                    .log
                    .get_or_insert_with(crate::status::LogFigures::default);
                let first = figures.bytes == 0;
                figures.bytes = log.len;
                figures.kept_from = log.base;
                if first || status.status.state != State::InSync {
                    status.status.mode = ctx.config.mode.as_str().to_string();
                    status.set(State::InSync, Some("holding the primary's log".into()));
                } else if crate::status::unix_ms_now()
                    > status.status.updated_unix_ms.saturating_add(1000)
                {
                    status.save();
                }
            }
            other => {
                return SessionEnd::Broken(format!(
                    "protocol error: data on unknown stream {other}"
                ))
            }
        }
    }
}

async fn failover(
    ctx: &BackupCtx,
    store: &Store,
    addresses: &[ServiceAddr],
    lost_at: Instant,
    why: &str,
    status: &mut StatusFile,
) {
    let started = Instant::now();
    let detection = started.saturating_duration_since(lost_at);
    let Some((epoch, dir)) = store.committed() else {
        return;
    };
    tracing::warn!(id = %ctx.id, epoch, "the primary is gone ({why}): taking over from checkpoint {epoch}");
    status.set(
        State::FailingOver,
        Some(format!("the primary is gone: {why}")),
    );
    let mut record = FailoverRecord {
        at_unix_ms: crate::status::unix_ms_now(),
        from_epoch: Some(epoch),
        detection_ms: ms(detection),
        restore_ms: 0.0,
        network_ms: 0.0,
        total_ms: 0.0,
        outcome: String::new(),
    };
    match take_over(ctx, &dir, addresses, &mut record).await {
        Ok(pid) => {
            record.total_ms = ms(started.elapsed()) + record.detection_ms;
            record.outcome = "live".into();
            tracing::info!(id = %ctx.id, pid, "live: restored checkpoint {epoch} in {:.0} ms (detection {:.0} ms)", ms(started.elapsed()), record.detection_ms);
            status.status.record_failover(record);
            status.status.role = Role::Primary;
            let Some(peer) = ctx.config.peer.as_ref() else {
                status.set(
                    State::Live,
                    Some(format!("took over from checkpoint {epoch}; no peer configured for a new backup (io.containerd.rrc.peer): UNPROTECTED")),
                );
                return;
            };
            status.set(
                State::Live,
                Some(format!(
                    "took over from checkpoint {epoch}; replicating to a new backup at {peer}"
                )),
            );
            // The new primary replicates in turn, to a backup started at its peer address.
            match super::primary::start(ctx.replica.clone()).await {
                Ok(handle) => {
                    let mut containers = ctx.containers.lock().await;
                    if let Some(r) = containers.get_mut(&ctx.id).and_then(|c| c.replica.as_mut()) {
                        r.handle = Some(handle);
                    }
                }
                Err(e) => {
                    tracing::error!(id = %ctx.id, "cannot replicate the new primary: {e}");
                    status.set(
                        State::Live,
                        Some(format!(
                            "took over from checkpoint {epoch}; cannot replicate: {e}; UNPROTECTED"
                        )),
                    );
                }
            }
        }
        Err(e) => {
            record.total_ms = ms(started.elapsed()) + record.detection_ms;
            record.outcome = format!("failed: {e}");
            tracing::error!(id = %ctx.id, "FAILOVER FAILED: {e}");
            status.status.record_failover(record);
            status.set(State::Failed, Some(format!("failover failed: {e}")));
            // The task ends, so containerd and its clients see the failure.
            let containers = ctx.containers.lock().await;
            if let Some(c) = containers.get(&ctx.id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.init.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn take_over(
    ctx: &BackupCtx,
    dir: &Path,
    addresses: &[ServiceAddr],
    record: &mut FailoverRecord,
) -> Result<i32, String> {
    let netns = &ctx.setup.netns;
    if addresses.is_empty() {
        return Err("the primary never said which addresses to take over".into());
    }
    let t = Instant::now();
    net::drop_inbound(netns).await?;
    super::primary::remove_stale_rules(ctx).await;
    if let Err(e) = net::destroy_leftover_sockets(netns).await {
        tracing::warn!(id = %ctx.id, "destroying leftover sockets: {e}");
    }
    net::assign(netns, addresses).await?;
    let mut network = t.elapsed();

    let t = Instant::now();
    let (pipes, io) = replica_streams(&ctx.stdio, &ctx.id, &ctx.namespace)
        .await
        .map_err(|e| format!("streams: {e}"))?;
    let opts = RestoreOptions {
        work_dir: Some(ctx.bundle.join("rrc-restore")),
        stdio: RestoreStdio::Fds {
            stdin: pipes.stdin,
            stdout: pipes.stdout,
            stderr: pipes.stderr,
        },
        ..RestoreOptions::default()
    };
    let restored = checkpointer(&ctx.runc_root, &ctx.runc_binary)
        .restore(&ctx.id, &ctx.bundle, dir, opts)
        .await;
    record.restore_ms = ms(t.elapsed());
    let report = match restored {
        Ok(r) => r,
        Err(e) => {
            let _ = net::allow_inbound(netns).await;
            let _ = net::unassign(netns, addresses).await;
            return Err(format!("restore: {e}"));
        }
    };

    let t = Instant::now();
    let lifted = net::allow_inbound(netns).await;
    let announced = net::announce(netns, addresses).await;
    network += t.elapsed();
    record.network_ms = ms(network);
    if let Err(e) = lifted.and(announced) {
        tracing::error!(id = %ctx.id, "after the restore: {e}");
    }

    let pid = report.pid;
    let mut containers = ctx.containers.lock().await;
    let Some(c) = containers.get_mut(&ctx.id) else {
        return Err("the task was deleted during the failover".into());
    };
    c.adopt_restored(pid, io);
    drop(containers);
    send_event(
        &ctx.events,
        TaskStart {
            container_id: ctx.id.clone(),
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        },
    )
    .await;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrc_eventlog::{Event, SegmentStart, Thread, Writer};

    /// A log writer whose first segment starts at sequence 1, epoch 0, with one thread.
    fn a_writer() -> Writer<Vec<u8>> {
        let start = SegmentStart {
            base_seq: 1,
            epoch: 0,
            container_id: "c".into(),
            live: vec![Thread::new(1, 1)],
        };
        Writer::new(Vec::new(), start).expect("writer")
    }

    fn a_log() -> Vec<u8> {
        let mut w = a_writer();
        for i in 0..20u8 {
            w.append(
                Thread::NONE,
                0,
                &Event::IngressPacket { bytes: vec![i; 40] },
            )
            .expect("append");
        }
        w.into_inner()
    }

    #[test]
    fn a_log_is_stored_in_any_pieces_and_a_damaged_one_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let log = a_log();
        let mut r = ReceivedLog::new(dir.path());
        let mut off = 0usize;
        for piece in log.chunks(7) {
            r.append(off as u64, piece).expect("stored");
            off += piece.len();
        }
        let stored =
            std::fs::read(dir.path().join(super::super::hybrid::RECEIVED_LOG_FILE)).expect("file");
        assert_eq!(stored, log);

        // A gap is refused.
        let err = r.append(off as u64 + 5, b"x").expect_err("gap");
        assert!(err.contains("gap or an overlap"), "{err}");

        // A primary that pairs again starts over; a flipped byte is refused, not stored.
        r.reset();
        let mut bad = log.clone();
        let last = bad.len() - 10;
        bad[last] ^= 0xff;
        let err = r.append(0, &bad).expect_err("corrupt");
        assert!(err.contains("does not decode"), "{err}");
        assert_eq!(r.len, 0, "nothing of the damaged log counts as stored");
    }

    #[test]
    fn a_pairing_starts_at_a_cut_and_a_commit_drops_what_is_before_the_next() {
        // Three segments: epoch 0, then cut at epoch 1 and at epoch 2.
        let mut w = a_writer();
        let mut cuts = Vec::new();
        for epoch in 0..3u8 {
            if epoch > 0 {
                w.end_segment().expect("end");
                cuts.push(w.bytes_written());
                w.start_segment(u64::from(epoch), vec![Thread::new(1, 1)])
                    .expect("start");
            }
            for i in 0..10u8 {
                w.append(
                    Thread::new(1, 1),
                    0,
                    &Event::IngressPacket {
                        bytes: vec![epoch * 16 + i; 30],
                    },
                )
                .expect("append");
            }
        }
        let log = w.into_inner();
        let dir = tempfile::tempdir().expect("dir");
        let mut r = ReceivedLog::new(dir.path());
        // The pairing's checkpoint cut at cuts[0]: the log arrives from there.
        let first = usize::try_from(cuts[0]).expect("offset");
        let mut off = first;
        for piece in log[first..].chunks(11) {
            r.append(off as u64, piece).expect("stored");
            off += piece.len();
        }
        r.committed_cut(cuts[0]);
        assert_eq!(r.base, cuts[0]);
        let path = dir.path().join(super::super::hybrid::RECEIVED_LOG_FILE);
        let stored = std::fs::read(&path).expect("file");
        assert_eq!(stored.len(), log.len(), "same offsets as the primary's log");
        assert!(
            stored[..first].iter().all(|&b| b == 0),
            "never sent: a hole"
        );
        assert_eq!(stored[first..], log[first..]);
        // The next checkpoint commits: everything before its cut goes.
        r.committed_cut(cuts[1]);
        let second = usize::try_from(cuts[1]).expect("offset");
        let stored = std::fs::read(&path).expect("file");
        assert!(stored[..second].iter().all(|&b| b == 0), "dropped");
        assert_eq!(stored[second..], log[second..]);
        assert_eq!(&stored[second..second + 8], b"RRCEVLOG");
        assert_eq!(r.base, cuts[1]);
    }
}
