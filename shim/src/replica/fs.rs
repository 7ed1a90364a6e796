//! The container's writable layer in passive mode, and the hook CRIU runs during a dump.
//!
//! CRIU runs `rrc-criu-hook.sh` (its `action-script`) at each step of a dump or restore. Three
//! steps reach the primary's shim, over a unix socket, through `containerd-shim-rrc-v2
//! criu-hook SOCKET ACTION`:
//!
//! * `network-lock` / `network-unlock`: CRIU's own network lock is off (see
//!   [`super::prepare`]); the shim holds every inbound packet in an NFQUEUE of its own between
//!   the two (outbound packets are held by the output hold anyway), so no packet changes a
//!   socket while CRIU reads it. Held, not dropped: nothing has to be retransmitted.
//! * `post-dump`: the writable layer's delta, below.
//!
//! Everything the container writes lands in its overlay's upper directory. Each epoch the
//! primary's files must reach the backup together with the checkpoint of the same instant,
//! otherwise a restored process would find files that do not match its memory (CRIU refuses a
//! restore when an open file's size differs).
//!
//! * While CRIU holds the container stopped, after it dumped it (its `post-dump` action script),
//!   the hook `containerd-shim-rrc-v2 criu-hook SOCKET` asks the primary's shim over a unix
//!   socket to write the delta of the upper directory since the last epoch
//!   ([`rrc_fs_delta::Tracker`]) into the checkpoint's image directory, as `rrcfs-*` files. The
//!   image directory is then sealed and streamed as usual: the delta commits with its checkpoint.
//! * The backup applies each committed delta, in order, through its own (unused) rootfs mount.
//! * An epoch whose checkpoint fails forgets its delta ([`rrc_fs_delta::Tracker::undo_last`]);
//!   a new pairing starts with a full delta.
//!
//! Volumes (bind mounts) are not replicated, and a rootfs that is not an overlay is refused for
//! replication at Create only if it cannot be found (logged): see the README.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::protos::types::mount::Mount;
use rrc_fs_delta::{DeltaStats, Tracker};
use rrc_output_hold::OutputHold;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// Prefix of the delta's files inside an image directory.
pub const PREFIX: &str = "rrcfs-";
/// The hook script in the bundle that CRIU runs (`action-script`).
pub const HOOK_SCRIPT: &str = "rrc-criu-hook.sh";
/// Where hook sockets live (bundle paths can exceed a unix socket path's 108 bytes).
const SOCKET_DIR: &str = "/run/rrc/hooks";

/// The overlay upper directory among a container's rootfs mounts, if it has one.
pub fn upper_dir(mounts: &[Mount]) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.type_ == "overlay")
        .flat_map(|m| m.options.iter())
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
}

/// The hook socket of a bundle: a short path derived from the bundle's.
pub fn socket_path(bundle: &Path) -> PathBuf {
    let h = bundle
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    Path::new(SOCKET_DIR).join(format!("{h:016x}.sock"))
}

/// Writes the hook script CRIU runs at every action. In passive mode `network-lock`,
/// `network-unlock` and `post-dump` reach the shim. With `hybrid`, `pre-dump` (the recorder
/// steps aside there, see [`HookServer::start`]) and `post-dump` do; the network actions do
/// not, because the recorder holds inbound packets for the whole checkpoint, and every action
/// that reaches the shim starts a process while the container is frozen.
pub fn write_hook_script(bundle: &Path, hybrid: bool) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("find own binary: {e}"))?;
    let script = bundle.join(HOOK_SCRIPT);
    let actions = if hybrid {
        "pre-dump|post-dump"
    } else {
        "network-lock|network-unlock|post-dump"
    };
    let text = format!(
        "#!/bin/sh\n\
         # Written by containerd-shim-rrc-v2: CRIU runs this at each step of a checkpoint or\n\
         # restore. Before CRIU seizes the container (hybrid mode) its recorder steps aside;\n\
         # around the dump of sockets the shim holds inbound packets; after the dump\n\
         # (container still stopped) it saves the writable layer.\n\
         case \"$CRTOOLS_SCRIPT_ACTION\" in\n\
         {actions})\n\
         \texec '{}' criu-hook '{}' \"$CRTOOLS_SCRIPT_ACTION\" ;;\n\
         esac\n\
         exit 0\n",
        exe.display(),
        socket_path(bundle).display()
    );
    std::fs::write(&script, text).map_err(|e| format!("write {}: {e}", script.display()))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", script.display()))?;
    Ok(script)
}

/// The `criu-hook` subcommand: tells the shim behind `socket` that CRIU reached `action`
/// (`network-lock`, `network-unlock` or `post-dump`) and waits for it to be done.
///
/// Without a shim listening (a restore on the backup: nothing to hold there, the backup drops
/// inbound packets itself), the network actions succeed and `post-dump` fails.
pub fn run_hook(socket: &Path, action: &str) -> Result<(), String> {
    let network = matches!(action, "network-lock" | "network-unlock");
    if !network && action != "post-dump" && action != "pre-dump" {
        return Err(format!("unknown action {action:?}"));
    }
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if network && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot reach the shim at {}: {e}",
                socket.display()
            ))
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{action}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the shim: {e}"))?;
    match line.trim() {
        "ok" => Ok(()),
        other => Err(other.to_string()),
    }
}

struct HookState {
    /// None when the rootfs is not an overlay (nothing to track).
    tracker: Option<Tracker>,
    /// The image directory of the dump in progress.
    target: Option<PathBuf>,
    /// What the last delta held.
    last: Option<DeltaStats>,
}

/// What CRIU's `pre-dump` action asks of the shim (hybrid mode): the receiver parks the
/// container's recorder (CRIU is about to seize the tasks) and answers; CRIU goes on only
/// after an `Ok`.
pub type PreDump = tokio::sync::oneshot::Sender<Result<(), String>>;

/// How long CRIU's `pre-dump` may wait for the recorder to step aside.
const PRE_DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The primary's side: serves the hook, holds inbound packets around the dump of sockets, keeps
/// the writable layer's tracker.
pub struct HookServer {
    upper: Option<PathBuf>,
    state: Arc<Mutex<HookState>>,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl HookServer {
    /// Listens on the bundle's hook socket. `gate` holds the container's inbound packets (an
    /// `OutputHold` on its INPUT chain, passing everything until `network-lock`); without one
    /// (hybrid mode, where the recorder holds ingress for the whole checkpoint) the network
    /// actions do nothing. `pre_dump` receives CRIU's `pre-dump` actions (see [`PreDump`]);
    /// without it they succeed at once.
    pub fn start(
        bundle: &Path,
        upper: Option<PathBuf>,
        gate: Option<Arc<OutputHold>>,
        pre_dump: Option<tokio::sync::mpsc::Sender<PreDump>>,
    ) -> Result<HookServer, String> {
        let socket = socket_path(bundle);
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("listen on {}: {e}", socket.display()))?;
        let state = Arc::new(Mutex::new(HookState {
            tracker: upper.as_ref().map(|_| Tracker::new()),
            target: None,
            last: None,
        }));
        let (st, up) = (state.clone(), upper.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, up, gate, pre) = (st.clone(), up.clone(), gate.clone(), pre_dump.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    if tokio::io::BufReader::new(r)
                        .read_line(&mut line)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let answer = match line.trim() {
                        "pre-dump" => match pre {
                            None => "ok".to_string(),
                            Some(pre) => ask_pre_dump(&pre).await,
                        },
                        "network-lock" => {
                            if let Some(gate) = &gate {
                                // Packets from now on get a tag above the release mark: held.
                                gate.set_tag(gate.tag() + 2);
                                gate.hold_again();
                            }
                            "ok".to_string()
                        }
                        "network-unlock" => {
                            if let Some(gate) = &gate {
                                gate.release_all();
                            }
                            "ok".to_string()
                        }
                        "post-dump" => match up {
                            None => {
                                if let Ok(mut s) = st.lock() {
                                    s.last = Some(DeltaStats::default());
                                }
                                "ok".to_string()
                            }
                            Some(up) => {
                                match tokio::task::spawn_blocking(move || save(&st, &up)).await {
                                    Ok(Ok(())) => "ok".to_string(),
                                    Ok(Err(e)) => e,
                                    Err(e) => format!("delta task: {e}"),
                                }
                            }
                        },
                        other => format!("unknown request {other:?}"),
                    };
                    if answer != "ok" {
                        tracing::error!("CRIU hook {:?} failed: {answer}", line.trim());
                    }
                    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
                });
            }
        });
        Ok(HookServer {
            upper,
            state,
            socket,
            task,
        })
    }

    /// The upper directory, if the rootfs is an overlay.
    pub fn upper(&self) -> Option<&Path> {
        self.upper.as_deref()
    }

    /// A dump into `image_dir` is about to start: its hook call writes the delta there.
    pub fn arm(&self, image_dir: &Path) {
        if let Ok(mut s) = self.state.lock() {
            s.target = Some(image_dir.to_path_buf());
            s.last = None;
        }
    }

    /// The dump ended: returns the delta it carried (None: the hook never ran).
    pub fn disarm(&self) -> Option<DeltaStats> {
        self.state.lock().ok().and_then(|mut s| {
            s.target = None;
            s.last.take()
        })
    }

    /// The last delta did not reach the backup: the next one carries its changes too.
    pub fn undo_last(&self) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(t) = s.tracker.as_mut() {
                t.undo_last();
            }
        }
    }

    /// A new backup: the next delta is a full one.
    pub fn reset(&self) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(t) = s.tracker.as_mut() {
                t.reset();
            }
        }
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Hands CRIU's `pre-dump` to whoever takes them and waits for the answer ("ok" or why not).
async fn ask_pre_dump(pre: &tokio::sync::mpsc::Sender<PreDump>) -> String {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if pre.send(tx).await.is_err() {
        return "nobody handles pre-dump: is a checkpoint in progress?".into();
    }
    match tokio::time::timeout(PRE_DUMP_TIMEOUT, rx).await {
        Ok(Ok(Ok(()))) => "ok".into(),
        Ok(Ok(Err(e))) => e,
        Ok(Err(_)) => "the checkpoint was abandoned before the container was parked".into(),
        Err(_) => format!("the container was not parked within {PRE_DUMP_TIMEOUT:?}"),
    }
}

/// Writes the delta into the armed image directory, as `rrcfs-*` files.
fn save(state: &Mutex<HookState>, upper: &Path) -> Result<(), String> {
    let mut s = state
        .lock()
        .map_err(|_| "tracker state poisoned".to_string())?;
    let target = s
        .target
        .clone()
        .ok_or_else(|| "no checkpoint of this container is in progress".to_string())?;
    let mut tmp = target.as_os_str().to_owned();
    tmp.push(".fs");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let tracker = s
        .tracker
        .as_mut()
        .ok_or_else(|| "no writable layer is tracked".to_string())?;
    let stats = tracker
        .delta(upper, &tmp)
        .map_err(|e| format!("writable layer delta: {e}"))?;
    let moved = (|| -> std::io::Result<()> {
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            let mut name = std::ffi::OsString::from(PREFIX);
            name.push(entry.file_name());
            std::fs::rename(entry.path(), target.join(name))?;
        }
        std::fs::remove_dir(&tmp)
    })();
    if let Err(e) = moved {
        if let Some(t) = s.tracker.as_mut() {
            t.undo_last();
        }
        return Err(format!("move the delta into {}: {e}", target.display()));
    }
    s.last = Some(stats);
    Ok(())
}

/// The backup's side: applies the delta a committed checkpoint carries (if any) to `rootfs`.
/// Returns the number of bytes of file content applied.
pub fn apply_committed(image_dir: &Path, rootfs: &Path) -> Result<Option<u64>, String> {
    let index = image_dir.join(format!("{PREFIX}{}", rrc_fs_delta::INDEX));
    if !index.exists() {
        return Ok(None);
    }
    let mut tmp = image_dir.as_os_str().to_owned();
    tmp.push(".fs-apply");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let linked = (|| -> std::io::Result<u64> {
        let mut bytes = 0;
        for entry in std::fs::read_dir(image_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) {
                bytes += entry.metadata()?.len();
                std::fs::hard_link(entry.path(), tmp.join(rest))?;
            }
        }
        Ok(bytes)
    })();
    let result = match linked {
        Ok(bytes) => rrc_fs_delta::apply(&tmp, rootfs)
            .map(|_| Some(bytes))
            .map_err(|e| format!("apply the writable layer delta: {e}")),
        Err(e) => Err(format!("stage the writable layer delta: {e}")),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_upper_dir() {
        let m = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                "workdir=/s/2/work".into(),
                "upperdir=/s/2/fs".into(),
                "lowerdir=/s/1/fs".into(),
            ],
            ..Default::default()
        };
        assert_eq!(upper_dir(&[m]), Some(PathBuf::from("/s/2/fs")));
        let bind = Mount {
            type_: "bind".into(),
            ..Default::default()
        };
        assert_eq!(upper_dir(&[bind]), None);
    }

    #[test]
    fn socket_paths_are_short_and_distinct() {
        let a = socket_path(Path::new(
            "/run/rrc-test/123456-0/primary/state/io.containerd.runtime.v2.task/rrc-123456-0-primary/redis-ft",
        ));
        let b = socket_path(Path::new(
            "/run/containerd/io.containerd.runtime.v2.task/default/x",
        ));
        assert_ne!(a, b);
        assert!(a.as_os_str().len() < 100, "{}", a.display());
    }
}
