//! Frames: the unit on the wire.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "RR"
//! 2       4     body length N (little endian), at most MAX_BODY
//! 6       N     body: kind (1 byte), sequence number (8 bytes LE), payload (N - 9 bytes)
//! 6+N     4     CRC-32C of bytes 0 .. 6+N (little endian)
//! ```
//!
//! Sequence numbers count the frames of one direction from 1, with no gap; the receiver checks
//! them (see [`crate::channel`]). The decoder accepts partial input (it asks for more) and
//! refuses anything malformed: a bad magic, an oversized length, a checksum mismatch, an unknown
//! kind.

/// Frame magic.
pub const MAGIC: [u8; 2] = *b"RR";
/// Bytes before the body.
pub const HEADER_LEN: usize = 6;
/// Bytes after the body.
pub const TRAILER_LEN: usize = 4;
/// Fixed part of the body (kind + sequence number).
pub const BODY_FIXED: usize = 9;
/// The largest body accepted (larger messages are split by their sender).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// The largest payload one frame carries.
pub const MAX_PAYLOAD: usize = MAX_BODY - BODY_FIXED;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: version, role, container, nonce.
    Hello = 1,
    /// Handshake: the HMAC proof of the shared key.
    Proof = 2,
    /// Handshake: the peer's proof was good.
    Accept = 3,
    /// The sender refuses the connection (reason in the payload) and closes it.
    Reject = 4,
    /// Liveness.
    Heartbeat = 5,
    /// Cumulative acknowledgement of data frames (sequence number in the payload).
    Ack = 6,
    /// Application data: a stream byte, then the bytes.
    Data = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Proof,
            3 => Kind::Accept,
            4 => Kind::Reject,
            5 => Kind::Heartbeat,
            6 => Kind::Ack,
            7 => Kind::Data,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// Its sequence number in its direction.
    pub seq: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with a frame: another protocol, or garbage.
    #[error("bad frame magic {0:02x?} (the peer does not speak rrc's replication protocol)")]
    BadMagic([u8; 2]),
    /// A length out of bounds.
    #[error("frame body of {0} bytes is outside 9..={MAX_BODY}")]
    BadLength(usize),
    /// The checksum does not match: the frame was corrupted.
    #[error("frame checksum mismatch (stored {stored:08x}, computed {computed:08x}): corrupted in transit")]
    BadChecksum {
        /// The checksum in the frame.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A payload too large to send.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")]
    TooLarge(usize),
}

/// Encodes a frame.
pub fn encode(kind: Kind, seq: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let body = BODY_FIXED + payload.len();
    let mut out = Vec::with_capacity(HEADER_LEN + body + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    // body <= MAX_BODY < u32::MAX.
    out.extend_from_slice(&u32::try_from(body).unwrap_or(u32::MAX).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Decodes the first frame in `buf`: `Ok(None)` if more bytes are needed, otherwise the frame
/// and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[..2] != MAGIC {
        return Err(FrameError::BadMagic([buf[0], buf[1]]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let body = usize::try_from(le_u32(&buf[2..6])).unwrap_or(usize::MAX);
    if !(BODY_FIXED..=MAX_BODY).contains(&body) {
        return Err(FrameError::BadLength(body));
    }
    let total = HEADER_LEN + body + TRAILER_LEN;
    if buf.len() < total {
        return Ok(None);
    }
    let stored = le_u32(&buf[HEADER_LEN + body..total]);
    let computed = crc32c::crc32c(&buf[..HEADER_LEN + body]);
    if stored != computed {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    let b = &buf[HEADER_LEN..HEADER_LEN + body];
    let kind = Kind::from_u8(b[0]).ok_or(FrameError::UnknownKind(b[0]))?;
    let seq = le_u64(&b[1..9]);
    Ok(Some((
        Frame {
            kind,
            seq,
            payload: b[BODY_FIXED..].to_vec(),
        },
        total,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Hello),
            Just(Kind::Proof),
            Just(Kind::Accept),
            Just(Kind::Reject),
            Just(Kind::Heartbeat),
            Just(Kind::Ack),
            Just(Kind::Data),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(kind in kinds(), seq: u64, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let bytes = encode(kind, seq, &payload).expect("encodes");
            let (frame, used) = decode(&bytes).expect("decodes").expect("complete");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(frame, Frame { kind, seq, payload });
        }

        #[test]
        fn every_prefix_asks_for_more(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let bytes = encode(Kind::Data, 7, &payload).expect("encodes");
            for n in 0..bytes.len() {
                prop_assert_eq!(decode(&bytes[..n]), Ok(None));
            }
        }

        #[test]
        fn any_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..256), pos: usize, bit in 0u8..8) {
            let mut bytes = encode(Kind::Data, 3, &payload).expect("encodes");
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            // Either refused, or (a flipped length) still waiting for bytes: never a wrong frame.
            match decode(&bytes) {
                Err(_) | Ok(None) => {}
                Ok(Some((f, _))) => prop_assert!(false, "corrupted frame accepted: {f:?}"),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn refusals_are_specific() {
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(FrameError::BadMagic(*b"GE"))
        );
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&big), Err(FrameError::BadLength(_))));
        let mut bytes = encode(Kind::Ack, 1, &[]).expect("encodes");
        bytes[HEADER_LEN] = 99;
        assert!(matches!(
            decode(&bytes),
            Err(FrameError::BadChecksum { .. })
        ));
        assert_eq!(
            encode(Kind::Data, 1, &vec![0; MAX_PAYLOAD + 1]),
            Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn unknown_kind_with_valid_checksum() {
        let mut bytes = encode(Kind::Ack, 1, &[]).expect("encodes");
        bytes[HEADER_LEN] = 42;
        let end = bytes.len() - TRAILER_LEN;
        let crc = crc32c::crc32c(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bytes), Err(FrameError::UnknownKind(42)));
    }
}
