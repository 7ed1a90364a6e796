//! Passive-mode replication of one container (issue 3's design in `docs/passive-mode.md`).
//!
//! * [`primary`]: the epoch loop on the primary: hold outputs, checkpoint with CRIU, stream the
//!   checkpoint to the backup, release the outputs of the previous epoch once it committed.
//! * [`backup`]: the backup's side: a standby task that stores committed checkpoints and, when the
//!   primary is gone, restores the last one, takes the service address and goes live.
//! * [`wire`]: the control messages the pair exchanges besides checkpoint pieces.
//! * [`net`]: the container's network namespace: addresses, the output hold's iptables rule,
//!   taking over an address.
//! * [`hybrid`]: hybrid mode's primary: the recorder, the log streamed to the backup, outputs
//!   released on its acknowledgement.
//! * [`fs`]: the container's writable layer, saved with each checkpoint and applied by the
//!   backup.
//! * [`runner`]: running commands (runc, CRIU, ip, iptables) without losing their exit status
//!   to the shim's reaper.
//!
//! What Create does for a replicated container is [`prepare`]: it checks the spec (a network
//! namespace given by path, no terminal), reads the key, and names a CRIU configuration file in
//! the spec.

pub mod backup;
pub mod fs;
pub mod hybrid;
pub mod net;
pub mod primary;
pub mod runner;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::{Error, Result};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rrc_checkpoint::CRIU_CONFIG_ANNOTATION;
use rrc_config::{Mode, RrcConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The CRIU configuration file in the bundle (named by the spec's `org.criu.config`).
pub const CRIU_CONFIG_FILE: &str = "rrc-criu.conf";
/// The backup's checkpoint store, in its bundle.
pub const STORE_DIR: &str = "rrc-store";
/// The primary's checkpoint images while they are sent, in its bundle.
pub const EPOCHS_DIR: &str = "rrc-epochs";

/// What Create learned about a replicated container.
#[derive(Debug, Clone)]
pub struct ReplicaSetup {
    /// The container's network namespace (a path; external to CRIU's dumps).
    pub netns: PathBuf,
    /// The shared key.
    pub key: Vec<u8>,
    /// The epoch length.
    pub epoch: Duration,
    /// The rootfs overlay's upper directory (None: not an overlay; writes are not replicated).
    pub upper: Option<PathBuf>,
}

/// Checks and prepares a replicated container's bundle: the spec must name its network
/// namespace by path; the auth key is read; `org.criu.config` is set to a file in the bundle
/// (written here) so CRIU locks the network with nftables inside the container's namespace.
/// The spec is saved back to `config.json`.
pub fn prepare(
    bundle: &Path,
    spec: &mut Spec,
    config: &RrcConfig,
    upper: Option<PathBuf>,
) -> Result<ReplicaSetup> {
    if config.mode == Mode::Hybrid {
        check_hybrid_config(config)?;
    }
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network))
        .and_then(|n| n.path().clone())
        .ok_or_else(|| {
            Error::InvalidArgument(
                "rrc: a replicated container must join a network namespace given by path \
                 (ctr run --with-ns network:/var/run/netns/NAME, or a pod's sandbox): its \
                 address moves to the backup's namespace on failover"
                    .into(),
            )
        })?;
    if !netns.exists() {
        return Err(Error::InvalidArgument(format!(
            "rrc: the container's network namespace {} does not exist",
            netns.display()
        )));
    }
    let key_file = config.auth_key_file.as_ref().ok_or_else(|| {
        Error::InvalidArgument(
            "rrc: a replicated container needs io.containerd.rrc.auth-key-file (the key \
             primary and backup share)"
                .into(),
        )
    })?;
    let key = std::fs::read(key_file).map_err(|e| {
        Error::InvalidArgument(format!(
            "rrc: cannot read io.containerd.rrc.auth-key-file {}: {e}",
            key_file.display()
        ))
    })?;
    if config.mode == Mode::Hybrid {
        prepare_hybrid(bundle, spec, config)?;
    }
    let conf = bundle.join(CRIU_CONFIG_FILE);
    // CRIU's own network lock is off: its nftables lock deletes its table after each dump,
    // which unregisters netfilter hooks, and the kernel then drops every packet waiting in the
    // namespace's NFQUEUE (held outputs would never leave); its iptables lock runs
    // iptables-restore twice per dump (+100 ms frozen here). Instead CRIU's network-lock and
    // network-unlock actions run the hook, and the shim holds inbound packets in a queue of its
    // own meanwhile (outbound ones are held anyway): see `fs`. In hybrid mode the recorder
    // holds inbound packets for the whole checkpoint, and CRIU's pre-dump action is where it
    // steps aside (see `hybrid`).
    let hook = fs::write_hook_script(bundle, config.mode == Mode::Hybrid).map_err(Error::Other)?;
    let text = format!(
        "# Written by containerd-shim-rrc-v2: CRIU's options for this container's checkpoints.\n\
         network-lock skip\n\
         action-script {}\n",
        hook.display()
    );
    if upper.is_none() {
        tracing::warn!(
            "the rootfs of {} is not an overlay: files it writes are not replicated",
            bundle.display()
        );
    }
    std::fs::write(&conf, text)
        .map_err(|e| Error::Other(format!("write {}: {e}", conf.display())))?;
    let mut annotations = spec.annotations().clone().unwrap_or_default();
    annotations.insert(
        CRIU_CONFIG_ANNOTATION.to_string(),
        conf.display().to_string(),
    );
    spec.set_annotations(Some(annotations));
    spec.save(bundle.join("config.json"))
        .map_err(|e| Error::Other(format!("write config.json: {e}")))?;
    Ok(ReplicaSetup {
        netns,
        key,
        epoch: config.epoch,
        upper,
    })
}

/// Refuses what hybrid mode cannot keep, before anything else is checked or written.
fn check_hybrid_config(config: &RrcConfig) -> Result<()> {
    if config.on_recorder_failure != rrc_config::RecorderFailurePolicy::Stop {
        return Err(Error::InvalidArgument(
            "rrc: io.containerd.rrc.on-recorder-failure=continue-unprotected is not possible in \
             hybrid mode: the container's seccomp filter sends the recorded system calls to its \
             recorder, and without one they fail (ENOSYS), so a container whose recorder died \
             cannot go on correctly. Use on-recorder-failure=stop (the default) or mode passive"
                .into(),
        ));
    }
    Ok(())
}

/// Hybrid mode's part of Create: checks that the recorder can run and that the policy is one
/// hybrid mode can keep, and merges the recorder's seccomp rules into the spec's profile
/// (`SCMP_ACT_TRACE` for the syscalls it records; the container's own denials still deny).
fn prepare_hybrid(bundle: &Path, spec: &mut Spec, config: &RrcConfig) -> Result<()> {
    if config.role == rrc_config::Role::Primary && hybrid::recorder_binary().is_none() {
        return Err(Error::InvalidArgument(format!(
            "rrc: hybrid mode needs the recorder, {}, next to containerd-shim-rrc-v2 or on \
             containerd's PATH (make install puts both in place)",
            hybrid::RECORDER_BIN
        )));
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    let merged = rrc_recorder::profile::merge(linux.seccomp().as_ref()).map_err(|e| {
        Error::InvalidArgument(format!(
            "rrc: cannot merge the recorder's rules into the container's seccomp profile: {e}"
        ))
    })?;
    for (name, why) in &merged.untraced {
        tracing::warn!(
            "hybrid mode: {name} is NOT recorded for this container ({why}); a replay that \
             depends on it may diverge"
        );
    }
    linux.set_seccomp(Some(merged.profile));
    if let Some(cpu) = config.recorder_cpu {
        // The recorder pins itself to the same CPU (see hybrid::spawn).
        let mut resources = linux.resources().clone().unwrap_or_default();
        let mut cpus = resources.cpu().clone().unwrap_or_default();
        if let Some(old) = cpus.cpus().as_ref().filter(|c| **c != cpu.to_string()) {
            tracing::warn!(
                "io.containerd.rrc.recorder-cpu={cpu} replaces the container's cpuset {old}"
            );
        }
        cpus.set_cpus(Some(cpu.to_string()));
        resources.set_cpu(Some(cpus));
        linux.set_resources(Some(resources));
    }
    spec.set_linux(Some(linux));
    if config.role == rrc_config::Role::Primary {
        // The recorder must seize the init before runc installs the filter: a traced system
        // call with no tracer fails (ENOSYS), and runc's own init makes some.
        let mut hooks = spec.hooks().clone().unwrap_or_default();
        let mut create_runtime = hooks.create_runtime().clone().unwrap_or_default();
        create_runtime.push(hybrid::hook(bundle)?);
        hooks.set_create_runtime(Some(create_runtime));
        spec.set_hooks(Some(hooks));
    }
    Ok(())
}

/// Frees `len` bytes of `file` from `offset` on, keeping its size and every other byte's
/// offset (the hole reads as zeros): how both sides drop the log before a committed cut.
pub fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::other("range out of bounds"));
    };
    // SAFETY: fallocate on a descriptor this process owns, with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What both sides' replication tasks know of their container.
#[derive(Debug, Clone)]
pub struct ReplicaCtx {
    /// Container id.
    pub id: String,
    /// containerd namespace.
    pub namespace: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// What Create prepared.
    pub setup: ReplicaSetup,
    /// The container's configuration.
    pub config: RrcConfig,
    /// runc's root (with the namespace).
    pub runc_root: PathBuf,
    /// The runc binary.
    pub runc_binary: String,
}

/// A running replication task and the switch that stops it.
pub struct ReplicaHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ReplicaHandle {
    /// Wraps a task that watches `stop`.
    pub fn new(stop: watch::Sender<bool>, task: JoinHandle<()>) -> ReplicaHandle {
        ReplicaHandle { stop, task }
    }

    /// Asks the task to end (the primary says goodbye to its backup, so it does not take over).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Ends the task at once.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Asks the task to end and waits for it (at most `limit`): it removes what it installed
    /// in the container's namespace (rules that would otherwise drop every packet).
    pub async fn finish(mut self, limit: Duration) {
        self.stop();
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            tracing::warn!("the replication task did not end within {limit:?}: aborted");
            self.task.abort();
        }
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The checkpointer for a container of this runc root, running commands through the shim's
/// reaper, with CRIU from `PATH` or where `integration/setup.sh` installs it.
pub fn checkpointer(
    runc_root: &Path,
    runc_binary: &str,
) -> rrc_checkpoint::Checkpointer<runner::ShimRunner> {
    let criu = rrc_checkpoint::resolve_binary(Path::new("criu"))
        .or_else(|| rrc_checkpoint::resolve_binary(Path::new("/usr/local/sbin/criu")))
        .unwrap_or_else(|| PathBuf::from("criu"));
    rrc_checkpoint::Checkpointer::with_runner(runner::ShimRunner, runc_root)
        .runc_binary(runc_binary)
        .criu_binary(criu)
}

/// The replication channel's settings for this container.
pub fn channel_config(
    setup: &ReplicaSetup,
    config: &RrcConfig,
    id: &str,
    role: rrc_channel::Role,
) -> rrc_channel::Config {
    let mut cfg = rrc_channel::Config::new(setup.key.clone(), id, role);
    cfg.heartbeat = config.heartbeat;
    cfg.timeout = config.failover_timeout;
    cfg
}

/// The container's status file (see [`crate::status`]), kept up to date by the replication task.
pub struct StatusFile {
    bundle: PathBuf,
    /// What is written.
    pub status: crate::status::ReplicaStatus,
}

impl StatusFile {
    /// A status for a container in `role`.
    pub fn new(
        bundle: &Path,
        id: &str,
        namespace: &str,
        role: crate::status::Role,
        peer: Option<String>,
    ) -> StatusFile {
        StatusFile {
            bundle: bundle.to_path_buf(),
            status: crate::status::ReplicaStatus {
                version: crate::status::STATUS_VERSION,
                container_id: id.to_string(),
                namespace: namespace.to_string(),
                mode: Mode::Passive.as_str().to_string(),
                role,
                state: crate::status::State::Starting,
                detail: None,
                peer,
                pid: Some(std::process::id()),
                last_committed_epoch: None,
                last_checkpoint: None,
                checkpoints: 0,
                failovers: Vec::new(),
                log: None,
                updated_unix_ms: crate::status::unix_ms_now(),
            },
        }
    }

    /// Sets the state and detail and writes the file (a failure to write is logged).
    pub fn set(&mut self, state: crate::status::State, detail: Option<String>) {
        self.status.state = state;
        self.status.detail = detail;
        self.save();
    }

    /// Writes the file.
    pub fn save(&mut self) {
        self.status.updated_unix_ms = crate::status::unix_ms_now();
        if let Err(e) = crate::status::write(&self.bundle, &self.status) {
            tracing::warn!("cannot write the replication status: {e}");
        }
    }
}
