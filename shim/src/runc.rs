//! Running runc from inside the shim.
//!
//! The shim is a child subreaper and the `containerd-shim` crate reaps every child with
//! `waitpid(-1)` on SIGCHLD, so a child's exit status can only be learned from the crate's exit
//! monitor. [`ReaperAwareSpawner`] subscribes to the monitor *before* spawning, then waits for the
//! exit event of its own pid; every runc (and later CRIU) invocation goes through it, so no exit
//! status is lost to the reaper.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{
    monitor_subscribe, monitor_unsubscribe, Subscription,
};
use containerd_shim::monitor::{ExitEvent, Subject, Topic};
use runc::options::GlobalOpts;
use runc::{Command, Runc, Spawner};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::options::ShimOptions;

/// runc's JSON log, in the bundle.
pub const LOG_JSON_FILE: &str = "log.json";
/// The init process's pid file, in the bundle.
pub const INIT_PID_FILE: &str = "init.pid";
/// Where runc keeps container state when nothing says otherwise.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// The directory containerd's v2 runtime keeps bundles in, under its state directory.
const TASK_DIR: &str = "io.containerd.runtime.v2.task";

/// The runc state root for a container: the `Root` runtime option if set; otherwise
/// `<containerd state>/runc`, derived from the bundle path
/// (`<containerd state>/io.containerd.runtime.v2.task/<namespace>/<id>`). For containerd's default
/// state directory that is `/run/containerd/runc`, the same as containerd's runc shim; a second
/// containerd instance with its own state directory gets its own runc root, so one instance's
/// cleanup never touches another's containers. The namespace is appended by [`new_runc`].
pub fn runc_root(opts: &ShimOptions, bundle: &Path) -> PathBuf {
    if !opts.root.is_empty() {
        return PathBuf::from(&opts.root);
    }
    let state = bundle
        .parent()
        .and_then(Path::parent)
        .filter(|d| d.file_name().is_some_and(|n| n == TASK_DIR))
        .and_then(Path::parent);
    match state {
        Some(state) => state.join("runc"),
        None => PathBuf::from(DEFAULT_RUNC_ROOT),
    }
}

/// Reads a pid file runc wrote (`--pid-file`).
pub fn read_pid_file(path: &Path) -> containerd_shim::Result<i32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| containerd_shim::Error::Other(format!("read {}: {e}", path.display())))?;
    text.trim().parse().map_err(|_| {
        containerd_shim::Error::Other(format!("bad pid {text:?} in {}", path.display()))
    })
}

/// Builds the runc client for a container.
pub fn new_runc(
    opts: &ShimOptions,
    namespace: &str,
    bundle: &Path,
) -> Result<Runc, runc::error::Error> {
    let command = if opts.binary_name.is_empty() {
        "runc"
    } else {
        opts.binary_name.as_str()
    };
    let mut g = GlobalOpts::default()
        .command(command)
        .root(runc_root(opts, bundle).join(namespace))
        .log(bundle.join(LOG_JSON_FILE))
        .log_json()
        .systemd_cgroup(opts.systemd_cgroup);
    g.custom_spawner(Arc::new(ReaperAwareSpawner));
    g.build()
}

/// Spawns commands and learns their exit status from the shim's exit monitor.
#[derive(Debug, Default)]
pub struct ReaperAwareSpawner;

#[async_trait]
impl Spawner for ReaperAwareSpawner {
    async fn execute(&self, cmd: Command) -> runc::Result<(ExitStatus, u32, String, String)> {
        let (pid, out) = spawn_and_wait(cmd, None)
            .await
            .map_err(runc::error::Error::ProcessSpawnFailed)?;
        Ok((
            out.status,
            pid,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// Runs `cmd` to its end without losing its exit status to the shim's reaper: subscribes to
/// the exit monitor, spawns, writes `input` to its stdin (then closes it) if given, reads the
/// streams the caller piped to their ends, and waits for the monitor to report the exit.
/// Returns the pid and the output.
pub async fn spawn_and_wait(
    cmd: tokio::process::Command,
    input: Option<&[u8]>,
) -> std::io::Result<(u32, Output)> {
    let (mut child, pid, sub) = spawn_watched(cmd).await?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        if let Err(e) = stdin.write_all(input).await {
            tracing::warn!("writing to a child's stdin: {e}");
        }
    }
    let (stdout, stderr, code) = tokio::join!(
        read_all(child.stdout.take()),
        read_all(child.stderr.take()),
        wait_for_exit(pid, sub)
    );
    Ok((
        pid,
        Output {
            status: exit_status(code),
            stdout,
            stderr,
        },
    ))
}

/// Spawns `cmd` with the shim's exit monitor already subscribed, so its exit cannot be missed;
/// returns the child, its pid and the subscription (for [`wait_for_exit`]). Keep the `Child`
/// until the exit is reported: a dropped tokio `Child` is reaped by tokio's orphan queue, and
/// the monitor never hears of it.
pub async fn spawn_watched(
    mut cmd: tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, u32, Subscription)> {
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let sub_id = sub.id;
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = monitor_unsubscribe(sub_id).await;
            return Err(e);
        }
    };
    let Some(pid) = child.id() else {
        let _ = monitor_unsubscribe(sub_id).await;
        return Err(std::io::Error::other("spawned command has no pid"));
    };
    Ok((child, pid, sub))
}

/// The exit monitor's code (128+n for a signal) as an [`ExitStatus`] (a wait status).
pub fn exit_status(code: i32) -> ExitStatus {
    if code > 128 && code < 128 + 65 {
        ExitStatus::from_raw(code - 128)
    } else {
        ExitStatus::from_raw((code & 0xff) << 8)
    }
}

async fn read_all<R: AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut r) = r {
        if let Err(e) = r.read_to_end(&mut out).await {
            tracing::warn!("reading a child's output: {e}");
        }
    }
    out
}

/// Waits for the monitor to report `pid`'s exit, then unsubscribes.
pub async fn wait_for_exit(pid: u32, mut sub: Subscription) -> i32 {
    let code = loop {
        match sub.rx.recv().await {
            Some(ExitEvent {
                subject: Subject::Pid(p),
                exit_code,
            }) if i64::from(p) == i64::from(pid) => break exit_code,
            Some(_) => continue,
            None => break -1,
        }
    };
    let _ = monitor_unsubscribe(sub.id).await;
    code
}

#[derive(Deserialize)]
struct LogLine {
    level: String,
    msg: String,
}

/// runc's own last error message from its JSON log in the bundle, if it wrote one.
pub fn last_runc_error(bundle: &Path) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join(LOG_JSON_FILE)).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
        .filter(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg.trim().to_string())
        .next_back()
}

/// An error for a failed runc call: runc's own message from its log when there is one, otherwise
/// what the runc crate reported.
pub fn runtime_error(bundle: &Path, e: runc::error::Error, what: &str) -> containerd_shim::Error {
    match last_runc_error(bundle) {
        Some(msg) => containerd_shim::Error::Other(format!("{what}: {msg}")),
        None => containerd_shim::Error::Other(format!("{what}: {e}")),
    }
}

/// Maps runc's kill errors to the codes containerd expects.
pub fn kill_error(e: runc::error::Error) -> containerd_shim::Error {
    let msg = e.to_string().to_lowercase();
    if msg.contains("process already finished")
        || msg.contains("container not running")
        || msg.contains("no such process")
    {
        containerd_shim::Error::NotFoundError("process already finished".into())
    } else if msg.contains("does not exist") {
        containerd_shim::Error::NotFoundError("no such container".into())
    } else {
        containerd_shim::Error::Other(format!("runc kill failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_follows_containerd_state_dir() {
        let o = ShimOptions::default();
        let b = Path::new("/run/containerd/io.containerd.runtime.v2.task/default/c1");
        assert_eq!(runc_root(&o, b), PathBuf::from("/run/containerd/runc"));
        let b = Path::new("/tmp/h1/state/io.containerd.runtime.v2.task/k8s.io/c1");
        assert_eq!(runc_root(&o, b), PathBuf::from("/tmp/h1/state/runc"));
        assert_eq!(
            runc_root(&o, Path::new("/srv/bundle")),
            PathBuf::from(DEFAULT_RUNC_ROOT)
        );
        let o = ShimOptions {
            root: "/custom".into(),
            ..Default::default()
        };
        assert_eq!(runc_root(&o, b), PathBuf::from("/custom"));
    }

    #[test]
    fn last_error_is_taken_from_the_log() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join(LOG_JSON_FILE),
            "{\"level\":\"info\",\"msg\":\"x\"}\nnot json\n{\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH \"}\n",
        )
        .expect("write");
        assert_eq!(
            last_runc_error(dir.path()).as_deref(),
            Some("exec: \"nope\": executable file not found in $PATH")
        );
        assert_eq!(last_runc_error(Path::new("/nonexistent")), None);
    }
}
