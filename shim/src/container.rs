//! One container: its runc client, its init process and its execs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cgroups_rs::fs::{Cgroup, Subsystem};
use containerd_shim::api::{CreateTaskRequest, ExecProcessRequest, Status};
use containerd_shim::mount::umount_recursive;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::cgroups::metrics::Metrics;
use containerd_shim::util::{mkdir, mount_rootfs};
use containerd_shim::{other, Error, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};
use rrc_config::{Mode, Role, RrcConfig};
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};
use runc::Runc;

use crate::io::{replica_streams, IoSetup, ProcessIo, Stdio};
use crate::options::ShimOptions;
use crate::process::Process;
use crate::replica::{self, ReplicaHandle, ReplicaSetup};

/// How long Delete waits for a replication task to clean up (its rules in the container's
/// namespace; a primary's goodbye to its backup).
const REPLICA_FINISH: std::time::Duration = std::time::Duration::from_secs(3);
use crate::runc::{kill_error, new_runc, read_pid_file, runtime_error, INIT_PID_FILE};

/// File in the bundle where the shim records the decoded runtime options, so that `delete`
/// (run after the shim was lost) finds the same runc binary and root.
pub const OPTIONS_FILE: &str = "rrc-options.json";
/// File in the bundle holding an inline rrc configuration (`ConfigBody`).
const INLINE_CONFIG_FILE: &str = "rrc-config.toml";

/// Reads the runtime options recorded in a bundle (defaults when there are none).
pub fn read_recorded_options(bundle: &Path) -> ShimOptions {
    std::fs::read(bundle.join(OPTIONS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A container managed by this shim.
pub struct Container {
    /// Container id.
    pub id: String,
    /// containerd namespace.
    namespace: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// runc client.
    pub runc: Runc,
    /// rrc configuration.
    pub config: RrcConfig,
    /// The init process.
    pub init: Process,
    /// Exec processes by exec id.
    pub execs: HashMap<String, Process>,
    /// The container's cgroup, for stats.
    cgroup: Option<Cgroup>,
    /// Whether the container shares its pid namespace (then its processes must be killed when
    /// init exits, since the kernel will not).
    shares_pid_ns: bool,
    /// Replication, for a container in a replicated mode.
    pub replica: Option<Replication>,
}

/// A replicated container's replication state.
pub struct Replication {
    /// What Create prepared.
    pub setup: ReplicaSetup,
    /// The replication task, once started.
    pub handle: Option<ReplicaHandle>,
    /// A backup that has not taken over: init is the standby process, there is no runc
    /// container.
    pub standby: bool,
    /// The runc binary.
    pub runc_binary: String,
    /// runc's root for this container (namespace included).
    pub runc_root: PathBuf,
    /// Hybrid mode's recorder, started at Create, until Start hands it to the replication.
    pub recorder: Option<replica::hybrid::Recorder>,
}

fn spec_shares_pid_ns(spec: &Spec) -> bool {
    let Some(ns) = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) else {
        return true;
    };
    !ns.iter()
        .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
}

/// Reads rrc's configuration for a container: its annotations and the runtime's config file.
pub fn load_config(spec: &Spec, opts: &ShimOptions, bundle: &Path) -> Result<RrcConfig> {
    let file = match (&opts.config_path, &opts.config_body) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(body)) => {
            let p = bundle.join(INLINE_CONFIG_FILE);
            std::fs::write(&p, body).map_err(|e| other!("write {}: {e}", p.display()))?;
            Some(p)
        }
        (None, None) => None,
    };
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let config = RrcConfig::load(annotations, file.as_deref())
        .map_err(|e| Error::InvalidArgument(format!("rrc: {e}")))?;
    Ok(config)
}

impl Container {
    /// Creates the container (`runc create`): decodes options, validates rrc's configuration,
    /// mounts the rootfs and sets up stdio. On failure nothing is left mounted.
    pub async fn create(namespace: &str, req: &CreateTaskRequest) -> Result<Container> {
        let bundle = PathBuf::from(&req.bundle);
        let opts = match req.options.as_ref() {
            Some(any) => ShimOptions::decode(&any.type_url, &any.value)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
            None => ShimOptions::default(),
        };
        let mut spec = Spec::load(bundle.join("config.json"))
            .map_err(|e| Error::InvalidArgument(format!("read OCI spec: {e}")))?;
        let config = load_config(&spec, &opts, &bundle)?;
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        let replica = if config.mode == Mode::Off {
            None
        } else {
            if req.terminal {
                return Err(Error::InvalidArgument(
                    "rrc: a replicated container cannot have a terminal (its streams must be \
                     pipes CRIU can checkpoint); run it without -t/--tty"
                        .into(),
                ));
            }
            Some(Replication {
                setup: replica::prepare(
                    &bundle,
                    &mut spec,
                    &config,
                    replica::fs::upper_dir(&req.rootfs),
                )?,
                handle: None,
                standby: config.role == Role::Backup,
                runc_binary: if opts.binary_name.is_empty() {
                    "runc".to_string()
                } else {
                    opts.binary_name.clone()
                },
                runc_root: crate::runc::runc_root(&opts, &bundle).join(namespace),
                recorder: None,
            })
        };
        let standby = replica.as_ref().is_some_and(|r| r.standby);
        let json = serde_json::to_vec(&opts).map_err(|e| other!("encode options: {e}"))?;
        std::fs::write(bundle.join(OPTIONS_FILE), json)
            .map_err(|e| other!("write {}: {e}", OPTIONS_FILE))?;

        let runc =
            new_runc(&opts, namespace, &bundle).map_err(|e| other!("cannot set up runc: {e}"))?;
        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            mkdir(&rootfs, 0o711).await?;
        }
        for m in &req.rootfs {
            if let Err(e) = mount_rootfs(m, &rootfs).await {
                let _ = umount_recursive(rootfs.to_str(), 0);
                return Err(e);
            }
        }

        let mut init = Process::new(&req.id, stdio.clone(), None);
        let pid_file = bundle.join(INIT_PID_FILE);
        let replicated = replica.is_some();
        let mut replica = replica;
        // Hybrid mode's recorder waits for runc create's hook to name the init.
        if let Some(r) = replica.as_mut() {
            if config.mode == Mode::Hybrid && !standby {
                match replica::hybrid::spawn(&bundle, &req.id, &r.setup.netns, config.recorder_cpu)
                    .await
                {
                    Ok(rec) => r.recorder = Some(rec),
                    Err(e) => {
                        let _ = umount_recursive(rootfs.to_str(), 0);
                        return Err(e);
                    }
                }
            }
        }
        let created = async {
            if standby {
                // A backup runs nothing until it takes over.
                return Ok(());
            }
            if replicated {
                let (pipes, io) = replica_streams(&stdio, &req.id, namespace).await?;
                let copts = CreateOpts::new()
                    .pid_file(&pid_file)
                    .no_pivot(opts.no_pivot_root)
                    .no_new_keyring(opts.no_new_keyring)
                    .detach(false)
                    .io(std::sync::Arc::new(pipes));
                let result = runc.create(&req.id, &bundle, Some(&copts)).await;
                drop(copts);
                if let Err(e) = result {
                    let mut io = io;
                    io.close().await;
                    return Err(runtime_error(&bundle, e, "OCI runtime create failed"));
                }
                init.io = io;
                init.pid = read_pid_file(&pid_file)?;
                return Ok(());
            }
            let setup = IoSetup::new(&stdio, &req.id, namespace).await?;
            let mut copts = CreateOpts::new()
                .pid_file(&pid_file)
                .no_pivot(opts.no_pivot_root)
                .no_new_keyring(opts.no_new_keyring)
                .detach(false);
            if let Some(path) = setup.console_socket() {
                copts = copts.console_socket(path);
            }
            if let Some(io) = setup.runc_io() {
                copts = copts.io(io);
            }
            let result = runc.create(&req.id, &bundle, Some(&copts)).await;
            drop(copts);
            if let Err(e) = result {
                setup.abort().await;
                return Err(runtime_error(&bundle, e, "OCI runtime create failed"));
            }
            init.io = setup.finish(&stdio).await?;
            init.pid = read_pid_file(&pid_file)?;
            Ok(())
        }
        .await;
        if let Err(e) = created {
            if let Some(rec) = replica.as_ref().and_then(|r| r.recorder.as_ref()) {
                rec.kill();
            }
            init.io.close().await;
            let _ = runc
                .delete(&req.id, Some(&DeleteOpts { force: true }))
                .await;
            let _ = umount_recursive(rootfs.to_str(), 0);
            return Err(e);
        }
        let cgroup = u32::try_from(init.pid)
            .ok()
            .and_then(|pid| containerd_shim::cgroup::get_cgroup(pid).ok());
        Ok(Container {
            id: req.id.clone(),
            namespace: namespace.to_string(),
            bundle,
            runc,
            config,
            init,
            execs: HashMap::new(),
            cgroup,
            shares_pid_ns: spec_shares_pid_ns(&spec),
            replica,
        })
    }

    fn bundle_str(&self) -> String {
        self.bundle.display().to_string()
    }

    /// The process named by `exec_id` (init when empty).
    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} not found")))
    }

    /// Mutable access to the process named by `exec_id`.
    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} not found")))
    }

    /// State RPC.
    pub fn state(&self, exec_id: &str) -> Result<containerd_shim::api::StateResponse> {
        Ok(self.process(exec_id)?.state(&self.bundle_str()))
    }

    /// Starts init (`runc start`) or an exec (`runc exec --detach`); returns its pid.
    pub async fn start(&mut self, exec_id: &str) -> Result<i32> {
        if exec_id.is_empty() {
            if self.init.status != Status::CREATED {
                return Err(Error::FailedPreconditionError(format!(
                    "container {} cannot start: it is {:?}",
                    self.id, self.init.status
                )));
            }
            let ctx = self.replica_ctx();
            if let (Some(r), Some(ctx)) = (self.replica.as_mut(), ctx) {
                if r.standby {
                    // The backup's replication task is started by the task service.
                    self.init.pid = replica::backup::spawn_standby()?;
                    self.init.status = Status::RUNNING;
                    return Ok(self.init.pid);
                }
                r.handle = Some(if let Some(rec) = r.recorder.take() {
                    replica::hybrid::start(ctx, rec).await?
                } else {
                    replica::primary::start(ctx).await?
                });
            }
            if let Err(e) = self.runc.start(&self.id).await {
                if let Some(h) = self.replica.as_mut().and_then(|r| r.handle.take()) {
                    h.stop();
                }
                return Err(runtime_error(&self.bundle, e, "OCI runtime start failed"));
            }
            self.init.status = Status::RUNNING;
            return Ok(self.init.pid);
        }
        if self.init.status != Status::RUNNING {
            return Err(Error::FailedPreconditionError(format!(
                "container {} is not running",
                self.id
            )));
        }
        let bundle = self.bundle.clone();
        let id = self.id.clone();
        let p = self
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} not found")))?;
        if p.status != Status::CREATED {
            return Err(Error::FailedPreconditionError(format!(
                "exec {exec_id} was already started"
            )));
        }
        let spec = p
            .spec
            .clone()
            .ok_or_else(|| Error::InvalidArgument(format!("exec {exec_id} has no spec")))?;
        let pid_file = bundle.join(format!("{exec_id}.pid"));
        let setup = IoSetup::new(&p.stdio, exec_id, &self.namespace).await?;
        let mut eopts = ExecOpts::new().pid_file(&pid_file).detach(true);
        if let Some(path) = setup.console_socket() {
            eopts = eopts.console_socket(path);
        }
        if let Some(io) = setup.runc_io() {
            eopts = eopts.io(io);
        }
        let result = self.runc.exec(&id, &spec, Some(&eopts)).await;
        drop(eopts);
        if let Err(e) = result {
            setup.abort().await;
            return Err(runtime_error(&bundle, e, "OCI runtime exec failed"));
        }
        p.io = setup.finish(&p.stdio).await?;
        p.pid = read_pid_file(&pid_file)?;
        p.status = Status::RUNNING;
        Ok(p.pid)
    }

    /// What a replication task needs to know of this container (None: not replicated).
    pub fn replica_ctx(&self) -> Option<replica::ReplicaCtx> {
        self.replica.as_ref().map(|r| replica::ReplicaCtx {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            bundle: self.bundle.clone(),
            setup: r.setup.clone(),
            config: self.config.clone(),
            runc_root: r.runc_root.clone(),
            runc_binary: r.runc_binary.clone(),
        })
    }

    /// Whether this is a backup that has not taken over (init is the standby process).
    pub fn is_standby(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.standby)
    }

    fn refuse_standby(&self, what: &str) -> Result<()> {
        if self.is_standby() {
            return Err(Error::FailedPreconditionError(format!(
                "container {} is a backup waiting for its primary: it runs no processes until \
                 it takes over, so it cannot {what}",
                self.id
            )));
        }
        Ok(())
    }

    /// After a failover: the restored init becomes the task's process and the standby exits
    /// (its exit is not reported: init's pid is no longer its pid).
    pub fn adopt_restored(&mut self, pid: i32, io: ProcessIo) {
        let standby = self.init.pid;
        self.init.pid = pid;
        self.init.io = io;
        self.init.status = Status::RUNNING;
        if let Some(r) = self.replica.as_mut() {
            r.standby = false;
        }
        if standby > 0 {
            let _ = kill(Pid::from_raw(standby), Signal::SIGKILL);
        }
        // As after runc create: containerd's cleanup of a lost shim reads it.
        if let Err(e) = std::fs::write(self.bundle.join(INIT_PID_FILE), pid.to_string()) {
            tracing::warn!("write {INIT_PID_FILE}: {e}");
        }
        self.cgroup = u32::try_from(pid)
            .ok()
            .and_then(|pid| containerd_shim::cgroup::get_cgroup(pid).ok());
    }

    /// Kill RPC.
    pub async fn kill(&mut self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if exec_id.is_empty() && self.is_standby() {
            let sig = i32::try_from(signal)
                .ok()
                .and_then(|s| Signal::try_from(s).ok())
                .ok_or_else(|| Error::InvalidArgument(format!("invalid signal {signal}")))?;
            if self.init.status != Status::RUNNING {
                return Err(Error::NotFoundError("process already finished".into()));
            }
            return kill(Pid::from_raw(self.init.pid), sig)
                .map_err(|e| other!("signal the standby process: {e}"));
        }
        if exec_id.is_empty() {
            return self
                .runc
                .kill(&self.id, signal, Some(&KillOpts { all }))
                .await
                .map_err(kill_error);
        }
        let p = self.process(exec_id)?;
        if p.pid <= 0 {
            return Err(Error::FailedPreconditionError(format!(
                "exec {exec_id} was not started"
            )));
        }
        if p.status == Status::STOPPED {
            return Err(Error::NotFoundError("process already finished".into()));
        }
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("invalid signal {signal}")))?;
        kill(Pid::from_raw(p.pid), sig).map_err(|e| match e {
            nix::errno::Errno::ESRCH => Error::NotFoundError("process already finished".into()),
            e => other!("kill exec {exec_id}: {e}"),
        })
    }

    /// Called when init exits: in a shared pid namespace, kill whatever init left behind. A
    /// primary tells its backup the container stopped; a backup stops listening.
    pub async fn on_init_exit(&mut self) {
        if let Some(h) = self.replica.as_ref().and_then(|r| r.handle.as_ref()) {
            h.stop();
        }
        if self.is_standby() {
            return;
        }
        if self.shares_pid_ns {
            if let Err(e) = self
                .runc
                .kill(&self.id, 9, Some(&KillOpts { all: true }))
                .await
            {
                tracing::debug!("killing what {} left behind: {e}", self.id);
            }
        }
    }

    /// Delete RPC for an exec: forgets it and returns (pid, exit status, exited at).
    pub async fn delete_exec(&mut self, exec_id: &str) -> Result<Process> {
        let p = self.process(exec_id)?;
        if p.status == Status::RUNNING {
            return Err(Error::FailedPreconditionError(format!(
                "exec {exec_id} is still running; kill it first"
            )));
        }
        let _ = std::fs::remove_file(self.bundle.join(format!("{exec_id}.pid")));
        let mut p = self
            .execs
            .remove(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} not found")))?;
        p.io.close().await;
        Ok(p)
    }

    /// Delete RPC for the container: `runc delete --force`, the replication task ended (and
    /// waited for), and the rootfs unmounted.
    pub async fn delete(&mut self) -> Result<()> {
        if matches!(
            self.init.status,
            Status::RUNNING | Status::PAUSED | Status::PAUSING
        ) {
            return Err(Error::FailedPreconditionError(format!(
                "container {} is still running; kill it first",
                self.id
            )));
        }
        if let Err(e) = self
            .runc
            .delete(&self.id, Some(&DeleteOpts { force: true }))
            .await
        {
            let msg = e.to_string().to_lowercase();
            if !msg.contains("does not exist") && !msg.contains("not exist") {
                return Err(runtime_error(&self.bundle, e, "OCI runtime delete failed"));
            }
        }
        if let Some(h) = self.replica.as_mut().and_then(|r| r.handle.take()) {
            h.finish(REPLICA_FINISH).await;
        }
        umount_recursive(self.bundle.join("rootfs").to_str(), 0)?;
        self.init.io.close().await;
        for p in self.execs.values_mut() {
            p.io.close().await;
        }
        // A container deleted before it ran: runc killed its init, whose exit the reaper may
        // never attribute (it is forgotten now). Record it as killed, so waiters get an answer.
        if self.init.status == Status::CREATED {
            self.init.set_exited(128 + 9);
        }
        Ok(())
    }

    /// Exec RPC: records a new exec process (started by Start).
    pub fn add_exec(&mut self, req: &ExecProcessRequest) -> Result<()> {
        self.refuse_standby("run an exec")?;
        if self.config.mode == Mode::Hybrid {
            return Err(Error::FailedPreconditionError(format!(
                "container {} is recorded (rrc mode hybrid): an exec'd process would run outside \
                 its recording, and the system calls its seccomp filter traces would fail; exec \
                 is not supported in hybrid mode yet",
                self.id
            )));
        }
        if self.execs.contains_key(&req.exec_id) {
            return Err(crate::task::status(
                containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        if self.init.status != Status::RUNNING {
            return Err(Error::FailedPreconditionError(format!(
                "container {} is not running",
                self.id
            )));
        }
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec request has no process spec".into()))?;
        let mut spec: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        spec.set_terminal(Some(req.terminal));
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        self.execs.insert(
            req.exec_id.clone(),
            Process::new(&req.exec_id, stdio, Some(spec)),
        );
        Ok(())
    }

    /// Pids RPC.
    pub async fn pids(&self) -> Result<Vec<ProcessInfo>> {
        if self.is_standby() {
            return Ok(vec![ProcessInfo {
                pid: u32::try_from(self.init.pid).unwrap_or(0),
                ..Default::default()
            }]);
        }
        let pids = self
            .runc
            .ps(&self.id)
            .await
            .map_err(|e| runtime_error(&self.bundle, e, "runc ps failed"))?;
        Ok(pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid: u32::try_from(pid).unwrap_or(0),
                ..Default::default()
            })
            .collect())
    }

    /// Pause RPC.
    pub async fn pause(&mut self) -> Result<()> {
        self.refuse_standby("be paused")?;
        if self.init.status != Status::RUNNING {
            return Err(Error::FailedPreconditionError(format!(
                "cannot pause container {}: it is {:?}",
                self.id, self.init.status
            )));
        }
        self.init.status = Status::PAUSING;
        if let Err(e) = self.runc.pause(&self.id).await {
            self.init.status = Status::RUNNING;
            return Err(runtime_error(&self.bundle, e, "OCI runtime pause failed"));
        }
        self.init.status = Status::PAUSED;
        Ok(())
    }

    /// Resume RPC.
    pub async fn resume(&mut self) -> Result<()> {
        if self.init.status != Status::PAUSED {
            return Err(Error::FailedPreconditionError(format!(
                "cannot resume container {}: it is {:?}",
                self.id, self.init.status
            )));
        }
        if let Err(e) = self.runc.resume(&self.id).await {
            return Err(runtime_error(&self.bundle, e, "OCI runtime resume failed"));
        }
        self.init.status = Status::RUNNING;
        Ok(())
    }

    /// Update RPC: new resource limits through `runc update`.
    pub async fn update(&self, resources: &LinuxResources) -> Result<()> {
        if self.init.status == Status::STOPPED {
            return Err(Error::FailedPreconditionError(format!(
                "container {} has exited",
                self.id
            )));
        }
        self.runc
            .update(&self.id, resources)
            .await
            .map_err(|e| runtime_error(&self.bundle, e, "OCI runtime update failed"))
    }

    /// Stats RPC: the container's cgroup metrics.
    pub fn stats(&self) -> Result<Metrics> {
        let cg = self.cgroup.as_ref().filter(|c| c.exists()).ok_or_else(|| {
            Error::NotFoundError(format!("container {} has no cgroup any more", self.id))
        })?;
        let mut metrics = containerd_shim::cgroup::collect_metrics(cg)?;
        if !cg.v2() {
            add_v1_metrics(cg, &mut metrics);
        }
        Ok(metrics)
    }
}

/// The cgroup v1 figures `containerd_shim::cgroup::collect_metrics` leaves out: it reads the CPU
/// usage from cgroup v2's `cpu.stat` only (so on v1 it was always 0) and of the memory only the
/// usage. Fills them from `cpuacct.*` and `memory.*`, as containerd's runc shim does.
fn add_v1_metrics(cg: &Cgroup, metrics: &mut Metrics) {
    for subsystem in cg.subsystems() {
        match subsystem {
            Subsystem::CpuAcct(c) => {
                let acct = c.cpuacct();
                let usage = metrics
                    .cpu
                    .mut_or_insert_default()
                    .usage
                    .mut_or_insert_default();
                usage.total = acct.usage;
                usage.kernel = acct.usage_sys;
                usage.user = acct.usage_user;
                usage.per_cpu = acct
                    .usage_percpu
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect();
            }
            Subsystem::Mem(c) => {
                let mem = c.memory_stat();
                let limit = |l: i64| u64::try_from(l).unwrap_or(u64::MAX);
                let m = metrics.memory.mut_or_insert_default();
                let usage = m.usage.mut_or_insert_default();
                usage.usage = mem.usage_in_bytes;
                usage.limit = limit(mem.limit_in_bytes);
                usage.max = mem.max_usage_in_bytes;
                usage.failcnt = mem.fail_cnt;
                let st = &mem.stat;
                m.cache = st.cache;
                m.rss = st.rss;
                m.rss_huge = st.rss_huge;
                m.mapped_file = st.mapped_file;
                m.dirty = st.dirty;
                m.writeback = st.writeback;
                m.pg_pg_in = st.pgpgin;
                m.pg_pg_out = st.pgpgout;
                m.pg_fault = st.pgfault;
                m.pg_maj_fault = st.pgmajfault;
                m.inactive_anon = st.inactive_anon;
                m.active_anon = st.active_anon;
                m.inactive_file = st.inactive_file;
                m.active_file = st.active_file;
                m.unevictable = st.unevictable;
                m.hierarchical_memory_limit = limit(st.hierarchical_memory_limit);
                m.hierarchical_swap_limit = limit(st.hierarchical_memsw_limit);
                m.total_cache = st.total_cache;
                m.total_rss = st.total_rss;
                m.total_rss_huge = st.total_rss_huge;
                m.total_mapped_file = st.total_mapped_file;
                m.total_dirty = st.total_dirty;
                m.total_writeback = st.total_writeback;
                m.total_pg_pg_in = st.total_pgpgin;
                m.total_pg_pg_out = st.total_pgpgout;
                m.total_pg_fault = st.total_pgfault;
                m.total_pg_maj_fault = st.total_pgmajfault;
                m.total_inactive_anon = st.total_inactive_anon;
                m.total_active_anon = st.total_active_anon;
                m.total_inactive_file = st.total_inactive_file;
                m.total_active_file = st.total_active_file;
                m.total_unevictable = st.total_unevictable;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(annotations: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        spec.set_annotations(Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        spec
    }

    #[test]
    fn plain_container_is_mode_off() {
        let dir = tempfile::tempdir().expect("dir");
        let cfg = load_config(&spec_with(&[]), &ShimOptions::default(), dir.path()).expect("ok");
        assert_eq!(cfg.mode, Mode::Off);
    }

    fn replicated(dir: &Path, extra: &[(&str, &str)]) -> (Spec, RrcConfig) {
        let key = dir.join("key");
        std::fs::write(&key, [1u8; 32]).expect("key");
        let key = key.display().to_string();
        let mut a = vec![
            ("io.containerd.rrc.peer", "198.18.0.3:7070"),
            ("io.containerd.rrc.auth-key-file", key.as_str()),
        ];
        a.extend_from_slice(extra);
        let spec = spec_with(&a);
        let cfg = load_config(&spec, &ShimOptions::default(), dir).expect("valid");
        (spec, cfg)
    }

    /// A replicated spec whose network namespace is given by path (this process's).
    fn with_netns(spec: &mut Spec) {
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        for n in ns.iter_mut() {
            if n.typ() == LinuxNamespaceType::Network {
                n.set_path(Some(PathBuf::from("/proc/self/ns/net")));
            }
        }
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
    }

    #[test]
    fn hybrid_backup_gets_the_merged_profile_and_no_hook() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut spec, cfg) = replicated(
            dir.path(),
            &[
                ("io.containerd.rrc.mode", "hybrid"),
                ("io.containerd.rrc.role", "backup"),
                ("io.containerd.rrc.listen", "198.18.0.3:7070"),
                ("io.containerd.rrc.recorder-cpu", "1"),
            ],
        );
        with_netns(&mut spec);
        replica::prepare(dir.path(), &mut spec, &cfg, None).expect("prepared");
        let saved = Spec::load(dir.path().join("config.json")).expect("saved spec");
        let linux = saved.linux().as_ref().expect("linux");
        let profile = linux.seccomp().as_ref().expect("seccomp profile");
        let traces_read = profile.syscalls().iter().flatten().any(|r| {
            r.names().iter().any(|n| n == "read")
                && r.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActTrace
        });
        assert!(traces_read, "read is not traced: {profile:?}");
        let cpus = linux
            .resources()
            .as_ref()
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| c.cpus().clone());
        assert_eq!(cpus.as_deref(), Some("1"));
        // Only a primary has a recorder to hand the init to.
        let hooks = saved
            .hooks()
            .as_ref()
            .and_then(|h| h.create_runtime().clone())
            .unwrap_or_default();
        assert!(hooks.is_empty(), "{hooks:?}");
    }

    #[test]
    fn hybrid_refuses_to_continue_without_its_recorder() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut spec, cfg) = replicated(
            dir.path(),
            &[
                ("io.containerd.rrc.mode", "hybrid"),
                (
                    "io.containerd.rrc.on-recorder-failure",
                    "continue-unprotected",
                ),
            ],
        );
        with_netns(&mut spec);
        let err = replica::prepare(dir.path(), &mut spec, &cfg, None).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("continue-unprotected") && text.contains("ENOSYS"),
            "{text}"
        );
    }

    #[test]
    fn hybrid_primary_hands_its_init_to_the_recorder_from_a_hook() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut spec, cfg) = replicated(dir.path(), &[("io.containerd.rrc.mode", "hybrid")]);
        with_netns(&mut spec);
        match replica::prepare(dir.path(), &mut spec, &cfg, None) {
            Ok(_) => {
                let saved = Spec::load(dir.path().join("config.json")).expect("saved spec");
                let hooks = saved
                    .hooks()
                    .as_ref()
                    .and_then(|h| h.create_runtime().clone())
                    .unwrap_or_default();
                let args = hooks
                    .first()
                    .and_then(|h| h.args().clone())
                    .unwrap_or_default();
                assert_eq!(
                    args.get(1).map(String::as_str),
                    Some("recorder-hook"),
                    "{hooks:?}"
                );
                let fifo = dir.path().join(replica::hybrid::PID_FIFO);
                assert_eq!(args.get(2), Some(&fifo.display().to_string()));
            }
            // Without rrc-recorder next to the test binary or on PATH, Create says so.
            Err(e) => assert!(e.to_string().contains("rrc-recorder"), "{e}"),
        }
    }

    #[test]
    fn passive_needs_a_network_namespace_by_path() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut spec, cfg) = replicated(dir.path(), &[]);
        assert_eq!(cfg.mode, Mode::Passive);
        let err = replica::prepare(dir.path(), &mut spec, &cfg, None).expect_err("refused");
        assert!(
            err.to_string().contains("network namespace given by path"),
            "{err}"
        );
    }

    #[test]
    fn passive_bundle_gets_its_criu_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut spec, cfg) = replicated(dir.path(), &[]);
        with_netns(&mut spec);
        let upper = dir.path().join("upper");
        let setup =
            replica::prepare(dir.path(), &mut spec, &cfg, Some(upper.clone())).expect("prepared");
        assert_eq!(setup.upper, Some(upper));
        assert_eq!(setup.netns, PathBuf::from("/proc/self/ns/net"));
        assert_eq!(setup.key, vec![1u8; 32]);
        assert_eq!(setup.epoch, rrc_config::DEFAULT_EPOCH);
        let saved = Spec::load(dir.path().join("config.json")).expect("saved spec");
        let conf = saved
            .annotations()
            .as_ref()
            .and_then(|a| a.get(rrc_checkpoint::CRIU_CONFIG_ANNOTATION))
            .expect("annotation");
        let text = std::fs::read_to_string(conf).expect("criu config");
        assert!(text.contains("network-lock skip"), "{text}");
        let hook = dir.path().join(replica::fs::HOOK_SCRIPT);
        assert!(
            text.contains(&format!("action-script {}", hook.display())),
            "{text}"
        );
        let script = std::fs::read_to_string(&hook).expect("hook script");
        assert!(
            script.contains("post-dump")
                && script.contains("network-lock")
                && script.contains("criu-hook"),
            "{script}"
        );
    }

    #[test]
    fn bad_annotation_fails_with_key_named() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec_with(&[("io.containerd.rrc.epoch-ms", "0")]);
        let err = load_config(&spec, &ShimOptions::default(), dir.path()).expect_err("refused");
        assert!(
            err.to_string().contains("io.containerd.rrc.epoch-ms"),
            "{err}"
        );
    }

    #[test]
    fn inline_config_body_is_used() {
        let dir = tempfile::tempdir().expect("dir");
        let opts = ShimOptions {
            config_body: Some("epoch-ms = 0\n".into()),
            ..Default::default()
        };
        let err = load_config(&spec_with(&[]), &opts, dir.path()).expect_err("refused");
        assert!(err.to_string().contains("epoch-ms"), "{err}");
    }

    #[test]
    fn pid_namespace_sharing() {
        let spec = Spec::default();
        assert!(
            !spec_shares_pid_ns(&spec),
            "default spec has its own pid ns"
        );
        let mut s = Spec::default();
        s.set_linux(None);
        assert!(spec_shares_pid_ns(&s));
    }
}
