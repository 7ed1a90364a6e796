//! Running commands inside the shim without losing their exit status.
//!
//! The shim reaps every child (`waitpid(-1)`), so `std::process` and tokio cannot wait for their
//! own children reliably here. [`ShimRunner`] subscribes to the shim's exit monitor before it
//! spawns (through [`crate::runc::spawn_and_wait`], as runc's calls do), and is what `rrc-checkpoint` and the
//! network helpers use.

use std::process::Output;

use async_trait::async_trait;
use rrc_checkpoint::CommandRunner;

use crate::runc::spawn_and_wait;

/// Runs commands whose exit the shim's reaper collects.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShimRunner;

#[async_trait]
impl CommandRunner for ShimRunner {
    async fn run(&self, cmd: tokio::process::Command) -> Result<Output, std::io::Error> {
        spawn_and_wait(cmd, None).await.map(|(_, out)| out)
    }
}

/// Runs `cmd` (stdin piped) with [`ShimRunner`], writing `input` to its stdin; an error with
/// its stderr if it fails.
pub async fn run_with_input(cmd: tokio::process::Command, input: &[u8]) -> Result<(), String> {
    let what = format!("{:?}", cmd.as_std().get_program());
    let (_, out) = spawn_and_wait(cmd, Some(input))
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
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
