//! rrc's replication channel: one TCP connection between a primary and its backup.
//!
//! This crate owns the wire: frame layout ([`frame`]), the versioned handshake with mutual
//! authentication from a shared key ([`handshake`]), and the established channel with sequence
//! numbers, cumulative acknowledgements, heartbeats, peer-death detection and backpressure
//! ([`channel`]). It knows nothing of what it carries (checkpoints, logs): callers choose the
//! stream byte of each message and decide when to acknowledge. It never reads keys from disk
//! (callers pass the bytes) and never logs them.

pub mod channel;
pub mod frame;
pub mod handshake;

pub use channel::{connect, establish, Channel, ChannelError, Config, Incoming, Peer};
pub use handshake::{Role, PROTOCOL_VERSION};

#[cfg(test)]
mod tests;
