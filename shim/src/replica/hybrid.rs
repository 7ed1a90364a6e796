//! The primary's side of hybrid mode: record, stream the log, release outputs on the backup's
//! acknowledgement (issue 4; design in `docs/hybrid-mode.md`).
//!
//! ```text
//! runc create ─ rrc-recorder --pid INIT (a process of its own) seizes every thread
//!            ─ the shim waits until it says "attached" (the position file), then runc start
//! recorder   ─ one write per record into a pipe, then publishes the log's length
//! shim       ─ pipe → rrc-log (the local copy) → stream 2 of the channel → backup
//! backup     ─ appends to rrc-log-received, acknowledges the message
//! hold       ─ tags each outgoing packet with the published length when it arrives;
//!              releases every packet whose tag the backup has acknowledged
//! ```
//!
//! Packets entering the container's namespace go to the recorder's ingress queue (`raw`
//! PREROUTING, before conntrack and TCP) and are logged before the kernel has them, so every
//! acknowledgement the container's kernel sends is covered by the log too.
//!
//! Unpaired, outputs flow (the status says unprotected) and the log accumulates locally; a
//! backup that pairs receives it from the start, then holding resumes.
//!
//! Not yet: checkpoints. CRIU seizes the container's tasks with ptrace, and a task has one
//! tracer: the recorder must step aside for each dump, which it cannot do yet. So the backup
//! keeps the whole log since the container started, and a hybrid backup does not take over
//! (replay is issue 5): it says so loudly instead of restoring anything stale.
//!
//! If the recorder dies the container dies with it (`PTRACE_O_EXITKILL`: without a tracer,
//! the system calls the container's seccomp filter traces fail with ENOSYS, so it could not
//! run correctly anyway). The shim reports it and the task exits; policy `stop` is the only
//! one hybrid mode accepts (see `prepare`).

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::monitor::Topic;
use containerd_shim::{Error, Result};
use rrc_channel::{Channel, Role as ChannelRole};
use rrc_output_hold::OutputHold;
use rrc_recorder::position::{SharedPosition, STATE_ATTACHED, STATE_ENDED};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;

use super::net;
use super::primary::{bind, fence, hold_rules, instance_id, queues, took_over, End};
use super::wire::{encode_log, Control, STREAM_CONTROL, STREAM_LOG};
use super::{channel_config, ReplicaCtx, ReplicaHandle, StatusFile};
use crate::status::{LogFigures, Role, State};

/// The primary's copy of the whole log, in its bundle.
pub const LOG_FILE: &str = "rrc-log";
/// The recorder's published position, in the primary's bundle.
pub const POSITION_FILE: &str = "rrc-log-position";
/// The log a backup received, in its bundle.
pub const RECEIVED_LOG_FILE: &str = "rrc-log-received";
/// The recorder's binary name (next to the shim's, or on `PATH`).
pub const RECORDER_BIN: &str = "rrc-recorder";
/// Largest log message.
const CHUNK: usize = 256 * 1024;
/// How long the recorder may take to seize the container's threads.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait between attempts to reach the backup.
const RECONNECT: Duration = Duration::from_secs(1);
/// How often the status file's log figures are refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Where the recorder is: `RRC_RECORDER_BIN`, else next to this binary, else `PATH`.
pub fn recorder_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RRC_RECORDER_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join(RECORDER_BIN);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(RECORDER_BIN))
            .find(|p| p.is_file())
    })
}

/// The NFQUEUE of the recorder's ingress log.
fn ingress_queue(id: &str) -> u16 {
    queues(id).0 + 2000
}

/// The `raw` table rule (without `-t raw -A`/`-D`) sending every packet entering the namespace
/// (but on `lo`) to the ingress log.
fn ingress_rule(id: &str) -> Vec<String> {
    [
        "PREROUTING",
        "!",
        "-i",
        "lo",
        "-j",
        "NFQUEUE",
        "--queue-num",
    ]
    .map(String::from)
    .into_iter()
    .chain([ingress_queue(id).to_string()])
    .collect()
}

async fn raw_rule(netns: &Path, op: &str, rule: &[String]) -> std::result::Result<(), String> {
    let mut args = vec!["-t".to_string(), "raw".to_string(), op.to_string()];
    args.extend(rule.iter().cloned());
    net::iptables(netns, &args).await
}

/// Removes the ingress rule a killed shim left (a queue nobody reads drops every packet).
async fn remove_stale_ingress_rule(ctx: &ReplicaCtx) {
    let rule = ingress_rule(&ctx.id);
    for _ in 0..8 {
        if raw_rule(&ctx.setup.netns, "-D", &rule).await.is_err() {
            break;
        }
        tracing::warn!(id = %ctx.id, "removed an ingress-log rule left by an earlier shim");
    }
}

/// The recorder's end: its exit code as the shim's monitor reports it (128+n for signal n).
type Exit = Option<i32>;

/// Starts recording and replicating a created container whose init is `init_pid`: the output
/// hold, the recorder (attached before this returns, so `runc start` may follow), the ingress
/// log, and the replication task. Fails, with nothing left running, if any of it cannot start.
pub async fn start(ctx: ReplicaCtx, init_pid: i32) -> Result<ReplicaHandle> {
    let bin = recorder_binary().ok_or_else(|| {
        Error::Other(format!(
            "rrc: hybrid mode needs {RECORDER_BIN} next to the shim or on PATH (make install)"
        ))
    })?;
    let (queue, _) = queues(&ctx.id);
    let hold = bind(&ctx.setup.netns, queue, "hold the container's outputs").await?;
    hold.release_all();
    let position_path = ctx.bundle.join(POSITION_FILE);
    let position = Arc::new(
        SharedPosition::create(&position_path)
            .map_err(|e| Error::Other(format!("rrc: {}: {e}", position_path.display())))?,
    );
    let p = position.clone();
    hold.set_tag_source(Box::new(move || p.written()));

    super::primary::remove_stale_rules(&ctx).await;
    remove_stale_ingress_rule(&ctx).await;
    let out_rule = hold_rules(&ctx.id).swap_remove(0);
    let mut add = vec!["-A".to_string()];
    add.extend(out_rule.iter().cloned());
    net::iptables(&ctx.setup.netns, &add)
        .await
        .map_err(|e| Error::Other(format!("rrc: cannot install the output hold's rule: {e}")))?;

    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--pid")
        .arg(init_pid.to_string())
        .args(["--out", "-", "--position-file"])
        .arg(&position_path)
        .args(["--container-id", &ctx.id, "--ingress-queue"])
        .arg(ingress_queue(&ctx.id).to_string())
        .arg("--netns")
        .arg(&ctx.setup.netns)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = spawn_recorder(cmd, &position).await;
    let (child_out, pid, exit) = match started {
        Ok(s) => s,
        Err(e) => {
            remove_rules(&ctx, &out_rule, false).await;
            return Err(Error::Other(format!("rrc: the recorder: {e}")));
        }
    };
    if let Err(e) = raw_rule(&ctx.setup.netns, "-A", &ingress_rule(&ctx.id)).await {
        // The recorder ends with the container (EXITKILL would kill it): stop it first.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        remove_rules(&ctx, &out_rule, false).await;
        return Err(Error::Other(format!(
            "rrc: cannot install the ingress log's rule: {e}"
        )));
    }
    tracing::info!(id = %ctx.id, recorder = pid, "recorder attached to {init_pid}");

    let log_path = ctx.bundle.join(LOG_FILE);
    let (stored_tx, stored_rx) = watch::channel(0u64);
    let reader = tokio::spawn(copy_log(
        child_out.0,
        log_path.clone(),
        stored_tx,
        ctx.id.clone(),
    ));
    tokio::spawn(forward_stderr(child_out.1, ctx.id.clone()));
    let (tx, rx) = watch::channel(false);
    let parts = Parts {
        ctx,
        hold,
        out_rule,
        position,
        log_path,
        recorder_pid: pid,
    };
    let task = tokio::spawn(async move {
        run(&parts, stored_rx, exit, rx).await;
        reader.abort();
    });
    Ok(ReplicaHandle::new(tx, task))
}

type Streams = (tokio::process::ChildStdout, tokio::process::ChildStderr);

/// Spawns the recorder with the shim's exit monitor watching it, and waits until it has
/// attached; returns its streams, pid, and a watch of its exit.
async fn spawn_recorder(
    mut cmd: tokio::process::Command,
    position: &SharedPosition,
) -> std::result::Result<(Streams, i32, watch::Receiver<Exit>), String> {
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| format!("watching its exit: {e}"))?;
    let sub_id = sub.id;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = containerd_shim::asynchronous::monitor::monitor_unsubscribe(sub_id).await;
            return Err(format!("cannot start it: {e}"));
        }
    };
    let Some(pid) = child.id() else {
        let _ = containerd_shim::asynchronous::monitor::monitor_unsubscribe(sub_id).await;
        return Err("it has no pid".into());
    };
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        let code = crate::runc::wait_for_exit(pid, sub).await;
        let _ = exit_tx.send(Some(code));
    });
    let (Some(out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("its streams were not piped".into());
    };
    let pid = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        if position.state() == STATE_ATTACHED {
            return Ok(((out, err), pid, exit_rx));
        }
        let exited = *exit_rx.borrow();
        if let Some(code) = exited {
            let mut text = String::new();
            let _ = tokio::time::timeout(Duration::from_millis(200), err.read_to_string(&mut text))
                .await;
            return Err(format!(
                "it exited ({}) before attaching: {}",
                describe_exit(code),
                text.trim()
            ));
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(format!(
                "it did not attach within {ATTACH_TIMEOUT:?}; killed it"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn describe_exit(code: i32) -> String {
    if code > 128 && code < 128 + 65 {
        format!("killed by signal {}", code - 128)
    } else {
        format!("exit code {code}")
    }
}

/// Copies the recorder's output into the local log, publishing how much is stored.
async fn copy_log(
    mut out: tokio::process::ChildStdout,
    path: PathBuf,
    stored: watch::Sender<u64>,
    id: String,
) {
    // A plain file: appends land in the page cache in microseconds, cheaper than a hop to
    // tokio's blocking pool on this latency path.
    let mut file = match std::fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(%id, "cannot create the log {}: {e}", path.display());
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::error!(%id, "reading the recorder's log: {e}");
                break;
            }
        };
        if let Err(e) = std::io::Write::write_all(&mut file, &buf[..n]) {
            tracing::error!(%id, "writing the log {}: {e}", path.display());
            break;
        }
        total += n as u64;
        stored.send_replace(total);
    }
}

/// The recorder's messages, into the shim's log.
async fn forward_stderr(err: tokio::process::ChildStderr, id: String) {
    let mut lines = tokio::io::BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(%id, "recorder: {line}");
    }
}

async fn remove_rules(ctx: &ReplicaCtx, out_rule: &[String], ingress: bool) {
    let mut del = vec!["-D".to_string()];
    del.extend(out_rule.iter().cloned());
    if let Err(e) = net::iptables(&ctx.setup.netns, &del).await {
        tracing::debug!(id = %ctx.id, "removing the output hold's rule: {e}");
    }
    if ingress {
        if let Err(e) = raw_rule(&ctx.setup.netns, "-D", &ingress_rule(&ctx.id)).await {
            tracing::debug!(id = %ctx.id, "removing the ingress log's rule: {e}");
        }
    }
}

struct Parts {
    ctx: ReplicaCtx,
    hold: OutputHold,
    out_rule: Vec<String>,
    position: Arc<SharedPosition>,
    log_path: PathBuf,
    recorder_pid: i32,
}

/// How a pairing or the whole replication ended.
enum Ended {
    /// As in passive mode.
    End(End),
    /// The recorder is gone.
    Recorder(i32),
}

async fn run(
    p: &Parts,
    stored: watch::Receiver<u64>,
    mut exit: watch::Receiver<Exit>,
    mut stop: watch::Receiver<bool>,
) {
    let ctx = &p.ctx;
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
    status.status.mode = "hybrid".into();
    status.status.log = Some(LogFigures::default());
    status.set(
        State::WaitingForBackup,
        Some(format!("recording; connecting to the backup at {peer}")),
    );
    let instance = instance_id();
    let mut last_error = String::new();
    let mut fenced = false;
    let mut recorder_end = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let exited = *exit.borrow();
        if let Some(code) = exited {
            recorder_end = Some(code);
            break;
        }
        let cfg = channel_config(&ctx.setup, &ctx.config, &ctx.id, ChannelRole::Primary);
        let connected = tokio::select! {
            r = rrc_channel::connect(&peer, cfg) => Some(r),
            _ = stop.changed() => None,
            _ = exit.changed() => continue,
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
                refresh_log(&mut status, p, 0);
                status.set(State::Unprotected, Some(msg));
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT) => {}
                    _ = stop.changed() => break,
                    _ = exit.changed() => {}
                }
                continue;
            }
        };
        last_error.clear();
        tracing::info!(id = %ctx.id, "paired with the backup at {peer}");
        let end = tokio::select! {
            r = session(p, &ch, instance, stored.clone(), &mut status) => Ended::End(End::Lost(r)),
            _ = stop.changed() => Ended::End(End::Stopped),
            r = exit.wait_for(Option::is_some) => Ended::Recorder(r.map(|c| c.unwrap_or(-1)).unwrap_or(-1)),
        };
        match end {
            Ended::End(End::Stopped) => {
                goodbye(&ch, "the container stopped").await;
                break;
            }
            Ended::Recorder(code) => {
                // Whatever the container's end, the backup must not take over from this log.
                goodbye(&ch, "the container's recording ended").await;
                recorder_end = Some(code);
                break;
            }
            Ended::End(End::Lost(why)) => {
                tracing::error!(id = %ctx.id, "lost the backup: {why}; checking whether it took over");
                status.set(
                    State::Unprotected,
                    Some(format!(
                        "lost the backup: {why}; outputs held while checking whether it took over"
                    )),
                );
                if took_over(ctx).await {
                    fence(ctx, &mut status).await;
                    fenced = true;
                    break;
                }
                p.hold.release_all();
                tracing::error!(id = %ctx.id, "the backup did not take over: the container runs UNPROTECTED");
                status.set(State::Unprotected, Some(format!("lost the backup: {why}")));
            }
        }
    }
    p.hold.release_all();
    remove_rules(ctx, &p.out_rule, true).await;
    if let Some(code) = recorder_end {
        recorder_ended(p, code, &mut status).await;
    } else if !fenced {
        status.set(State::Stopped, None);
    }
}

async fn goodbye(ch: &Channel, reason: &str) {
    let bye = Control::Goodbye {
        reason: reason.into(),
    };
    if let Ok(seq) = ch.send(STREAM_CONTROL, &bye.encode()).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.wait_acked(seq)).await;
    }
}

/// The recorder exited: the normal end of a container that exited, or a failure.
async fn recorder_ended(p: &Parts, code: i32, status: &mut StatusFile) {
    let ctx = &p.ctx;
    if code == 0 && p.position.state() == STATE_ENDED {
        tracing::info!(id = %ctx.id, "the recording ended with the container");
        status.set(State::Stopped, None);
        return;
    }
    let what = format!(
        "the recorder (pid {}) died ({}); policy on-recorder-failure=stop: the container \
         is stopped (without its recorder its traced system calls would fail)",
        p.recorder_pid,
        describe_exit(code)
    );
    tracing::error!(id = %ctx.id, "{what}");
    let root = ctx.runc_root.display().to_string();
    if let Err(e) = super::runner::run(
        &ctx.runc_binary,
        &["--root", &root, "kill", "--all", &ctx.id, "KILL"],
    )
    .await
    {
        tracing::debug!(id = %ctx.id, "killing the container after its recorder died: {e}");
    }
    status.set(State::Failed, Some(what));
}

fn refresh_log(status: &mut StatusFile, p: &Parts, acked: u64) {
    let log = status.status.log.get_or_insert_with(LogFigures::default);
    log.bytes = p.position.written();
    log.acked_bytes = log.acked_bytes.max(acked);
    log.packets_released = p.hold.released();
    log.packets_held = p.hold.held();
}

/// One pairing: sends the log from its start, then as it grows; releases outputs as the
/// backup acknowledges. Returns why it ended.
async fn session(
    p: &Parts,
    ch: &Channel,
    instance: u64,
    mut stored: watch::Receiver<u64>,
    status: &mut StatusFile,
) -> String {
    let ctx = &p.ctx;
    let addresses = match net::addresses(&ctx.setup.netns).await {
        Ok(a) => a,
        Err(e) => return format!("cannot read the container's addresses: {e}"),
    };
    let pair = Control::Pair {
        addresses,
        epoch_ms: u64::try_from(ctx.setup.epoch.as_millis()).unwrap_or(u64::MAX),
        instance,
        mode: "hybrid".into(),
    };
    if let Err(e) = ch.send(STREAM_CONTROL, &pair.encode()).await {
        return e.to_string();
    }
    let file = match std::fs::File::open(&p.log_path) {
        Ok(f) => f,
        Err(e) => return format!("cannot read the log {}: {e}", p.log_path.display()),
    };
    // From now on outputs wait for the backup. The log it gets starts at the beginning, so
    // whatever left while unprotected is covered once it acknowledges.
    p.hold.hold_again();
    let mut acks = ch.acked();
    let mut sent = 0u64;
    let mut acked_offset = 0u64;
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    let mut protected = false;
    let mut output_open = true;
    let mut next_status = Instant::now();
    loop {
        // Send everything stored so far.
        let have = *stored.borrow_and_update();
        while sent < have {
            let want = usize::try_from((have - sent).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = match file.read_at(&mut buf[..want], sent) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return format!("reading the log {}: {e}", p.log_path.display()),
            };
            let seq = match ch.send(STREAM_LOG, &encode_log(sent, &buf[..n])).await {
                Ok(s) => s,
                Err(e) => return e.to_string(),
            };
            sent += n as u64;
            inflight.push_back((seq, sent));
        }
        // Release what is acknowledged.
        let acked_seq = *acks.borrow_and_update();
        while inflight.front().is_some_and(|&(seq, _)| seq <= acked_seq) {
            if let Some((_, end)) = inflight.pop_front() {
                acked_offset = end;
            }
        }
        if acked_offset > 0 {
            p.hold.release_upto(acked_offset);
            if !protected {
                protected = true;
                tracing::info!(id = %ctx.id, bytes = acked_offset, "protected: the backup holds the log");
                refresh_log(status, p, acked_offset);
                status.set(State::Protected, None);
            }
        }
        if Instant::now() >= next_status {
            next_status = Instant::now() + STATUS_EVERY;
            refresh_log(status, p, acked_offset);
            status.save();
        }
        if let Some(e) = ch.error() {
            return e.to_string();
        }
        tokio::select! {
            // Once the recorder's output ended only acknowledgements remain to wait for.
            r = stored.changed(), if output_open => if r.is_err() {
                output_open = false;
            },
            r = acks.changed() => if r.is_err() {
                return ch.error().map(|e| e.to_string()).unwrap_or_else(|| "the channel closed".into());
            },
            _ = tokio::time::sleep(STATUS_EVERY) => {}
        }
    }
}
