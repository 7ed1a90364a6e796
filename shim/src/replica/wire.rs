//! What primary and backup say to each other on the replication channel, besides checkpoints.
//!
//! Stream [`STREAM_CONTROL`] carries [`Control`] messages as JSON (the channel's handshake already
//! checked the protocol version, so the JSON needs none of its own); stream
//! [`STREAM_CHECKPOINT`] carries `rrc_checkpoint::Piece`s. Anything else is a protocol error.

use serde::{Deserialize, Serialize};

use super::net::ServiceAddr;

/// Control messages.
pub const STREAM_CONTROL: u8 = 0;
/// Checkpoint pieces.
pub const STREAM_CHECKPOINT: u8 = 1;

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
        };
        assert_eq!(Control::decode(&m.encode()), Ok(m));
        let g = Control::Goodbye {
            reason: "exit".into(),
        };
        assert_eq!(Control::decode(&g.encode()), Ok(g));
        assert!(Control::decode(b"{\"type\":\"nope\"}").is_err());
        assert!(Control::decode(b"\xff").is_err());
    }
}
