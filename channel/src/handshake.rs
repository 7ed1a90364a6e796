//! The handshake's messages and its authentication.
//!
//! Both sides send `Hello` (protocol version, role, container identity, a fresh 32-byte nonce),
//! then `Proof` = HMAC-SHA256(shared key, [`PROOF_LABEL`] ‖ sender role ‖ container id ‖ sender
//! nonce ‖ receiver nonce), then `Accept` once the peer's proof checks out. The key never travels;
//! each proof is bound to both nonces, so a recorded proof cannot be replayed. Any check that
//! fails makes the side that saw it send `Reject` with the reason and close.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Domain separation for proofs.
pub const PROOF_LABEL: &[u8] = b"rrc-channel-v1 proof";
/// Nonce size.
pub const NONCE_LEN: usize = 32;
/// Longest container identity accepted.
pub const MAX_CONTAINER_ID: usize = 1024;

/// A side's role in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the application, sends state.
    Primary,
    /// Receives state, takes over on failure.
    Backup,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }
    fn from_u8(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            _ => None,
        }
    }
}

/// Why a handshake message is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {problem}")]
pub struct MessageError {
    /// Which message.
    pub what: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn malformed(what: &'static str, problem: impl Into<String>) -> MessageError {
    MessageError {
        what,
        problem: problem.into(),
    }
}

/// The first message of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u16,
    /// Sender's role.
    pub role: Role,
    /// Sender's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The replicated container's identity, as configured on the sender.
    pub container_id: String,
}

impl Hello {
    /// Layout: version (u16 LE) first, so any future version can still read it; role; nonce;
    /// container id (the rest, UTF-8).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(3 + NONCE_LEN + self.container_id.len());
        v.extend_from_slice(&self.version.to_le_bytes());
        v.push(self.role.to_u8());
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(self.container_id.as_bytes());
        v
    }

    /// Only the version, from a hello of any version.
    pub fn peek_version(b: &[u8]) -> Option<u16> {
        Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
    }

    /// Decodes a hello of this protocol version's layout.
    pub fn decode(b: &[u8]) -> Result<Hello, MessageError> {
        const WHAT: &str = "hello";
        if b.len() < 3 + NONCE_LEN {
            return Err(malformed(WHAT, format!("{} bytes is too short", b.len())));
        }
        let version = u16::from_le_bytes([b[0], b[1]]);
        let role = Role::from_u8(b[2]).ok_or_else(|| malformed(WHAT, format!("role {}", b[2])))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[3..3 + NONCE_LEN]);
        let id = &b[3 + NONCE_LEN..];
        if id.is_empty() || id.len() > MAX_CONTAINER_ID {
            return Err(malformed(WHAT, "container id must be 1 to 1024 bytes"));
        }
        let container_id = String::from_utf8(id.to_vec())
            .map_err(|_| malformed(WHAT, "container id is not UTF-8"))?;
        Ok(Hello {
            version,
            role,
            nonce,
            container_id,
        })
    }
}

/// The proof a side sends: it knows the key, for this container, these nonces.
pub fn proof(
    key: &[u8],
    sender: Role,
    container_id: &str,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
) -> [u8; 32] {
    mac(key, sender, container_id, sender_nonce, receiver_nonce)
        .finalize()
        .into_bytes()
        .into()
}

fn mac(
    key: &[u8],
    sender: Role,
    container_id: &str,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(PROOF_LABEL);
    m.update(&[sender.to_u8()]);
    m.update(
        &u32::try_from(container_id.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    m.update(container_id.as_bytes());
    m.update(sender_nonce);
    m.update(receiver_nonce);
    m
}

/// Checks a peer's proof in constant time.
pub fn verify(
    key: &[u8],
    sender: Role,
    container_id: &str,
    sender_nonce: &[u8; NONCE_LEN],
    receiver_nonce: &[u8; NONCE_LEN],
    proof: &[u8],
) -> bool {
    mac(key, sender, container_id, sender_nonce, receiver_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Why a side rejects, as sent in `Reject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// Protocol versions differ.
    Version = 1,
    /// The peer's proof was wrong: keys differ.
    Auth = 2,
    /// Configured for another container.
    Container = 3,
    /// Both sides have the same role.
    Role = 4,
    /// A malformed, corrupt or unexpected frame.
    Protocol = 5,
}

/// Encodes a reject: code byte, then a human-readable reason.
pub fn encode_reject(code: RejectCode, reason: &str) -> Vec<u8> {
    let mut v = vec![code as u8];
    v.extend_from_slice(reason.as_bytes());
    v
}

/// Decodes a reject into its reason text (lossy: it is only shown).
pub fn decode_reject(b: &[u8]) -> String {
    String::from_utf8_lossy(b.get(1..).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roundtrip_and_refusals() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Backup,
            nonce: [9; NONCE_LEN],
            container_id: "redis-1".into(),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        assert_eq!(Hello::peek_version(&h.encode()), Some(PROTOCOL_VERSION));
        assert!(Hello::decode(&h.encode()[..10]).is_err());
        let mut bad = h.encode();
        bad[2] = 7;
        assert!(Hello::decode(&bad).is_err());
        let mut no_id = h.encode();
        no_id.truncate(3 + NONCE_LEN);
        assert!(Hello::decode(&no_id).is_err());
    }

    #[test]
    fn proofs_bind_key_role_container_and_nonces() {
        let (a, b) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = proof(b"0123456789abcdef", Role::Primary, "c", &a, &b);
        assert!(verify(b"0123456789abcdef", Role::Primary, "c", &a, &b, &p));
        assert!(!verify(b"0123456789abcdeX", Role::Primary, "c", &a, &b, &p));
        assert!(!verify(b"0123456789abcdef", Role::Backup, "c", &a, &b, &p));
        assert!(!verify(b"0123456789abcdef", Role::Primary, "d", &a, &b, &p));
        assert!(!verify(b"0123456789abcdef", Role::Primary, "c", &b, &a, &p));
        assert!(!verify(
            b"0123456789abcdef",
            Role::Primary,
            "c",
            &a,
            &b,
            &p[..31]
        ));
    }
}
