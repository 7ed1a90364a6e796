//! How commands are run.
//!
//! Inside the shim, a child's exit status can only be learned from containerd-shim's exit monitor
//! (the shim reaps every child with `waitpid(-1)`), so the shim plugs in its own
//! [`CommandRunner`]; tests and stand-alone programs use [`TokioRunner`].

use std::process::Output;

use async_trait::async_trait;

/// Runs a prepared command to its end and returns its status and output.
///
/// The command's standard streams are used *as configured*: the caller sets
/// [`std::process::Stdio::piped`] on the streams it wants captured (those are read to their end
/// and returned), and other streams (a restored container inherits runc's stdout and stderr)
/// must not be replaced. So do not implement this with [`tokio::process::Command::output`],
/// which pipes stdout and stderr unconditionally: the restored container would then hold the
/// pipes and the call would never end.
#[async_trait]
pub trait CommandRunner: Send + Sync {
    /// Runs `cmd`.
    async fn run(&self, cmd: tokio::process::Command) -> Result<Output, std::io::Error>;
}

/// Spawns commands with tokio and waits for them: for processes that do not reap children behind
/// tokio's back.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioRunner;

#[async_trait]
impl CommandRunner for TokioRunner {
    async fn run(&self, mut cmd: tokio::process::Command) -> Result<Output, std::io::Error> {
        cmd.spawn()?.wait_with_output().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[tokio::test]
    async fn captures_only_piped_streams() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let out = TokioRunner.run(cmd).await.expect("runs");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert!(out.stderr.is_empty());

        // A stream given to a process that outlives the command is not waited for.
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(tmp.path().join("o")).expect("create");
        let mut cmd = tokio::process::Command::new("sh");
        // The sleep keeps stdout (the file) open; its pid comes back on the piped stderr.
        cmd.args(["-c", "sleep 30 2>/dev/null & echo $! >&2"])
            .stdout(file)
            .stderr(Stdio::piped());
        let start = std::time::Instant::now();
        let out = TokioRunner.run(cmd).await.expect("runs");
        assert!(out.status.success());
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        let pid: i32 = String::from_utf8_lossy(&out.stderr)
            .trim()
            .parse()
            .expect("the sleep's pid");
        let killed = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(killed.success());
    }
}
