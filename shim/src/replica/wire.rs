//! What primary and backup say to each other on the replication channel, besides checkpoints.
//!
//! Stream [`STREAM_CONTROL`] carries [`Control`] messages as JSON (the channel's handshake already
//! checked the protocol version, so the JSON needs none of its own); stream
//! [`STREAM_CHECKPOINT`] carries `rrc_checkpoint::Piece`s; stream [`STREAM_LOG`] (hybrid mode)
//! carries the event log: each message is the offset of its first byte in the log (u64, little
//! endian) followed by the bytes. Anything else is a protocol error.

use serde::{Deserialize, Serialize};

use super::net::ServiceAddr;

/// Control messages.
pub const STREAM_CONTROL: u8 = 0;
/// Checkpoint pieces.
pub const STREAM_CHECKPOINT: u8 = 1;
/// Hybrid mode: the event log, in order (offset, bytes).
pub const STREAM_LOG: u8 = 2;

fn passive() -> String {
    "passive".to_string()
}

/// A log message: the offset of `bytes` in the log, then the bytes.
pub fn encode_log(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + bytes.len());
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(bytes);
    m
}

/// The offset and bytes of a log message; an error if it is too short to hold the offset.
pub fn decode_log(m: &[u8]) -> Result<(u64, &[u8]), String> {
    match m.split_first_chunk::<8>() {
        Some((off, rest)) => Ok((u64::from_le_bytes(*off), rest)),
        None => Err(format!(
            "malformed log message: {} bytes, shorter than its 8-byte offset",
            m.len()
        )),
    }
}

/// Hybrid mode: the file, in a checkpoint's image directory, that says where the checkpoint
/// cuts the event log ([`LogCut`]).
pub const CUT_FILE: &str = "rrc-log-cut.json";

/// Hybrid mode: where a checkpoint cuts the log. It holds the effect of every record before
/// sequence number `seq`; its segment starts at byte `offset` of the log, and once the
/// checkpoint is committed both sides drop every byte before it. Travels inside the sealed
/// image directory, so a committed checkpoint always names its cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCut {
    /// The checkpoint's epoch (also the new segment's).
    pub epoch: u64,
    /// The first sequence number the checkpoint does not contain.
    pub seq: u64,
    /// The byte offset of that segment's header in the log.
    pub offset: u64,
}

impl LogCut {
    /// Writes the cut into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> Result<(), String> {
        let path = dir.join(CUT_FILE);
        let text = serde_json::to_vec(self).map_err(|e| format!("encoding the cut: {e}"))?;
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))
    }

    /// The cut of the checkpoint in `dir`; `None` if it has none (a passive-mode checkpoint).
    pub fn read(dir: &std::path::Path) -> Result<Option<LogCut>, String> {
        let path = dir.join(CUT_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("{} is not a log cut: {e}", path.display()))
    }
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// The primary's first message: what the backup must take over.
    Pair {
        /// The service addresses of the container's network namespace.
        addresses: Vec<ServiceAddr>,
        /// The primary's epoch, in milliseconds.
        epoch_ms: u64,
        /// Differs between two runs of a primary: a backup that hears a new one drops what it
        /// holds of the previous one (its epochs start again).
        instance: u64,
        /// The primary's mode (`passive` or `hybrid`; absent means passive): the backup refuses
        /// a primary whose mode is not its own.
        #[serde(default = "passive")]
        mode: String,
    },
    /// The primary's container stopped on purpose (exit, kill, delete): the backup must not
    /// take over.
    Goodbye {
        /// Why, for the log.
        reason: String,
    },
}

impl Control {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a message; the error says what was wrong.
    pub fn decode(b: &[u8]) -> Result<Control, String> {
        serde_json::from_slice(b).map_err(|e| format!("malformed control message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusal() {
        let m = Control::Pair {
            addresses: vec![ServiceAddr {
                interface: "eth0".into(),
                address: std::net::Ipv4Addr::new(10, 0, 0, 1),
                prefix: 24,
            }],
            epoch_ms: 1000,
            instance: 7,
            mode: "hybrid".into(),
        };
        assert_eq!(Control::decode(&m.encode()), Ok(m));
        let g = Control::Goodbye {
            reason: "exit".into(),
        };
        assert_eq!(Control::decode(&g.encode()), Ok(g));
        assert!(Control::decode(b"{\"type\":\"nope\"}").is_err());
        assert!(Control::decode(b"\xff").is_err());
        // A primary that does not name its mode is a passive one.
        let old = br#"{"type":"pair","addresses":[],"epoch_ms":1,"instance":2}"#;
        assert!(
            matches!(Control::decode(old), Ok(Control::Pair { mode, .. }) if mode == "passive")
        );
    }

    #[test]
    fn a_cut_travels_in_its_image_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(LogCut::read(dir.path()), Ok(None));
        let cut = LogCut {
            epoch: 3,
            seq: 1234,
            offset: 98765,
        };
        cut.write(dir.path()).expect("write");
        assert_eq!(LogCut::read(dir.path()), Ok(Some(cut)));
        std::fs::write(dir.path().join(CUT_FILE), b"{").expect("damage");
        let err = LogCut::read(dir.path()).expect_err("refused");
        assert!(err.contains("is not a log cut"), "{err}");
    }

    #[test]
    fn log_messages_carry_their_offset() {
        let m = encode_log(1 << 40, b"abc");
        assert_eq!(decode_log(&m), Ok((1 << 40, &b"abc"[..])));
        assert_eq!(decode_log(&encode_log(0, b"")), Ok((0, &b""[..])));
        let err = decode_log(b"short").expect_err("refused");
        assert!(err.contains("shorter than its 8-byte offset"), "{err}");
    }
}
