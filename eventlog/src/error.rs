//! The crate's one error type.

use std::sync::Arc;

use crate::wire::{MAGIC, MAX_RECORD};

/// Everything that can go wrong writing or reading a log. Offsets are byte offsets from the
/// start of the input (a [`crate::Reader`]'s slice, or everything pushed into a
/// [`crate::Decoder`]) of the header or record at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EventLogError {
    /// The input does not start with a segment header where one is due.
    #[error(
        "not an rrc event log at byte {offset}: found {found:02x?}, expected the magic {MAGIC:?} \
         of a segment header"
    )]
    BadMagic {
        /// Where the header should be.
        offset: u64,
        /// The bytes found there (up to the magic's length).
        found: Vec<u8>,
    },
    /// A segment header of a format version this build does not read.
    #[error(
        "event log segment at byte {offset} has format version {found}; this build reads \
         versions {} to {supported}: run the same rrc version on primary and backup (or the \
         header is corrupt)",
        crate::wire::MIN_VERSION
    )]
    UnknownVersion {
        /// The header.
        offset: u64,
        /// The version it declares.
        found: u16,
        /// The newest version this build reads (it writes it too).
        supported: u16,
    },
    /// A finished input ends inside a header or a record (a log cut short: the writer died
    /// mid-record, or the file was truncated). A stream that may still grow is not truncated:
    /// its reader asks for more bytes instead.
    #[error(
        "event log truncated: the input ends inside the header or record at byte {offset}; the \
         records before it are intact"
    )]
    Truncated {
        /// The incomplete header or record.
        offset: u64,
    },
    /// A record declares a length over the limit.
    #[error(
        "record at byte {offset} declares {len} bytes, over the {MAX_RECORD}-byte limit: the \
         log is corrupt"
    )]
    TooLarge {
        /// The record.
        offset: u64,
        /// The length it declares.
        len: u64,
    },
    /// A checksum mismatch: the bytes were damaged after they were written.
    #[error(
        "checksum mismatch at byte {offset} (stored {expected:08x}, computed {found:08x}): the \
         log is corrupt from here on"
    )]
    Corrupt {
        /// The header or record.
        offset: u64,
        /// The CRC-32C stored with it.
        expected: u32,
        /// The CRC-32C of the bytes read.
        found: u32,
    },
    /// A record whose checksum is good but whose body does not decode (unknown kind, bad
    /// varint, out-of-range value, trailing bytes): written by a buggy or different encoder.
    #[error("malformed record at byte {offset}: {what}")]
    Malformed {
        /// The record.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// An event record whose sequence number is not the next one (a gap, a duplicate or a
    /// reordering), or a segment that does not continue where the previous one ended.
    #[error(
        "sequence gap at byte {offset}: expected sequence number {expected}, found {found}: \
         records are missing or out of order"
    )]
    Gap {
        /// The record.
        offset: u64,
        /// The sequence number due.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
    /// A well-formed record where it cannot be (an event outside a segment, a segment start
    /// inside an open segment).
    #[error("record out of place at byte {offset}: {what}")]
    OutOfPlace {
        /// The record.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// The writer was asked to write something the format cannot carry.
    #[error("cannot encode: {0}")]
    Unencodable(String),
    /// The writer's output failed.
    #[error("writing the event log: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// The writer's output failed earlier: it may hold a partial record, so nothing more is
    /// written.
    #[error(
        "the event log writer failed earlier and may have left a partial record; start a new log"
    )]
    WriterFailed,
}

impl From<std::io::Error> for EventLogError {
    fn from(e: std::io::Error) -> Self {
        EventLogError::Io(Arc::new(e))
    }
}
