//! A process's standard streams.
//!
//! Without a terminal, containerd's FIFOs are handed straight to runc, which gives them to the
//! process: nothing is copied by the shim. With a terminal, runc sends the pty master over a
//! console socket; the shim copies the stdin FIFO into it and its output into the stdout FIFO.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_shim::{other, Error, Result};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use runc::io::FIFO;
use tokio::net::unix::pipe;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// The FIFO paths containerd gave for a process.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO (empty: none).
    pub stdout: String,
    /// stderr FIFO (empty: none).
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

impl Stdio {
    /// Builds the stdio of a process from containerd's paths, accepting plain FIFO paths and
    /// `fifo://` URIs. containerd's other log URIs (`binary://`, used by nerdctl for detached
    /// containers, and `file://`) are refused with a clear error: this shim does not copy output
    /// into loggers yet.
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Result<Stdio> {
        let path = |name: &str, v: &str| -> Result<String> {
            match v.split_once("://") {
                None => Ok(v.to_string()),
                Some(("fifo", p)) => Ok(p.to_string()),
                Some((scheme, _)) => Err(Error::InvalidArgument(format!(
                    "{name} is a {scheme}:// log URI; containerd-shim-rrc-v2 supports only \
                     FIFOs (what ctr and the CRI use) for now, not logging binaries or files"
                ))),
            }
        };
        Ok(Stdio {
            stdin: path("stdin", stdin)?,
            stdout: path("stdout", stdout)?,
            stderr: path("stderr", stderr)?,
            terminal,
        })
    }

    /// runc's view of the FIFOs, for a process without a terminal.
    ///
    /// A stream containerd gave no FIFO for (CRI's sandbox container has none: `NullIO`) is
    /// `/dev/null`. Left unset, runc would get the runc crate's default pipes, the process would
    /// inherit them, and the shim, reading runc's output to its end, would wait for the process
    /// to exit.
    pub fn fifos(&self) -> Arc<FIFO> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let or_null = |s: &str| Some(some(s).unwrap_or_else(|| "/dev/null".to_string()));
        Arc::new(FIFO {
            stdin: some(&self.stdin),
            stdout: or_null(&self.stdout),
            stderr: or_null(&self.stderr),
        })
    }
}

/// A unix socket runc sends the pty master to (`--console-socket`).
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: PathBuf,
    /// The socket's path, for runc.
    pub path: PathBuf,
}

static CONSOLE_SEQ: AtomicU64 = AtomicU64::new(0);

impl ConsoleSocket {
    /// Binds a fresh console socket in a private directory.
    pub fn new() -> Result<ConsoleSocket> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "rrc-pty-{}-{}",
            std::process::id(),
            CONSOLE_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| other!("create console socket dir {}: {e}", dir.display()))?;
        let path = dir.join("pty.sock");
        let listener = UnixListener::bind(&path)
            .map_err(|e| other!("bind console socket {}: {e}", path.display()))?;
        Ok(ConsoleSocket {
            listener,
            dir,
            path,
        })
    }

    /// Waits for runc to connect and receives the pty master.
    pub async fn receive_master(&self) -> Result<OwnedFd> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(|e| other!("accept on console socket: {e}"))?;
        let std_stream = stream
            .into_std()
            .map_err(|e| other!("console socket stream: {e}"))?;
        std_stream
            .set_nonblocking(false)
            .map_err(|e| other!("console socket stream: {e}"))?;
        tokio::task::spawn_blocking(move || receive_fd(std_stream.as_raw_fd()))
            .await
            .map_err(|e| other!("receive pty master: {e}"))?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn receive_fd(sock: RawFd) -> Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| other!("receive pty master: {e}"))?;
    for c in msg.cmsgs().map_err(|e| other!("receive pty master: {e}"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: SCM_RIGHTS just gave us these descriptors; nothing else owns them.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            if !owned.is_empty() {
                return Ok(owned.swap_remove(0));
            }
        }
    }
    Err(other!("runc sent no pty master on the console socket"))
}

/// The copies between a terminal and containerd's FIFOs.
pub struct ConsoleCopy {
    /// The pty master, kept for resizing.
    pub master: OwnedFd,
    stdin_task: Option<JoinHandle<()>>,
}

impl ConsoleCopy {
    /// Starts copying stdin FIFO → master and master → stdout FIFO.
    pub fn start(master: OwnedFd, stdio: &Stdio) -> Result<ConsoleCopy> {
        let dup = |fd: &OwnedFd| -> Result<tokio::fs::File> {
            let d = fd.try_clone().map_err(|e| other!("dup pty master: {e}"))?;
            Ok(tokio::fs::File::from_std(std::fs::File::from(d)))
        };
        let mut stdin_task = None;
        if !stdio.stdin.is_empty() {
            let mut to_master = dup(&master)?;
            // read_write keeps the FIFO open even while no writer is attached.
            let mut from = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&stdio.stdin)
                .map_err(|e| other!("open stdin {}: {e}", stdio.stdin))?;
            stdin_task = Some(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from, &mut to_master).await;
            }));
        }
        if !stdio.stdout.is_empty() {
            let mut from_master = dup(&master)?;
            let mut to = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&stdio.stdout)
                .map_err(|e| other!("open stdout {}: {e}", stdio.stdout))?;
            tokio::spawn(async move {
                // Ends with EIO once every process holding the terminal has exited.
                let _ = tokio::io::copy(&mut from_master, &mut to).await;
            });
        }
        Ok(ConsoleCopy { master, stdin_task })
    }

    /// Stops feeding stdin (CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(t) = self.stdin_task.take() {
            t.abort();
        }
    }

    /// Sets the terminal's size.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let ws = rustix::termios::Winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.master, ws)
            .map_err(|e| Error::Other(format!("resize pty: {e}")))
    }
}

impl Drop for ConsoleCopy {
    fn drop(&mut self) {
        self.close_stdin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_paths_and_uris() {
        let s = Stdio::new("/f/in", "fifo:///f/out", "", false).expect("fifos");
        assert_eq!(
            (s.stdin.as_str(), s.stdout.as_str(), s.stderr.as_str()),
            ("/f/in", "/f/out", "")
        );
        let err = Stdio::new("", "binary:///usr/bin/nerdctl?x=1", "", false).expect_err("binary");
        assert!(err.to_string().contains("binary://"), "{err}");
        assert!(Stdio::new("", "", "file:///var/log/x", false).is_err());
    }
}
