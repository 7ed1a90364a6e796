//! `runc checkpoint` and `runc restore`, with CRIU underneath.
//!
//! The `runc` crate (0.4) has only stubs for these, so the command lines are built here. Every
//! path handed to runc is made absolute (`runc restore` changes into the bundle first), runc's own
//! log goes to a JSON file in the work directory (during a restore runc's stderr is the restored
//! container's), and CRIU's binary is resolved up front and passed with `--criu`, so a missing
//! binary is reported as such instead of as a failed dump.

use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use rustix::pipe::{pipe_with, PipeFlags};

use crate::manifest::{self, ManifestError};
use crate::runner::{CommandRunner, TokioRunner};
use crate::stats::{self, DumpStats, RestoreStats, STATS_DUMP_FILE, STATS_RESTORE_FILE};

/// The OCI annotation that names a CRIU configuration file for runc to hand to CRIU (runc 1.1:
/// `org.criu.config`; without it runc names `/etc/criu/runc.conf`). CRIU reads that file on every
/// dump and restore, and its settings override runc's. It is the only way to set CRIU options
/// runc has no flag for, such as the network-lock method.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The file runc's JSON log goes to, in the work directory.
pub const RUNC_LOG_FILE: &str = "runc.log";
/// CRIU's log of a dump, in the work directory (named by runc).
pub const DUMP_LOG_FILE: &str = "dump.log";
/// CRIU's log of a restore, in the work directory (named by runc).
pub const RESTORE_LOG_FILE: &str = "restore.log";
/// The restored init's pid, in the work directory.
pub const RESTORE_PID_FILE: &str = "restore.pid";

/// How many of CRIU's error lines an error carries.
const CRIU_ERROR_LINES: usize = 8;
/// A line CRIU logs as an error on every run as root without `CAP_SYS_RESOURCE`; harmless.
const HARMLESS_CRIU_ERROR: &str = "Can't setup RLIMIT_NOFILE for self";

/// What went wrong in a checkpoint or a restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// runc or CRIU is not installed where it was looked for.
    #[error("{name} not found (looked for {looked}); install it (integration/setup.sh builds CRIU 4.2 into /usr/local/sbin)")]
    MissingBinary {
        /// "runc" or "criu".
        name: &'static str,
        /// Where it was looked for.
        looked: String,
    },
    /// A container id runc would refuse, or that would leave the runc root.
    #[error("invalid container id {0:?}: use letters, digits, '_', '+', '-' and '.'")]
    BadId(String),
    /// The dump's image directory already holds files.
    #[error("image directory {0} is not empty: dump into a new or empty directory")]
    ImageDirNotEmpty(PathBuf),
    /// A restore would reuse the id of a container runc still knows.
    #[error(
        "container {id} already exists in runc root {root}: delete it or restore under another id"
    )]
    ContainerExists {
        /// The id.
        id: String,
        /// The runc root.
        root: PathBuf,
    },
    /// A network-lock method was asked for but the container names no CRIU configuration file.
    #[error("cannot set CRIU's network lock for {what}: {why} (the container's spec needs the annotation {CRIU_CONFIG_ANNOTATION}=<file>)")]
    NoCriuConfig {
        /// The container or bundle.
        what: String,
        /// Why not.
        why: String,
    },
    /// The image directory is incomplete or corrupt: nothing was restored.
    #[error("refusing to restore: {0}")]
    Image(#[from] ManifestError),
    /// Sealing the image directory after a dump failed.
    #[error("sealing the dump of {id}: {source}")]
    Seal {
        /// The container.
        id: String,
        /// Why.
        source: ManifestError,
    },
    /// A command could not be run.
    #[error("run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A command ran longer than its timeout and was killed.
    #[error("{what} of {id} did not finish within {after:?} and runc was killed")]
    TimedOut {
        /// "runc checkpoint" or "runc restore".
        what: &'static str,
        /// The container.
        id: String,
        /// The timeout.
        after: Duration,
    },
    /// `runc checkpoint` failed; the container keeps running.
    #[error("runc checkpoint of {id} failed ({status}): {runc}\nCRIU's last errors (from {log}):\n{criu}", log = log.display(), criu = criu.join("\n"))]
    DumpFailed {
        /// The container.
        id: String,
        /// runc's exit status.
        status: String,
        /// runc's error messages.
        runc: String,
        /// CRIU's log.
        log: PathBuf,
        /// CRIU's last error lines.
        criu: Vec<String>,
    },
    /// `runc restore` failed; nothing of the container is left running.
    #[error("runc restore of {id} failed ({status}): {runc}\nCRIU's last errors (from {log}):\n{criu}", log = log.display(), criu = criu.join("\n"))]
    RestoreFailed {
        /// The container.
        id: String,
        /// runc's exit status.
        status: String,
        /// runc's error messages.
        runc: String,
        /// CRIU's log.
        log: PathBuf,
        /// CRIU's last error lines.
        criu: Vec<String>,
    },
    /// runc said it restored, but its pid file is unusable.
    #[error("runc restore of {id} wrote no usable pid to {path}: {why}", path = path.display())]
    BadPidFile {
        /// The container.
        id: String,
        /// The pid file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file or directory could not be read or written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, CheckpointError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How CRIU keeps packets away from the container's network namespace while it dumps or restores
/// TCP connections (CRIU's `--network-lock`). With an external network namespace (one named by
/// path in the spec, which runc passes to CRIU as external) the lock is installed inside that
/// namespace and drops every packet CRIU did not mark for the duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    /// iptables rules (CRIU's default): CRIU runs `iptables-restore` (and `ip6tables-restore`)
    /// several times, which adds about 45–75 ms to the frozen time here.
    Iptables,
    /// An nftables table through libnftables, in process: a few milliseconds.
    Nftables,
    /// No lock. TCP state read while packets still arrive may be inconsistent: only for
    /// measurements, or when something else already holds all traffic.
    Skip,
}

impl NetworkLock {
    /// CRIU's name for the method.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkLock::Iptables => "iptables",
            NetworkLock::Nftables => "nftables",
            NetworkLock::Skip => "skip",
        }
    }
}

impl fmt::Display for NetworkLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// runc's `--manage-cgroups-mode` (runc 1.1 knows these three; CRIU's `ignore` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupsMode {
    /// Restore cgroup properties only where cgroups were created (CRIU's default).
    Soft,
    /// Restore all cgroup properties.
    Full,
    /// Fail if a cgroup property cannot be restored.
    Strict,
}

impl CgroupsMode {
    fn as_str(self) -> &'static str {
        match self {
            CgroupsMode::Soft => "soft",
            CgroupsMode::Full => "full",
            CgroupsMode::Strict => "strict",
        }
    }
}

/// Options of [`Checkpointer::dump`].
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// CRIU's work directory (its `dump.log` and `stats-dump`, and runc's log). Default: the
    /// image directory's path with `.work` appended. Created if missing.
    pub work_dir: Option<PathBuf>,
    /// Keep the container running after the dump (`--leave-running`). Default: true.
    pub leave_running: bool,
    /// Dump established TCP connections (`--tcp-established`). Default: true.
    pub tcp_established: bool,
    /// Dump file locks (`--file-locks`); without it CRIU refuses a container holding one.
    /// Costs nothing measurable. Default: true.
    pub file_locks: bool,
    /// Allow connected Unix sockets whose peer is outside the container (`--ext-unix-sk`).
    /// Default: false.
    pub ext_unix_sk: bool,
    /// runc's `--manage-cgroups-mode`. Default: none given (CRIU's `soft`).
    pub manage_cgroups_mode: Option<CgroupsMode>,
    /// CRIU's network-lock method, written into the CRIU configuration file the container's
    /// [`CRIU_CONFIG_ANNOTATION`] names (an error if it names none). Default: none (CRIU's
    /// default, iptables, or whatever that file already says).
    pub network_lock: Option<NetworkLock>,
    /// Kill runc if it runs longer. Default: 60 s.
    pub timeout: Option<Duration>,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            work_dir: None,
            leave_running: true,
            tcp_established: true,
            file_locks: true,
            ext_unix_sk: false,
            manage_cgroups_mode: None,
            network_lock: None,
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// The restored process's standard streams.
///
/// runc hands CRIU its own stdin, stdout and stderr for every one of the container's standard
/// streams that was a pipe at dump time (runc's `descriptors.json`); the others are restored from
/// the image. Give pipes: CRIU can dump a pipe again, but not a file or a device opened outside
/// the container's mounts (the host's `/dev/null` included: "Can't lookup mount=… for fd=1").
#[derive(Debug, Default)]
pub enum RestoreStdio {
    /// New pipes; the other ends come back in [`RestoreReport::stdio`].
    #[default]
    Pipes,
    /// These file descriptors (given to runc, and closed in this process once it has started).
    Fds {
        /// For stdin.
        stdin: OwnedFd,
        /// For stdout.
        stdout: OwnedFd,
        /// For stderr.
        stderr: OwnedFd,
    },
    /// The host's `/dev/null`: the restored container cannot be checkpointed again if one of its
    /// standard streams was a pipe.
    Null,
}

/// Options of [`Checkpointer::restore`].
#[derive(Debug)]
pub struct RestoreOptions {
    /// CRIU's work directory (its `restore.log` and `stats-restore`, runc's log and the pid
    /// file). Default: the image directory's path with `.restore` appended. Created if missing.
    pub work_dir: Option<PathBuf>,
    /// Restore established TCP connections (`--tcp-established`). Default: true.
    pub tcp_established: bool,
    /// Restore file locks (`--file-locks`). Default: true.
    pub file_locks: bool,
    /// `--ext-unix-sk`. Default: false.
    pub ext_unix_sk: bool,
    /// runc's `--manage-cgroups-mode`. Default: none given.
    pub manage_cgroups_mode: Option<CgroupsMode>,
    /// CRIU's network-lock method, written into the file the bundle's [`CRIU_CONFIG_ANNOTATION`]
    /// names. Default: none.
    pub network_lock: Option<NetworkLock>,
    /// The restored process's standard streams. Default: [`RestoreStdio::Pipes`].
    pub stdio: RestoreStdio,
    /// Kill runc if it runs longer. Default: 60 s.
    pub timeout: Option<Duration>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            work_dir: None,
            tcp_established: true,
            file_locks: true,
            ext_unix_sk: false,
            manage_cgroups_mode: None,
            network_lock: None,
            stdio: RestoreStdio::Pipes,
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// What a dump took and produced.
#[derive(Debug, Clone)]
pub struct DumpReport {
    /// The (absolute) image directory, sealed.
    pub image_dir: PathBuf,
    /// The (absolute) work directory.
    pub work_dir: PathBuf,
    /// `runc checkpoint`, from spawn to exit.
    pub wall: Duration,
    /// Checksumming the images and writing the marker (the container runs again by then).
    pub seal: Duration,
    /// CRIU's own figures; `None` if its `stats-dump` was missing or unreadable (logged).
    pub stats: Option<DumpStats>,
    /// Total size of the image files, in bytes.
    pub image_bytes: u64,
    /// Number of image files.
    pub files: usize,
}

/// The restored container's standard streams, for [`RestoreStdio::Pipes`].
#[derive(Debug)]
pub struct RestoredStdio {
    /// Write end of its stdin pipe.
    pub stdin: OwnedFd,
    /// Read end of its stdout pipe.
    pub stdout: OwnedFd,
    /// Read end of its stderr pipe.
    pub stderr: OwnedFd,
}

/// What a restore took and produced.
#[derive(Debug)]
pub struct RestoreReport {
    /// The restored init process (in the caller's pid namespace).
    pub pid: i32,
    /// Checking the image directory against its marker.
    pub verify: Duration,
    /// `runc restore`, from spawn to exit.
    pub wall: Duration,
    /// CRIU's own figures; `None` if its `stats-restore` was missing or unreadable (logged).
    pub stats: Option<RestoreStats>,
    /// The other ends of the pipes, for [`RestoreStdio::Pipes`].
    pub stdio: Option<RestoredStdio>,
}

/// Checkpoints and restores the containers of one runc root.
#[derive(Debug)]
pub struct Checkpointer<R = TokioRunner> {
    runner: R,
    root: PathBuf,
    runc: PathBuf,
    criu: PathBuf,
}

impl Checkpointer<TokioRunner> {
    /// For runc root `root` (runc's `--root`), running commands with [`TokioRunner`], and `runc`
    /// and `criu` from `PATH`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Checkpointer::with_runner(TokioRunner, root)
    }
}

impl<R: CommandRunner> Checkpointer<R> {
    /// For runc root `root`, running commands with `runner`.
    pub fn with_runner(runner: R, root: impl Into<PathBuf>) -> Self {
        Checkpointer {
            runner,
            root: root.into(),
            runc: PathBuf::from("runc"),
            criu: PathBuf::from("criu"),
        }
    }

    /// Uses this runc: a path, or a name looked up in `PATH`.
    pub fn runc_binary(mut self, runc: impl Into<PathBuf>) -> Self {
        self.runc = runc.into();
        self
    }

    /// Uses this CRIU: a path, or a name looked up in `PATH` (passed to runc as `--criu`).
    pub fn criu_binary(mut self, criu: impl Into<PathBuf>) -> Self {
        self.criu = criu.into();
        self
    }

    /// The runc root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checkpoints running container `id` into `image_dir` (created; must be empty or missing)
    /// with `runc checkpoint`, then seals the directory (see [`crate::manifest`]). On failure the
    /// directory is left unsealed, so nothing restores from it, and the container keeps running.
    pub async fn dump(&self, id: &str, image_dir: &Path, opts: &DumpOptions) -> Result<DumpReport> {
        check_id(id)?;
        let (runc, criu) = (
            self.binary("runc", &self.runc)?,
            self.binary("criu", &self.criu)?,
        );
        let root = absolute(&self.root)?;
        let image_dir = absolute(image_dir)?;
        let work_dir = match &opts.work_dir {
            Some(w) => absolute(w)?,
            None => with_suffix(&image_dir, ".work"),
        };
        prepare_image_dir(&image_dir)?;
        prepare_work_dir(&work_dir, &[DUMP_LOG_FILE, STATS_DUMP_FILE, RUNC_LOG_FILE])?;
        if let Some(lock) = opts.network_lock {
            let what = format!("container {id} in {}", root.display());
            let config = criu_config_of_container(&root, id)
                .map_err(|why| CheckpointError::NoCriuConfig { what, why })?;
            write_criu_config(&config, lock)?;
        }

        let mut cmd = self.runc_command(&runc, &criu, &root, &work_dir);
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(&image_dir)
            .arg("--work-path")
            .arg(&work_dir);
        if opts.leave_running {
            cmd.arg("--leave-running");
        }
        common_flags(
            &mut cmd,
            opts.tcp_established,
            opts.file_locks,
            opts.ext_unix_sk,
            opts.manage_cgroups_mode,
        );
        cmd.arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tracing::debug!(id, image_dir = %image_dir.display(), "runc checkpoint");

        let start = Instant::now();
        let out = self
            .run(cmd, &runc, opts.timeout, "runc checkpoint", id)
            .await?;
        let wall = start.elapsed();
        if !out.status.success() {
            let log = work_dir.join(DUMP_LOG_FILE);
            return Err(CheckpointError::DumpFailed {
                id: id.to_string(),
                status: out.status.to_string(),
                runc: runc_errors(&work_dir.join(RUNC_LOG_FILE), Some(&out)),
                criu: criu_errors(&log),
                log,
            });
        }
        let stats = match stats::read_dump_stats(&work_dir.join(STATS_DUMP_FILE)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(id, "no CRIU dump statistics: {e}");
                None
            }
        };
        let seal_start = Instant::now();
        let manifest = manifest::seal(&image_dir).map_err(|source| CheckpointError::Seal {
            id: id.to_string(),
            source,
        })?;
        let seal = seal_start.elapsed();
        tracing::debug!(id, ?wall, ?seal, bytes = manifest.total_bytes(), "dumped");
        Ok(DumpReport {
            image_dir,
            work_dir,
            wall,
            seal,
            stats,
            image_bytes: manifest.total_bytes(),
            files: manifest.files.len(),
        })
    }

    /// Restores container `id` (a new one in this runc root) from the sealed `image_dir` with
    /// `runc restore --detach`, using `bundle` (its `config.json` names the rootfs, the
    /// namespaces to join, and the cgroup). The image directory is checked against its marker
    /// first: an incomplete or corrupt one is refused before runc is started. If runc fails,
    /// whatever it left of the container is deleted.
    pub async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        image_dir: &Path,
        opts: RestoreOptions,
    ) -> Result<RestoreReport> {
        check_id(id)?;
        let (runc, criu) = (
            self.binary("runc", &self.runc)?,
            self.binary("criu", &self.criu)?,
        );
        let root = absolute(&self.root)?;
        let bundle = absolute(bundle)?;
        let image_dir = absolute(image_dir)?;
        let work_dir = match &opts.work_dir {
            Some(w) => absolute(w)?,
            None => with_suffix(&image_dir, ".restore"),
        };

        let verify_start = Instant::now();
        manifest::verify(&image_dir)?;
        let verify = verify_start.elapsed();
        if root.join(id).exists() {
            return Err(CheckpointError::ContainerExists {
                id: id.to_string(),
                root,
            });
        }
        prepare_work_dir(
            &work_dir,
            &[
                RESTORE_LOG_FILE,
                STATS_RESTORE_FILE,
                RUNC_LOG_FILE,
                RESTORE_PID_FILE,
            ],
        )?;
        if let Some(lock) = opts.network_lock {
            let what = format!("bundle {}", bundle.display());
            let config = criu_config_of_bundle(&bundle)
                .map_err(|why| CheckpointError::NoCriuConfig { what, why })?;
            write_criu_config(&config, lock)?;
        }

        let pid_file = work_dir.join(RESTORE_PID_FILE);
        let mut cmd = self.runc_command(&runc, &criu, &root, &work_dir);
        cmd.arg("restore")
            .arg("--detach")
            .arg("--image-path")
            .arg(&image_dir)
            .arg("--work-path")
            .arg(&work_dir)
            .arg("--bundle")
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pid_file);
        common_flags(
            &mut cmd,
            opts.tcp_established,
            opts.file_locks,
            opts.ext_unix_sk,
            opts.manage_cgroups_mode,
        );
        cmd.arg(id);
        let restored_stdio = match opts.stdio {
            RestoreStdio::Pipes => {
                let pipe = || {
                    pipe_with(PipeFlags::CLOEXEC).map_err(|e| CheckpointError::Io {
                        path: PathBuf::from("pipe"),
                        source: e.into(),
                    })
                };
                let (stdin_r, stdin_w) = pipe()?;
                let (stdout_r, stdout_w) = pipe()?;
                let (stderr_r, stderr_w) = pipe()?;
                cmd.stdin(stdin_r).stdout(stdout_w).stderr(stderr_w);
                Some(RestoredStdio {
                    stdin: stdin_w,
                    stdout: stdout_r,
                    stderr: stderr_r,
                })
            }
            RestoreStdio::Fds {
                stdin,
                stdout,
                stderr,
            } => {
                cmd.stdin(stdin).stdout(stdout).stderr(stderr);
                None
            }
            RestoreStdio::Null => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                None
            }
        };
        tracing::debug!(id, image_dir = %image_dir.display(), bundle = %bundle.display(), "runc restore");

        let start = Instant::now();
        let result = self.run(cmd, &runc, opts.timeout, "runc restore", id).await;
        let wall = start.elapsed();
        let failure = match result {
            Ok(out) if out.status.success() => None,
            Ok(out) => {
                let log = work_dir.join(RESTORE_LOG_FILE);
                Some(CheckpointError::RestoreFailed {
                    id: id.to_string(),
                    status: out.status.to_string(),
                    runc: runc_errors(&work_dir.join(RUNC_LOG_FILE), None),
                    criu: criu_errors(&log),
                    log,
                })
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failure {
            self.delete_leftover(&runc, &root, id).await;
            return Err(e);
        }
        let pid = match read_pid(&pid_file) {
            Ok(pid) => pid,
            Err(why) => {
                self.delete_leftover(&runc, &root, id).await;
                return Err(CheckpointError::BadPidFile {
                    id: id.to_string(),
                    path: pid_file,
                    why,
                });
            }
        };
        let stats = match stats::read_restore_stats(&work_dir.join(STATS_RESTORE_FILE)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(id, "no CRIU restore statistics: {e}");
                None
            }
        };
        tracing::debug!(id, pid, ?wall, "restored");
        Ok(RestoreReport {
            pid,
            verify,
            wall,
            stats,
            stdio: restored_stdio,
        })
    }

    fn binary(&self, name: &'static str, configured: &Path) -> Result<PathBuf> {
        resolve_binary(configured).ok_or_else(|| CheckpointError::MissingBinary {
            name,
            looked: if configured.components().count() > 1 {
                configured.display().to_string()
            } else {
                format!(
                    "{} in PATH={}",
                    configured.display(),
                    std::env::var("PATH").unwrap_or_default()
                )
            },
        })
    }

    fn runc_command(
        &self,
        runc: &Path,
        criu: &Path,
        root: &Path,
        work_dir: &Path,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(runc);
        cmd.arg("--root")
            .arg(root)
            .arg("--criu")
            .arg(criu)
            .arg("--log")
            .arg(work_dir.join(RUNC_LOG_FILE))
            .arg("--log-format")
            .arg("json")
            .kill_on_drop(true);
        cmd
    }

    async fn run(
        &self,
        cmd: tokio::process::Command,
        program: &Path,
        timeout: Option<Duration>,
        what: &'static str,
        id: &str,
    ) -> Result<Output> {
        let run = self.runner.run(cmd);
        let out = match timeout {
            Some(t) => {
                tokio::time::timeout(t, run)
                    .await
                    .map_err(|_| CheckpointError::TimedOut {
                        what,
                        id: id.to_string(),
                        after: t,
                    })?
            }
            None => run.await,
        };
        out.map_err(|source| CheckpointError::Spawn {
            program: program.display().to_string(),
            source,
        })
    }

    /// After a failed restore: `runc delete --force` whatever runc still knows of `id`.
    async fn delete_leftover(&self, runc: &Path, root: &Path, id: &str) {
        if !root.join(id).exists() {
            return;
        }
        let mut cmd = tokio::process::Command::new(runc);
        cmd.arg("--root")
            .arg(root)
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(30), self.runner.run(cmd)).await {
            Ok(Ok(out)) if out.status.success() => {
                tracing::info!(id, "deleted what a failed restore left")
            }
            Ok(Ok(out)) => tracing::warn!(
                id,
                "runc delete after a failed restore: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Ok(Err(e)) => tracing::warn!(id, "runc delete after a failed restore: {e}"),
            Err(_) => tracing::warn!(id, "runc delete after a failed restore timed out"),
        }
    }
}

fn common_flags(
    cmd: &mut tokio::process::Command,
    tcp_established: bool,
    file_locks: bool,
    ext_unix_sk: bool,
    cgroups: Option<CgroupsMode>,
) {
    if tcp_established {
        cmd.arg("--tcp-established");
    }
    if file_locks {
        cmd.arg("--file-locks");
    }
    if ext_unix_sk {
        cmd.arg("--ext-unix-sk");
    }
    if let Some(mode) = cgroups {
        cmd.arg("--manage-cgroups-mode").arg(mode.as_str());
    }
}

/// runc's container id rule (`^[\w+-\.]+$`), without `.` and `..`.
fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::BadId(id.to_string()))
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(io_err(p))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// `configured` if it is a path to an executable file; a bare name is looked up in `PATH`.
pub fn resolve_binary(configured: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if configured.components().count() > 1 {
        return executable(configured).then(|| configured.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(configured))
        .find(|p| executable(p))
}

fn prepare_image_dir(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(CheckpointError::ImageDirNotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir)),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Creates `dir` if needed and removes the files a previous run left there, so nothing stale is
/// read back.
fn prepare_work_dir(dir: &Path, stale: &[&str]) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    for name in stale {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    Ok(())
}

/// The CRIU configuration file a running container's spec names: runc keeps the spec's
/// annotations as `key=value` labels in `<root>/<id>/state.json`.
fn criu_config_of_container(root: &Path, id: &str) -> std::result::Result<PathBuf, String> {
    let state = root.join(id).join("state.json");
    let text = std::fs::read(&state).map_err(|e| format!("read {}: {e}", state.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("parse {}: {e}", state.display()))?;
    let prefix = format!("{CRIU_CONFIG_ANNOTATION}=");
    let labels = v
        .get("config")
        .and_then(|c| c.get("labels"))
        .and_then(|l| l.as_array())
        .ok_or_else(|| format!("{} has no config.labels", state.display()))?;
    let value = labels
        .iter()
        .filter_map(|l| l.as_str())
        .find_map(|l| l.strip_prefix(&prefix))
        .ok_or_else(|| "its spec has no such annotation".to_string())?;
    config_path(value)
}

/// The CRIU configuration file a bundle's `config.json` names.
fn criu_config_of_bundle(bundle: &Path) -> std::result::Result<PathBuf, String> {
    let spec = bundle.join("config.json");
    let text = std::fs::read(&spec).map_err(|e| format!("read {}: {e}", spec.display()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("parse {}: {e}", spec.display()))?;
    let value = v
        .get("annotations")
        .and_then(|a| a.get(CRIU_CONFIG_ANNOTATION))
        .and_then(|p| p.as_str())
        .ok_or_else(|| format!("{} has no such annotation", spec.display()))?;
    config_path(value)
}

fn config_path(value: &str) -> std::result::Result<PathBuf, String> {
    let p = PathBuf::from(value);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!(
            "the annotation's value {value:?} is not an absolute path"
        ))
    }
}

/// Writes the CRIU configuration file (atomically: CRIU ignores a missing file, and must never
/// see half of one).
fn write_criu_config(path: &Path, lock: NetworkLock) -> Result<()> {
    let text = format!(
        "# Written by rrc-checkpoint before each runc checkpoint and restore: runc names this file\n\
         # to CRIU because the container's spec has the {CRIU_CONFIG_ANNOTATION} annotation.\n\
         network-lock {lock}\n"
    );
    let tmp = with_suffix(path, ".tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_pid(path: &Path) -> std::result::Result<i32, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(format!("contents {text:?}")),
    }
}

/// The error messages of runc's JSON log (and of its stderr, when that was captured).
fn runc_errors(log: &Path, out: Option<&Output>) -> String {
    let mut msgs: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            matches!(
                v.get("level").and_then(|l| l.as_str()),
                Some("error" | "fatal")
            )
        })
        .filter_map(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
        .collect();
    if let Some(out) = out {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        if !stderr.is_empty() && !msgs.iter().any(|m| stderr.contains(m.as_str())) {
            msgs.push(stderr.to_string());
        }
    }
    if msgs.is_empty() {
        "runc said nothing".to_string()
    } else {
        let start = msgs.len().saturating_sub(3);
        msgs.get(start..).unwrap_or_default().join("; ")
    }
}

/// The last error lines of a CRIU log.
pub fn criu_errors(log: &Path) -> Vec<String> {
    let text = match std::fs::read(log) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) => return vec![format!("(no CRIU log at {}: {e})", log.display())],
    };
    let errors: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Error (") && !l.contains(HARMLESS_CRIU_ERROR))
        .map(|l| l.trim().to_string())
        .collect();
    if errors.is_empty() {
        // No error line: the last lines say where it stopped.
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(3);
        return lines
            .get(start..)
            .unwrap_or_default()
            .iter()
            .map(|l| l.trim().to_string())
            .collect();
    }
    let start = errors.len().saturating_sub(CRIU_ERROR_LINES);
    errors.get(start..).unwrap_or_default().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use async_trait::async_trait;

    /// Records command lines; acts like runc+CRIU on the file system according to `behave`.
    struct FakeRunner {
        calls: Mutex<Vec<Vec<String>>>,
        behave: Behave,
    }

    #[derive(Clone, Copy)]
    enum Behave {
        /// Write a small image, stats and (for restore) a pid file; exit 0.
        Succeed,
        /// Write CRIU and runc logs with errors; exit 1.
        Fail,
        /// Never finish.
        Hang,
    }

    fn arg_after(args: &[String], flag: &str) -> PathBuf {
        let i = args.iter().position(|a| a == flag).expect("flag present");
        PathBuf::from(args.get(i + 1).expect("flag value"))
    }

    #[async_trait]
    impl CommandRunner for FakeRunner {
        async fn run(&self, cmd: tokio::process::Command) -> std::io::Result<Output> {
            let std = cmd.as_std();
            let mut args = vec![std.get_program().to_string_lossy().into_owned()];
            args.extend(std.get_args().map(|a| a.to_string_lossy().into_owned()));
            self.calls.lock().expect("lock").push(args.clone());
            let status = |code: i32| {
                use std::os::unix::process::ExitStatusExt;
                std::process::ExitStatus::from_raw(code << 8)
            };
            if args.iter().any(|a| a == "delete") {
                return Ok(Output {
                    status: status(0),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                });
            }
            let work = arg_after(&args, "--work-path");
            let images = arg_after(&args, "--image-path");
            let restoring = args.iter().any(|a| a == "restore");
            match self.behave {
                Behave::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    unreachable!("the timeout fires first")
                }
                Behave::Succeed => {
                    let (stats, name) = if restoring {
                        let pid = arg_after(&args, "--pid-file");
                        std::fs::write(pid, "4242")?;
                        (
                            include_bytes!("testdata/stats-restore").as_slice(),
                            STATS_RESTORE_FILE,
                        )
                    } else {
                        std::fs::write(images.join("pages-1.img"), vec![1u8; 8192])?;
                        std::fs::write(images.join("descriptors.json"), b"[]")?;
                        (
                            include_bytes!("testdata/stats-dump").as_slice(),
                            STATS_DUMP_FILE,
                        )
                    };
                    std::fs::write(work.join(name), stats)?;
                    Ok(Output {
                        status: status(0),
                        stdout: Vec::new(),
                        stderr: Vec::new(),
                    })
                }
                Behave::Fail => {
                    let log = if restoring {
                        RESTORE_LOG_FILE
                    } else {
                        DUMP_LOG_FILE
                    };
                    std::fs::write(
                        work.join(log),
                        "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                         (00.002) working\n\
                         (00.054) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=0 path=/run/x\n\
                         (00.055) Error (criu/cr-dump.c:1545): Dump files (pid: 9090) failed with -1\n",
                    )?;
                    std::fs::write(
                        work.join(RUNC_LOG_FILE),
                        "{\"level\":\"warning\",\"msg\":\"meh\"}\n{\"level\":\"error\",\"msg\":\"criu failed: type NOTIFY errno 0\"}\n",
                    )?;
                    Ok(Output {
                        status: status(1),
                        stdout: Vec::new(),
                        stderr: b"criu failed: type NOTIFY errno 0\n".to_vec(),
                    })
                }
            }
        }
    }

    fn fake(behave: Behave, root: &Path) -> Checkpointer<FakeRunner> {
        Checkpointer::with_runner(
            FakeRunner {
                calls: Mutex::new(Vec::new()),
                behave,
            },
            root,
        )
        .runc_binary("/bin/true")
        .criu_binary("/bin/true")
    }

    fn calls(c: &Checkpointer<FakeRunner>) -> Vec<Vec<String>> {
        c.runner.calls.lock().expect("lock").clone()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn dump_builds_runc_checkpoint_and_seals() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = fake(Behave::Succeed, &tmp.path().join("root"));
        let images = tmp.path().join("img");
        let report = rt()
            .block_on(c.dump("redis1", &images, &DumpOptions::default()))
            .expect("dump");
        let call = calls(&c).pop().expect("one call");
        let work = format!("{}.work", images.display());
        let expected: Vec<String> = [
            "/bin/true",
            "--root",
            &tmp.path().join("root").display().to_string(),
            "--criu",
            "/bin/true",
            "--log",
            &format!("{work}/runc.log"),
            "--log-format",
            "json",
            "checkpoint",
            "--image-path",
            &images.display().to_string(),
            "--work-path",
            &work,
            "--leave-running",
            "--tcp-established",
            "--file-locks",
            "redis1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(call, expected);
        assert_eq!(report.image_bytes, 8192 + 2);
        assert_eq!(report.files, 2);
        let stats = report.stats.expect("stats");
        assert_eq!(stats.frozen, Duration::from_micros(59_100));
        manifest::verify(&images).expect("sealed");

        // The directory now holds a dump: a second dump into it is refused.
        let e = rt()
            .block_on(c.dump("redis1", &images, &DumpOptions::default()))
            .expect_err("not empty");
        assert!(matches!(e, CheckpointError::ImageDirNotEmpty(_)), "{e}");
    }

    #[test]
    fn dump_options_change_the_command_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = fake(Behave::Succeed, &tmp.path().join("root"));
        let opts = DumpOptions {
            work_dir: Some(tmp.path().join("w")),
            leave_running: false,
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: true,
            manage_cgroups_mode: Some(CgroupsMode::Full),
            ..DumpOptions::default()
        };
        rt().block_on(c.dump("c", &tmp.path().join("img"), &opts))
            .expect("dump");
        let call = calls(&c).pop().expect("one call");
        let tail: Vec<&str> = call
            .iter()
            .skip_while(|a| *a != "checkpoint")
            .map(String::as_str)
            .collect();
        let img = tmp.path().join("img").display().to_string();
        let w = tmp.path().join("w").display().to_string();
        assert_eq!(
            tail,
            [
                "checkpoint",
                "--image-path",
                img.as_str(),
                "--work-path",
                w.as_str(),
                "--ext-unix-sk",
                "--manage-cgroups-mode",
                "full",
                "c"
            ]
        );
    }

    #[test]
    fn a_failed_dump_carries_criu_and_runc_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = fake(Behave::Fail, &tmp.path().join("root"));
        let images = tmp.path().join("img");
        let e = rt()
            .block_on(c.dump("r1", &images, &DumpOptions::default()))
            .expect_err("fails");
        let text = e.to_string();
        assert!(text.contains("Can't lookup mount=27 for fd=0"), "{text}");
        assert!(text.contains("criu failed: type NOTIFY"), "{text}");
        assert!(!text.contains("RLIMIT_NOFILE"), "{text}");
        assert!(!text.contains("meh"), "{text}");
        // Nothing restores from the failed dump.
        assert!(matches!(
            manifest::verify(&images),
            Err(ManifestError::Unsealed { .. })
        ));
    }

    #[test]
    fn restore_verifies_first_and_builds_runc_restore() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let images = tmp.path().join("img");
        let bundle = tmp.path().join("bundle");
        let c = fake(Behave::Succeed, &root);

        // Not sealed (no dump): refused, and runc is never started.
        std::fs::create_dir_all(&images).expect("mkdir");
        std::fs::write(images.join("pages-1.img"), b"x").expect("write");
        let e = rt()
            .block_on(c.restore("r", &bundle, &images, RestoreOptions::default()))
            .expect_err("unsealed");
        assert!(
            matches!(e, CheckpointError::Image(ManifestError::Unsealed { .. })),
            "{e}"
        );
        assert!(e.to_string().starts_with("refusing to restore"), "{e}");
        assert!(calls(&c).is_empty());

        manifest::seal(&images).expect("seal");
        let report = rt()
            .block_on(c.restore("r", &bundle, &images, RestoreOptions::default()))
            .expect("restore");
        assert_eq!(report.pid, 4242);
        assert!(report.stdio.is_some());
        assert_eq!(
            report.stats.expect("stats").restore,
            Duration::from_micros(160_371)
        );
        let call = calls(&c).pop().expect("a call");
        let work = format!("{}.restore", images.display());
        let tail: Vec<&str> = call
            .iter()
            .skip_while(|a| *a != "restore")
            .map(String::as_str)
            .collect();
        let img = images.display().to_string();
        let b = bundle.display().to_string();
        let pid = format!("{work}/restore.pid");
        assert_eq!(
            tail,
            [
                "restore",
                "--detach",
                "--image-path",
                img.as_str(),
                "--work-path",
                work.as_str(),
                "--bundle",
                b.as_str(),
                "--pid-file",
                pid.as_str(),
                "--tcp-established",
                "--file-locks",
                "r"
            ]
        );

        // An id runc still knows is refused before runc runs.
        std::fs::create_dir_all(root.join("r")).expect("mkdir");
        let n = calls(&c).len();
        let e = rt()
            .block_on(c.restore("r", &bundle, &images, RestoreOptions::default()))
            .expect_err("exists");
        assert!(matches!(e, CheckpointError::ContainerExists { .. }), "{e}");
        assert_eq!(calls(&c).len(), n);
    }

    #[test]
    fn a_failed_restore_deletes_the_leftover() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let images = tmp.path().join("img");
        std::fs::create_dir_all(&images).expect("mkdir");
        manifest::seal(&images).expect("seal");
        let c = fake(Behave::Fail, &root);
        // runc left state behind.
        std::fs::create_dir_all(root.join("x")).expect("mkdir");
        let e = rt()
            .block_on(c.restore("y", tmp.path(), &images, RestoreOptions::default()))
            .expect_err("fails");
        assert!(matches!(e, CheckpointError::RestoreFailed { .. }), "{e}");
        assert!(e.to_string().contains("Can't lookup mount"), "{e}");
        // No state for y: no delete.
        assert_eq!(calls(&c).len(), 1);

        // The fake leaves state for the id it fails to restore: deleted afterwards.
        std::fs::remove_dir(root.join("x")).expect("rmdir");
        struct LeavesState(FakeRunner, PathBuf);
        #[async_trait]
        impl CommandRunner for LeavesState {
            async fn run(&self, cmd: tokio::process::Command) -> std::io::Result<Output> {
                std::fs::create_dir_all(&self.1)?;
                self.0.run(cmd).await
            }
        }
        let c = Checkpointer::with_runner(
            LeavesState(
                FakeRunner {
                    calls: Mutex::new(Vec::new()),
                    behave: Behave::Fail,
                },
                root.join("z"),
            ),
            &root,
        )
        .runc_binary("/bin/true")
        .criu_binary("/bin/true");
        rt().block_on(c.restore("z", tmp.path(), &images, RestoreOptions::default()))
            .expect_err("fails");
        let calls = c.runner.0.calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 2);
        let last = calls.last().expect("delete");
        assert!(
            last.ends_with(&["delete".into(), "--force".into(), "z".into()]),
            "{last:?}"
        );
    }

    #[test]
    fn missing_binaries_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let img = tmp.path().join("img");
        let c = fake(Behave::Succeed, tmp.path()).runc_binary("/nonexistent/runc");
        let e = rt()
            .block_on(c.dump("a", &img, &DumpOptions::default()))
            .expect_err("no runc");
        assert!(
            matches!(e, CheckpointError::MissingBinary { name: "runc", .. }),
            "{e}"
        );
        let c = fake(Behave::Succeed, tmp.path()).criu_binary("no-such-criu-binary");
        let e = rt()
            .block_on(c.dump("a", &img, &DumpOptions::default()))
            .expect_err("no criu");
        assert!(
            matches!(e, CheckpointError::MissingBinary { name: "criu", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("PATH="), "{e}");
        let e = rt()
            .block_on(c.restore("a", tmp.path(), &img, RestoreOptions::default()))
            .expect_err("no criu");
        assert!(
            matches!(e, CheckpointError::MissingBinary { name: "criu", .. }),
            "{e}"
        );
        assert!(calls(&c).is_empty());
        assert!(!img.exists(), "nothing created");
    }

    #[test]
    fn bad_ids_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = fake(Behave::Succeed, tmp.path());
        for id in ["", ".", "..", "a/b", "a b", "x\n"] {
            let e = rt()
                .block_on(c.dump(id, &tmp.path().join("i"), &DumpOptions::default()))
                .expect_err("bad id");
            assert!(matches!(e, CheckpointError::BadId(_)), "{id:?}: {e}");
        }
    }

    #[test]
    fn a_hung_runc_times_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = fake(Behave::Hang, tmp.path());
        let opts = DumpOptions {
            timeout: Some(Duration::from_millis(50)),
            ..DumpOptions::default()
        };
        let e = rt()
            .block_on(c.dump("a", &tmp.path().join("i"), &opts))
            .expect_err("times out");
        assert!(matches!(e, CheckpointError::TimedOut { .. }), "{e}");
    }

    #[test]
    fn network_lock_goes_into_the_annotated_criu_config() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let conf = tmp.path().join("criu.conf");
        std::fs::create_dir_all(root.join("c1")).expect("mkdir");
        let state = serde_json::json!({"config": {"labels": [
            "bundle=/x",
            format!("{CRIU_CONFIG_ANNOTATION}={}", conf.display()),
        ]}});
        std::fs::write(root.join("c1/state.json"), state.to_string()).expect("write");
        let c = fake(Behave::Succeed, &root);
        let opts = DumpOptions {
            network_lock: Some(NetworkLock::Nftables),
            ..DumpOptions::default()
        };
        rt().block_on(c.dump("c1", &tmp.path().join("i1"), &opts))
            .expect("dump");
        let text = std::fs::read_to_string(&conf).expect("config written");
        assert!(text.lines().any(|l| l == "network-lock nftables"), "{text}");

        // A container whose spec names no file: a clear error, and no dump.
        std::fs::create_dir_all(root.join("c2")).expect("mkdir");
        std::fs::write(
            root.join("c2/state.json"),
            r#"{"config": {"labels": ["bundle=/x"]}}"#,
        )
        .expect("write");
        let n = calls(&c).len();
        let e = rt()
            .block_on(c.dump("c2", &tmp.path().join("i2"), &opts))
            .expect_err("no annotation");
        assert!(matches!(e, CheckpointError::NoCriuConfig { .. }), "{e}");
        assert!(e.to_string().contains(CRIU_CONFIG_ANNOTATION), "{e}");
        assert_eq!(calls(&c).len(), n);

        // Restore reads the bundle's config.json.
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(&bundle).expect("mkdir");
        let conf2 = tmp.path().join("criu2.conf");
        std::fs::write(
            bundle.join("config.json"),
            serde_json::json!({"annotations": {CRIU_CONFIG_ANNOTATION: conf2}}).to_string(),
        )
        .expect("write");
        let opts = RestoreOptions {
            network_lock: Some(NetworkLock::Skip),
            stdio: RestoreStdio::Null,
            ..RestoreOptions::default()
        };
        let report = rt()
            .block_on(c.restore("r", &bundle, &tmp.path().join("i1"), opts))
            .expect("restore");
        assert!(report.stdio.is_none());
        let text = std::fs::read_to_string(&conf2).expect("config written");
        assert!(text.lines().any(|l| l == "network-lock skip"), "{text}");
    }

    #[test]
    fn criu_errors_fall_back_to_the_last_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("dump.log");
        std::fs::write(&log, "a\nb\nc\nd\n").expect("write");
        assert_eq!(criu_errors(&log), ["b", "c", "d"]);
        let missing = criu_errors(&tmp.path().join("none.log"));
        assert!(missing[0].contains("no CRIU log"), "{missing:?}");
    }
}
