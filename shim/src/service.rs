//! The shim's lifecycle: the `start` and `delete` subcommands and the long-running daemon.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::mount::umount_recursive;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::ttrpc::context::with_duration;
use containerd_shim::util::timestamp;
use containerd_shim::{other, Config, DeleteResponse, Error, Flags, StartOpts};
use oci_spec::runtime::Spec;
use runc::options::DeleteOpts;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::container::read_recorded_options;
use crate::options::ShimOptions;
use crate::runc::{new_runc, read_pid_file, INIT_PID_FILE};
use crate::task::{handle_exit, TaskService};

/// Annotations that put several containers into one shim (a Kubernetes pod's containers share
/// the sandbox's shim).
pub const GROUP_LABELS: [&str; 3] = [
    "io.containerd.rrc.v2.group",
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// The shim.
pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: String,
}

/// Reads runtime options from the shim's stdin (containerd writes an `Any` there on `start`).
pub fn options_from_stdin() -> containerd_shim::Result<ShimOptions> {
    let mut data = Vec::new();
    std::io::stdin()
        .read_to_end(&mut data)
        .map_err(|e| other!("read runtime options from stdin: {e}"))?;
    if data.is_empty() {
        return Ok(ShimOptions::default());
    }
    let any = Any::parse_from_bytes(&data).map_err(|e| {
        Error::InvalidArgument(format!("runtime options are not a protobuf Any: {e}"))
    })?;
    ShimOptions::decode(&any.type_url, &any.value)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let shim_opts = options_from_stdin()?;
        let spec = Spec::load("config.json")
            .map_err(|e| Error::InvalidArgument(format!("read OCI spec config.json: {e}")))?;
        let grouping = spec
            .annotations()
            .as_ref()
            .and_then(|a| GROUP_LABELS.iter().find_map(|l| a.get(*l)))
            .cloned()
            .unwrap_or_else(|| opts.id.clone());
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        // A shim already serving this group takes the new container.
        if std::os::unix::net::UnixStream::connect(socket_path(&address)).is_ok() {
            tokio::fs::write("address", &address)
                .await
                .map_err(|e| other!("write address: {e}"))?;
            return Ok(address);
        }
        let exe = std::env::current_exe().map_err(|e| other!("find own binary: {e}"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args([
            "-namespace",
            &opts.namespace,
            "-id",
            &opts.id,
            "-address",
            &opts.address,
            "-socket",
            &address,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if opts.debug {
            cmd.arg("-debug");
        }
        let mut child = cmd.spawn().map_err(|e| other!("spawn shim daemon: {e}"))?;
        let pid = child.id().unwrap_or(0);
        if !shim_opts.shim_cgroup.is_empty() {
            containerd_shim::cgroup::add_task_to_cgroup(&shim_opts.shim_cgroup, pid)?;
        }
        containerd_shim::cgroup::adjust_oom_score(pid)?;
        // The daemon closes its stdout once its ttrpc server is listening.
        if let Some(mut out) = child.stdout.take() {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink).await;
        }
        tokio::fs::write("address", &address)
            .await
            .map_err(|e| other!("write address: {e}"))?;
        // As containerd's runc shim does: the daemon's pid, for operators and tools.
        tokio::fs::write("shim.pid", pid.to_string())
            .await
            .map_err(|e| other!("write shim.pid: {e}"))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| other!("current dir: {e}"))?
        } else {
            PathBuf::from(&self.bundle)
        };
        cleanup_bundle(&self.namespace, &self.id, &bundle).await
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (tx, mut rx) = mpsc::channel::<(String, Box<dyn MessageDyn>)>(256);
        let task = TaskService::new(&self.namespace, self.exit.clone(), tx.clone());

        let ns = self.namespace.clone();
        tokio::spawn(async move {
            while let Some((topic, event)) = rx.recv().await {
                if let Err(e) = publisher
                    .publish(with_duration(Duration::from_secs(5)), &topic, &ns, event)
                    .await
                {
                    tracing::warn!("publish {topic} to containerd: {e}");
                }
            }
        });

        match monitor_subscribe(Topic::Pid).await {
            Ok(mut sub) => {
                let containers = task.containers.clone();
                tokio::spawn(async move {
                    while let Some(ev) = sub.rx.recv().await {
                        if let Subject::Pid(pid) = ev.subject {
                            handle_exit(&containers, &tx, pid, ev.exit_code).await;
                        }
                    }
                });
            }
            Err(e) => tracing::error!("cannot watch process exits: {e}"),
        }
        task
    }
}

/// What `delete` does after containerd lost the shim: remove runc's state (killing whatever is
/// left) and unmount the rootfs.
pub async fn cleanup_bundle(
    namespace: &str,
    id: &str,
    bundle: &Path,
) -> containerd_shim::Result<DeleteResponse> {
    let opts = read_recorded_options(bundle);
    match new_runc(&opts, namespace, bundle) {
        Ok(runc) => {
            if let Err(e) = runc.delete(id, Some(&DeleteOpts { force: true })).await {
                tracing::warn!("runc delete {id}: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot set up runc to delete {id}: {e}"),
    }
    if let Err(e) = umount_recursive(bundle.join("rootfs").to_str(), 0) {
        tracing::warn!("unmount rootfs of {id}: {e}");
    }
    // A replicated container's CRIU hook socket outlives a killed shim.
    let _ = std::fs::remove_file(crate::replica::fs::socket_path(bundle));
    let pid = read_pid_file(&bundle.join(INIT_PID_FILE))
        .ok()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    let mut resp = DeleteResponse::new();
    resp.pid = pid;
    resp.exit_status = 128 + 9;
    resp.exited_at = Some(timestamp()?).into();
    Ok(resp)
}
