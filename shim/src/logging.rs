//! containerd's log URIs: where a process's output goes when it is not a FIFO.
//!
//! containerd clients may give, instead of FIFO paths, a URI for stdout (and the same for stderr):
//!
//! * `binary:///path/to/logger?key=value&...` — the shim starts the logging binary with the
//!   arguments `key value ...` and the environment `CONTAINER_ID`, `CONTAINER_NAMESPACE`; the
//!   process's stdout is readable on the logger's fd 3, stderr on fd 4, and the logger closes (or
//!   writes to) fd 5 once it is ready. nerdctl uses this for detached containers.
//! * `file:///path/to/file` — the shim appends stdout and stderr to the file.
//! * `fifo:///path` or a bare path — a FIFO, handed to runc as it is.
//!
//! This is containerd's runc shim's convention; this module implements it for rrc's shim.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::{other, Error, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::task::JoinHandle;

/// Where a process's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// FIFOs (possibly empty: no output).
    Fifo {
        /// stdout FIFO path, empty for none.
        stdout: String,
        /// stderr FIFO path, empty for none.
        stderr: String,
    },
    /// A logging binary.
    Binary {
        /// The binary.
        path: PathBuf,
        /// Its arguments, from the URI's query.
        args: Vec<String>,
    },
    /// A file both streams are appended to.
    File(PathBuf),
}

fn percent_decode(s: &str, plus_is_space: bool) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Splits `scheme://rest` (None for a bare path).
fn scheme(uri: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = uri.split_once("://")?;
    let valid = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

/// The absolute path of `binary:///path` or `file:///path` (no host allowed).
fn uri_path(name: &str, uri: &str, rest: &str) -> Result<PathBuf> {
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "{name} URI {uri:?} must name an absolute path, as in scheme:///path"
        )));
    }
    let path = percent_decode(path, false)
        .map_err(|e| Error::InvalidArgument(format!("{name} URI {uri:?}: {e}")))?;
    Ok(PathBuf::from(path))
}

impl Output {
    /// Parses containerd's stdout and stderr strings.
    pub fn parse(stdout: &str, stderr: &str) -> Result<Output> {
        let fifo = |name: &str, v: &str| -> Result<String> {
            match scheme(v) {
                None => Ok(v.to_string()),
                Some(("fifo", p)) => Ok(p.to_string()),
                Some((s, _)) => Err(Error::InvalidArgument(format!(
                    "{name} is a {s}:// URI while stdout is a FIFO; give both as FIFOs, or \
                     stdout as a binary:// or file:// log URI"
                ))),
            }
        };
        match scheme(stdout) {
            None | Some(("fifo", _)) => Ok(Output::Fifo {
                stdout: fifo("stdout", stdout)?,
                stderr: fifo("stderr", stderr)?,
            }),
            Some(("binary", rest)) => {
                let path = uri_path("stdout", stdout, rest)?;
                let mut args = Vec::new();
                if let Some((_, query)) = rest.split_once('?') {
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        for part in [k, v] {
                            args.push(percent_decode(part, true).map_err(|e| {
                                Error::InvalidArgument(format!("stdout URI {stdout:?}: {e}"))
                            })?);
                        }
                    }
                }
                Ok(Output::Binary { path, args })
            }
            Some(("file", rest)) => Ok(Output::File(uri_path("stdout", stdout, rest)?)),
            Some((s, _)) => Err(Error::InvalidArgument(format!(
                "stdout URI scheme {s}:// is not supported; use a FIFO, binary:///path or \
                 file:///path"
            ))),
        }
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| other!("create pipe: {e}"))
}

/// The process's output pipes, as runc sees them: stdout and stderr are the pipes' write ends,
/// stdin (if any) is containerd's FIFO.
#[derive(Debug)]
pub struct PipeIo {
    /// stdin FIFO, if any.
    pub stdin: Option<PathBuf>,
    /// stdout pipe's write end.
    pub stdout: OwnedFd,
    /// stderr pipe's write end.
    pub stderr: OwnedFd,
}

#[async_trait]
impl runc::io::Io for PipeIo {
    async fn set(&self, cmd: &mut runc::Command) -> std::io::Result<()> {
        if let Some(path) = &self.stdin {
            // Non-blocking open (a blocking one waits for a writer), then blocking reads, so the
            // process sees EOF when containerd closes its end.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)?;
            let flags = OFlag::from_bits_retain(fcntl(&f, FcntlArg::F_GETFL)?);
            fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
            cmd.stdin(f);
        }
        cmd.stdout(self.stdout.try_clone()?);
        cmd.stderr(self.stderr.try_clone()?);
        Ok(())
    }

    async fn close_after_start(&self) {}
}

/// What consumes a process's output: a logging binary or copies into a file.
pub struct Logger {
    what: String,
    /// The logging binary's pidfd (None for a file, or a binary that exited at once).
    pidfd: Option<Arc<OwnedFd>>,
    copies: Vec<JoinHandle<()>>,
}

/// How long a logger may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

impl Logger {
    /// Starts the consumer of `output` reading the given pipe read ends. For a binary, returns
    /// once it is ready. `Output::Fifo` needs no logger.
    pub async fn start(
        output: &Output,
        id: &str,
        namespace: &str,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<Option<Logger>> {
        match output {
            Output::Fifo { .. } => Ok(None),
            Output::File(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| other!("create log directory {}: {e}", dir.display()))?;
                }
                let open = || {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| other!("open log file {}: {e}", path.display()))
                };
                let mut copies = Vec::new();
                for from in [stdout, stderr] {
                    let mut to = tokio::fs::File::from_std(open()?);
                    let mut from = tokio::fs::File::from_std(std::fs::File::from(from));
                    copies.push(tokio::spawn(async move {
                        if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
                            tracing::warn!("copying output to the log file: {e}");
                        }
                    }));
                }
                Ok(Some(Logger {
                    what: format!("log file {}", path.display()),
                    pidfd: None,
                    copies,
                }))
            }
            Output::Binary { path, args } => {
                let (ready_r, ready_w) = pipe()?;
                let fds = [stdout.as_raw_fd(), stderr.as_raw_fd(), ready_w.as_raw_fd()];
                let mut cmd = std::process::Command::new(path);
                cmd.args(args)
                    .env("CONTAINER_ID", id)
                    .env("CONTAINER_NAMESPACE", namespace)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                // SAFETY: the closure only calls dup2 and fcntl, which are async-signal-safe,
                // on descriptors that stay open in the parent until spawn returns. It moves
                // them to 3, 4, 5 without close-on-exec, as the logging-binary convention wants.
                unsafe {
                    cmd.pre_exec(move || {
                        // Lift each source above 5 first, so no dup2 overwrites a later source.
                        let mut high = [0; 3];
                        for (i, fd) in fds.iter().enumerate() {
                            let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                            if h < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            high[i] = h;
                        }
                        for (i, fd) in high.iter().enumerate() {
                            let target = 3 + i32::try_from(i).unwrap_or(0);
                            if libc::dup2(*fd, target) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        Ok(())
                    });
                }
                let child = cmd
                    .spawn()
                    .map_err(|e| other!("start logging binary {}: {e}", path.display()))?;
                let pid = child.id();
                // The shim's reaper collects its exit; a pidfd tells us when that happens.
                let pidfd = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(-1))
                    .and_then(|p| {
                        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                    })
                    .map(Arc::new);
                drop(child);
                drop((stdout, stderr, ready_w));
                // Ready: the logger writes a byte to fd 5 or closes it.
                let mut ready = tokio::fs::File::from_std(std::fs::File::from(ready_r));
                let mut byte = [0u8; 1];
                let waited = tokio::time::timeout(
                    READY_TIMEOUT,
                    tokio::io::AsyncReadExt::read(&mut ready, &mut byte),
                )
                .await;
                let logger = Logger {
                    what: format!("logging binary {}", path.display()),
                    pidfd,
                    copies: Vec::new(),
                };
                match waited {
                    Ok(Ok(_)) => Ok(Some(logger)),
                    Ok(Err(e)) => {
                        logger.stop().await;
                        Err(other!(
                            "reading from logging binary {}: {e}",
                            path.display()
                        ))
                    }
                    Err(_) => {
                        logger.stop().await;
                        Err(other!(
                            "logging binary {} did not signal it was ready within {:?}",
                            path.display(),
                            READY_TIMEOUT
                        ))
                    }
                }
            }
        }
    }

    /// Copies a replicated process's output pipes into containerd's stdout and stderr FIFOs
    /// (empty path: the output is read and dropped, so the process never blocks on a full pipe).
    pub fn copy_to_fifos(stdout: &str, stderr: &str, out_r: OwnedFd, err_r: OwnedFd) -> Logger {
        let mut copies = Vec::new();
        for (path, from) in [(stdout.to_string(), out_r), (stderr.to_string(), err_r)] {
            copies.push(tokio::spawn(async move {
                // Non-blocking, epoll-driven ends: a copy never pins a thread of the blocking
                // pool (the shim could not exit while one waits).
                let mut from = match tokio::net::unix::pipe::Receiver::from_owned_fd(from) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!("output pipe: {e}");
                        return;
                    }
                };
                let result = if path.is_empty() {
                    tokio::io::copy(&mut from, &mut tokio::io::sink()).await
                } else {
                    // containerd holds the FIFO's read end, so opening it does not fail.
                    match tokio::net::unix::pipe::OpenOptions::new().open_sender(&path) {
                        Ok(mut to) => tokio::io::copy(&mut from, &mut to).await,
                        Err(e) => {
                            tracing::warn!("open output FIFO {path}: {e}; output dropped");
                            tokio::io::copy(&mut from, &mut tokio::io::sink()).await
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("copying output to {path}: {e}");
                }
            }));
        }
        Logger {
            what: format!("output FIFOs {stdout} {stderr}"),
            pidfd: None,
            copies,
        }
    }

    /// Lets the logger finish: the copies, or the binary, get until the process's output ends
    /// (briefly), then a binary gets SIGTERM and, after 10 s more, SIGKILL.
    pub async fn stop(self) {
        for c in self.copies {
            if tokio::time::timeout(Duration::from_secs(2), c)
                .await
                .is_err()
            {
                tracing::warn!("{}: output still flowing at delete; stopped", self.what);
            }
        }
        // Without a pidfd the logger had exited (and been reaped) before we could look: its pid
        // may already name another process, so nothing is signalled.
        let Some(pidfd) = self.pidfd else {
            return;
        };
        let exited = |t: Duration| {
            let fd = pidfd.clone();
            let ms = u16::try_from(t.as_millis()).unwrap_or(u16::MAX);
            // A pidfd polls readable once the process has exited.
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
                })
                .await
                .unwrap_or(false)
            }
        };
        if exited(Duration::from_secs(1)).await {
            return;
        }
        let signal = |sig| rustix::process::pidfd_send_signal(&*pidfd, sig);
        let _ = signal(rustix::process::Signal::TERM);
        if !exited(Duration::from_secs(10)).await {
            tracing::warn!("{} ignored SIGTERM; killing it", self.what);
            let _ = signal(rustix::process::Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerd_uris() {
        assert_eq!(
            Output::parse("/f/out", "fifo:///f/err").expect("fifo"),
            Output::Fifo {
                stdout: "/f/out".into(),
                stderr: "/f/err".into()
            }
        );
        assert_eq!(
            Output::parse(
                "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl&x",
                "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl&x"
            )
            .expect("binary"),
            Output::Binary {
                path: "/usr/local/bin/nerdctl".into(),
                args: vec![
                    "_NERDCTL_INTERNAL_LOGGING".into(),
                    "/var/lib/nerdctl".into(),
                    "x".into(),
                    String::new()
                ]
            }
        );
        assert_eq!(
            Output::parse("file:///var/log/a%20b.log", "").expect("file"),
            Output::File("/var/log/a b.log".into())
        );
    }

    #[test]
    fn refuses_bad_uris() {
        for (out, err, want) in [
            ("binary://host/bin/x", "", "absolute path"),
            ("file://relative", "", "absolute path"),
            ("syslog:///x", "", "not supported"),
            ("/f/out", "binary:///x", "while stdout is a FIFO"),
            ("binary:///x?k=%zz", "", "percent"),
        ] {
            let e = Output::parse(out, err).expect_err(out);
            assert!(e.to_string().contains(want), "{out}: {e}");
        }
    }
}
