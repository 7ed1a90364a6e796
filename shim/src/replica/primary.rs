//! The primary's side of passive mode.
//!
//! ```text
//! epoch e:  hold.set_tag(e)                  packets produced from now on carry tag e
//!           dump (runc checkpoint --leave-running, CRIU freezes the container briefly)
//!           stream the images to the backup; it commits them and acknowledges
//!           hold.release_upto(e - 1)          outputs of epoch e-1 depend only on checkpoint e
//! ```
//!
//! Unpaired (no backup yet, or the backup was lost) the hold lets everything through and the
//! status says the container is unprotected. The loop keeps trying to reach the backup; when it
//! does, the next checkpoint is a full one (every checkpoint is, for now) and holding resumes.
//! When the container stops on purpose the backup is told (`Goodbye`), so it does not take over.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::{Error, Result};
use rrc_channel::{Channel, Role as ChannelRole};
use rrc_checkpoint::{send_dir, Checkpointer, DumpOptions, TransferError};
use rrc_output_hold::{nfqueue_rule, OutputHold};
use tokio::sync::watch;

use super::fs::HookServer;
use super::net;
use super::runner::ShimRunner;
use super::wire::{Control, STREAM_CHECKPOINT, STREAM_CONTROL};
use super::{channel_config, checkpointer, ReplicaCtx, ReplicaHandle, StatusFile, EPOCHS_DIR};
use crate::status::{CheckpointFigures, Role, State};

/// Consecutive failed checkpoints after which a paired primary stops holding outputs (and says
/// it is unprotected) rather than stall its clients.
const MAX_FAILED_DUMPS: u32 = 3;
/// How long to wait between attempts to reach the backup.
const RECONNECT: Duration = Duration::from_secs(1);

/// What the primary's loop needs.
pub type PrimaryCtx = ReplicaCtx;

/// The NFQUEUE number a container's hold uses (in its own network namespace).
fn queue_number(id: &str) -> u16 {
    let h = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    u16::try_from(1000 + h % 1000).unwrap_or(1000)
}

/// The NFQUEUE numbers of a container's output hold and of its inbound gate.
pub(super) fn queues(id: &str) -> (u16, u16) {
    let queue = queue_number(id);
    (queue, queue + 1000)
}

/// The iptables rules of a container's output hold (OUTPUT) and inbound gate (INPUT).
fn hold_rules(id: &str) -> Vec<Vec<String>> {
    let (queue, gate_queue) = queues(id);
    vec![
        nfqueue_rule(None, queue),
        [
            "INPUT",
            "!",
            "-i",
            "lo",
            "-j",
            "NFQUEUE",
            "--queue-num",
            &gate_queue.to_string(),
        ]
        .map(String::from)
        .to_vec(),
    ]
}

/// Removes the rules a killed shim left in the container's namespace (hold, gate, and hybrid
/// mode's ingress log, whatever the mode now): they would send packets to queues nobody reads.
pub async fn remove_stale_rules(ctx: &ReplicaCtx) {
    super::hybrid::remove_stale_ingress_rule(ctx).await;
    let listing = match net::list_rules(&ctx.setup.netns).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(id = %ctx.id, "listing the namespace's rules: {e}");
            return;
        }
    };
    for rule in hold_rules(&ctx.id) {
        let n = net::delete_all(&ctx.setup.netns, &rule, &listing).await;
        if n > 0 {
            tracing::warn!(id = %ctx.id, "removed {n} rule(s) left by an earlier shim: {}", rule.join(" "));
        }
    }
}

/// Binds NFQUEUE `queue` in `netns` (on a blocking thread: the hold's thread enters the
/// namespace); `what` says what for, in the error.
pub(super) async fn bind(netns: &Path, queue: u16, what: &str) -> Result<OutputHold> {
    let netns = netns.to_path_buf();
    tokio::task::spawn_blocking(move || OutputHold::bind(&netns, queue))
        .await
        .map_err(|e| Error::Other(format!("rrc: cannot {what}: {e}")))?
        .map_err(|e| Error::Other(format!("rrc: cannot {what}: {e}")))
}

/// Starts holding the container's outputs (call before `runc start`, so nothing leaves
/// unaccounted) and the epoch loop. Fails, with nothing left behind, if the hold cannot be set
/// up.
pub async fn start(ctx: PrimaryCtx) -> Result<ReplicaHandle> {
    let (queue, gate_queue) = queues(&ctx.id);
    let hold = bind(&ctx.setup.netns, queue, "hold the container's outputs").await?;
    // Unpaired until the backup answers: outputs flow.
    hold.release_all();
    // The inbound gate: CRIU's network lock, done by the shim (see `super::fs`). It passes
    // everything except while CRIU dumps the sockets.
    let gate = bind(&ctx.setup.netns, gate_queue, "gate the container's inputs").await?;
    gate.release_all();
    let rules = hold_rules(&ctx.id);

    remove_stale_rules(&ctx).await;
    let hooks = HookServer::start(
        &ctx.bundle,
        ctx.setup.upper.clone(),
        Some(Arc::new(gate)),
        None,
    )
    .map_err(|e| Error::Other(format!("rrc: the CRIU hook's socket: {e}")))?;
    for (i, rule) in rules.iter().enumerate() {
        let mut add = vec!["-A".to_string()];
        add.extend(rule.iter().cloned());
        if let Err(e) = net::iptables(&ctx.setup.netns, &add).await {
            for rule in rules.iter().take(i) {
                let mut del = vec!["-D".to_string()];
                del.extend(rule.iter().cloned());
                let _ = net::iptables(&ctx.setup.netns, &del).await;
            }
            return Err(Error::Other(format!(
                "rrc: cannot install the output hold's rules: {e}"
            )));
        }
    }
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(run(ctx, hold, rules, Some(hooks), rx));
    Ok(ReplicaHandle::new(tx, task))
}

pub(super) enum End {
    /// The container stopped: say goodbye.
    Stopped,
    /// The backup is gone (or refused a checkpoint).
    Lost(String),
}

async fn run(
    ctx: PrimaryCtx,
    hold: OutputHold,
    rules: Vec<Vec<String>>,
    fs: Option<HookServer>,
    mut stop: watch::Receiver<bool>,
) {
    let (peer, mut status) = primary_status(&ctx, "passive", "");
    let checkpointer = checkpointer(&ctx.runc_root, &ctx.runc_binary);
    let instance = instance_id();
    let mut epoch = 0u64;
    let mut last_error = String::new();
    let mut fenced = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let cfg = channel_config(&ctx.setup, &ctx.config, &ctx.id, ChannelRole::Primary);
        let connected = tokio::select! {
            r = rrc_channel::connect(&peer, cfg) => Some(r),
            _ = stop.changed() => None,
        };
        let ch = match connected {
            None => break,
            Some(Ok(ch)) => ch,
            Some(Err(e)) => {
                let msg = format!("cannot reach the backup at {peer}: {e}");
                if msg != last_error {
                    tracing::warn!(id = %ctx.id, "{msg}; the container runs UNPROTECTED until it can");
                    last_error = msg.clone();
                }
                let state = if status.status.checkpoints == 0 {
                    State::WaitingForBackup
                } else {
                    State::Unprotected
                };
                status.set(state, Some(msg));
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        last_error.clear();
        tracing::info!(id = %ctx.id, "paired with the backup at {peer}");
        let parts = Parts {
            ctx: &ctx,
            checkpointer: &checkpointer,
            hold: &hold,
            fs: fs.as_ref(),
            instance,
        };
        let end = tokio::select! {
            r = session(&parts, &ch, &mut epoch, &mut status) => End::Lost(r),
            _ = stop.changed() => End::Stopped,
        };
        match end {
            End::Stopped => {
                goodbye(&ch, "the container stopped").await;
                break;
            }
            End::Lost(why) => {
                if backup_lost(&ctx, &hold, &why, &mut status).await {
                    fenced = true;
                    break;
                }
            }
        }
    }
    for rule in rules {
        let mut del = vec!["-D".to_string()];
        del.extend(rule);
        if let Err(e) = net::iptables(&ctx.setup.netns, &del).await {
            tracing::debug!(id = %ctx.id, "removing the output hold's rule: {e}");
        }
    }
    hold.release_all();
    drop(hold);
    let _ = std::fs::remove_dir_all(ctx.bundle.join(EPOCHS_DIR));
    if !fenced {
        status.set(State::Stopped, None);
    }
}

/// A primary's start: the backup's address, and the status file in state waiting-for-backup
/// (its detail `doing` then "connecting to the backup at PEER"). A backup that took over and
/// now replicates in turn keeps its failover history.
pub(super) fn primary_status(ctx: &PrimaryCtx, mode: &str, doing: &str) -> (String, StatusFile) {
    let peer = ctx
        .config
        .peer
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut status = StatusFile::new(
        &ctx.bundle,
        &ctx.id,
        &ctx.namespace,
        Role::Primary,
        Some(peer.clone()),
    );
    status.status.mode = mode.to_string();
    if let Ok(previous) = crate::status::read(&ctx.bundle) {
        status.status.failovers = previous.failovers;
    }
    status.set(
        State::WaitingForBackup,
        Some(format!("{doing}connecting to the backup at {peer}")),
    );
    (peer, status)
}

/// Tells the backup the container stopped on purpose (it must not take over), waiting up to a
/// second for its acknowledgement.
pub(super) async fn goodbye(ch: &Channel, reason: &str) {
    let bye = Control::Goodbye {
        reason: reason.into(),
    };
    if let Ok(seq) = ch.send(STREAM_CONTROL, &bye.encode()).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.wait_acked(seq)).await;
    }
}

/// After losing the backup (`why`), with outputs still held: if the backup took over, fence
/// this primary and return true; otherwise let outputs flow, say the container is
/// unprotected, and return false.
pub(super) async fn backup_lost(
    ctx: &PrimaryCtx,
    hold: &OutputHold,
    why: &str,
    status: &mut StatusFile,
) -> bool {
    tracing::error!(id = %ctx.id, "lost the backup: {why}; checking whether it took over");
    status.set(
        State::Unprotected,
        Some(format!(
            "lost the backup: {why}; outputs held while checking whether it took over"
        )),
    );
    if took_over(ctx).await {
        fence(ctx, status).await;
        return true;
    }
    hold.release_all();
    tracing::error!(id = %ctx.id, "the backup did not take over: the container runs UNPROTECTED");
    status.set(State::Unprotected, Some(format!("lost the backup: {why}")));
    false
}

/// Probes sent to find out whether the backup claimed the service address.
const PROBES: u32 = 3;
/// Time between probes (and waited after the last one).
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// After losing the backup: did it take over? A backup that lost us too claims the service
/// addresses within its failover timeout of the silence, so the primary keeps its outputs held
/// for that long (plus a margin), then asks the network (ARP probes) whether another host
/// answers for one of its addresses. If a probe cannot be made the answer is no: the container
/// keeps serving, unprotected, and the error is logged.
async fn took_over(ctx: &PrimaryCtx) -> bool {
    tokio::time::sleep(ctx.config.failover_timeout + Duration::from_millis(100)).await;
    let addresses = match net::addresses(&ctx.setup.netns).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(id = %ctx.id, "cannot read the container's addresses to probe them: {e}");
            return false;
        }
    };
    for a in addresses {
        let netns = ctx.setup.netns.clone();
        let probed = tokio::task::spawn_blocking(move || {
            rrc_takeover::probe(&netns, &a.interface, a.address, PROBES, PROBE_INTERVAL)
                .map(|mac| mac.map(|m| (a.address, m)))
        })
        .await;
        match probed {
            Ok(Ok(Some((addr, mac)))) => {
                let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
                tracing::error!(id = %ctx.id, "another host ({}) answers for {addr}: the backup took over", mac.join(":"));
                return true;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!(id = %ctx.id, "probing the service address: {e}"),
            Err(e) => tracing::error!(id = %ctx.id, "probing the service address: {e}"),
        }
    }
    false
}

/// Stops serving for good: the backup took over. The service addresses leave the namespace
/// and the container is killed (containerd sees its task exit); the status says fenced.
async fn fence(ctx: &PrimaryCtx, status: &mut StatusFile) {
    if let Ok(addrs) = net::addresses(&ctx.setup.netns).await {
        if let Err(e) = net::unassign(&ctx.setup.netns, &addrs).await {
            tracing::error!(id = %ctx.id, "removing the service addresses: {e}");
        }
    }
    let root = ctx.runc_root.display().to_string();
    if let Err(e) = super::runner::run(
        &ctx.runc_binary,
        &["--root", &root, "kill", "--all", &ctx.id, "KILL"],
    )
    .await
    {
        tracing::error!(id = %ctx.id, "killing the fenced container: {e}");
    }
    tracing::error!(id = %ctx.id, "FENCED: the backup took over; this container stopped serving");
    status.set(
        State::Fenced,
        Some("the backup took over while this primary could not reach it; this container was stopped and its addresses removed".into()),
    );
}

/// A number that differs between two runs of a primary, so a backup knows a new one.
pub(super) fn instance_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    u64::try_from(t % u128::from(u64::MAX)).unwrap_or(0) ^ u64::from(std::process::id())
}

/// What one pairing works with.
struct Parts<'a> {
    ctx: &'a PrimaryCtx,
    checkpointer: &'a Checkpointer<ShimRunner>,
    hold: &'a OutputHold,
    fs: Option<&'a HookServer>,
    instance: u64,
}

/// One pairing: checkpoints until something fails; returns why.
async fn session(p: &Parts<'_>, ch: &Channel, epoch: &mut u64, status: &mut StatusFile) -> String {
    let Parts {
        ctx,
        checkpointer,
        hold,
        fs,
        instance,
    } = *p;
    // A new backup has a fresh rootfs: the first delta is a full one.
    if let Some(fs) = fs {
        fs.reset();
    }
    let addresses = match net::addresses(&ctx.setup.netns).await {
        Ok(a) => a,
        Err(e) => return format!("cannot read the container's addresses: {e}"),
    };
    let pair = Control::Pair {
        addresses,
        epoch_ms: u64::try_from(ctx.setup.epoch.as_millis()).unwrap_or(u64::MAX),
        instance,
        mode: "passive".into(),
    };
    if let Err(e) = ch.send(STREAM_CONTROL, &pair.encode()).await {
        return e.to_string();
    }
    let mut protected = false;
    let mut failures = 0u32;
    let epochs = ctx.bundle.join(EPOCHS_DIR);
    loop {
        let started = Instant::now();
        *epoch += 1;
        let e = *epoch;
        hold.set_tag(e);
        if !protected {
            hold.hold_again();
        }
        let dir = epochs.join(e.to_string());
        if let Some(fs) = fs {
            fs.arm(&dir);
        }
        let mut dumped = checkpointer
            .dump(&ctx.id, &dir, &DumpOptions::default())
            .await
            .map_err(|e| e.to_string());
        let delta = fs.and_then(HookServer::disarm);
        if let (Some(_), Ok(_), None) = (fs, &dumped, &delta) {
            dumped = Err(format!(
                "CRIU did not run its post-dump hook ({} in the bundle)",
                super::fs::HOOK_SCRIPT
            ));
        }
        let fs_bytes = delta.as_ref().map(|d| d.bytes).unwrap_or(0);
        let report = match dumped {
            Ok(r) => r,
            Err(err) => {
                forget_epoch(&dir, fs, delta.is_some());
                failures += 1;
                tracing::error!(id = %ctx.id, epoch = e, "checkpoint failed: {err}");
                if failures >= MAX_FAILED_DUMPS && protected {
                    hold.release_all();
                    protected = false;
                    status.set(
                        State::Unprotected,
                        Some(format!(
                            "{failures} checkpoints in a row failed; last: {err}"
                        )),
                    );
                }
                tokio::time::sleep_until((started + ctx.setup.epoch).into()).await;
                continue;
            }
        };
        failures = 0;
        let dump_ms = ms(report.wall);
        let frozen_ms = report.stats.as_ref().map(|s| ms(s.paused())).unwrap_or(0.0);
        if let Some(st) = &report.stats {
            tracing::info!(
                id = %ctx.id,
                epoch = e,
                "checkpoint: freezing {:.1} ms, frozen {:.1} ms (memory dump {:.1} ms, write {:.1} ms), runc {:.1} ms, {} bytes",
                ms(st.freezing),
                ms(st.frozen),
                ms(st.memdump),
                ms(st.memwrite),
                dump_ms,
                report.image_bytes
            );
        }
        let (transfer, commit_wait) =
            match send_and_commit(ch, &report.image_dir, &dir, e, fs, delta.is_some()).await {
                Ok(t) => t,
                Err(why) => return why,
            };
        hold.release_upto(e - 1);
        remove_epoch(&dir);
        if !protected {
            protected = true;
            tracing::info!(id = %ctx.id, epoch = e, "protected: the backup committed a checkpoint");
        }
        let s = &mut status.status;
        s.checkpoints += 1;
        s.last_committed_epoch = Some(e);
        s.last_checkpoint = Some(CheckpointFigures {
            epoch: e,
            frozen_ms,
            dump_ms,
            transfer_ms: ms(transfer),
            commit_wait_ms: ms(commit_wait),
            bytes: report.image_bytes,
            fs_delta_bytes: fs_bytes,
            at_unix_ms: crate::status::unix_ms_now(),
        });
        status.set(State::Protected, None);
        tokio::time::sleep_until((started + ctx.setup.epoch).into()).await;
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A checkpoint that will not commit: its files go, and the writable layer's delta it carried
/// (`had_delta`: the dump got as far as CRIU's post-dump hook) is carried by the next one.
pub(super) fn forget_epoch(dir: &Path, fs: Option<&HookServer>, had_delta: bool) {
    if had_delta {
        if let Some(fs) = fs {
            fs.undo_last();
        }
    }
    remove_epoch(dir);
}

/// Sends the dumped checkpoint of epoch `epoch` (images in `image_dir`, its files under `dir`)
/// and waits for the backup's commit: the backup handles messages in order and acknowledges
/// the last piece once committed, so an acknowledgement of anything later implies it too.
/// Returns how long the transfer and the wait took. On failure the epoch is forgotten
/// ([`forget_epoch`]) and the error ends the pairing.
pub(super) async fn send_and_commit(
    ch: &Channel,
    image_dir: &Path,
    dir: &Path,
    epoch: u64,
    fs: Option<&HookServer>,
    had_delta: bool,
) -> std::result::Result<(Duration, Duration), String> {
    let sending = Instant::now();
    let sent = send_checkpoint(ch, image_dir, epoch).await;
    let transfer = sending.elapsed();
    let waiting = Instant::now();
    let committed = match sent {
        Ok(seq) => ch.wait_acked(seq).await.map_err(|e| e.to_string()),
        Err(why) => Err(why),
    };
    if let Err(why) = committed {
        forget_epoch(dir, fs, had_delta);
        return Err(why);
    }
    Ok((transfer, waiting.elapsed()))
}

pub(super) fn remove_epoch(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    for suffix in [".work", ".fs"] {
        let mut other = dir.as_os_str().to_owned();
        other.push(suffix);
        let _ = std::fs::remove_dir_all(PathBuf::from(other));
    }
}

/// Streams an image directory; returns the sequence number of its last piece.
async fn send_checkpoint(ch: &Channel, dir: &Path, epoch: u64) -> std::result::Result<u64, String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let d = dir.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || {
        send_dir(&d, epoch, |p| {
            tx.blocking_send(p.encode())
                .map_err(|_| TransferError::Sequence("the sender stopped".into()))
        })
    });
    let mut last = None;
    let mut failed = None;
    while let Some(bytes) = rx.recv().await {
        match ch.send(STREAM_CHECKPOINT, &bytes).await {
            Ok(seq) => last = Some(seq),
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    drop(rx);
    let produced = producer.await;
    if let Some(e) = failed {
        return Err(e);
    }
    match produced {
        Ok(Ok(())) => last.ok_or_else(|| "an empty checkpoint".to_string()),
        Ok(Err(e)) => Err(format!("reading checkpoint {epoch}: {e}")),
        Err(e) => Err(format!("checkpoint sender: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_numbers_stay_in_range() {
        for id in ["", "redis", "a-very-long-container-id-0123456789abcdef"] {
            let q = queue_number(id);
            assert!((1000..2000).contains(&q), "{q}");
        }
        assert_eq!(queue_number("redis"), queue_number("redis"));
    }
}
