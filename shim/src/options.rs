//! Runtime options: what containerd sends the shim on `start` (stdin) and in `CreateTaskRequest`.
//!
//! containerd sends one of several protobuf messages, wrapped in a `google.protobuf.Any`:
//!
//! | type URL | who sends it |
//! |---|---|
//! | `containerd.runc.v1.Options` | clients that treat the shim as a runc shim (CRI with a runc-style options table) |
//! | `containerd.linux.runc.CreateOptions` | containerd's Go client (ctr, nerdctl) for a runtime whose name does not start with `io.containerd.runc` |
//! | `containerd.linux.runc.RuncOptions` | old clients naming the runc binary and root |
//! | `runtimeoptions.v1.Options` | the CRI plugin when a runtime sets `options.ConfigPath`, and `ctr run --runtime-config-path` |
//!
//! All are decoded into one [`ShimOptions`]. The decoder is hand-written over the protobuf wire
//! format because the shim crates carry only the first of these types; it refuses malformed input
//! with an error that names the type.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::CodedInputStream;
use serde::{Deserialize, Serialize};

/// Why runtime options could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// A type rrc does not know.
    #[error("unsupported runtime options type {0:?}; rrc accepts containerd.runc.v1.Options, containerd.linux.runc.CreateOptions, containerd.linux.runc.RuncOptions and runtimeoptions.v1.Options")]
    UnknownType(String),
    /// Bytes that are not a valid message of the announced type.
    #[error("malformed runtime options of type {type_url}: {problem}")]
    Malformed {
        /// The announced type.
        type_url: String,
        /// What is wrong.
        problem: String,
    },
}

/// The runtime options the shim uses, whatever message they came in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimOptions {
    /// The type URL they arrived as (empty when none were sent).
    pub type_url: String,
    /// runc binary (default `runc`).
    pub binary_name: String,
    /// runc state root (default: derived from the bundle's location, see `runc::runc_root`).
    pub root: String,
    /// cgroup to put the shim in.
    pub shim_cgroup: String,
    /// Owner of the IO pipes.
    pub io_uid: u32,
    /// Group of the IO pipes.
    pub io_gid: u32,
    /// Pass `--no-pivot` to runc.
    pub no_pivot_root: bool,
    /// Pass `--no-new-keyring` to runc.
    pub no_new_keyring: bool,
    /// Use runc's systemd cgroup driver.
    pub systemd_cgroup: bool,
    /// CRIU's image path.
    pub criu_image_path: String,
    /// CRIU's work path.
    pub criu_work_path: String,
    /// rrc's TOML configuration file (from `runtimeoptions.v1.Options.ConfigPath`).
    pub config_path: Option<PathBuf>,
    /// Inline TOML configuration (from `runtimeoptions.v1.Options.ConfigBody`).
    pub config_body: Option<String>,
}

enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// Reads every (field number, value) of a message; fixed-width fields are skipped.
fn fields(type_url: &str, bytes: &[u8]) -> Result<Vec<(u32, Value)>, OptionsError> {
    let malformed = |problem: String| OptionsError::Malformed {
        type_url: type_url.to_string(),
        problem,
    };
    let mut is = CodedInputStream::from_bytes(bytes);
    let mut out = Vec::new();
    loop {
        let tag = match is.read_raw_tag_or_eof() {
            Ok(Some(tag)) => tag,
            Ok(None) => break,
            Err(e) => return Err(malformed(e.to_string())),
        };
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return Err(malformed("field number 0".into()));
        }
        let value = match wire {
            0 => Value::Varint(
                is.read_raw_varint64()
                    .map_err(|e| malformed(e.to_string()))?,
            ),
            2 => Value::Bytes(is.read_bytes().map_err(|e| malformed(e.to_string()))?),
            1 => {
                is.read_raw_little_endian64()
                    .map_err(|e| malformed(e.to_string()))?;
                continue;
            }
            5 => {
                is.read_raw_little_endian32()
                    .map_err(|e| malformed(e.to_string()))?;
                continue;
            }
            other => return Err(malformed(format!("unsupported wire type {other}"))),
        };
        out.push((field, value));
    }
    Ok(out)
}

struct Reader<'a> {
    type_url: &'a str,
}

impl Reader<'_> {
    fn err(&self, field: u32, what: &str) -> OptionsError {
        OptionsError::Malformed {
            type_url: self.type_url.to_string(),
            problem: format!("field {field} should be {what}"),
        }
    }
    fn string(&self, field: u32, v: Value) -> Result<String, OptionsError> {
        match v {
            Value::Bytes(b) => String::from_utf8(b).map_err(|_| self.err(field, "UTF-8 text")),
            Value::Varint(_) => Err(self.err(field, "a string")),
        }
    }
    fn bool(&self, field: u32, v: Value) -> Result<bool, OptionsError> {
        match v {
            Value::Varint(n) => Ok(n != 0),
            Value::Bytes(_) => Err(self.err(field, "a bool")),
        }
    }
    fn u32(&self, field: u32, v: Value) -> Result<u32, OptionsError> {
        match v {
            Value::Varint(n) => u32::try_from(n).map_err(|_| self.err(field, "a 32-bit number")),
            Value::Bytes(_) => Err(self.err(field, "a number")),
        }
    }
}

impl ShimOptions {
    /// Decodes the options from an `Any`'s type URL and value. An empty type URL and value mean
    /// "no options".
    pub fn decode(type_url: &str, bytes: &[u8]) -> Result<ShimOptions, OptionsError> {
        let mut o = ShimOptions {
            type_url: type_url.to_string(),
            ..Default::default()
        };
        if type_url.is_empty() && bytes.is_empty() {
            return Ok(o);
        }
        // Type URLs may carry a host prefix ("types.containerd.io/..."); the name is what counts.
        let name = type_url.rsplit('/').next().unwrap_or(type_url);
        let r = Reader { type_url };
        let fields = fields(type_url, bytes)?;
        match name {
            "containerd.runc.v1.Options" => {
                for (f, v) in fields {
                    match f {
                        1 => o.no_pivot_root = r.bool(f, v)?,
                        2 => o.no_new_keyring = r.bool(f, v)?,
                        3 => o.shim_cgroup = r.string(f, v)?,
                        4 => o.io_uid = r.u32(f, v)?,
                        5 => o.io_gid = r.u32(f, v)?,
                        6 => o.binary_name = r.string(f, v)?,
                        7 => o.root = r.string(f, v)?,
                        9 => o.systemd_cgroup = r.bool(f, v)?,
                        10 => o.criu_image_path = r.string(f, v)?,
                        11 => o.criu_work_path = r.string(f, v)?,
                        _ => {}
                    }
                }
            }
            "containerd.linux.runc.CreateOptions" => {
                for (f, v) in fields {
                    match f {
                        1 => o.no_pivot_root = r.bool(f, v)?,
                        8 => o.no_new_keyring = r.bool(f, v)?,
                        9 => o.shim_cgroup = r.string(f, v)?,
                        10 => o.io_uid = r.u32(f, v)?,
                        11 => o.io_gid = r.u32(f, v)?,
                        12 => o.criu_work_path = r.string(f, v)?,
                        13 => o.criu_image_path = r.string(f, v)?,
                        _ => {}
                    }
                }
            }
            "containerd.linux.runc.RuncOptions" => {
                for (f, v) in fields {
                    match f {
                        1 => o.binary_name = r.string(f, v)?,
                        2 => o.root = r.string(f, v)?,
                        4 => o.systemd_cgroup = r.bool(f, v)?,
                        _ => {}
                    }
                }
            }
            "runtimeoptions.v1.Options" => {
                for (f, v) in fields {
                    match f {
                        2 => {
                            let p = r.string(f, v)?;
                            if !p.is_empty() {
                                o.config_path = Some(PathBuf::from(p));
                            }
                        }
                        3 => {
                            let body = r.string(f, v)?;
                            if !body.is_empty() {
                                o.config_body = Some(body);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => return Err(OptionsError::UnknownType(type_url.to_string())),
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(field: u32, wire: u32) -> u8 {
        u8::try_from((field << 3) | wire).expect("small field")
    }
    fn string(field: u32, s: &str) -> Vec<u8> {
        let mut v = vec![key(field, 2), u8::try_from(s.len()).expect("short")];
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn empty_means_defaults() {
        assert_eq!(
            ShimOptions::decode("", &[]).expect("ok"),
            ShimOptions::default()
        );
    }

    #[test]
    fn runc_options() {
        let mut b = string(6, "/usr/local/bin/runc");
        b.extend(string(7, "/run/x"));
        b.extend([key(1, 0), 1, key(4, 0), 0x90, 0x4e]); // no_pivot_root, io_uid = 10000
        let o = ShimOptions::decode("containerd.runc.v1.Options", &b).expect("ok");
        assert_eq!(o.binary_name, "/usr/local/bin/runc");
        assert_eq!(o.root, "/run/x");
        assert!(o.no_pivot_root);
        assert_eq!(o.io_uid, 10000);
    }

    #[test]
    fn legacy_create_options() {
        let mut b = string(9, "/rrc-shims");
        b.extend([key(8, 0), 1]);
        b.extend(string(6, "ipc")); // empty_namespaces: ignored
        let o = ShimOptions::decode("containerd.linux.runc.CreateOptions", &b).expect("ok");
        assert_eq!(o.shim_cgroup, "/rrc-shims");
        assert!(o.no_new_keyring);
    }

    #[test]
    fn runtime_options_with_prefix() {
        let mut b = string(1, "io.containerd.rrc.v1.options");
        b.extend(string(2, "/etc/rrc/config.toml"));
        let o =
            ShimOptions::decode("types.containerd.io/runtimeoptions.v1.Options", &b).expect("ok");
        assert_eq!(o.config_path, Some(PathBuf::from("/etc/rrc/config.toml")));
    }

    #[test]
    fn refuses_unknown_type_and_garbage() {
        let err = ShimOptions::decode("example.Other", &[]).expect_err("unknown");
        assert!(err.to_string().contains("example.Other"));
        // A length prefix longer than the data.
        let err = ShimOptions::decode("containerd.runc.v1.Options", &[key(6, 2), 50, b'a'])
            .expect_err("truncated");
        assert!(matches!(err, OptionsError::Malformed { .. }), "{err}");
        // A bool field sent as bytes.
        let err = ShimOptions::decode("containerd.runc.v1.Options", &string(1, "x"))
            .expect_err("wrong wire type");
        assert!(err.to_string().contains("field 1"), "{err}");
        // Invalid UTF-8 in a string.
        let err = ShimOptions::decode("containerd.runc.v1.Options", &[key(6, 2), 1, 0xff])
            .expect_err("utf8");
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; `shim/fuzz` has the coverage-guided version.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            for t in [
                "containerd.runc.v1.Options",
                "containerd.linux.runc.CreateOptions",
                "containerd.linux.runc.RuncOptions",
                "runtimeoptions.v1.Options",
            ] {
                let _ = ShimOptions::decode(t, &bytes);
            }
        }
    }
}
