//! containerd's task service (API v2): the RPCs containerd sends the shim.
//!
//! Events are queued while the container lock is held, so they reach containerd in the order the
//! API requires (TaskCreate → TaskStart → TaskExit → TaskDelete; TaskExecAdded → TaskExecStarted →
//! TaskExit): the exit handler needs the same lock before it can queue a TaskExit.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, Empty, ExecProcessRequest, KillRequest,
    ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    Status, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, DeleteResponse,
    PauseRequest, PidsRequest, PidsResponse, ResumeRequest, StatsRequest, StatsResponse,
    UpdateTaskRequest,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::util::{convert_to_any, convert_to_timestamp};
use containerd_shim::{Error, TtrpcResult};
use oci_spec::runtime::LinuxResources;
use tokio::sync::{mpsc, Mutex};

use crate::container::Container;
use crate::oom;

/// Queue of events for containerd.
pub type EventSender = mpsc::Sender<(String, Box<dyn MessageDyn>)>;

/// The task service of one shim (one or more containers).
pub struct TaskService {
    /// Containers by id.
    pub containers: Arc<Mutex<HashMap<String, Container>>>,
    namespace: String,
    exit: Arc<ExitSignal>,
    events: EventSender,
}

/// Queues an event for containerd.
pub async fn send_event(events: &EventSender, event: impl Event) {
    let topic = event.topic();
    if let Err(e) = events.send((topic.clone(), Box::new(event))).await {
        tracing::warn!("cannot queue event {topic}: {e}");
    }
}

/// An error carrying a ttrpc status code.
pub fn status(code: Code, msg: impl Into<String>) -> Error {
    Error::Ttrpc(ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into())))
}

/// Turns a shim error into what containerd receives: a status with the right code and a plain
/// message (unsupported calls are NotImplemented, as containerd requires).
pub fn rpc(e: Error) -> ttrpc::Error {
    match e {
        Error::Other(s) => ttrpc::Error::RpcStatus(ttrpc::get_status(Code::UNKNOWN, s)),
        Error::Unimplemented(s) => {
            ttrpc::Error::RpcStatus(ttrpc::get_status(Code::UNIMPLEMENTED, s))
        }
        e => e.into(),
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFoundError(format!("container {id} not found"))
}

impl TaskService {
    /// A task service publishing to `events`.
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, events: EventSender) -> TaskService {
        TaskService {
            containers: Arc::new(Mutex::new(HashMap::new())),
            namespace: namespace.to_string(),
            exit,
            events,
        }
    }
}

impl TaskService {
    /// Starts a backup's replication task (its standby process is running).
    async fn start_backup(&self, c: &mut Container) -> containerd_shim::Result<()> {
        let Some(replica) = c.replica_ctx() else {
            return Ok(());
        };
        let ctx = crate::replica::backup::BackupCtx {
            replica,
            stdio: c.init.stdio.clone(),
            containers: self.containers.clone(),
            events: self.events.clone(),
        };
        let handle = crate::replica::backup::start(ctx).await?;
        if let Some(r) = c.replica.as_mut() {
            r.handle = Some(handle);
        }
        Ok(())
    }
}

/// Handles one exit reported by the reaper: marks the process stopped and queues TaskExit.
pub async fn handle_exit(
    containers: &Mutex<HashMap<String, Container>>,
    events: &EventSender,
    pid: i32,
    code: i32,
) {
    let mut containers = containers.lock().await;
    for c in containers.values_mut() {
        let exec_id = if c.init.pid == pid && c.init.status != Status::STOPPED {
            c.on_init_exit().await;
            String::new()
        } else if let Some((id, _)) = c
            .execs
            .iter()
            .find(|(_, p)| p.pid == pid && p.status != Status::STOPPED)
        {
            id.clone()
        } else {
            continue;
        };
        let container_id = c.id.clone();
        let Ok(p) = c.process_mut(&exec_id) else {
            return;
        };
        p.set_exited(code);
        tracing::info!(container = %container_id, exec = %exec_id, pid, code, "process exited");
        let event = TaskExit {
            container_id: container_id.clone(),
            id: if exec_id.is_empty() {
                container_id
            } else {
                exec_id
            },
            pid: u32::try_from(pid).unwrap_or(0),
            exit_status: p.exit_status,
            exited_at: Some(convert_to_timestamp(p.exited_at)).into(),
            ..Default::default()
        };
        send_event(events, event).await;
        return;
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let containers = self.containers.lock().await;
        let c = containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        Ok(c.state(&req.exec_id).map_err(rpc)?)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "create");
        if !req.checkpoint.is_empty() {
            return Err(rpc(Error::Unimplemented(
                "creating a task from a checkpoint is not supported by containerd-shim-rrc-v2"
                    .into(),
            )));
        }
        let mut containers = self.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(rpc(status(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            )));
        }
        let c = Container::create(&self.namespace, &req)
            .await
            .map_err(|e| {
                tracing::error!(id = %req.id, "create failed: {e}");
                e
            })
            .map_err(rpc)?;
        let pid = u32::try_from(c.init.pid).unwrap_or(0);
        containers.insert(req.id.clone(), c);
        send_event(
            &self.events,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            },
        )
        .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        let pid = c.start(&req.exec_id).await.map_err(rpc)?;
        if req.exec_id.is_empty() && c.is_standby() {
            if let Err(e) = self.start_backup(c).await {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(rpc(e));
            }
        }
        let upid = u32::try_from(pid).unwrap_or(0);
        if req.exec_id.is_empty() {
            send_event(
                &self.events,
                TaskStart {
                    container_id: req.id.clone(),
                    pid: upid,
                    ..Default::default()
                },
            )
            .await;
            oom::watch(&req.id, upid, self.events.clone());
        } else {
            send_event(
                &self.events,
                TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: upid,
                    ..Default::default()
                },
            )
            .await;
        }
        Ok(StartResponse {
            pid: upid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        let (pid, exit_status, exited_at) = if req.exec_id.is_empty() {
            c.delete().await.map_err(rpc)?;
            (c.init.pid, c.init.exit_status, c.init.exited_at)
        } else {
            let p = c.delete_exec(&req.exec_id).await.map_err(rpc)?;
            (p.pid, p.exit_status, p.exited_at)
        };
        if req.exec_id.is_empty() {
            containers.remove(&req.id);
        }
        let ts = convert_to_timestamp(exited_at);
        let pid = u32::try_from(pid).unwrap_or(0);
        if req.exec_id.is_empty() {
            send_event(
                &self.events,
                TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status,
                    exited_at: Some(ts.clone()).into(),
                    ..Default::default()
                },
            )
            .await;
        }
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at: Some(ts).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let containers = self.containers.lock().await;
        let c = containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        Ok(PidsResponse {
            processes: c.pids().await.map_err(rpc)?,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        c.pause().await.map_err(rpc)?;
        send_event(
            &self.events,
            TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            },
        )
        .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        c.resume().await.map_err(rpc)?;
        send_event(
            &self.events,
            TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            },
        )
        .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(rpc(Error::Unimplemented(
            "checkpointing a task through containerd is not supported by containerd-shim-rrc-v2"
                .into(),
        )))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        c.kill(&req.exec_id, req.signal, req.all)
            .await
            .map_err(rpc)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        c.add_exec(&req).map_err(rpc)?;
        send_event(
            &self.events,
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        )
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let containers = self.containers.lock().await;
        let c = containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        let p = c.process(&req.exec_id).map_err(rpc)?;
        let console =
            p.io.console
                .as_ref()
                .ok_or_else(|| {
                    Error::FailedPreconditionError(format!("process {} has no terminal", p.id))
                })
                .map_err(rpc)?;
        console.resize(req.width, req.height).map_err(rpc)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let mut containers = self.containers.lock().await;
        let c = containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        let p = c.process_mut(&req.exec_id).map_err(rpc)?;
        // Without a terminal the process holds containerd's stdin FIFO itself and sees EOF when
        // containerd closes its end; with one, the shim stops feeding the terminal.
        if let Some(console) = p.io.console.as_mut() {
            console.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let data = req
            .resources
            .as_ref()
            .map(|r| r.value.clone())
            .unwrap_or_default();
        let resources: LinuxResources = serde_json::from_slice(&data)
            .map_err(|e| Error::InvalidArgument(format!("resources are not valid JSON: {e}")))
            .map_err(rpc)?;
        let containers = self.containers.lock().await;
        let c = containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        c.update(&resources).await.map_err(rpc)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let rx = {
            let mut containers = self.containers.lock().await;
            let c = containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id))
                .map_err(rpc)?;
            c.process_mut(&req.exec_id).map_err(rpc)?.wait_channel()
        };
        let (exit_status, exited_at) = rx
            .await
            .map_err(|_| Error::Other(format!("{} went away before it exited", req.id)))
            .map_err(rpc)?;
        Ok(WaitResponse {
            exit_status,
            exited_at: Some(convert_to_timestamp(exited_at)).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let containers = self.containers.lock().await;
        let c = containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id))
            .map_err(rpc)?;
        let metrics = c.stats().map_err(rpc)?;
        Ok(StatsResponse {
            stats: Some(convert_to_any(Box::new(metrics)).map_err(rpc)?).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let containers = self.containers.lock().await;
        let task_pid = containers
            .get(&req.id)
            .map(|c| u32::try_from(c.init.pid).unwrap_or(0))
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.containers.lock().await.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}
