//! rrc's per-container configuration.
//!
//! This crate owns the *configuration surface* of rrc: the names of every setting, their defaults,
//! and the rules that make a value valid. It reads two sources:
//!
//! * OCI annotations under the prefix [`ANNOTATION_PREFIX`] (`io.containerd.rrc.`), set by
//!   `ctr run --annotation`, `nerdctl run --annotation`, or a Kubernetes pod whose annotations are
//!   allow-listed by the runtime's `pod_annotations` in containerd's CRI configuration;
//! * a TOML file, named by the `ConfigPath` runtime option (containerd sends it when a CRI runtime
//!   sets `options.ConfigPath`), holding the same keys without the prefix.
//!
//! An annotation wins over the file. Every value is validated here; an error names the key, where
//! it came from, what is wrong and what to do. This crate touches nothing but the files it is asked
//! to read (the TOML file and the authentication key file); it starts nothing and knows nothing of
//! containerd or runc.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Prefix of every rrc annotation.
pub const ANNOTATION_PREFIX: &str = "io.containerd.rrc.";

/// Smallest accepted shared authentication key, in bytes.
pub const MIN_KEY_BYTES: u64 = 16;

/// Every key rrc understands, with its default and a one-line description (used for the docs and
/// for error messages).
pub const KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "mode",
        default: "off, or passive when peer, listen or role is set",
        help: "replication mode: off (a plain runc container), passive (outputs released when the epoch's checkpoint is committed at the backup), hybrid (outputs released when the backup holds the log)",
    },
    KeyDoc {
        key: "role",
        default: "primary",
        help: "primary runs the application; backup waits for a primary and takes over when it fails",
    },
    KeyDoc {
        key: "peer",
        default: "(none)",
        help: "address (IP:port or host:port) of the backup a primary replicates to; on a backup, where its own backup listens once it has taken over",
    },
    KeyDoc {
        key: "listen",
        default: "0.0.0.0:7070 on a backup",
        help: "address (IP:port) a backup listens on for its primary",
    },
    KeyDoc {
        key: "epoch-ms",
        default: "1000",
        help: "checkpoint interval in milliseconds (1 to 60000); a full CRIU dump pauses the container about 100-160 ms, so much shorter epochs spend most of their time checkpointing",
    },
    KeyDoc {
        key: "auth-key-file",
        default: "(none; required when replicating)",
        help: "file holding the key shared by primary and backup (at least 16 bytes; e.g. head -c 32 /dev/urandom > FILE)",
    },
    KeyDoc {
        key: "heartbeat-ms",
        default: "50",
        help: "interval between heartbeats on the replication channel, in milliseconds (1 to 10000)",
    },
    KeyDoc {
        key: "failover-timeout-ms",
        default: "500",
        help: "how long a backup waits without hearing from its primary before it takes over; more than heartbeat-ms (1 to 600000)",
    },
    KeyDoc {
        key: "on-recorder-failure",
        default: "stop",
        help: "what the primary does if its recorder dies: stop (stop the container) or continue-unprotected (keep serving, unreplicated; refused in hybrid mode, where a container cannot run without its recorder)",
    },
    KeyDoc {
        key: "recorder-cpu",
        default: "(none: not pinned)",
        help: "hybrid mode: a CPU number; the recorder and the container are pinned to it (a recorded system call costs several times more when the recorder wakes on another CPU than its container)",
    },
    KeyDoc {
        key: "log-archive",
        default: "(none: discarded)",
        help: "hybrid mode, primary: an absolute directory where the event log is kept instead of discarded once a checkpoint after it is committed (one file per container, NAMESPACE-ID.rrclog; for audits and rrc-recorder verify; it grows without bound)",
    },
];

/// Documentation of one configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    /// The key as it appears in the TOML file; the annotation is [`ANNOTATION_PREFIX`] + key.
    pub key: &'static str,
    /// The default, in words.
    pub default: &'static str,
    /// What the key does.
    pub help: &'static str,
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI annotation (the full annotation name).
    Annotation(String),
    /// A key in the TOML file at this path.
    File(PathBuf),
    /// No value given; the default applies.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Annotation(name) => write!(f, "annotation {name}"),
            Source::File(path) => write!(f, "config file {}", path.display()),
            Source::Default => write!(f, "default"),
        }
    }
}

/// Everything that can be wrong with rrc's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key under the rrc prefix, or in the file, that rrc does not know.
    #[error("unknown rrc setting {key:?} ({origin}); known settings: {known}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// Where it was found.
        origin: Source,
        /// The known keys, comma separated.
        known: String,
    },
    /// A known key with a value that is not valid.
    #[error("invalid value {value:?} for {key} ({origin}): {problem}")]
    InvalidValue {
        /// The key (without prefix).
        key: &'static str,
        /// The value as given.
        value: String,
        /// Where it was found.
        origin: Source,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A combination of settings that cannot work.
    #[error("inconsistent rrc settings: {0}")]
    Inconsistent(String),
    /// The TOML file could not be read.
    #[error("cannot read rrc config file {path}: {err}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The TOML file is not valid TOML, or a value has a type rrc cannot use.
    #[error("rrc config file {path} is not valid: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Replication mode of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No replication: a plain runc container.
    Off,
    /// Outputs are released when the checkpoint of their epoch is committed at the backup.
    Passive,
    /// Outputs are released when the backup has acknowledged the log they depend on.
    Hybrid,
}

impl Mode {
    /// The mode's name as written in annotations and the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Passive => "passive",
            Mode::Hybrid => "hybrid",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Role of this shim in a replicated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the application and replicates it.
    Primary,
    /// Waits for a primary, takes over when it fails.
    Backup,
}

impl Role {
    /// The role's name as written in annotations and the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// What a primary does when its recorder dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecorderFailurePolicy {
    /// Stop the container.
    Stop,
    /// Keep serving without replication, reported loudly.
    ContinueUnprotected,
}

/// A network address: an IP or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// IP address or DNS name.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl Address {
    /// The address as an IP socket address, when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const HINT: &str = "expected IP:port, [IPv6]:port or hostname:port, e.g. 198.18.0.3:7070";
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("port 0 is not a usable port; {HINT}"));
            }
            return Ok(Address {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("no port; {HINT}"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("port {port:?} is not a number from 1 to 65535; {HINT}"))?;
        if port == 0 {
            return Err(format!("port 0 is not a usable port; {HINT}"));
        }
        if !is_hostname(host) {
            return Err(format!(
                "{host:?} is neither an IP address nor a host name; {HINT}"
            ));
        }
        Ok(Address {
            host: host.to_string(),
            port,
        })
    }
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        // An all-numeric dotted name is a malformed IP, not a host name.
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// The validated configuration of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RrcConfig {
    /// Replication mode.
    pub mode: Mode,
    /// Role in the pair.
    pub role: Role,
    /// The backup's address (primary side).
    pub peer: Option<Address>,
    /// Address to listen on (backup side).
    pub listen: Option<Address>,
    /// Checkpoint interval.
    pub epoch: Duration,
    /// File holding the shared key.
    pub auth_key_file: Option<PathBuf>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which a backup takes over.
    pub failover_timeout: Duration,
    /// What to do if the recorder dies.
    pub on_recorder_failure: RecorderFailurePolicy,
    /// Hybrid mode: the CPU the recorder and the container are pinned to.
    pub recorder_cpu: Option<u32>,
    /// Hybrid mode: where the primary appends the log it would otherwise discard.
    pub log_archive: Option<PathBuf>,
    /// Where each explicitly set key came from, for reports.
    pub sources: BTreeMap<&'static str, Source>,
}

impl Default for RrcConfig {
    fn default() -> Self {
        RrcConfig {
            mode: Mode::Off,
            role: Role::Primary,
            peer: None,
            listen: None,
            epoch: DEFAULT_EPOCH,
            auth_key_file: None,
            heartbeat: Duration::from_millis(50),
            failover_timeout: Duration::from_millis(500),
            on_recorder_failure: RecorderFailurePolicy::Stop,
            recorder_cpu: None,
            log_archive: None,
            sources: BTreeMap::new(),
        }
    }
}

/// The checkpoint interval when none is configured: what full CRIU dumps sustain here (each
/// pauses the container about 100-160 ms; see the README).
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(1000);

/// Default port a backup listens on.
pub const DEFAULT_LISTEN_PORT: u16 = 7070;

impl RrcConfig {
    /// Reads and validates the configuration from a container's OCI annotations and, if given,
    /// the runtime's TOML file. Annotations not under [`ANNOTATION_PREFIX`] are ignored.
    pub fn load<'a, I>(annotations: I, file: Option<&Path>) -> Result<RrcConfig, ConfigError>
    where
        I: IntoIterator<Item = (&'a String, &'a String)>,
    {
        let mut raw: BTreeMap<&'static str, (String, Source)> = BTreeMap::new();
        if let Some(path) = file {
            for (key, value) in read_file(path)? {
                let known = known_key(&key).ok_or_else(|| ConfigError::UnknownKey {
                    key: key.clone(),
                    origin: Source::File(path.to_path_buf()),
                    known: known_keys(),
                })?;
                raw.insert(known, (value, Source::File(path.to_path_buf())));
            }
        }
        for (name, value) in annotations {
            let Some(key) = name.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let known = known_key(key).ok_or_else(|| ConfigError::UnknownKey {
                key: name.clone(),
                origin: Source::Annotation(name.clone()),
                known: known_keys(),
            })?;
            raw.insert(known, (value.clone(), Source::Annotation(name.clone())));
        }
        Self::from_raw(raw)
    }

    fn from_raw(raw: BTreeMap<&'static str, (String, Source)>) -> Result<RrcConfig, ConfigError> {
        let mut cfg = RrcConfig::default();
        let invalid = |key: &'static str, value: &str, source: &Source, problem: String| {
            ConfigError::InvalidValue {
                key,
                value: value.to_string(),
                origin: source.clone(),
                problem,
            }
        };
        for (&key, (value, source)) in &raw {
            let v = value.trim();
            match key {
                "mode" => {
                    cfg.mode = match v {
                        "off" => Mode::Off,
                        "passive" => Mode::Passive,
                        "hybrid" => Mode::Hybrid,
                        _ => {
                            return Err(invalid(
                                key,
                                value,
                                source,
                                "expected one of off, passive, hybrid".into(),
                            ))
                        }
                    }
                }
                "role" => {
                    cfg.role = match v {
                        "primary" => Role::Primary,
                        "backup" => Role::Backup,
                        _ => {
                            return Err(invalid(
                                key,
                                value,
                                source,
                                "expected primary or backup".into(),
                            ))
                        }
                    }
                }
                "peer" => {
                    cfg.peer = Some(v.parse().map_err(|p| invalid(key, value, source, p))?);
                }
                "listen" => {
                    cfg.listen = Some(v.parse().map_err(|p| invalid(key, value, source, p))?);
                }
                "epoch-ms" => {
                    cfg.epoch = millis(v, 1, 60_000).map_err(|p| invalid(key, value, source, p))?;
                }
                "heartbeat-ms" => {
                    cfg.heartbeat =
                        millis(v, 1, 10_000).map_err(|p| invalid(key, value, source, p))?;
                }
                "failover-timeout-ms" => {
                    cfg.failover_timeout =
                        millis(v, 1, 600_000).map_err(|p| invalid(key, value, source, p))?;
                }
                "auth-key-file" => {
                    let path = PathBuf::from(v);
                    check_key_file(&path).map_err(|p| invalid(key, value, source, p))?;
                    cfg.auth_key_file = Some(path);
                }
                "on-recorder-failure" => {
                    cfg.on_recorder_failure = match v {
                        "stop" => RecorderFailurePolicy::Stop,
                        "continue-unprotected" => RecorderFailurePolicy::ContinueUnprotected,
                        _ => {
                            return Err(invalid(
                                key,
                                value,
                                source,
                                "expected stop or continue-unprotected".into(),
                            ))
                        }
                    }
                }
                "recorder-cpu" => {
                    let cpu: u32 = v.parse().map_err(|_| {
                        invalid(
                            key,
                            value,
                            source,
                            "expected a CPU number (0, 1, ...)".into(),
                        )
                    })?;
                    if cpu >= 1024 {
                        return Err(invalid(
                            key,
                            value,
                            source,
                            "CPU numbers go up to 1023".into(),
                        ));
                    }
                    cfg.recorder_cpu = Some(cpu);
                }
                "log-archive" => {
                    let path = PathBuf::from(v);
                    if !path.is_absolute() {
                        return Err(invalid(
                            key,
                            value,
                            source,
                            "must be an absolute directory path".into(),
                        ));
                    }
                    if path.exists() && !path.is_dir() {
                        return Err(invalid(
                            key,
                            value,
                            source,
                            "exists and is not a directory".into(),
                        ));
                    }
                    cfg.log_archive = Some(path);
                }
                // `known_key` only lets through the keys in KEYS, all handled above.
                other => {
                    return Err(ConfigError::UnknownKey {
                        key: other.to_string(),
                        origin: source.clone(),
                        known: known_keys(),
                    })
                }
            }
            cfg.sources.insert(key, source.clone());
        }

        let explicit_mode = raw.contains_key("mode");
        let wants_replication = ["peer", "listen", "role"]
            .iter()
            .any(|k| raw.contains_key(k));
        if !explicit_mode && wants_replication {
            cfg.mode = Mode::Passive;
        }
        if cfg.mode != Mode::Off {
            cfg.check_replicated()?;
        }
        Ok(cfg)
    }

    fn check_replicated(&mut self) -> Result<(), ConfigError> {
        let mode = self.mode;
        match self.role {
            Role::Primary if self.peer.is_none() => {
                return Err(ConfigError::Inconsistent(format!(
                    "mode {mode} on a primary needs {ANNOTATION_PREFIX}peer (the backup's address)"
                )))
            }
            Role::Backup if self.listen.is_none() => {
                self.listen = Some(Address {
                    host: "0.0.0.0".into(),
                    port: DEFAULT_LISTEN_PORT,
                });
            }
            _ => {}
        }
        if self.auth_key_file.is_none() {
            return Err(ConfigError::Inconsistent(format!(
                "mode {mode} needs {ANNOTATION_PREFIX}auth-key-file (a key shared by primary and backup)"
            )));
        }
        if self.failover_timeout <= self.heartbeat {
            return Err(ConfigError::Inconsistent(format!(
                "failover-timeout-ms ({} ms) must be more than heartbeat-ms ({} ms)",
                self.failover_timeout.as_millis(),
                self.heartbeat.as_millis()
            )));
        }
        Ok(())
    }

    /// Whether any rrc setting was given at all.
    pub fn is_configured(&self) -> bool {
        !self.sources.is_empty()
    }
}

fn known_key(key: &str) -> Option<&'static str> {
    KEYS.iter().map(|k| k.key).find(|k| *k == key)
}

fn known_keys() -> String {
    KEYS.iter().map(|k| k.key).collect::<Vec<_>>().join(", ")
}

fn millis(v: &str, min: u64, max: u64) -> Result<Duration, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("expected a whole number of milliseconds from {min} to {max}"))?;
    if n < min || n > max {
        return Err(format!("must be from {min} to {max} milliseconds"));
    }
    Ok(Duration::from_millis(n))
}

fn check_key_file(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("must be an absolute path".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the key file: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    // Open it to prove it is readable, not just present.
    std::fs::File::open(path).map_err(|e| format!("cannot read the key file: {e}"))?;
    if meta.len() < MIN_KEY_BYTES {
        return Err(format!(
            "the key file holds {} bytes; a key needs at least {MIN_KEY_BYTES} (e.g. head -c 32 /dev/urandom > {})",
            meta.len(),
            path.display()
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::ReadFile {
        path: path.to_path_buf(),
        err,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::BadFile {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    return Err(ConfigError::BadFile {
                        path: path.to_path_buf(),
                        problem: format!(
                            "{key} is a {}; rrc settings are strings or whole numbers",
                            other.type_str()
                        ),
                    })
                }
            };
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests;
