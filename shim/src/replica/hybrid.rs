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
//! backup     ─ writes to rrc-log-received (same offsets), acknowledges the message
//! hold       ─ tags each outgoing packet with the published length when it arrives;
//!              releases every packet whose tag the backup has acknowledged
//! ```
//!
//! Packets entering the container's namespace go to the recorder's ingress queue (`raw`
//! PREROUTING, before conntrack and TCP) and are logged before the kernel has them, so every
//! acknowledgement the container's kernel sends is covered by the log too.
//!
//! Checkpoints (every epoch, and one at once when a backup pairs):
//!
//! ```text
//! runc checkpoint --leave-running   CRIU starts; its pre-dump action (rrc-criu-hook.sh)
//!                                   reaches the shim's hook server
//! recorder: park EPOCH              every thread stops between system calls, the log is cut
//!                                   (a new segment for the epoch), ingress is held, the
//!                                   cgroup frozen, the tracer detached: CRIU may seize now
//! CRIU dumps                        finds the cgroup frozen, leaves it frozen
//! recorder: resume                  every thread seized again, cgroup thawed, ingress let in
//! images + rrc-log-cut.json         to the backup, which commits them and drops its log
//!                                   before the cut; the primary drops its own (or archives it)
//! ```
//!
//! Outputs are released once this pairing's backup has committed a checkpoint and
//! acknowledged the log up to their tag. Unpaired, outputs flow (the status says unprotected)
//! and the log is dropped as it comes (nothing can replay it); a backup that pairs gets a
//! checkpoint first, then the log from its cut, and holding resumes.
//!
//! Hybrid mode does not take over yet (replay is issue 5): a hybrid backup whose primary dies
//! says so loudly instead of restoring anything stale.
//!
//! If the recorder dies the container dies with it (`PTRACE_O_EXITKILL`: without a tracer,
//! the system calls the container's seccomp filter traces fail with ENOSYS, so it could not
//! run correctly anyway). The shim reports it and the task exits; policy `stop` is the only
//! one hybrid mode accepts (see `prepare`).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::{Error, Result};
use rrc_channel::{Channel, Role as ChannelRole};
use rrc_checkpoint::{Checkpointer, DumpOptions, DumpReport};
use rrc_output_hold::{nfqueue_rule, OutputHold};
use rrc_recorder::control::{Command as ControlCommand, Reply};
use rrc_recorder::position::{SharedPosition, STATE_ATTACHED, STATE_ENDED};

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;

use super::fs::{HookServer, PreDump};
use super::net;
use super::primary::{
    backup_lost, bind, forget_epoch, goodbye, instance_id, ms, primary_status, queues,
    remove_epoch, send_and_commit, End,
};
use super::runner::ShimRunner;
use super::wire::{encode_log, Control, LogCut, STREAM_CONTROL, STREAM_LOG};
use super::{channel_config, ReplicaCtx, ReplicaHandle, StatusFile, EPOCHS_DIR};
use crate::status::{CheckpointFigures, LogFigures, State};

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
pub(super) async fn remove_stale_ingress_rule(ctx: &ReplicaCtx) {
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
    control: Option<RecorderControl>,
}

/// How long the recorder may take to answer a command (a park waits up to 2 s for every thread,
/// then freezes; the recorder itself gives up after 10 s).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// The shim's end of the recorder's control socket (`rrc-recorder --control-fd`, see
/// `rrc_recorder::control`): park the container for a checkpoint, resume it.
pub struct RecorderControl {
    io: tokio::sync::Mutex<(
        tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
}

impl RecorderControl {
    fn new(stream: std::os::unix::net::UnixStream) -> std::io::Result<RecorderControl> {
        stream.set_nonblocking(true)?;
        let (r, w) = tokio::net::UnixStream::from_std(stream)?.into_split();
        Ok(RecorderControl {
            io: tokio::sync::Mutex::new((tokio::io::BufReader::new(r), w)),
        })
    }

    async fn call(&self, cmd: ControlCommand) -> std::result::Result<Reply, String> {
        use tokio::io::AsyncWriteExt;
        let mut io = self.io.lock().await;
        let (r, w) = &mut *io;
        w.write_all(format!("{}\n", cmd.line()).as_bytes())
            .await
            .map_err(|e| format!("the recorder's control socket: {e}"))?;
        let mut line = String::new();
        match tokio::time::timeout(CONTROL_TIMEOUT, r.read_line(&mut line)).await {
            Err(_) => Err(format!(
                "the recorder did not answer {:?} within {CONTROL_TIMEOUT:?}",
                cmd.line()
            )),
            Ok(Err(e)) => Err(format!("the recorder's control socket: {e}")),
            Ok(Ok(0)) => Err("the recorder closed its control socket (it exited)".into()),
            Ok(Ok(_)) => Reply::parse(&line),
        }
    }

    /// Parks the container for the checkpoint of `epoch`: returns the log's cut.
    pub async fn park(&self, epoch: u64) -> std::result::Result<LogCut, String> {
        match self.call(ControlCommand::Park { epoch }).await? {
            Reply::Parked(c) => Ok(LogCut {
                epoch,
                seq: c.seq,
                offset: c.offset,
            }),
            Reply::Error(e) => Err(format!("the recorder could not park the container: {e}")),
            other => Err(format!("the recorder answered park with {other:?}")),
        }
    }

    /// Resumes a parked container; returns how many threads are traced again.
    pub async fn resume(&self) -> std::result::Result<usize, String> {
        match self.call(ControlCommand::Resume).await? {
            Reply::Resumed { threads } => Ok(threads),
            Reply::Error(e) => Err(format!("the recorder could not resume the container: {e}")),
            other => Err(format!("the recorder answered resume with {other:?}")),
        }
    }
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
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    // Non-blocking open: with no reader it fails (ENXIO) instead of hanging. A recorder that
    // is starting has not opened its end yet: try again until it has, or it is known dead, or
    // the deadline passes.
    let mut f = loop {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo);
        let e = match opened {
            Ok(f) => break f,
            Err(e) => e,
        };
        let recorder = i32::try_from(pos.pid()).unwrap_or(0);
        let dead = recorder > 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(recorder), None).is_err();
        if e.raw_os_error() != Some(libc::ENXIO) || dead || Instant::now() > deadline {
            return Err(format!(
                "cannot reach the recorder through {}: {e} ({})",
                fifo.display(),
                if dead {
                    format!("the recorder, pid {recorder}, is gone")
                } else {
                    "is rrc-recorder running?".to_string()
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    std::io::Write::write_all(&mut f, format!("{}\n", st.pid).as_bytes())
        .map_err(|e| format!("writing to {}: {e}", fifo.display()))?;
    drop(f);
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
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::Other(format!("rrc: the recorder's control socket: {e}")))?;
    let control = RecorderControl::new(ours)
        .map_err(|e| Error::Other(format!("rrc: the recorder's control socket: {e}")))?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&bin);
    // SAFETY: runs in the forked child before exec and only calls dup2/fcntl (async-signal
    // safe) on a descriptor the parent keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_fd == CONTROL_FD {
                let flags = libc::fcntl(CONTROL_FD, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(CONTROL_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_fd, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.arg("--control-fd")
        .arg(CONTROL_FD.to_string())
        .arg("--pid-fifo")
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
    let spawned = spawn_recorder(cmd).await;
    drop(theirs);
    let (streams, pid, exit) =
        spawned.map_err(|e| Error::Other(format!("rrc: the recorder: {e}")))?;
    Ok(Recorder {
        streams: Some(streams),
        pid,
        exit,
        position,
        position_path,
        control: Some(control),
    })
}

/// The descriptor the recorder's control socket gets in the recorder.
const CONTROL_FD: i32 = 3;

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
    // CRIU's pre-dump action is where the recorder steps aside for each checkpoint; the hook
    // server also saves the writable layer's delta (post-dump), as in passive mode.
    let (pre_tx, pre_rx) = tokio::sync::mpsc::channel(1);
    let hooks = HookServer::start(&ctx.bundle, ctx.setup.upper.clone(), None, Some(pre_tx));
    let archive = ctx
        .config
        .log_archive
        .as_ref()
        .map(|dir| open_archive(dir, &ctx));
    let (hooks, archive, control, (out, err)) = match (
        hooks,
        archive.transpose(),
        recorder.control.take(),
        recorder.streams.take(),
    ) {
        (Ok(h), Ok(a), Some(c), Some(s)) => (h, a, c, s),
        (h, a, _, _) => {
            recorder.kill();
            remove_rules(&ctx, &out_rule, true).await;
            let why = match (h.err(), a.err()) {
                (Some(e), _) => format!("the CRIU hook's socket: {e}"),
                (_, Some(e)) => format!("io.containerd.rrc.log-archive: {e}"),
                _ => "the recorder's streams were taken".into(),
            };
            return Err(Error::Other(format!("rrc: {why}")));
        }
    };
    tracing::info!(id = %ctx.id, recorder = pid, position = %recorder.position_path.display(), "recorder attached");

    let log_path = ctx.bundle.join(LOG_FILE);
    let (stored_tx, stored_rx) = watch::channel(0u64);
    let reader = tokio::spawn(copy_log(out, log_path.clone(), stored_tx, ctx.id.clone()));
    tokio::spawn(forward_stderr(err, ctx.id.clone()));
    let (tx, rx) = watch::channel(false);
    let exit = recorder.exit.clone();
    let checkpointer = super::checkpointer(&ctx.runc_root, &ctx.runc_binary);
    let parts = Parts {
        ctx,
        hold,
        out_rule,
        position,
        log: std::sync::Mutex::new(LocalLog {
            path: log_path.clone(),
            dropped: 0,
            archive,
        }),
        log_path,
        recorder_pid: pid,
        control,
        hooks,
        pre_dump: tokio::sync::Mutex::new(pre_rx),
        checkpointer,
        epoch: AtomicU64::new(0),
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

/// What a hybrid primary works with for the container's whole life.
struct Parts {
    ctx: ReplicaCtx,
    hold: OutputHold,
    out_rule: Vec<String>,
    position: Arc<SharedPosition>,
    /// The local copy's bookkeeping (what was dropped, the archive).
    log: std::sync::Mutex<LocalLog>,
    log_path: PathBuf,
    recorder_pid: i32,
    control: RecorderControl,
    hooks: HookServer,
    /// CRIU's pre-dump actions, taken by the checkpoint in progress.
    pre_dump: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<PreDump>>,
    checkpointer: Checkpointer<ShimRunner>,
    /// The last epoch started.
    epoch: AtomicU64,
}

/// The primary's copy of the log (`rrc-log`): the sender reads it back, a backup that pairs
/// gets it from the cut of the checkpoint taken at pairing, and everything before the last
/// committed cut is dropped (a hole is punched: the file keeps its size and offsets), or
/// first appended to the archive when `log-archive` is set.
struct LocalLog {
    path: PathBuf,
    /// Bytes before this offset are dropped.
    dropped: u64,
    archive: Option<(PathBuf, std::fs::File)>,
}

impl LocalLog {
    /// Drops (or archives) every byte before `offset`.
    fn discard_before(&mut self, offset: u64) -> std::result::Result<(), String> {
        if offset <= self.dropped {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if let Some((apath, a)) = &mut self.archive {
            let mut buf = vec![0u8; CHUNK];
            let mut at = self.dropped;
            while at < offset {
                let want = usize::try_from((offset - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                let n = file
                    .read_at(&mut buf[..want], at)
                    .map_err(|e| format!("{}: {e}", self.path.display()))?;
                if n == 0 {
                    return Err(format!(
                        "{} ends at {at}, before the cut at {offset}",
                        self.path.display()
                    ));
                }
                std::io::Write::write_all(a, &buf[..n])
                    .map_err(|e| format!("archiving the log to {}: {e}", apath.display()))?;
                at += n as u64;
            }
        }
        super::punch_hole(&file, self.dropped, offset - self.dropped)
            .map_err(|e| format!("dropping the log before {offset}: {e}"))?;
        self.dropped = offset;
        Ok(())
    }
}

/// Opens (afresh) the archive of this container's log in `dir`.
fn open_archive(
    dir: &Path,
    ctx: &ReplicaCtx,
) -> std::result::Result<(PathBuf, std::fs::File), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let path = dir.join(format!("{}-{}.rrclog", ctx.namespace, ctx.id));
    let f = std::fs::File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    Ok((path, f))
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
                // Nothing needs the log while no backup holds it: the next pairing starts
                // from a checkpoint of its own.
                let have = *stored.borrow();
                if let Ok(mut log) = p.log.lock() {
                    if let Err(e) = log.discard_before(have) {
                        tracing::warn!(id = %ctx.id, "{e}");
                    }
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
    // A recorder that died with the container parked for a checkpoint left its cgroup frozen,
    // and frozen tasks do not die: thaw (runc says "not paused" otherwise, which is fine).
    if let Err(e) =
        super::runner::run(&ctx.runc_binary, &["--root", &root, "resume", &ctx.id]).await
    {
        tracing::debug!(id = %ctx.id, "thawing the container after its recorder died: {e}");
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

/// One pairing: a checkpoint right away (the backup needs a state to replay from), the log
/// from that checkpoint's cut on as it grows, a checkpoint every epoch after that; releases
/// outputs as the backup acknowledges. Returns why it ended.
///
/// Release rule: a packet's tag is the log length when it left the container. It leaves once
/// this pairing's backup has committed a checkpoint (the first one covers every packet from
/// before its cut) and acknowledged the log up to the tag.
///
/// The log stream and the checkpoints are two loops that always run together: both send on
/// the channel, and a send holds the channel's writer until its frame is out, so neither may
/// wait on the other while the other is not being polled.
async fn session(
    p: &Parts,
    ch: &Channel,
    instance: u64,
    stored: watch::Receiver<u64>,
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
    // From now on outputs wait for the backup; a new backup has a fresh rootfs (full delta).
    p.hold.hold_again();
    p.hooks.reset();
    let (cut_tx, cut_rx) = watch::channel(None::<LogCut>);
    let (committed_tx, committed_rx) = watch::channel(None::<LogCut>);
    let status = std::sync::Mutex::new(status);
    let log = stream_log(p, ch, &file, stored, cut_rx, committed_rx, &status);
    let checkpoints = checkpoint_loop(p, ch, &cut_tx, &committed_tx, &status);
    tokio::pin!(log, checkpoints);
    tokio::select! {
        why = &mut log => why,
        why = &mut checkpoints => why,
    }
}

type SharedStatus<'a> = std::sync::Mutex<&'a mut StatusFile>;

fn with_status<R>(status: &SharedStatus<'_>, f: impl FnOnce(&mut StatusFile) -> R) -> R {
    let mut guard = status.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// A pairing's log stream: the log from the first checkpoint's cut on (published on `cut`),
/// as it grows; releases outputs as the backup acknowledges it, once a checkpoint is
/// committed (published on `committed`). Returns why it ended.
async fn stream_log(
    p: &Parts,
    ch: &Channel,
    file: &std::fs::File,
    mut stored: watch::Receiver<u64>,
    mut cut: watch::Receiver<Option<LogCut>>,
    mut committed: watch::Receiver<Option<LogCut>>,
    status: &SharedStatus<'_>,
) -> String {
    let ctx = &p.ctx;
    let mut acks = ch.acked();
    // Where the next log message starts: the first checkpoint's cut, once it is known.
    let mut sent: Option<u64> = None;
    let mut acked_offset = 0u64;
    let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    let mut protected = false;
    let mut output_open = true;
    let mut next_status = Instant::now();
    loop {
        if sent.is_none() {
            sent = cut.borrow_and_update().map(|c| c.offset);
        }
        // Send everything stored so far, from the first cut on.
        if let Some(from) = sent.as_mut() {
            let have = *stored.borrow_and_update();
            while *from < have {
                let want = usize::try_from((have - *from).min(CHUNK as u64)).unwrap_or(CHUNK);
                let n = match file.read_at(&mut buf[..want], *from) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return format!("reading the log {}: {e}", p.log_path.display()),
                };
                let seq = match ch.send(STREAM_LOG, &encode_log(*from, &buf[..n])).await {
                    Ok(s) => s,
                    Err(e) => return e.to_string(),
                };
                *from += n as u64;
                inflight.push_back((seq, *from));
            }
        }
        // Release what is acknowledged.
        let acked_seq = *acks.borrow_and_update();
        while inflight.front().is_some_and(|&(seq, _)| seq <= acked_seq) {
            if let Some((_, end)) = inflight.pop_front() {
                acked_offset = end;
            }
        }
        let last = *committed.borrow_and_update();
        if let Some(c) = last {
            if !protected {
                // Back from unprotected (the first checkpoints failed): hold again.
                p.hold.hold_again();
            }
            p.hold.release_upto(acked_offset.max(c.offset));
            if !protected {
                protected = true;
                tracing::info!(id = %ctx.id, epoch = c.epoch, "protected: the backup committed a checkpoint and holds the log after it");
                with_status(status, |st| {
                    refresh_log(st, p, acked_offset);
                    st.set(State::Protected, None);
                });
            }
        }
        if Instant::now() >= next_status {
            next_status = Instant::now() + STATUS_EVERY;
            with_status(status, |st| {
                refresh_log(st, p, acked_offset);
                st.save();
            });
        }
        if let Some(e) = ch.error() {
            return e.to_string();
        }
        tokio::select! {
            _ = cut.changed(), if sent.is_none() => {}
            _ = committed.changed() => {}
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

/// A pairing's checkpoints: one at once, then one every epoch. Each committed one drops the
/// log before its cut and is published on `committed`. Returns why the pairing ended.
async fn checkpoint_loop(
    p: &Parts,
    ch: &Channel,
    cut: &watch::Sender<Option<LogCut>>,
    committed: &watch::Sender<Option<LogCut>>,
    status: &SharedStatus<'_>,
) -> String {
    let ctx = &p.ctx;
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let e = p.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let mut next = started + ctx.setup.epoch;
        match cycle(p, ch, e, cut).await {
            Ok(done) => {
                failures = 0;
                let c = done.cut;
                if let Ok(mut log) = p.log.lock() {
                    if let Err(e) = log.discard_before(c.offset) {
                        tracing::warn!(id = %ctx.id, "{e}");
                    }
                }
                tracing::info!(id = %ctx.id, epoch = c.epoch, seq = c.seq, offset = c.offset, "checkpoint committed: paused {:.1} ms", done.figures.frozen_ms);
                with_status(status, |st| {
                    let s = &mut st.status;
                    s.checkpoints += 1;
                    s.last_committed_epoch = Some(c.epoch);
                    s.last_checkpoint = Some(done.figures);
                    if let Some(l) = s.log.as_mut() {
                        l.kept_from = c.offset;
                    }
                    st.save();
                });
                committed.send_replace(Some(c));
            }
            Err(CycleError::Channel(why)) => return why,
            Err(CycleError::Dump(why)) => {
                failures += 1;
                tracing::error!(id = %ctx.id, epoch = e, "hybrid checkpoint failed: {why}");
                if committed.borrow().is_none() && failures >= MAX_FAILED_CHECKPOINTS {
                    // No state the backup could replay from: rather than stall the clients,
                    // let outputs flow (unprotected) and keep trying.
                    p.hold.release_all();
                    with_status(status, |st| {
                        st.set(
                            State::Unprotected,
                            Some(format!(
                                "{failures} checkpoints in a row failed; last: {why}"
                            )),
                        );
                    });
                }
                next = Instant::now() + ctx.setup.epoch.min(RECONNECT);
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Consecutive failed checkpoints of a pairing without any committed one, after which outputs
/// flow unprotected rather than wait.
const MAX_FAILED_CHECKPOINTS: u32 = 3;

/// A committed checkpoint.
struct Cycle {
    cut: LogCut,
    figures: CheckpointFigures,
}

enum CycleError {
    /// The dump failed; the container runs on, traced.
    Dump(String),
    /// The backup is unreachable: the pairing is over.
    Channel(String),
}

/// One checkpoint: CRIU dumps the container while its recorder steps aside (parked from CRIU's
/// pre-dump action to the end of the dump), the images (with the cut and the writable layer's
/// delta) go to the backup, which commits them.
async fn cycle(
    p: &Parts,
    ch: &Channel,
    e: u64,
    cut_tx: &watch::Sender<Option<LogCut>>,
) -> std::result::Result<Cycle, CycleError> {
    let dir = p.ctx.bundle.join(EPOCHS_DIR).join(e.to_string());
    p.hooks.arm(&dir);
    let dumped = dump_parked(p, &dir, e, cut_tx).await;
    let delta = p.hooks.disarm();
    let (report, cut, paused) = match dumped {
        Ok(d) => d,
        Err(why) => {
            forget_epoch(&dir, Some(&p.hooks), delta.is_some());
            return Err(CycleError::Dump(why));
        }
    };
    let Some(delta) = delta else {
        forget_epoch(&dir, Some(&p.hooks), false);
        return Err(CycleError::Dump(format!(
            "CRIU did not run its post-dump hook ({} in the bundle)",
            super::fs::HOOK_SCRIPT
        )));
    };
    if let Some(st) = &report.stats {
        tracing::debug!(
            epoch = e,
            "checkpoint: paused {:.1} ms (CRIU frozen {:.1} ms: memory dump {:.1} ms, write {:.1} ms), runc {:.1} ms, {} bytes",
            ms(paused),
            ms(st.frozen),
            ms(st.memdump),
            ms(st.memwrite),
            ms(report.wall),
            report.image_bytes
        );
    }
    let (transfer, commit_wait) =
        send_and_commit(ch, &report.image_dir, &dir, e, Some(&p.hooks), true)
            .await
            .map_err(CycleError::Channel)?;
    remove_epoch(&dir);
    Ok(Cycle {
        cut,
        figures: CheckpointFigures {
            epoch: e,
            frozen_ms: ms(paused),
            dump_ms: ms(report.wall),
            transfer_ms: ms(transfer),
            commit_wait_ms: ms(commit_wait),
            bytes: report.image_bytes,
            fs_delta_bytes: delta.bytes,
            at_unix_ms: crate::status::unix_ms_now(),
        },
    })
}

/// `runc checkpoint` of the container, parking its recorder when CRIU reaches its pre-dump
/// action (just before CRIU seizes the tasks) and resuming it once the dump is over. Returns
/// the dump, the log's cut (also written into the image directory, and published on `cut_tx`
/// at once so the log can stream from it), and how long the container was paused.
async fn dump_parked(
    p: &Parts,
    dir: &Path,
    e: u64,
    cut_tx: &watch::Sender<Option<LogCut>>,
) -> std::result::Result<(DumpReport, LogCut, Duration), String> {
    let mut pre = p.pre_dump.lock().await;
    while let Ok(stale) = pre.try_recv() {
        let _ = stale.send(Err("no checkpoint was waiting for it".into()));
    }
    let opts = DumpOptions::default();
    let dump = p.checkpointer.dump(&p.ctx.id, dir, &opts);
    tokio::pin!(dump);
    let mut parked_at: Option<Instant> = None;
    let mut cut: Option<std::result::Result<LogCut, String>> = None;
    let dumped = loop {
        tokio::select! {
            r = &mut dump => break r,
            Some(reply) = pre.recv(), if parked_at.is_none() => {
                let start = Instant::now();
                let r = p.control.park(e).await;
                if r.is_ok() {
                    parked_at = Some(start);
                }
                let r = r.and_then(|c| c.write(dir).map(|()| c));
                let _ = reply.send(r.as_ref().map(drop).map_err(Clone::clone));
                if let Ok(c) = &r {
                    cut_tx.send_replace(Some(*c));
                }
                cut = Some(r);
            }
        }
    };
    drop(pre);
    let resumed = match parked_at {
        Some(_) => p.control.resume().await.map(drop),
        None => Ok(()),
    };
    let paused = parked_at.map(|t| t.elapsed()).unwrap_or_default();
    resumed?;
    match (dumped, cut) {
        (Ok(report), Some(Ok(cut))) => Ok((report, cut, paused)),
        (_, Some(Err(why))) => Err(why),
        (Err(e), _) => Err(e.to_string()),
        (Ok(_), None) => Err(format!(
            "CRIU did not run its pre-dump action ({} in the bundle): the recorder was never \
             parked, so the dump is not used",
            super::fs::HOOK_SCRIPT
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo_and_position(dir: &Path) -> (PathBuf, PathBuf, SharedPosition) {
        let fifo = dir.join(PID_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        let position = dir.join(POSITION_FILE);
        let pos = SharedPosition::create(&position).expect("position");
        (fifo, position, pos)
    }

    #[test]
    fn the_hook_waits_for_a_recorder_that_opens_its_fifo_late() {
        let dir = tempfile::tempdir().expect("tmp");
        let (fifo, position, pos) = fifo_and_position(dir.path());
        pos.set_pid(u64::from(std::process::id()));
        // The "recorder" opens its end only after 100 ms, reads the pid, says attached.
        let f2 = fifo.clone();
        let p2 = position.clone();
        let recorder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let text = std::fs::read_to_string(&f2).expect("read the fifo");
            SharedPosition::open(&p2)
                .expect("position")
                .set_state(STATE_ATTACHED);
            text
        });
        run_hook(&fifo, &position, r#"{"pid": 4242}"#).expect("the hook reached the recorder");
        assert_eq!(recorder.join().expect("thread").trim(), "4242");
    }

    #[test]
    fn the_hook_says_so_at_once_when_the_recorder_is_gone() {
        let dir = tempfile::tempdir().expect("tmp");
        let (fifo, position, pos) = fifo_and_position(dir.path());
        // A pid that exited: a child reaped at once.
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let dead = child.id();
        child.wait().expect("wait");
        pos.set_pid(u64::from(dead));
        let started = Instant::now();
        let err = run_hook(&fifo, &position, r#"{"pid": 4242}"#).expect_err("no recorder");
        assert!(err.contains("is gone"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
