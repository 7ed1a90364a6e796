//! Log positions: what a backup acknowledges, and where a checkpoint cuts the log.
//!
//! The backup acknowledges a cumulative [`Position`]: "I hold every event record up to this
//! sequence number". The primary releases an output once the position that was current when the
//! output was produced is acknowledged. A checkpoint is taken between two records; its
//! [`CheckpointCut`] is the first sequence number it does not contain. Once the backup has
//! committed that checkpoint, both sides may discard every record before the cut: replay starts
//! from the checkpoint and needs only the records from the cut on.

use std::fmt;

use crate::reader::segments;
use crate::EventLogError;

/// A place in a container's log: every event record with a sequence number up to and including
/// [`Position::seq`]. Sequence numbers start at 1, so [`Position::NONE`] (0) is "nothing".
///
/// Positions are cumulative and totally ordered: a larger position covers a smaller one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(u64);

impl Position {
    /// Before any record.
    pub const NONE: Position = Position(0);

    /// The position of the event record numbered `seq` (it and everything before it).
    pub const fn new(seq: u64) -> Position {
        Position(seq)
    }

    /// The position just before the record numbered `seq` (everything before it).
    pub const fn before(seq: u64) -> Position {
        Position(seq.saturating_sub(1))
    }

    /// The sequence number of the last record covered (0 for [`Position::NONE`]).
    pub const fn seq(self) -> u64 {
        self.0
    }

    /// The sequence number of the first record not covered.
    pub const fn next_seq(self) -> u64 {
        self.0.saturating_add(1)
    }

    /// Whether the record numbered `seq` is covered.
    pub const fn covers(self, seq: u64) -> bool {
        seq <= self.0
    }

    /// The acknowledgement's bytes (u64, little endian), as the backup sends them.
    pub const fn to_le_bytes(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }

    /// A position from an acknowledgement's bytes.
    pub const fn from_le_bytes(b: [u8; 8]) -> Position {
        Position(u64::from_le_bytes(b))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a checkpoint cuts the log: it contains the effects of every record before
/// [`CheckpointCut::first_seq`] and of none from it on.
///
/// The recorder takes the cut from [`crate::Writer::next_seq`] while the container is paused
/// for the checkpoint, and opens a new segment there ([`crate::Writer::rotate`]), so that
/// segment boundaries and cuts coincide and discarding is a matter of dropping whole segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointCut {
    first_seq: u64,
}

impl CheckpointCut {
    /// The cut before the record numbered `first_seq`.
    pub const fn at(first_seq: u64) -> CheckpointCut {
        CheckpointCut { first_seq }
    }

    /// The first sequence number the checkpoint does not contain: replay starts there.
    pub const fn first_seq(self) -> u64 {
        self.first_seq
    }

    /// The position the checkpoint covers (everything before the cut).
    pub const fn covers(self) -> Position {
        Position::before(self.first_seq)
    }

    /// Whether the record numbered `seq` may be discarded once the checkpoint is committed
    /// (it is before the cut).
    pub const fn discards(self, seq: u64) -> bool {
        seq < self.first_seq
    }

    /// In a stored log (a finished input of whole segments), the byte offset of the first
    /// segment still needed: every byte before it may be dropped once the checkpoint is
    /// committed. A segment that straddles the cut is kept whole (replay skips its records
    /// before the cut); an open segment is always kept. `log.len()` if nothing is needed.
    pub fn keep_from(self, log: &[u8]) -> Result<usize, EventLogError> {
        for s in segments(log)? {
            match s.next_seq {
                Some(end) if end <= self.first_seq => {}
                _ => return Ok(s.range.start),
            }
        }
        Ok(log.len())
    }
}

impl fmt::Display for CheckpointCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cut before #{}", self.first_seq)
    }
}
