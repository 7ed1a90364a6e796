//! Running commands inside the shim without losing their exit status.
//!
//! The shim reaps every child (`waitpid(-1)`), so `std::process` and tokio cannot wait for their
//! own children reliably here. [`ShimRunner`] subscribes to the shim's exit monitor before it
//! spawns, like [`crate::runc::ReaperAwareSpawner`], and is what `rrc-checkpoint` and the
//! network helpers use.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::monitor::Topic;
use rrc_checkpoint::CommandRunner;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::runc::wait_for_exit;

/// Runs commands whose exit the shim's reaper collects.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShimRunner;

/// The exit monitor's code (128+n for a signal) as an [`ExitStatus`].
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

#[async_trait]
impl CommandRunner for ShimRunner {
    async fn run(&self, mut cmd: tokio::process::Command) -> Result<Output, std::io::Error> {
        let sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let sub_id = sub.id;
        let mut child = match cmd.spawn() {
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
        let (stdout, stderr, code) = tokio::join!(
            read_all(child.stdout.take()),
            read_all(child.stderr.take()),
            wait_for_exit(pid, sub)
        );
        Ok(Output {
            status: exit_status(code),
            stdout,
            stderr,
        })
    }
}

/// Runs `cmd` (stdin piped) with [`ShimRunner`], writing `input` to its stdin; an error with
/// its stderr if it fails.
pub async fn run_with_input(mut cmd: tokio::process::Command, input: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let what = format!("{:?}", cmd.as_std().get_program());
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let sub_id = sub.id;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = monitor_unsubscribe(sub_id).await;
            return Err(format!("{what}: {e}"));
        }
    };
    let Some(pid) = child.id() else {
        let _ = monitor_unsubscribe(sub_id).await;
        return Err(format!("{what}: no pid"));
    };
    if let Some(mut stdin) = child.stdin.take() {
        if let Err(e) = stdin.write_all(input).await {
            tracing::warn!("writing to {what}: {e}");
        }
    }
    let (stderr, code) = tokio::join!(read_all(child.stderr.take()), wait_for_exit(pid, sub));
    if code != 0 {
        return Err(format!(
            "{what} failed ({}): {}",
            exit_status(code),
            String::from_utf8_lossy(&stderr).trim()
        ));
    }
    Ok(())
}

/// Runs `program args...` to its end with [`ShimRunner`]; its stdout, or an error with its
/// stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = ShimRunner
        .run(cmd)
        .await
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
