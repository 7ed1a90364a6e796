//! Kubernetes CRI on a test host: the containerd configuration that turns on containerd 1.6's CRI
//! plugin with rrc as a runtime handler, and a CRI v1 gRPC client over containerd's socket.
//!
//! containerd 1.6's CRI plugin (config `version = 2`) needs, on these machines:
//!
//! * `restrict_oom_score_adj = true`: the bounding set lacks `CAP_SYS_RESOURCE`, so the sandbox's
//!   default `oom_score_adj` of -998 cannot be set; restricted, it is clamped to containerd's own;
//! * `disable_apparmor = true` (no AppArmor here);
//! * CNI directories it may create and watch: the plugin creates its CNI configuration directory
//!   (default `/etc/cni/net.d`) at start-up and watches it. No CNI configuration is needed for
//!   pods on the host network (`NamespaceMode::Node`), which is all the tests use; the runtime
//!   status then reports `NetworkReady=false`, which only matters to a kubelet;
//! * the sandbox (pause) image present and unpacked for the snapshotter in namespace `k8s.io`
//!   before the first `RunPodSandbox`, or the plugin tries to pull it (there is no registry here).
//!
//! Each rrc runtime handler is `runtime_type = "io.containerd.rrc.v2"` with the pod and
//! container annotations `io.containerd.rrc.*` allow-listed, so a pod's rrc settings reach the OCI
//! spec the shim reads. A handler with a configuration file gets an `options` table with
//! `ConfigPath`; containerd then sends the shim `runtimeoptions.v1.Options` carrying it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::testbed::RRC_RUNTIME;

/// The runtime handler [`cri_config`] names rrc by.
pub const RRC_HANDLER: &str = "rrc";

/// Annotations the rrc handlers pass from pods and containers to the OCI spec.
pub const RRC_ANNOTATIONS: &str = "io.containerd.rrc.*";

/// CNI directory used when a [`CriConfig`] names none (created by containerd if missing).
pub const DEFAULT_CNI_DIR: &str = "/tmp/rrc-cri-cni";

/// One CRI runtime handler served by rrc's shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrcHandler {
    /// The handler name (`RunPodSandboxRequest.runtime_handler`, a RuntimeClass's `handler`).
    pub name: String,
    /// rrc's TOML configuration file, sent to the shim as `options.ConfigPath`.
    pub config_path: Option<PathBuf>,
}

/// containerd 1.6's CRI plugin configured for rrc; [`CriConfig::to_toml`] renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriConfig {
    /// The pod sandbox image (must be present locally in namespace `k8s.io`).
    pub sandbox_image: String,
    /// Directory for CNI: configuration in `net.d`, plugins in `bin` (both stay empty).
    pub cni_dir: PathBuf,
    /// Runtime handlers backed by rrc.
    pub handlers: Vec<RrcHandler>,
}

impl CriConfig {
    /// A configuration with no rrc handler yet and CNI under [`DEFAULT_CNI_DIR`].
    pub fn new(sandbox_image: &str) -> CriConfig {
        CriConfig {
            sandbox_image: sandbox_image.to_string(),
            cni_dir: PathBuf::from(DEFAULT_CNI_DIR),
            handlers: Vec::new(),
        }
    }

    /// Adds an rrc runtime handler, with rrc's configuration file if given.
    #[must_use]
    pub fn handler(mut self, name: &str, config_path: Option<&Path>) -> CriConfig {
        self.handlers.push(RrcHandler {
            name: name.to_string(),
            config_path: config_path.map(Path::to_path_buf),
        });
        self
    }

    /// Puts CNI's (empty) directories under `dir`.
    #[must_use]
    pub fn cni_dir(mut self, dir: &Path) -> CriConfig {
        self.cni_dir = dir.to_path_buf();
        self
    }

    /// The TOML to append to a containerd `version = 2` configuration.
    pub fn to_toml(&self) -> String {
        const CRI: &str = r#"plugins."io.containerd.grpc.v1.cri""#;
        let mut s = String::new();
        // `writeln!` to a String cannot fail.
        let _ = writeln!(s, "\n[{CRI}]");
        let _ = writeln!(s, "  sandbox_image = {}", toml_string(&self.sandbox_image));
        let _ = writeln!(s, "  restrict_oom_score_adj = true");
        let _ = writeln!(s, "  disable_apparmor = true");
        let _ = writeln!(s, "  enable_selinux = false");
        let _ = writeln!(s, "  stream_server_address = \"127.0.0.1\"");
        let _ = writeln!(s, "  stream_server_port = \"0\"");
        let _ = writeln!(s, "\n[{CRI}.cni]");
        let _ = writeln!(
            s,
            "  conf_dir = {}",
            toml_string(&self.cni_dir.join("net.d").display().to_string())
        );
        let _ = writeln!(
            s,
            "  bin_dir = {}",
            toml_string(&self.cni_dir.join("bin").display().to_string())
        );
        let _ = writeln!(s, "\n[{CRI}.containerd]");
        let _ = writeln!(s, "  snapshotter = \"overlayfs\"");
        let _ = writeln!(s, "  default_runtime_name = \"runc\"");
        let _ = writeln!(s, "\n[{CRI}.containerd.runtimes.runc]");
        let _ = writeln!(s, "  runtime_type = \"io.containerd.runc.v2\"");
        for h in &self.handlers {
            let table = format!("{CRI}.containerd.runtimes.{}", toml_string(&h.name));
            let _ = writeln!(s, "\n[{table}]");
            let _ = writeln!(s, "  runtime_type = \"{RRC_RUNTIME}\"");
            let _ = writeln!(s, "  pod_annotations = [\"{RRC_ANNOTATIONS}\"]");
            let _ = writeln!(s, "  container_annotations = [\"{RRC_ANNOTATIONS}\"]");
            if let Some(path) = &h.config_path {
                let _ = writeln!(s, "\n[{table}.options]");
                let _ = writeln!(
                    s,
                    "  ConfigPath = {}",
                    toml_string(&path.display().to_string())
                );
            }
        }
        s
    }
}

/// The TOML to append to containerd's configuration (`version = 2`, containerd 1.6) to enable
/// the CRI plugin with one rrc runtime handler, [`RRC_HANDLER`], whose runtime options name
/// rrc's configuration file `config_path` if given. See [`CriConfig`] for more handlers.
pub fn cri_config(sandbox_image: &str, config_path: Option<&Path>) -> String {
    CriConfig::new(sandbox_image)
        .handler(RRC_HANDLER, config_path)
        .to_toml()
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A gRPC channel to containerd's socket (which also serves CRI).
pub async fn channel(socket: &Path) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connect to CRI at {}", socket.display()))
}

/// CRI v1 runtime and image clients over containerd's socket.
pub async fn connect(
    socket: &Path,
) -> anyhow::Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
    let ch = channel(socket).await?;
    Ok((
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_handlers_and_options() {
        let toml = CriConfig::new("docker.io/rrc/pause:latest")
            .cni_dir(Path::new("/tmp/x"))
            .handler("rrc", None)
            .handler("rrc-cfg", Some(Path::new("/etc/rrc \"a\".toml")))
            .to_toml();
        assert!(toml.contains(r#"sandbox_image = "docker.io/rrc/pause:latest""#));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains(r#"conf_dir = "/tmp/x/net.d""#));
        assert!(toml.contains(r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."rrc"]"#));
        assert!(toml.contains(
            r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes."rrc-cfg".options]"#
        ));
        assert!(toml.contains(r#"ConfigPath = "/etc/rrc \"a\".toml""#));
        assert_eq!(toml.matches(".options]").count(), 1);
    }
}
