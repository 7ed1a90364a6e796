//! The state the shim keeps for one process (a container's init or an exec).

use containerd_shim::protos::api::{StateResponse, Status};
use containerd_shim::util::convert_to_timestamp;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::io::{ProcessIo, Stdio};

/// Exit status and time, as Wait reports them.
pub type ExitInfo = (u32, Option<OffsetDateTime>);

/// One process of a container.
pub struct Process {
    /// The container id for init, the exec id for an exec.
    pub id: String,
    /// Host pid, 0 until created (init) or started (exec).
    pub pid: i32,
    /// Lifecycle state.
    pub status: Status,
    /// Exit status (128+n for a signal death), valid once stopped.
    pub exit_status: u32,
    /// When it exited.
    pub exited_at: Option<OffsetDateTime>,
    /// Its FIFOs.
    pub stdio: Stdio,
    /// Its terminal and logger, once started.
    pub io: ProcessIo,
    /// Wait calls to wake at exit.
    waiters: Vec<oneshot::Sender<ExitInfo>>,
    /// An exec's process spec (None for init).
    pub spec: Option<oci_spec::runtime::Process>,
}

impl Process {
    /// A process not started yet.
    pub fn new(id: &str, stdio: Stdio, spec: Option<oci_spec::runtime::Process>) -> Process {
        Process {
            id: id.to_string(),
            pid: 0,
            status: Status::CREATED,
            exit_status: 0,
            exited_at: None,
            stdio,
            io: ProcessIo::default(),
            waiters: Vec::new(),
            spec,
        }
    }

    /// Records the exit and wakes every waiter. Only the first exit counts.
    pub fn set_exited(&mut self, exit_status: i32) {
        if self.status == Status::STOPPED {
            return;
        }
        self.status = Status::STOPPED;
        self.exit_status = u32::try_from(exit_status).unwrap_or(255);
        self.exited_at = Some(OffsetDateTime::now_utc());
        for w in self.waiters.drain(..) {
            let _ = w.send((self.exit_status, self.exited_at));
        }
    }

    /// A receiver that resolves when the process exits (at once if it already has).
    pub fn wait_channel(&mut self) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        if self.status == Status::STOPPED {
            let _ = tx.send((self.exit_status, self.exited_at));
        } else {
            self.waiters.push(tx);
        }
        rx
    }

    /// The process as containerd's State RPC describes it.
    pub fn state(&self, bundle: &str) -> StateResponse {
        let mut r = StateResponse::new();
        r.id = self.id.clone();
        r.bundle = bundle.to_string();
        r.pid = u32::try_from(self.pid).unwrap_or(0);
        r.set_status(self.status);
        r.stdin = self.stdio.stdin.clone();
        r.stdout = self.stdio.stdout.clone();
        r.stderr = self.stdio.stderr.clone();
        r.terminal = self.stdio.terminal;
        r.exit_status = self.exit_status;
        if self.exited_at.is_some() {
            r.exited_at = Some(convert_to_timestamp(self.exited_at)).into();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_once_at_exit() {
        let stdio = Stdio::new("", "", "", false).expect("no streams");
        let mut p = Process::new("c", stdio, None);
        let rx = p.wait_channel();
        p.set_exited(137);
        assert_eq!(rx.await.expect("woken").0, 137);
        assert_eq!(p.exit_status, 137);
        p.set_exited(0);
        assert_eq!(p.exit_status, 137, "first exit wins");
        let (code, at) = p
            .wait_channel()
            .await
            .expect("already stopped resolves at once");
        assert_eq!((code, at.is_some()), (137, true));
        assert_eq!(p.state("/b").status(), Status::STOPPED);
    }
}
