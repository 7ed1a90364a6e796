//! End-to-end tests of `containerd-shim-rrc-v2` through Kubernetes' CRI: a real containerd 1.6
//! with its CRI plugin (one per test, in its own test bed, see `rrc_integration::cri` for the
//! configuration), rrc's shim as runtime handler `rrc`, pods on the host network (no CNI).
//!
//! Run as root: `cargo build && cargo test -p rrc-integration --test cri`. Without root or
//! containerd the tests print `SKIPPED: …` and pass (unless `RRC_REQUIRE_INTEGRATION=1`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest, LinuxContainerConfig,
    LinuxContainerResources, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use rrc_integration::cri::{self, CriConfig};
use rrc_integration::{image, integration_unavailable, wait_for, TestBed};
use tonic::transport::Channel;

/// The containerd namespace the CRI plugin works in.
const CRI_NAMESPACE: &str = "k8s.io";
/// The shim's binary name, as it appears in `argv[0]`.
const SHIM: &str = "containerd-shim-rrc-v2";
/// containerd's v2 runtime bundle directory, under its state directory.
const TASK_DIR: &str = "io.containerd.runtime.v2.task";
/// An rrc setting that is valid in mode off, and its annotation.
const EPOCH_MS: &str = "io.containerd.rrc.epoch-ms";
/// What the test container prints first.
const HELLO: &str = "hello-from-cri";

/// A test bed with one host, "node", running containerd with CRI, and CRI clients for it.
struct Node {
    bed: TestBed,
    rt: RuntimeServiceClient<Channel>,
}

impl Node {
    /// Starts containerd with the CRI plugin and the given rrc runtime handlers (name and
    /// contents of an rrc TOML config file to pass as `ConfigPath`), and imports busybox and
    /// pause into `k8s.io`. None (after printing why) when the integration tests cannot run.
    async fn start(handlers: &[(&str, Option<&str>)]) -> Result<Option<Node>> {
        if let Some(why) = integration_unavailable() {
            eprintln!("SKIPPED: {why}");
            return Ok(None);
        }
        let mut bed = TestBed::new(&["node"])?;
        let dir = bed.host("node").dir().to_path_buf();
        let mut config = CriConfig::new(&image("pause")).cni_dir(&dir.join("cni"));
        for (name, file) in handlers {
            let path = match file {
                Some(text) => {
                    let p = dir.join(format!("{name}.toml"));
                    std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
                    Some(p)
                }
                None => None,
            };
            config = config.handler(name, path.as_deref());
        }
        let host = bed.host_mut("node");
        host.start_containerd(&config.to_toml())?;
        host.import_images(CRI_NAMESPACE, &["busybox", "pause"])?;
        let (rt, mut img) = cri::connect(&host.containerd_socket()).await?;
        // The CRI plugin pulls a missing sandbox image: there is no registry here, so make sure
        // it never has to.
        for name in ["pause", "busybox"] {
            let st = img
                .image_status(ImageStatusRequest {
                    image: Some(image_spec(&image(name))),
                    verbose: false,
                })
                .await
                .with_context(|| format!("CRI ImageStatus {name}"))?
                .into_inner();
            ensure!(
                st.image.is_some(),
                "CRI does not see {} after the import",
                image(name)
            );
        }
        Ok(Some(Node { bed, rt }))
    }

    fn dir(&self) -> &Path {
        self.bed.host("node").dir()
    }

    fn socket(&self) -> PathBuf {
        self.bed.host("node").containerd_socket()
    }

    /// The bundle containerd gives a CRI container or sandbox.
    fn bundle(&self, id: &str) -> PathBuf {
        self.bed
            .host("node")
            .state_dir()
            .join(TASK_DIR)
            .join(CRI_NAMESPACE)
            .join(id)
    }

    /// containerd's log tail, for failure messages.
    fn log(&self) -> String {
        self.bed.host("node").containerd_log_tail()
    }

    /// A host-network pod's configuration, its logs under the host's directory.
    fn pod_config(&self, name: &str, annotations: &[(&str, &str)]) -> Result<PodSandboxConfig> {
        let logs = self.dir().join("pod-logs").join(name);
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
        Ok(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}"),
                namespace: "rrc-test".to_string(),
                attempt: 0,
            }),
            // No hostname: a host-network pod shares the host's UTS namespace too.
            log_directory: logs.display().to_string(),
            annotations: strings(annotations),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// RunPodSandbox; the error is the CRI status message.
    async fn run_pod(
        &mut self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> std::result::Result<String, String> {
        self.rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(|s| s.message().to_string())
    }

    /// CreateContainer of a busybox that prints [`HELLO`], then idles until SIGTERM (exit 0).
    async fn create_hello(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        annotations: &[(&str, &str)],
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "hello".to_string(),
                attempt: 0,
            }),
            image: Some(image_spec(&image("busybox"))),
            command: ["sh", "-c"].map(String::from).to_vec(),
            args: vec![format!(
                "echo {HELLO}; trap 'exit 0' TERM; while true; do sleep 0.2; done"
            )],
            annotations: strings(annotations),
            log_path: "hello.log".to_string(),
            ..Default::default()
        };
        self.create_container(pod, pod_config, config).await
    }

    /// CreateContainer of `config` in `pod`; returns the container id.
    async fn create_container(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String> {
        let id = self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .with_context(|| format!("CRI CreateContainer in pod {pod}\n{}", self.log()))?
            .into_inner()
            .container_id;
        Ok(id)
    }

    /// StartContainer; the error is the CRI status message.
    async fn start_container(&mut self, id: &str) -> std::result::Result<(), String> {
        self.rt
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    /// The container's state and, from the verbose info, its init pid.
    async fn container_state(&mut self, id: &str) -> Result<(ContainerState, Option<i32>, i32)> {
        let resp = self
            .rt
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            })
            .await
            .with_context(|| format!("CRI ContainerStatus {id}"))?
            .into_inner();
        let status = resp.status.context("ContainerStatus without status")?;
        Ok((
            ContainerState::try_from(status.state).unwrap_or(ContainerState::ContainerUnknown),
            info_pid(&resp.info),
            status.exit_code,
        ))
    }

    /// The sandbox's (pause process's) pid, from PodSandboxStatus' verbose info.
    async fn sandbox_pid(&mut self, pod: &str) -> Result<i32> {
        let resp = self
            .rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.to_string(),
                verbose: true,
            })
            .await
            .with_context(|| format!("CRI PodSandboxStatus {pod}"))?
            .into_inner();
        info_pid(&resp.info).with_context(|| format!("no pid in the sandbox info {:?}", resp.info))
    }

    /// Stops and removes a container, then stops and removes its pod, and checks that CRI lists
    /// neither any more.
    async fn tear_down(&mut self, pod: &str, containers: &[&str]) -> Result<()> {
        for c in containers {
            self.rt
                .stop_container(StopContainerRequest {
                    container_id: c.to_string(),
                    timeout: 10,
                })
                .await
                .with_context(|| format!("CRI StopContainer {c}\n{}", self.log()))?;
            let (state, _, code) = self.container_state(c).await?;
            ensure!(
                state == ContainerState::ContainerExited,
                "container {c} is {state:?} after StopContainer"
            );
            ensure!(code == 0, "container {c} exited {code} on SIGTERM, not 0");
            self.rt
                .remove_container(RemoveContainerRequest {
                    container_id: c.to_string(),
                })
                .await
                .with_context(|| format!("CRI RemoveContainer {c}\n{}", self.log()))?;
        }
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .with_context(|| format!("CRI StopPodSandbox {pod}\n{}", self.log()))?;
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .with_context(|| format!("CRI RemovePodSandbox {pod}\n{}", self.log()))?;
        self.expect_no_pods().await
    }

    /// CRI lists no pod and no container.
    async fn expect_no_pods(&mut self) -> Result<()> {
        let pods = self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .context("CRI ListPodSandbox")?
            .into_inner()
            .items;
        ensure!(pods.is_empty(), "CRI still lists pods: {pods:?}");
        let containers = self
            .rt
            .list_containers(ListContainersRequest::default())
            .await
            .context("CRI ListContainers")?
            .into_inner()
            .containers;
        ensure!(
            containers.is_empty(),
            "CRI still lists containers: {containers:?}"
        );
        Ok(())
    }

    /// The pids and arguments of rrc shim daemons serving this node's containerd (not the
    /// short-lived `start`/`delete` invocations).
    fn shim_daemons(&self) -> Vec<(i32, Vec<String>)> {
        let socket = self.socket().display().to_string();
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_shim = args
                .first()
                .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == SHIM));
            let ours = args
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == socket);
            let transient = args.last().is_some_and(|a| a == "start" || a == "delete");
            if is_shim && ours && !transient {
                out.push((pid, args));
            }
        }
        out
    }

    /// Waits until no rrc shim serves this node any more.
    async fn expect_no_shims(&self) -> Result<()> {
        // The tests run on a multi-threaded runtime: block this worker, not the runtime.
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(10), || {
                let left = self.shim_daemons();
                ensure!(left.is_empty(), "rrc shims still run: {left:?}");
                Ok(())
            })
        })
    }
}

fn strings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn image_spec(reference: &str) -> ImageSpec {
    ImageSpec {
        image: reference.to_string(),
        ..Default::default()
    }
}

/// The `pid` in the JSON of a verbose CRI status' `info["info"]`.
fn info_pid(info: &HashMap<String, String>) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v.get("pid")?.as_i64().and_then(|p| i32::try_from(p).ok())
}

/// The parent pid of a process.
fn ppid(pid: i32) -> Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no PPid in /proc/{pid}/status"))
}

/// The annotations of the OCI spec in a bundle (what the shim reads).
fn spec_annotations(bundle: &Path) -> Result<HashMap<String, String>> {
    let path = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let spec: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let map = spec
        .get("annotations")
        .and_then(|a| a.as_object())
        .map(|a| {
            a.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(map)
}

/// Waits until the container runs; returns its init pid.
async fn wait_running(node: &mut Node, id: &str) -> Result<i32> {
    let start = Instant::now();
    loop {
        let (state, pid, _) = node.container_state(id).await?;
        match (state, pid) {
            (ContainerState::ContainerRunning, Some(pid)) => return Ok(pid),
            _ if start.elapsed() > Duration::from_secs(10) => {
                bail!("container {id} is {state:?} (pid {pid:?}) 10 s after StartContainer")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A pod with an rrc annotation under the `rrc` handler: the sandbox and its container run under
/// one rrc shim, the annotation reaches the OCI spec the shim reads, the container's output
/// reaches its CRI log, ExecSync works, and everything goes away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_runs_under_rrc_shim() -> Result<()> {
    let t0 = Instant::now();
    let Some(mut node) = Node::start(&[(cri::RRC_HANDLER, None)]).await? else {
        return Ok(());
    };
    let started = t0.elapsed();
    let pod_cfg = node.pod_config("web", &[(EPOCH_MS, "250")])?;
    let pod = match node.run_pod(&pod_cfg, cri::RRC_HANDLER).await {
        Ok(id) => id,
        Err(e) => bail!("RunPodSandbox failed: {e}\n{}", node.log()),
    };
    let ctr = node.create_hello(&pod, &pod_cfg, &[]).await?;
    if let Err(e) = node.start_container(&ctr).await {
        bail!("StartContainer failed: {e}\n{}", node.log());
    }
    let ctr_pid = wait_running(&mut node, &ctr).await?;
    let pause_pid = node.sandbox_pid(&pod).await?;

    // One shim daemon serves the whole pod: started for the sandbox, grouped by
    // io.kubernetes.cri.sandbox-id, and the parent (subreaper) of both the pause process and
    // the container's init.
    let shims = node.shim_daemons();
    ensure!(shims.len() == 1, "expected one rrc shim, found {shims:?}");
    let (shim_pid, shim_args) = &shims[0];
    ensure!(
        shim_args.windows(2).any(|w| w[0] == "-id" && w[1] == pod),
        "the shim {shim_args:?} was not started for sandbox {pod}"
    );
    ensure!(
        shim_args
            .windows(2)
            .any(|w| w[0] == "-namespace" && w[1] == CRI_NAMESPACE),
        "the shim {shim_args:?} does not serve namespace {CRI_NAMESPACE}"
    );
    ensure!(
        ppid(pause_pid)? == *shim_pid,
        "the pause process {pause_pid} is not a child of the rrc shim {shim_pid}"
    );
    ensure!(
        ppid(ctr_pid)? == *shim_pid,
        "the container's init {ctr_pid} is not a child of the rrc shim {shim_pid}"
    );
    let address = |id: &str| {
        let p = node.bundle(id).join("address");
        std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
    };
    ensure!(
        address(&pod)? == address(&ctr)?,
        "the sandbox and the container have different shim addresses"
    );

    // The pod annotation reached the OCI specs of both (allow-listed by pod_annotations).
    for (what, id) in [("sandbox", &pod), ("container", &ctr)] {
        let a = spec_annotations(&node.bundle(id))?;
        ensure!(
            a.get(EPOCH_MS).map(String::as_str) == Some("250"),
            "the {what}'s OCI spec lacks {EPOCH_MS}=250: {a:?}"
        );
        ensure!(
            a.get("io.kubernetes.cri.sandbox-id") == Some(&pod),
            "the {what}'s OCI spec lacks the sandbox id: {a:?}"
        );
    }

    // The container's stdout went through the shim to CRI's log file.
    let log_file = Path::new(&pod_cfg.log_directory).join("hello.log");
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log_file).unwrap_or_default();
            ensure!(
                text.lines()
                    .any(|l| l.contains(" stdout ") && l.ends_with(HELLO)),
                "{} does not have {HELLO:?} yet: {text:?}",
                log_file.display()
            );
            Ok(())
        })
    })?;

    // ExecSync (what kubelet's exec probes use) runs through the shim's Exec.
    let exec = node
        .rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr.clone(),
            cmd: ["sh", "-c", "echo exec-ok; echo to-stderr >&2; exit 3"]
                .map(String::from)
                .to_vec(),
            timeout: 10,
        })
        .await
        .with_context(|| format!("CRI ExecSync\n{}", node.log()))?
        .into_inner();
    ensure!(
        String::from_utf8_lossy(&exec.stdout) == "exec-ok\n"
            && String::from_utf8_lossy(&exec.stderr) == "to-stderr\n"
            && exec.exit_code == 3,
        "ExecSync returned {exec:?}"
    );

    node.tear_down(&pod, &[&ctr]).await?;
    node.expect_no_shims().await?;
    for id in [&pod, &ctr] {
        ensure!(
            !node.bundle(id).exists(),
            "bundle {} is still there",
            node.bundle(id).display()
        );
    }
    eprintln!(
        "pod_runs_under_rrc_shim: containerd + images {started:?}, all {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// The shim validates rrc's annotations itself: an invalid pod annotation makes RunPodSandbox
/// fail, an invalid container annotation makes StartContainer fail, each naming the annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_refuses_invalid_annotations() -> Result<()> {
    let Some(mut node) = Node::start(&[(cri::RRC_HANDLER, None)]).await? else {
        return Ok(());
    };
    let bad = node.pod_config("bad", &[(EPOCH_MS, "0")])?;
    match node.run_pod(&bad, cri::RRC_HANDLER).await {
        Ok(id) => bail!("RunPodSandbox with {EPOCH_MS}=0 succeeded (pod {id})"),
        Err(e) => {
            eprintln!("RunPodSandbox with {EPOCH_MS}=0 refused: {e}");
            ensure!(
                e.contains(EPOCH_MS),
                "RunPodSandbox failed without naming {EPOCH_MS}: {e}"
            );
        }
    }
    node.expect_no_pods().await?;
    node.expect_no_shims().await?;

    // A valid pod whose container has an invalid annotation (allow-listed by
    // container_annotations): CRI creates the container, the shim refuses its task.
    let good = node.pod_config("good", &[])?;
    let pod = match node.run_pod(&good, cri::RRC_HANDLER).await {
        Ok(id) => id,
        Err(e) => bail!("RunPodSandbox failed: {e}\n{}", node.log()),
    };
    let ctr = node.create_hello(&pod, &good, &[(EPOCH_MS, "0")]).await?;
    match node.start_container(&ctr).await {
        Ok(()) => bail!("StartContainer with {EPOCH_MS}=0 on the container succeeded"),
        Err(e) => {
            eprintln!("StartContainer with {EPOCH_MS}=0 refused: {e}");
            ensure!(
                e.contains(EPOCH_MS),
                "StartContainer failed without naming {EPOCH_MS}: {e}"
            );
        }
    }
    node.rt
        .remove_container(RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .with_context(|| format!("CRI RemoveContainer {ctr}\n{}", node.log()))?;
    node.tear_down(&pod, &[]).await?;
    node.expect_no_shims().await
}

/// A runtime handler whose `options.ConfigPath` names an rrc config file: the shim reads it (a
/// valid file runs the pod; an invalid one fails it, naming the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_config_path_reaches_the_shim() -> Result<()> {
    let Some(mut node) = Node::start(&[
        ("rrc-cfg", Some("epoch-ms = 200\n")),
        ("rrc-cfg-bad", Some("epoch-ms = 0\n")),
    ])
    .await?
    else {
        return Ok(());
    };
    let bad_file = node.dir().join("rrc-cfg-bad.toml");
    let good_file = node.dir().join("rrc-cfg.toml");

    let bad = node.pod_config("bad", &[])?;
    match node.run_pod(&bad, "rrc-cfg-bad").await {
        Ok(id) => bail!("RunPodSandbox under rrc-cfg-bad (epoch-ms = 0) succeeded (pod {id})"),
        Err(e) => {
            eprintln!("RunPodSandbox under rrc-cfg-bad refused: {e}");
            ensure!(
                e.contains(&bad_file.display().to_string()) && e.contains("epoch-ms"),
                "RunPodSandbox under rrc-cfg-bad failed without naming {} and epoch-ms: {e}",
                bad_file.display()
            );
        }
    }
    node.expect_no_pods().await?;
    node.expect_no_shims().await?;

    let cfg = node.pod_config("cfg", &[])?;
    let pod = match node.run_pod(&cfg, "rrc-cfg").await {
        Ok(id) => id,
        Err(e) => bail!("RunPodSandbox under rrc-cfg failed: {e}\n{}", node.log()),
    };
    let ctr = node.create_hello(&pod, &cfg, &[]).await?;
    if let Err(e) = node.start_container(&ctr).await {
        bail!("StartContainer under rrc-cfg failed: {e}\n{}", node.log());
    }
    wait_running(&mut node, &ctr).await?;
    // The shim records the options it was created with: ConfigPath arrived for both.
    for id in [&pod, &ctr] {
        let p = node.bundle(id).join("rrc-options.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        let opts: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))?;
        ensure!(
            opts.get("config_path").and_then(|v| v.as_str())
                == Some(good_file.display().to_string().as_str()),
            "{} does not name {}: {text}",
            p.display(),
            good_file.display()
        );
    }
    node.tear_down(&pod, &[&ctr]).await?;
    node.expect_no_shims().await
}

/// A container that exceeds its memory limit: the shim reports the OOM (TaskOOM, from the cgroup
/// v1 memory controller), so CRI gives the reason `OOMKilled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kill_is_reported() -> Result<()> {
    let Some(mut node) = Node::start(&[(cri::RRC_HANDLER, None)]).await? else {
        return Ok(());
    };
    let pod_cfg = node.pod_config("oom", &[])?;
    let pod = match node.run_pod(&pod_cfg, cri::RRC_HANDLER).await {
        Ok(id) => id,
        Err(e) => bail!("RunPodSandbox failed: {e}\n{}", node.log()),
    };
    // busybox tail keeps a line without a newline whole: 256 MiB of zeros in 32 MiB.
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "hog".to_string(),
            attempt: 0,
        }),
        image: Some(image_spec(&image("busybox"))),
        command: ["sh", "-c", "head -c 268435456 /dev/zero | tail"]
            .map(String::from)
            .to_vec(),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 32 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        log_path: "hog.log".to_string(),
        ..Default::default()
    };
    let ctr = node.create_container(&pod, &pod_cfg, config).await?;
    if let Err(e) = node.start_container(&ctr).await {
        bail!("StartContainer failed: {e}\n{}", node.log());
    }
    let start = Instant::now();
    let (reason, code) = loop {
        let status = node
            .rt
            .container_status(ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: false,
            })
            .await
            .context("CRI ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without status")?;
        let exited = status.state == ContainerState::ContainerExited as i32;
        if exited && status.reason == "OOMKilled" {
            break (status.reason, status.exit_code);
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "container state {}, reason {:?}, exit code {} 20 s after start; expected exited, \
             OOMKilled\n{}",
            status.state,
            status.reason,
            status.exit_code,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "oom_kill_is_reported: {reason}, exit code {code}, after {:?}",
        start.elapsed()
    );
    node.rt
        .remove_container(RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .with_context(|| format!("CRI RemoveContainer {ctr}\n{}", node.log()))?;
    node.tear_down(&pod, &[]).await?;
    node.expect_no_shims().await
}
