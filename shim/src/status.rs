//! The operator view: each replicated container's role, mode, peer, last committed epoch, last
//! checkpoint's pause and size, and failover history.
//!
//! The shim serving a replicated container keeps a small JSON file, [`STATUS_FILE`], in the
//! container's bundle (`<containerd state dir>/io.containerd.runtime.v2.task/<namespace>/<id>/`)
//! and rewrites it atomically whenever something an operator cares about changes. Anyone can read
//! it (`cat`, `jq`, a monitoring agent); `containerd-shim-rrc-v2 status` lists every such file on
//! the host ([`scan`]) and renders it ([`render_table`], [`render_detail`]). containerd removes the
//! bundle, and the file with it, when the task is deleted. A container in mode `off` has no status
//! file. See `docs/operator-view.md`.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Name of the status file in a container's bundle.
pub const STATUS_FILE: &str = "rrc-status.json";
/// The status file's format version this build writes and reads. Fields may be added within a
/// version (readers ignore unknown fields); anything else bumps it.
pub const STATUS_VERSION: u32 = 1;
/// containerd's default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/containerd";
/// The directory containerd's v2 runtime keeps bundles in, under its state directory.
pub const TASK_DIR: &str = "io.containerd.runtime.v2.task";
/// How many failovers [`ReplicaStatus::record_failover`] keeps (the oldest are dropped), so the
/// file stays small however long the pair lives.
pub const MAX_FAILOVERS: usize = 32;

/// Prefix of the temporary files [`write`] renames into place.
const TEMP_PREFIX: &str = ".rrc-status.json.tmp";

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Which side of the pair this shim is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the application and sends checkpoints.
    Primary,
    /// Holds checkpoints and takes over when the primary dies.
    Backup,
}

impl Role {
    /// The name used in the file and the table (`primary`, `backup`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a replicated container stands. Serialized in kebab-case (`waiting-for-backup`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The shim is setting the container up; nothing is replicated yet.
    Starting,
    /// Primary, not paired yet: outputs flow, the container is UNPROTECTED.
    WaitingForBackup,
    /// Primary, paired: every epoch's checkpoint commits at the backup before its outputs go.
    Protected,
    /// Primary that lost its backup: outputs flow, the container is UNPROTECTED.
    Unprotected,
    /// Old primary that learned another host took over: it no longer serves.
    Fenced,
    /// Backup waiting for a primary to connect.
    Standby,
    /// Backup holding committed checkpoints, ready to take over.
    InSync,
    /// Backup taking over: restoring the last committed checkpoint and claiming the address.
    FailingOver,
    /// Backup that took over and now serves the application.
    Live,
    /// The container stopped (it exited or was killed): replication has ended.
    Stopped,
    /// Something went wrong; `detail` says what.
    Failed,
}

impl State {
    /// Every state, in the order of the documentation.
    pub const ALL: [State; 11] = [
        State::Starting,
        State::WaitingForBackup,
        State::Protected,
        State::Unprotected,
        State::Fenced,
        State::Standby,
        State::InSync,
        State::FailingOver,
        State::Live,
        State::Stopped,
        State::Failed,
    ];

    /// The name used in the file and the table (`waiting-for-backup`).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::WaitingForBackup => "waiting-for-backup",
            State::Protected => "protected",
            State::Unprotected => "unprotected",
            State::Fenced => "fenced",
            State::Standby => "standby",
            State::InSync => "in-sync",
            State::FailingOver => "failing-over",
            State::Live => "live",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    /// One line for a human: what the state means.
    pub fn describe(self) -> &'static str {
        match self {
            State::Starting => "the shim is setting the container up; nothing is replicated yet",
            State::WaitingForBackup => {
                "primary, no backup connected yet: outputs flow, the container is UNPROTECTED"
            }
            State::Protected => {
                "primary, paired: each epoch's checkpoint commits at the backup before its outputs \
                 are released"
            }
            State::Unprotected => {
                "primary that lost its backup: outputs flow, the container is UNPROTECTED"
            }
            State::Fenced => {
                "old primary: another host took over; this one released the address and does not \
                 serve"
            }
            State::Standby => "backup, waiting for a primary to connect",
            State::InSync => "backup holding committed checkpoints, ready to take over",
            State::FailingOver => {
                "backup taking over: restoring the last committed checkpoint, claiming the address"
            }
            State::Live => {
                "backup that took over: it now serves the container, UNPROTECTED until a new \
                 backup pairs with it"
            }
            State::Stopped => "the container stopped: replication has ended",
            State::Failed => "failed: see detail and the shim's log",
        }
    }

    /// Whether the container serves clients with no backup able to take over (what an operator
    /// should be alerted about): `waiting-for-backup`, `unprotected`, and `live` (a backup that
    /// took over has no backup of its own until one pairs with it).
    pub fn is_unprotected(self) -> bool {
        matches!(
            self,
            State::WaitingForBackup | State::Unprotected | State::Live
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Figures of one committed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointFigures {
    /// The epoch the checkpoint belongs to.
    pub epoch: u64,
    /// How long the container was frozen (what its clients notice), in ms.
    pub frozen_ms: f64,
    /// The whole dump (freeze, dump, unfreeze), in ms.
    pub dump_ms: f64,
    /// Sending the checkpoint to the backup, in ms.
    pub transfer_ms: f64,
    /// Waiting for the backup's commit after the last byte was sent, in ms.
    pub commit_wait_ms: f64,
    /// Size of the checkpoint image sent, in bytes.
    pub bytes: u64,
    /// Size of the file-system changes sent with it, in bytes.
    pub fs_delta_bytes: u64,
    /// When the checkpoint committed, ms since the Unix epoch.
    pub at_unix_ms: u64,
}

/// One failover: a backup that took over (or tried to).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailoverRecord {
    /// When the takeover started, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// The committed epoch restored, if one was.
    pub from_epoch: Option<u64>,
    /// From the last frame heard from the primary to declaring it dead, in ms.
    pub detection_ms: f64,
    /// Restoring the checkpoint, in ms.
    pub restore_ms: f64,
    /// Claiming the address and announcing it, in ms.
    pub network_ms: f64,
    /// From the last frame heard to serving again, in ms.
    pub total_ms: f64,
    /// `live` when the takeover completed; otherwise what went wrong.
    pub outcome: String,
}

/// What the status file holds: one replicated container as its shim sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    /// Format version ([`STATUS_VERSION`]).
    pub version: u32,
    /// containerd's container id.
    pub container_id: String,
    /// containerd namespace.
    pub namespace: String,
    /// Replication mode (`passive`, `hybrid`).
    pub mode: String,
    /// Primary or backup.
    pub role: Role,
    /// Where the container stands.
    pub state: State,
    /// More about the state (the reason for `failed`, `unprotected`, `fenced`).
    #[serde(default)]
    pub detail: Option<String>,
    /// The peer's address (`IP:port`), when known.
    #[serde(default)]
    pub peer: Option<String>,
    /// The pid of the shim that writes this file.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The last epoch whose checkpoint committed at the backup.
    #[serde(default)]
    pub last_committed_epoch: Option<u64>,
    /// Figures of the last committed checkpoint.
    #[serde(default)]
    pub last_checkpoint: Option<CheckpointFigures>,
    /// How many checkpoints committed since the shim started.
    #[serde(default)]
    pub checkpoints: u64,
    /// Failovers, oldest first (at most [`MAX_FAILOVERS`]).
    #[serde(default)]
    pub failovers: Vec<FailoverRecord>,
    /// Hybrid mode: the event log's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogFigures>,
    /// When the shim last wrote this status, ms since the Unix epoch.
    pub updated_unix_ms: u64,
}

/// Hybrid mode: where the container's event log stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogFigures {
    /// Bytes the recorder wrote (primary) or the backup stored.
    pub bytes: u64,
    /// Bytes the backup acknowledged (primary only).
    #[serde(default)]
    pub acked_bytes: u64,
    /// Outgoing packets released so far (primary only).
    #[serde(default)]
    pub packets_released: u64,
    /// Outgoing packets held right now (primary only).
    #[serde(default)]
    pub packets_held: u64,
    /// Mean time an outgoing packet waited for the backup's acknowledgement, in
    /// microseconds (primary only).
    #[serde(default)]
    pub mean_hold_us: f64,
    /// Offset of the first log byte still kept: the cut of the last committed checkpoint
    /// (everything before it was discarded, or archived on the primary with `log-archive`).
    #[serde(default)]
    pub kept_from: u64,
}

impl ReplicaStatus {
    /// A fresh status in state [`State::Starting`], stamped with this process's pid and now.
    pub fn new(container_id: &str, namespace: &str, mode: &str, role: Role) -> ReplicaStatus {
        ReplicaStatus {
            version: STATUS_VERSION,
            container_id: container_id.to_string(),
            namespace: namespace.to_string(),
            mode: mode.to_string(),
            role,
            state: State::Starting,
            detail: None,
            peer: None,
            pid: Some(std::process::id()),
            last_committed_epoch: None,
            last_checkpoint: None,
            checkpoints: 0,
            failovers: Vec::new(),
            log: None,
            updated_unix_ms: unix_ms_now(),
        }
    }

    /// Moves to `state` with an optional detail (replacing the previous one) and stamps now.
    pub fn set_state(&mut self, state: State, detail: Option<String>) {
        self.state = state;
        self.detail = detail;
        self.updated_unix_ms = unix_ms_now();
    }

    /// Records a committed checkpoint: last epoch, figures and count, and stamps now.
    pub fn record_checkpoint(&mut self, figures: CheckpointFigures) {
        self.last_committed_epoch = Some(figures.epoch);
        self.last_checkpoint = Some(figures);
        self.checkpoints = self.checkpoints.saturating_add(1);
        self.updated_unix_ms = unix_ms_now();
    }

    /// Appends a failover (keeping the last [`MAX_FAILOVERS`]) and stamps now.
    pub fn record_failover(&mut self, record: FailoverRecord) {
        self.failovers.push(record);
        if self.failovers.len() > MAX_FAILOVERS {
            let extra = self.failovers.len() - MAX_FAILOVERS;
            self.failovers.drain(..extra);
        }
        self.updated_unix_ms = unix_ms_now();
    }
}

/// Why a status file could not be written or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// There is no status file (the container is not replicated, or its shim has not written one).
    #[error("{}: no status file (not a replicated container, or its shim has not written one yet)", .path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file (or a directory on the way) exists but cannot be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Unreadable {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON (damaged, or not written by rrc).
    #[error("{}: not a JSON rrc status file: {source}", .path.display())]
    NotJson {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The file is JSON of a version this build reads, but its fields are not a valid status.
    #[error("{}: not a valid rrc status (format version {STATUS_VERSION}): {source}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// The file's format version is one this build does not know.
    #[error(
        "{}: status format version {found} is unknown to this rrc (it reads version {STATUS_VERSION}): written by a newer rrc; upgrade rrc",
        .path.display()
    )]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// The version found (`0` when the field is missing or not a number).
        found: u64,
    },
    /// The status could not be written.
    #[error("{}: cannot write status: {source}", .path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The status could not be encoded (not expected to happen).
    #[error("{}: cannot encode status: {source}", .path.display())]
    Encode {
        /// The file being written.
        path: PathBuf,
        /// The encoder's error.
        source: serde_json::Error,
    },
}

/// Writes `s` to `<bundle>/rrc-status.json` atomically: a temporary file in the bundle, renamed
/// over the old one, so a reader sees the old status or the new one, never a mix. Not fsynced:
/// the file describes a running shim and means nothing after a host crash.
pub fn write(bundle: &Path, s: &ReplicaStatus) -> Result<(), StatusError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = bundle.join(STATUS_FILE);
    let mut bytes = serde_json::to_vec_pretty(s).map_err(|source| StatusError::Encode {
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = bundle.join(format!("{TEMP_PREFIX}.{}.{seq}", std::process::id()));
    let result = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(source) = result {
        if let Err(e) = std::fs::remove_file(&tmp) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!("remove {}: {e}", tmp.display());
            }
        }
        return Err(StatusError::Write { path, source });
    }
    Ok(())
}

/// Reads `<bundle>/rrc-status.json`, refusing a missing, unreadable, damaged or newer file with an
/// error naming it.
pub fn read(bundle: &Path) -> Result<ReplicaStatus, StatusError> {
    read_file(&bundle.join(STATUS_FILE))
}

fn read_file(path: &Path) -> Result<ReplicaStatus, StatusError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == ErrorKind::NotFound {
            StatusError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            StatusError::Unreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    decode(&bytes, path)
}

/// Decodes the contents of a status file (`path` names it in errors): refuses anything that is
/// not a JSON status of this format version.
pub fn decode(bytes: &[u8], path: &Path) -> Result<ReplicaStatus, StatusError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| StatusError::NotJson {
            path: path.to_path_buf(),
            source,
        })?;
    let found = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if found != u64::from(STATUS_VERSION) {
        return Err(StatusError::UnknownVersion {
            path: path.to_path_buf(),
            found,
        });
    }
    serde_json::from_value(value).map_err(|source| StatusError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

/// One result of [`scan`]: a bundle directory and its status (or why it cannot be read).
pub type ScanRow = (PathBuf, Result<ReplicaStatus, StatusError>);

/// Every bundle under `<state_dir>/io.containerd.runtime.v2.task/` that holds a status file (all
/// namespaces, or only `namespace`), sorted by namespace then container id. Bundles without a
/// status file (mode `off`) are left out; a status file that cannot be read, or a namespace
/// directory that cannot be listed, is a row with its error, so one bad entry never hides the
/// others. A missing task directory means no containers: an empty list.
pub fn scan(state_dir: &Path, namespace: Option<&str>) -> Vec<ScanRow> {
    let task_dir = state_dir.join(TASK_DIR);
    let mut rows = Vec::new();
    let namespaces: Vec<PathBuf> = match namespace {
        Some(ns) => vec![task_dir.join(ns)],
        None => match subdirs(&task_dir) {
            Ok(dirs) => dirs,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                rows.push((
                    task_dir.clone(),
                    Err(StatusError::Unreadable {
                        path: task_dir,
                        source,
                    }),
                ));
                return rows;
            }
        },
    };
    for ns_dir in namespaces {
        let bundles = match subdirs(&ns_dir) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => {
                rows.push((
                    ns_dir.clone(),
                    Err(StatusError::Unreadable {
                        path: ns_dir,
                        source,
                    }),
                ));
                continue;
            }
        };
        for bundle in bundles {
            match read(&bundle) {
                Err(StatusError::Missing { .. }) => {
                    tracing::debug!("{}: no status file, not replicated", bundle.display());
                }
                r => rows.push((bundle, r)),
            }
        }
    }
    rows.sort_by(|a, b| {
        let (ans, aid) = row_names(&a.0, a.1.as_ref().ok());
        let (bns, bid) = row_names(&b.0, b.1.as_ref().ok());
        (ans, aid).cmp(&(bns, bid))
    });
    rows
}

/// The directories directly under `dir`, by path.
fn subdirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.push(entry.path()),
            Ok(_) => {}
            Err(e) => tracing::debug!("{}: {e}", entry.path().display()),
        }
    }
    Ok(out)
}

/// The namespace and container id a row is about: from the status, or else from the bundle
/// path (`.../<namespace>/<id>`).
fn row_names(bundle: &Path, status: Option<&ReplicaStatus>) -> (String, String) {
    if let Some(s) = status {
        return (s.namespace.clone(), s.container_id.clone());
    }
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if bundle.file_name().is_some_and(|n| n == TASK_DIR) {
        return (String::new(), String::new());
    }
    if bundle
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == TASK_DIR)
    {
        // A namespace directory that could not be listed.
        return (name(Some(bundle)), String::new());
    }
    (name(bundle.parent()), name(Some(bundle)))
}

/// The container id of a scan row: the status's, or the bundle directory's name.
pub fn row_container_id(row: &ScanRow) -> String {
    row_names(&row.0, row.1.as_ref().ok()).1
}

/// Whether `pid` is a running containerd shim: `/proc/<pid>/comm` names `containerd-shim…` (the
/// kernel keeps 15 bytes of `containerd-shim-rrc-v2`), so a pid reused by another program after
/// the shim died does not pass for it.
pub fn shim_running(pid: u32) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .is_ok_and(|comm| comm.trim_end().starts_with("containerd-shim"))
}

/// A fixed-width table of the rows, one line per container, with a header. Ages are from now;
/// a status whose shim is no longer running ([`shim_running`]) is marked `(stale)`. Lines after
/// the table name the containers serving UNPROTECTED ([`State::is_unprotected`]) and the stale
/// ones.
pub fn render_table(rows: &[ScanRow]) -> String {
    render_table_at(rows, unix_ms_now(), shim_running)
}

/// [`render_table`] with the clock and the shim liveness check given.
pub fn render_table_at(
    rows: &[ScanRow],
    now_unix_ms: u64,
    running: impl Fn(u32) -> bool,
) -> String {
    const HEADER: [&str; 11] = [
        "NAMESPACE",
        "CONTAINER",
        "MODE",
        "ROLE",
        "STATE",
        "PEER",
        "EPOCH",
        "PAUSE",
        "SIZE",
        "AGE",
        "FAILOVERS",
    ];
    let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|h| h.to_string()).collect()];
    // Per line: the error to print after its namespace and container, for unreadable rows.
    let mut errors: Vec<Option<String>> = vec![None];
    for (bundle, result) in rows {
        let (ns, id) = row_names(bundle, result.as_ref().ok());
        match result {
            Ok(s) => {
                let mut state = s.state.to_string();
                if is_stale(s, &running) {
                    state.push_str(" (stale)");
                }
                let cp = s.last_checkpoint.as_ref();
                lines.push(vec![
                    ns,
                    id,
                    s.mode.clone(),
                    s.role.to_string(),
                    state,
                    s.peer.clone().unwrap_or_else(|| "-".into()),
                    s.last_committed_epoch
                        .map_or_else(|| "-".into(), |e| e.to_string()),
                    cp.map_or_else(|| "-".into(), |c| format_ms(c.frozen_ms)),
                    cp.map_or_else(
                        || "-".into(),
                        |c| human_bytes(c.bytes.saturating_add(c.fs_delta_bytes)),
                    ),
                    cp.map_or_else(
                        || "-".into(),
                        |c| human_age(now_unix_ms.saturating_sub(c.at_unix_ms)),
                    ),
                    s.failovers.len().to_string(),
                ]);
                errors.push(None);
            }
            Err(e) => {
                lines.push(vec![ns, id]);
                errors.push(Some(format!("unreadable: {e}")));
            }
        }
    }
    let mut widths = [0usize; HEADER.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (line, error) in lines.iter().zip(&errors) {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            text.push_str(&format!("{cell:<width$}  "));
        }
        if let Some(e) = error {
            text.push_str(e);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    let names = |pick: &dyn Fn(&ReplicaStatus) -> bool| -> Vec<String> {
        rows.iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .filter(|s| pick(s))
            .map(|s| format!("{}/{}", s.namespace, s.container_id))
            .collect()
    };
    let unprotected = names(&|s| s.state.is_unprotected() && !is_stale(s, &running));
    if !unprotected.is_empty() {
        out.push_str(&format!(
            "\nUNPROTECTED (serving, no backup can take over): {}\n",
            unprotected.join(", ")
        ));
    }
    let stale = names(&|s| is_stale(s, &running));
    if !stale.is_empty() {
        out.push_str(&format!(
            "\nSTALE (the shim that wrote the status is not running): {}\n",
            stale.join(", ")
        ));
    }
    out
}

/// A multi-line view of one container: every field, the state's meaning, the last checkpoint's
/// figures and each failover's phases.
pub fn render_detail(s: &ReplicaStatus) -> String {
    render_detail_at(s, unix_ms_now(), shim_running)
}

/// [`render_detail`] with the clock and the shim liveness check given.
pub fn render_detail_at(
    s: &ReplicaStatus,
    now_unix_ms: u64,
    running: impl Fn(u32) -> bool,
) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("  {label:<24}{value}\n"));
    };
    let ago = |t: u64| {
        format!(
            "{} ago ({})",
            human_age(now_unix_ms.saturating_sub(t)),
            utc(t)
        )
    };
    line("mode:", s.mode.clone());
    line("role:", s.role.to_string());
    line("state:", format!("{} ({})", s.state, s.state.describe()));
    if let Some(d) = &s.detail {
        line("detail:", d.clone());
    }
    line("peer:", s.peer.clone().unwrap_or_else(|| "none".into()));
    match s.pid {
        Some(pid) if !running(pid) => line(
            "shim pid:",
            format!("{pid} (NOT RUNNING: this status is stale, the shim may have died)"),
        ),
        Some(pid) => line("shim pid:", pid.to_string()),
        None => line("shim pid:", "unknown".into()),
    }
    line("updated:", ago(s.updated_unix_ms));
    line(
        "last committed epoch:",
        s.last_committed_epoch
            .map_or_else(|| "none".into(), |e| e.to_string()),
    );
    line("checkpoints committed:", s.checkpoints.to_string());
    match &s.last_checkpoint {
        Some(c) => {
            line(
                "last checkpoint:",
                format!("epoch {}, committed {}", c.epoch, ago(c.at_unix_ms)),
            );
            line(
                "",
                format!(
                    "frozen {}, dump {}, transfer {}, commit wait {}",
                    format_ms(c.frozen_ms),
                    format_ms(c.dump_ms),
                    format_ms(c.transfer_ms),
                    format_ms(c.commit_wait_ms)
                ),
            );
            line(
                "",
                format!(
                    "image {}, file-system delta {}",
                    human_bytes(c.bytes),
                    human_bytes(c.fs_delta_bytes)
                ),
            );
        }
        None => line("last checkpoint:", "none".into()),
    }
    line("failovers:", s.failovers.len().to_string());
    for (i, f) in s.failovers.iter().enumerate() {
        let from = f
            .from_epoch
            .map_or_else(|| "no committed epoch".into(), |e| format!("epoch {e}"));
        line(
            "",
            format!(
                "{}. {}, from {from}: {}",
                i + 1,
                ago(f.at_unix_ms),
                f.outcome
            ),
        );
        line(
            "",
            format!(
                "   detection {}, restore {}, network {}, total {}",
                format_ms(f.detection_ms),
                format_ms(f.restore_ms),
                format_ms(f.network_ms),
                format_ms(f.total_ms)
            ),
        );
    }
    format!("{}/{}\n{out}", s.namespace, s.container_id)
}

fn is_stale(s: &ReplicaStatus, running: &impl Fn(u32) -> bool) -> bool {
    s.pid.is_some_and(|pid| !running(pid))
}

/// Milliseconds with one decimal (`95.3ms`).
fn format_ms(ms: f64) -> String {
    format!("{ms:.1}ms")
}

/// Bytes for a human: `512 B`, `2.4 KiB`, `52.0 MiB`, `1.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss above 2^53 bytes does not matter for one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

/// A duration in ms for a human, coarser as it grows: `850ms`, `12s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A Unix time in ms as UTC, `2026-11-25T10:00:00.123Z`.
fn utc(unix_ms: u64) -> String {
    let secs = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            unix_ms % 1000
        ),
        Err(_) => format!("{unix_ms} ms after the Unix epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    fn sample() -> ReplicaStatus {
        let mut s = ReplicaStatus::new("redis1", "default", "passive", Role::Primary);
        s.set_state(State::Protected, None);
        s.peer = Some("198.18.0.3:7070".into());
        s.pid = Some(4242);
        s.record_checkpoint(CheckpointFigures {
            epoch: 1042,
            frozen_ms: 95.25,
            dump_ms: 181.0,
            transfer_ms: 40.5,
            commit_wait_ms: 3.0,
            bytes: 2_516_582,
            fs_delta_bytes: 12_288,
            at_unix_ms: NOW - 1_200,
        });
        s.updated_unix_ms = NOW - 400;
        s
    }

    fn failed_over() -> ReplicaStatus {
        let mut s = ReplicaStatus::new("redis1", "default", "passive", Role::Backup);
        s.set_state(
            State::Failed,
            Some("restore of epoch 880 failed: criu exited 1".into()),
        );
        s.peer = Some("198.18.0.2:7070".into());
        s.pid = Some(77);
        s.record_failover(FailoverRecord {
            at_unix_ms: NOW - 720_000,
            from_epoch: Some(880),
            detection_ms: 502.0,
            restore_ms: 153.2,
            network_ms: 1.1,
            total_ms: 660.3,
            outcome: "restore failed: criu exited 1".into(),
        });
        s.updated_unix_ms = NOW - 5_000;
        s
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sample();
        write(dir.path(), &s).expect("write");
        assert_eq!(read(dir.path()).expect("read"), s);
        let s2 = failed_over();
        write(dir.path(), &s2).expect("rewrite");
        assert_eq!(read(dir.path()).expect("read again"), s2);
    }

    #[test]
    fn json_names() {
        let mut s = sample();
        s.set_state(State::WaitingForBackup, None);
        let text = serde_json::to_string(&s).expect("encode");
        for want in [
            r#""version":1"#,
            r#""container_id":"redis1""#,
            r#""role":"primary""#,
            r#""state":"waiting-for-backup""#,
            r#""last_committed_epoch":1042"#,
            r#""frozen_ms":95.25"#,
            r#""fs_delta_bytes":12288"#,
            r#""updated_unix_ms":"#,
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        for st in State::ALL {
            let j = serde_json::to_string(&st).expect("state");
            assert_eq!(j, format!("\"{}\"", st.as_str()));
            assert!(!st.describe().is_empty());
        }
        assert_eq!(
            serde_json::to_string(&State::InSync).expect("in-sync"),
            "\"in-sync\""
        );
        assert_eq!(
            serde_json::to_string(&Role::Backup).expect("role"),
            "\"backup\""
        );
        let unprotected: Vec<&str> = State::ALL
            .iter()
            .filter(|s| s.is_unprotected())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(unprotected, ["waiting-for-backup", "unprotected", "live"]);
    }

    #[test]
    fn optional_fields_may_be_absent_and_unknown_fields_are_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join(STATUS_FILE),
            r#"{"version":1,"container_id":"c","namespace":"n","mode":"passive",
                "role":"backup","state":"standby","updated_unix_ms":5,"future_field":true}"#,
        )
        .expect("write");
        let s = read(dir.path()).expect("read");
        assert_eq!(s.state, State::Standby);
        assert_eq!(s.checkpoints, 0);
        assert!(s.failovers.is_empty() && s.peer.is_none());
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = sample();
        for i in 0..5 {
            s.checkpoints = i;
            write(dir.path(), &s).expect("write");
        }
        assert_eq!(entries(dir.path()), vec![STATUS_FILE.to_string()]);
        assert_eq!(read(dir.path()).expect("read").checkpoints, 4);
    }

    #[test]
    fn failed_write_names_the_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let gone = dir.path().join("gone");
        let e = write(&gone, &sample()).expect_err("no bundle dir");
        assert!(matches!(e, StatusError::Write { .. }), "{e:?}");
        assert!(e
            .to_string()
            .contains(&gone.join(STATUS_FILE).display().to_string()));
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn unknown_version_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let mut v = serde_json::to_value(sample()).expect("value");
        v["version"] = serde_json::json!(2);
        v["something_new"] = serde_json::json!({"x": 1});
        std::fs::write(dir.path().join(STATUS_FILE), v.to_string()).expect("write");
        let e = read(dir.path()).expect_err("version 2");
        assert!(
            matches!(e, StatusError::UnknownVersion { found: 2, .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("written by a newer rrc; upgrade"), "{msg}");
        assert!(msg.contains("version 2"), "{msg}");
        assert!(msg.contains(STATUS_FILE), "{msg}");
    }

    #[test]
    fn corrupt_json_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(STATUS_FILE);
        std::fs::write(&path, b"{\"version\":1,\"contai").expect("write");
        let e = read(dir.path()).expect_err("corrupt");
        assert!(matches!(e, StatusError::NotJson { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a JSON rrc status file"), "{msg}");

        std::fs::write(&path, br#"{"version":1,"state":"dancing"}"#).expect("write");
        let e = read(dir.path()).expect_err("invalid");
        assert!(matches!(e, StatusError::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn missing_file_named() {
        let dir = tempfile::tempdir().expect("dir");
        let e = read(dir.path()).expect_err("missing");
        assert!(matches!(e, StatusError::Missing { .. }), "{e:?}");
        assert!(e.to_string().contains(STATUS_FILE));
    }

    #[test]
    fn record_failover_keeps_the_last() {
        let mut s = failed_over();
        for i in 0..(MAX_FAILOVERS as u64 + 5) {
            s.record_failover(FailoverRecord {
                at_unix_ms: i,
                from_epoch: Some(i),
                detection_ms: 0.0,
                restore_ms: 0.0,
                network_ms: 0.0,
                total_ms: 0.0,
                outcome: "live".into(),
            });
        }
        assert_eq!(s.failovers.len(), MAX_FAILOVERS);
        assert_eq!(
            s.failovers.last().and_then(|f| f.from_epoch),
            Some(MAX_FAILOVERS as u64 + 4)
        );
    }

    /// `<state>/io.containerd.runtime.v2.task/{ns-b/{z,a,offmode,bad}, ns-a/{c}}` plus a stray file.
    fn tree() -> tempfile::TempDir {
        let state = tempfile::tempdir().expect("dir");
        let tasks = state.path().join(TASK_DIR);
        for (ns, id) in [
            ("ns-b", "z"),
            ("ns-b", "a"),
            ("ns-b", "offmode"),
            ("ns-b", "bad"),
            ("ns-a", "c"),
        ] {
            let b = tasks.join(ns).join(id);
            std::fs::create_dir_all(&b).expect("bundle");
            std::fs::write(b.join("config.json"), "{}").expect("config");
            if id == "offmode" {
                continue;
            }
            if id == "bad" {
                std::fs::write(b.join(STATUS_FILE), "not json").expect("bad");
                continue;
            }
            let mut s = sample();
            s.container_id = id.into();
            s.namespace = ns.into();
            write(&b, &s).expect("write");
        }
        std::fs::write(tasks.join("stray-file"), "x").expect("stray");
        state
    }

    #[test]
    fn scan_two_namespaces_and_a_corrupt_file() {
        let state = tree();
        let rows = scan(state.path(), None);
        let names: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| {
                let (ns, id) = row_names(&r.0, r.1.as_ref().ok());
                (ns, id, r.1.is_ok())
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("ns-a".into(), "c".into(), true),
                ("ns-b".into(), "a".into(), true),
                ("ns-b".into(), "bad".into(), false),
                ("ns-b".into(), "z".into(), true),
            ]
        );
        let bad = rows.iter().find(|r| r.1.is_err()).expect("bad row");
        assert!(bad.0.ends_with("ns-b/bad"));
        assert_eq!(row_container_id(bad), "bad");
        assert!(matches!(bad.1, Err(StatusError::NotJson { .. })));

        let only_a = scan(state.path(), Some("ns-a"));
        assert_eq!(only_a.len(), 1);
        assert!(scan(state.path(), Some("nope")).is_empty());
        let empty = tempfile::tempdir().expect("dir");
        assert!(scan(empty.path(), None).is_empty());
    }

    #[test]
    fn table_shows_the_fields_and_errors() {
        let state = tree();
        let mut rows = scan(state.path(), None);
        let mut failed = failed_over();
        failed.namespace = "ns-c".into();
        rows.push((PathBuf::from("/x/ns-c/redis1"), Ok(failed)));
        let mut web = sample();
        web.container_id = "web".into();
        web.namespace = "ns-c".into();
        web.set_state(State::Unprotected, Some("backup lost".into()));
        rows.push((PathBuf::from("/x/ns-c/web"), Ok(web)));
        let table = render_table_at(&rows, NOW, |pid| pid != 77);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 11, "{table}");
        assert_eq!(
            lines[8],
            "UNPROTECTED (serving, no backup can take over): ns-c/web"
        );
        assert_eq!(
            lines[10],
            "STALE (the shim that wrote the status is not running): ns-c/redis1"
        );
        let header = lines[0];
        for col in [
            "NAMESPACE",
            "CONTAINER",
            "MODE",
            "ROLE",
            "STATE",
            "PEER",
            "EPOCH",
            "PAUSE",
            "SIZE",
            "AGE",
            "FAILOVERS",
        ] {
            assert!(header.contains(col), "{col} in {header}");
        }
        let c = lines[1];
        for want in [
            "ns-a",
            "c ",
            "passive",
            "primary",
            "protected",
            "198.18.0.3:7070",
            "1042",
            "95.2ms",
            "2.4 MiB",
            "1s",
        ] {
            assert!(c.contains(want), "{want} in {c}");
        }
        assert!(c.ends_with(" 0"), "{c}");
        // Columns line up: STATE starts at the same offset in the header and each row.
        let col = header.find("STATE").expect("STATE");
        assert_eq!(c.get(col..col + 9), Some("protected"));
        let bad = lines[3];
        assert!(bad.starts_with("ns-b"), "{bad}");
        assert!(bad.contains("bad"), "{bad}");
        assert!(bad.contains("unreadable"), "{bad}");
        assert!(bad.contains("not a JSON rrc status file"), "{bad}");
        let f = lines[5];
        for want in ["ns-c", "backup", "failed (stale)", "198.18.0.2:7070"] {
            assert!(f.contains(want), "{want} in {f}");
        }
        assert!(f.ends_with(" 1"), "{f}");
        assert!(lines[6].contains("unprotected") && lines[6].contains("ns-c"));
        assert!(table.lines().all(|l| l == l.trim_end()));
        // All healthy: no trailer.
        let healthy = render_table_at(&scan(state.path(), Some("ns-a")), NOW, |_| true);
        assert_eq!(healthy.lines().count(), 2, "{healthy}");
    }

    #[test]
    fn detail_shows_state_detail_and_failovers() {
        let text = render_detail_at(&failed_over(), NOW, |_| true);
        for want in [
            "default/redis1",
            "backup",
            "failed (failed: see detail and the shim's log)",
            "restore of epoch 880 failed: criu exited 1",
            "198.18.0.2:7070",
            "shim pid:",
            "77",
            "updated:",
            "5s ago",
            "last committed epoch:",
            "failovers:",
            "1. 12m00s ago",
            "from epoch 880: restore failed: criu exited 1",
            "detection 502.0ms, restore 153.2ms, network 1.1ms, total 660.3ms",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        let text = render_detail_at(&sample(), NOW, |_| false);
        for want in [
            "protected (primary, paired",
            "epoch 1042, committed 1s ago",
            "frozen 95.2ms, dump 181.0ms, transfer 40.5ms, commit wait 3.0ms",
            "image 2.4 MiB, file-system delta 12.0 KiB",
            "4242 (NOT RUNNING",
            "checkpoints committed:  1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
        assert_eq!(human_bytes(52 * 1024 * 1024), "52.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_age(850), "850ms");
        assert_eq!(human_age(12_000), "12s");
        assert_eq!(human_age(192_000), "3m12s");
        assert_eq!(human_age(7_500_000), "2h05m");
        assert_eq!(human_age(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_790_000_000_123), "2026-09-21T14:13:20.123Z");
        // The test binary is not a shim, and pid 0 has no /proc entry.
        assert!(!shim_running(std::process::id()));
        assert!(!shim_running(0));
    }
}
