//! The primary's side of hybrid mode: record, stream the log, release outputs on the backup's
//! acknowledgement (issue 4; design in `docs/hybrid-mode.md`).
//!
//! ```text
//! Create     ─ the shim starts rrc-recorder --pid-fifo FIFO (a process of its own), waiting
//! runc create ─ its createRuntime hook (containerd-shim-rrc-v2 recorder-hook) hands the
//!              recorder the init's pid and waits until every thread is seized (the position
//!              file says so): before runc installs the seccomp filter, so no traced system
//!              call of runc's own init ever runs without its tracer
//! Start      ─ output hold and ingress rule, then runc start
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
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::{Error, Result};
use rrc_channel::{Channel, Role as ChannelRole};
use rrc_output_hold::{nfqueue_rule, OutputHold};
use rrc_recorder::position::{SharedPosition, STATE_ATTACHED, STATE_ENDED};

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;

use super::net;
use super::primary::{backup_lost, bind, goodbye, instance_id, primary_status, queues, End};
use super::wire::{encode_log, Control, STREAM_CONTROL, STREAM_LOG};
use super::{channel_config, ReplicaCtx, ReplicaHandle, StatusFile};
use crate::status::{LogFigures, State};

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

/// The FIFO the recorder reads the init's pid from, in the bundle.
pub const PID_FIFO: &str = "rrc-recorder-pid";

/// A recorder started at Create, waiting for (then attached to) the container's init.
pub struct Recorder {
    streams: Option<Streams>,
    pid: i32,
    exit: watch::Receiver<Exit>,
    position: Arc<SharedPosition>,
    position_path: PathBuf,
}

impl Recorder {
    /// Whether it has seized every thread of the init.
    pub fn attached(&self) -> bool {
        self.position.state() == STATE_ATTACHED
    }

    /// Kills it (Create failed: the container will not run).
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The OCI hook that hands the recorder the init's pid: runc runs `createRuntime` hooks after
/// it created the init process and before the init installs the seccomp filter.
pub fn hook(bundle: &Path) -> Result<oci_spec::runtime::Hook> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("rrc: cannot find the shim's own binary: {e}")))?;
    oci_spec::runtime::HookBuilder::default()
        .path(exe)
        .args(vec![
            "containerd-shim-rrc-v2".to_string(),
            "recorder-hook".to_string(),
            bundle.join(PID_FIFO).display().to_string(),
            bundle.join(POSITION_FILE).display().to_string(),
        ])
        .timeout(i64::try_from(ATTACH_TIMEOUT.as_secs()).unwrap_or(10) + 5)
        .build()
        .map_err(|e| Error::Other(format!("rrc: the recorder's hook: {e}")))
}

/// `containerd-shim-rrc-v2 recorder-hook FIFO POSITION`, run by runc as a `createRuntime`
/// hook with the container's state on stdin: writes the init's pid to the recorder's FIFO and
/// waits until the recorder has seized it.
pub fn run_hook(fifo: &Path, position: &Path, state: &str) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct OciState {
        pid: i32,
    }
    let st: OciState = serde_json::from_str(state)
        .map_err(|e| format!("the OCI state on stdin has no pid: {e}"))?;
    let pos = SharedPosition::open(position).map_err(|e| format!("{}: {e}", position.display()))?;
    // Non-blocking open: with no reader (the recorder is gone) this fails instead of hanging.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| {
            format!(
                "cannot reach the recorder through {}: {e} (is rrc-recorder running?)",
                fifo.display()
            )
        })?;
    std::io::Write::write_all(&mut f, format!("{}\n", st.pid).as_bytes())
        .map_err(|e| format!("writing to {}: {e}", fifo.display()))?;
    drop(f);
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    while pos.state() != STATE_ATTACHED {
        if Instant::now() > deadline {
            return Err(format!(
                "the recorder did not attach to pid {} within {ATTACH_TIMEOUT:?}",
                st.pid
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Starts the recorder for a container about to be created (`runc create` follows; its hook
/// names the init). The recorder runs as a process of its own, watched by the shim's exit
/// monitor; it logs the packets entering `netns` too.
pub async fn spawn(bundle: &Path, id: &str, netns: &Path, cpu: Option<u32>) -> Result<Recorder> {
    let bin = recorder_binary().ok_or_else(|| {
        Error::Other(format!(
            "rrc: hybrid mode needs {RECORDER_BIN} next to the shim or on PATH (make install)"
        ))
    })?;
    let position_path = bundle.join(POSITION_FILE);
    let position = Arc::new(
        SharedPosition::create(&position_path)
            .map_err(|e| Error::Other(format!("rrc: {}: {e}", position_path.display())))?,
    );
    let fifo = bundle.join(PID_FIFO);
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| Error::Other(format!("rrc: mkfifo {}: {e}", fifo.display())))?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--pid-fifo")
        .arg(&fifo)
        .args(["--out", "-", "--position-file"])
        .arg(&position_path)
        .args(["--container-id", id, "--ingress-queue"])
        .arg(ingress_queue(id).to_string())
        .arg("--netns")
        .arg(netns)
        .args(
            cpu.map(|c| ["--cpu".to_string(), c.to_string()])
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (streams, pid, exit) = spawn_recorder(cmd)
        .await
        .map_err(|e| Error::Other(format!("rrc: the recorder: {e}")))?;
    Ok(Recorder {
        streams: Some(streams),
        pid,
        exit,
        position,
        position_path,
    })
}

/// Starts replicating a created container whose recorder is attached: the output hold, the
/// ingress log's rule, and the replication task. Fails, with nothing left running, if any of
/// it cannot start.
pub async fn start(ctx: ReplicaCtx, mut recorder: Recorder) -> Result<ReplicaHandle> {
    if !recorder.attached() {
        recorder.kill();
        let exited = *recorder.exit.borrow();
        let why = match exited {
            Some(code) => format!("it exited ({})", describe_exit(code)),
            None => "it is still waiting".to_string(),
        };
        return Err(Error::Other(format!(
            "rrc: the recorder never attached to the container ({why}); see the shim's log"
        )));
    }
    let (queue, _) = queues(&ctx.id);
    let hold = bind(&ctx.setup.netns, queue, "hold the container's outputs").await?;
    hold.release_all();
    let position = recorder.position.clone();
    let p = position.clone();
    hold.set_tag_source(Box::new(move || p.written()));

    super::primary::remove_stale_rules(&ctx).await;
    remove_stale_ingress_rule(&ctx).await;
    let out_rule = nfqueue_rule(None, queue);
    let mut add = vec!["-A".to_string()];
    add.extend(out_rule.iter().cloned());
    if let Err(e) = net::iptables(&ctx.setup.netns, &add).await {
        recorder.kill();
        return Err(Error::Other(format!(
            "rrc: cannot install the output hold's rule: {e}"
        )));
    }
    let pid = recorder.pid;
    if let Err(e) = raw_rule(&ctx.setup.netns, "-A", &ingress_rule(&ctx.id)).await {
        recorder.kill();
        remove_rules(&ctx, &out_rule, false).await;
        return Err(Error::Other(format!(
            "rrc: cannot install the ingress log's rule: {e}"
        )));
    }
    let Some((out, err)) = recorder.streams.take() else {
        return Err(Error::Other(
            "rrc: the recorder's streams were taken".into(),
        ));
    };
    tracing::info!(id = %ctx.id, recorder = pid, position = %recorder.position_path.display(), "recorder attached");

    let log_path = ctx.bundle.join(LOG_FILE);
    let (stored_tx, stored_rx) = watch::channel(0u64);
    let reader = tokio::spawn(copy_log(out, log_path.clone(), stored_tx, ctx.id.clone()));
    tokio::spawn(forward_stderr(err, ctx.id.clone()));
    let (tx, rx) = watch::channel(false);
    let exit = recorder.exit.clone();
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

/// Spawns the recorder with the shim's exit monitor watching it; returns its streams, pid,
/// and a watch of its exit.
async fn spawn_recorder(
    cmd: tokio::process::Command,
) -> std::result::Result<(Streams, i32, watch::Receiver<Exit>), String> {
    let (mut child, pid, sub) = crate::runc::spawn_watched(cmd)
        .await
        .map_err(|e| format!("cannot start it: {e}"))?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("its streams were not piped".into());
    };
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        // The Child stays alive until the shim's monitor reported the exit (see spawn_watched).
        let _child = child;
        let code = crate::runc::wait_for_exit(pid, sub).await;
        tracing::info!(
            recorder = pid,
            "the recorder exited ({})",
            describe_exit(code)
        );
        exit_tx.send_replace(Some(code));
    });
    let pid = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    Ok(((out, err), pid, exit_rx))
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
    let (peer, mut status) = primary_status(ctx, "hybrid", "recording; ");
    status.status.log = Some(LogFigures::default());
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
                if backup_lost(ctx, &p.hold, &why, &mut status).await {
                    fenced = true;
                    break;
                }
            }
        }
    }
    if recorder_end.is_none() && !fenced {
        // The container stopped: its recorder ends with it (or killed it, dying first). Which
        // of the two exits the shim heard first is a race; wait briefly for the recorder's.
        let ended = tokio::time::timeout(Duration::from_secs(1), exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().map(|c| (*c).unwrap_or(-1)));
        recorder_end = ended;
    }
    p.hold.release_all();
    remove_rules(ctx, &p.out_rule, true).await;
    if let Some(code) = recorder_end {
        recorder_ended(p, code, &mut status).await;
    } else if !fenced {
        status.set(State::Stopped, None);
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
    log.mean_hold_us = p.hold.mean_hold_us();
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
