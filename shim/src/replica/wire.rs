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
    fn log_messages_carry_their_offset() {
        let m = encode_log(1 << 40, b"abc");
        assert_eq!(decode_log(&m), Ok((1 << 40, &b"abc"[..])));
        assert_eq!(decode_log(&encode_log(0, b"")), Ok((0, &b""[..])));
        let err = decode_log(b"short").expect_err("refused");
        assert!(err.contains("shorter than its 8-byte offset"), "{err}");
    }
}
