//! A process's standard streams.
//!
//! Without a terminal, containerd's FIFOs are handed straight to runc, which gives them to the
//! process: nothing is copied by the shim. With a terminal, runc sends the pty master over a
//! console socket; the shim copies the stdin FIFO into it and its output into the stdout FIFO.
//! Output given as a log URI (`binary://`, `file://`, see [`crate::logging`]) goes through pipes
//! to a logging binary or into a file.
//!
//! A replicated container's streams are always pipes ([`replica_streams`]): CRIU cannot dump a
//! FIFO or a file opened from the host's mounts, and a restored container gets pipes again. The
//! shim copies between those pipes and containerd's FIFOs or log URI.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_shim::{other, Error, Result};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use runc::io::FIFO;

use tokio::io::AsyncWrite;
use tokio::net::unix::pipe;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::logging::{pipe as os_pipe, Logger, Output, PipeIo};

/// The streams containerd gave for a process.
#[derive(Debug, Clone)]
pub struct Stdio {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout as containerd gave it (a FIFO path or a log URI), for State.
    pub stdout: String,
    /// stderr as containerd gave it, for State.
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
    /// Where the output goes.
    pub output: Output,
}

impl Stdio {
    /// Builds the stdio of a process from containerd's strings: FIFO paths (bare or `fifo://`)
    /// or, for the output, a `binary://` or `file://` log URI. Anything else is refused with an
    /// error that says what is accepted.
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Result<Stdio> {
        let stdin = match stdin.split_once("://") {
            None => stdin.to_string(),
            Some(("fifo", p)) => p.to_string(),
            Some((scheme, _)) => {
                return Err(Error::InvalidArgument(format!(
                    "stdin is a {scheme}:// URI; stdin must be a FIFO"
                )))
            }
        };
        Ok(Stdio {
            stdin,
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            terminal,
            output: Output::parse(stdout, stderr)?,
        })
    }

    /// runc's view of the FIFOs, for a process without a terminal whose output is FIFOs.
    ///
    /// A stream containerd gave no FIFO for (CRI's sandbox container has none: `NullIO`) is
    /// `/dev/null`. Left unset, runc would get the runc crate's default pipes, the process would
    /// inherit them, and the shim, reading runc's output to its end, would wait for the process
    /// to exit.
    fn fifos(&self) -> Arc<FIFO> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let or_null = |s: &str| Some(some(s).unwrap_or_else(|| "/dev/null".to_string()));
        let (stdout, stderr) = match &self.output {
            Output::Fifo { stdout, stderr } => (or_null(stdout), or_null(stderr)),
            _ => (or_null(""), or_null("")),
        };
        Arc::new(FIFO {
            stdin: some(&self.stdin),
            stdout,
            stderr,
        })
    }
}

/// Where a terminal's output is copied to.
enum ConsoleOut {
    /// Nowhere.
    None,
    /// containerd's stdout FIFO.
    Fifo(String),
    /// A pipe to a logging binary, or a log file.
    Writer(OwnedFd),
}

/// A process's stdio while runc creates it: made before `runc create`/`runc exec`, finished
/// after it succeeded (or aborted after it failed).
pub struct IoSetup {
    console: Option<ConsoleSocket>,
    console_out: Option<ConsoleOut>,
    runc_io: Option<Arc<dyn runc::io::Io>>,
    logger: Option<Logger>,
}

impl IoSetup {
    /// Prepares the streams of process `id`: the console socket for a terminal, the FIFOs or
    /// pipes runc hands the process otherwise, and the logger a log URI asks for.
    pub async fn new(stdio: &Stdio, id: &str, namespace: &str) -> Result<IoSetup> {
        let (logger, pipes) = match &stdio.output {
            Output::Fifo { .. } => (None, None),
            output => {
                let (out_r, out_w) = os_pipe()?;
                let (err_r, err_w) = os_pipe()?;
                let logger = Logger::start(output, id, namespace, out_r, err_r).await?;
                (logger, Some((out_w, err_w)))
            }
        };
        if stdio.terminal {
            let console = match ConsoleSocket::new() {
                Ok(c) => c,
                Err(e) => {
                    if let Some(l) = logger {
                        l.stop().await;
                    }
                    return Err(e);
                }
            };
            // A terminal has one output stream: stderr's pipe (if any) is closed here.
            let out = match (pipes, &stdio.output) {
                (Some((out_w, _)), _) => ConsoleOut::Writer(out_w),
                (None, Output::Fifo { stdout, .. }) if !stdout.is_empty() => {
                    ConsoleOut::Fifo(stdout.clone())
                }
                _ => ConsoleOut::None,
            };
            return Ok(IoSetup {
                console: Some(console),
                console_out: Some(out),
                runc_io: None,
                logger,
            });
        }
        let runc_io: Arc<dyn runc::io::Io> = match pipes {
            Some((stdout, stderr)) => Arc::new(PipeIo {
                stdin: (!stdio.stdin.is_empty()).then(|| PathBuf::from(&stdio.stdin)),
                stdout,
                stderr,
            }),
            None => stdio.fifos(),
        };
        Ok(IoSetup {
            console: None,
            console_out: None,
            runc_io: Some(runc_io),
            logger,
        })
    }

    /// The console socket to give runc, for a terminal.
    pub fn console_socket(&self) -> Option<&Path> {
        self.console.as_ref().map(|c| c.path.as_path())
    }

    /// The streams to give runc, without a terminal.
    pub fn runc_io(&self) -> Option<Arc<dyn runc::io::Io>> {
        self.runc_io.clone()
    }

    /// After runc succeeded: receives the terminal, starts copying, and returns what the process
    /// keeps. The shim's copies of the output pipes' write ends close here, so the logger sees
    /// the end of the output when the process's own copies close.
    pub async fn finish(mut self, stdio: &Stdio) -> Result<ProcessIo> {
        self.runc_io = None;
        let console = match self.console.take() {
            None => None,
            Some(socket) => {
                let out = self.console_out.take().unwrap_or(ConsoleOut::None);
                let copied = async {
                    let master = socket.receive_master().await?;
                    ConsoleCopy::start(master, &stdio.stdin, out)
                }
                .await;
                match copied {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.abort().await;
                        return Err(e);
                    }
                }
            }
        };
        Ok(ProcessIo {
            console,
            logger: self.logger.take(),
        })
    }

    /// After runc failed: stops the logger.
    pub async fn abort(mut self) {
        if let Some(l) = self.logger.take() {
            l.stop().await;
        }
    }
}

/// What a running process keeps of its stdio.
#[derive(Default)]
pub struct ProcessIo {
    /// Its terminal, if it has one.
    pub console: Option<ConsoleCopy>,
    logger: Option<Logger>,
}

impl ProcessIo {
    /// At delete: stops the terminal copies and lets the logger finish.
    pub async fn close(&mut self) {
        self.console = None;
        if let Some(l) = self.logger.take() {
            l.stop().await;
        }
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
    /// Starts copying the stdin FIFO → master and master → the output.
    fn start(master: OwnedFd, stdin: &str, out: ConsoleOut) -> Result<ConsoleCopy> {
        let dup = |fd: &OwnedFd| -> Result<tokio::fs::File> {
            let d = fd.try_clone().map_err(|e| other!("dup pty master: {e}"))?;
            Ok(tokio::fs::File::from_std(std::fs::File::from(d)))
        };
        let mut stdin_task = None;
        if !stdin.is_empty() {
            let mut to_master = dup(&master)?;
            // read_write keeps the FIFO open even while no writer is attached.
            let mut from = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(stdin)
                .map_err(|e| other!("open stdin {stdin}: {e}"))?;
            stdin_task = Some(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from, &mut to_master).await;
            }));
        }
        let to: Option<Box<dyn AsyncWrite + Send + Unpin>> = match out {
            ConsoleOut::None => None,
            ConsoleOut::Fifo(path) => Some(Box::new(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&path)
                    .map_err(|e| other!("open stdout {path}: {e}"))?,
            )),
            ConsoleOut::Writer(fd) => {
                Some(Box::new(tokio::fs::File::from_std(std::fs::File::from(fd))))
            }
        };
        if let Some(mut to) = to {
            let mut from_master = dup(&master)?;
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
        let s = Stdio::new("fifo:///f/in", "fifo:///f/out", "", false).expect("fifos");
        assert_eq!(s.stdin, "/f/in");
        assert_eq!(
            s.output,
            Output::Fifo {
                stdout: "/f/out".into(),
                stderr: String::new()
            }
        );
        let s = Stdio::new(
            "",
            "binary:///bin/logger?a=b",
            "binary:///bin/logger?a=b",
            false,
        )
        .expect("binary");
        assert_eq!(
            s.stdout, "binary:///bin/logger?a=b",
            "State reports what was given"
        );
        assert!(
            Stdio::new("binary:///x", "", "", false).is_err(),
            "stdin is a FIFO"
        );
    }
}

/// The pipe ends a replicated container's init gets as stdin, stdout and stderr.
#[derive(Debug)]
pub struct ReplicaPipes {
    /// Read end of its stdin pipe.
    pub stdin: OwnedFd,
    /// Write end of its stdout pipe.
    pub stdout: OwnedFd,
    /// Write end of its stderr pipe.
    pub stderr: OwnedFd,
}

#[async_trait::async_trait]
impl runc::io::Io for ReplicaPipes {
    async fn set(&self, cmd: &mut runc::Command) -> std::io::Result<()> {
        cmd.stdin(self.stdin.try_clone()?);
        cmd.stdout(self.stdout.try_clone()?);
        cmd.stderr(self.stderr.try_clone()?);
        Ok(())
    }

    async fn close_after_start(&self) {}
}

/// Makes the pipes of a replicated container's init (at create, or for a restore) and starts
/// copying: containerd's stdin FIFO (if any) into the stdin pipe, the output pipes into the
/// stdout/stderr FIFOs or the log URI's consumer. A replicated container has no terminal.
pub async fn replica_streams(
    stdio: &Stdio,
    id: &str,
    namespace: &str,
) -> Result<(ReplicaPipes, ProcessIo)> {
    if stdio.terminal {
        return Err(Error::InvalidArgument(
            "a replicated container cannot have a terminal (its streams must be pipes that \
             CRIU can checkpoint); run it without -t/--tty"
                .into(),
        ));
    }
    let (in_r, in_w) = os_pipe()?;
    let (out_r, out_w) = os_pipe()?;
    let (err_r, err_w) = os_pipe()?;
    let logger = match &stdio.output {
        Output::Fifo { stdout, stderr } => {
            Some(Logger::copy_to_fifos(stdout, stderr, out_r, err_r))
        }
        output => Logger::start(output, id, namespace, out_r, err_r).await?,
    };
    if !stdio.stdin.is_empty() {
        let path = stdio.stdin.clone();
        let to = pipe::Sender::from_owned_fd(in_w).map_err(|e| other!("stdin pipe: {e}"))?;
        // Opened non-blocking (a blocking open waits for a writer) and read through epoll, so
        // the copy never pins a thread the shim would wait for at exit.
        let from = pipe::OpenOptions::new()
            .read_write(false)
            .open_receiver(&path)
            .map_err(|e| other!("open stdin FIFO {path}: {e}"))?;
        tokio::spawn(async move {
            let (mut from, mut to) = (from, to);
            if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
                tracing::debug!("copying stdin from {path}: {e}");
            }
        });
    }
    // Without a stdin FIFO the write end is dropped here: the process reads EOF.
    Ok((
        ReplicaPipes {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
        ProcessIo {
            console: None,
            logger,
        },
    ))
}
