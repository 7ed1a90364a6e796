//! Reading a log: [`Reader`] over a finished input (a file), [`Decoder`] over a stream that
//! arrives in pieces (the replication channel), and [`segments`] to find segment boundaries.
//!
//! Both readers check the structure as they go: a header before each segment, a segment start
//! right after it, event sequence numbers dense from the segment's base, a segment end that
//! agrees with them, and each segment continuing where the previous one ended. The first error
//! is final: asking again returns it again.

use std::ops::Range;

use crate::event::{Record, SegmentStart};
use crate::position::Position;
use crate::wire::{decode_header_at, decode_record_at};
use crate::EventLogError;

/// What comes next in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A segment header (at the start, or after a segment end).
    Header,
    /// The segment start that follows a header.
    Start,
    /// Event records of an open segment (or its end), the next one numbered `next_seq`.
    Event { next_seq: u64 },
}

/// The structure check shared by [`Reader`] and [`Decoder`].
#[derive(Debug, Clone)]
struct Parser {
    expect: Expect,
    /// Where the previous segment ended (its `next_seq`), if one did.
    ended_at: Option<u64>,
    position: Position,
}

/// One step of the parser: a header (no record) or a record, and the bytes it used.
type Step = Option<(Option<Record>, usize)>;

impl Parser {
    fn new() -> Parser {
        Parser {
            expect: Expect::Header,
            ended_at: None,
            position: Position::NONE,
        }
    }

    /// Whether the input may end here without being truncated.
    fn at_boundary(&self) -> bool {
        self.expect != Expect::Start
    }

    /// Parses what starts `buf`, which is at offset `at` of the input.
    fn step(&mut self, buf: &[u8], at: u64) -> Result<Step, EventLogError> {
        let next_seq = match self.expect {
            Expect::Header => {
                return Ok(decode_header_at(buf, at)?.map(|used| {
                    self.expect = Expect::Start;
                    (None, used)
                }));
            }
            Expect::Start => None,
            Expect::Event { next_seq } => Some(next_seq),
        };
        let Some((record, used)) = decode_record_at(buf, at)? else {
            return Ok(None);
        };
        let out_of_place = |what| Err(EventLogError::OutOfPlace { offset: at, what });
        let gap = |expected, found| {
            Err(EventLogError::Gap {
                offset: at,
                expected,
                found,
            })
        };
        match (&record, next_seq) {
            (Record::SegmentStart(s), None) => {
                match self.ended_at {
                    Some(end) if s.base_seq != end => return gap(end, s.base_seq),
                    _ => {}
                }
                self.expect = Expect::Event {
                    next_seq: s.base_seq,
                };
                self.position = Position::before(s.base_seq);
            }
            (_, None) => {
                return out_of_place("a segment header must be followed by a segment start")
            }
            (Record::Event(e), Some(next_seq)) => {
                if e.seq != next_seq {
                    return gap(next_seq, e.seq);
                }
                // The decoder refuses seq == u64::MAX, so this does not saturate.
                self.expect = Expect::Event {
                    next_seq: e.seq.saturating_add(1),
                };
                self.position = Position::new(e.seq);
            }
            (Record::SegmentEnd(end), Some(next_seq)) => {
                if end.next_seq != next_seq {
                    return gap(next_seq, end.next_seq);
                }
                self.expect = Expect::Header;
                self.ended_at = Some(next_seq);
            }
            (Record::SegmentStart(_), Some(_)) => {
                return out_of_place(
                    "segment start inside an open segment (the previous segment has no end)",
                )
            }
        }
        Ok(Some((Some(record), used)))
    }
}

/// Reads a finished input: a log file, or the bytes a backup stored.
///
/// The input is a sequence of segments; the last one may be open (no segment end). The input
/// may be empty. An input that ends inside a header or record, or between a header and its
/// segment start, is [`EventLogError::Truncated`].
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    parser: Parser,
    failed: Option<EventLogError>,
}

impl<'a> Reader<'a> {
    /// A reader of `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            parser: Parser::new(),
            failed: None,
        }
    }

    /// The next record: `Ok(None)` at the end of the input.
    #[allow(clippy::should_implement_trait)] // Fallible: an iterator of results reads worse here.
    pub fn next(&mut self) -> Result<Option<Record>, EventLogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            if self.pos == self.buf.len() {
                if self.parser.at_boundary() {
                    return Ok(None);
                }
                return self.fail(EventLogError::Truncated {
                    offset: self.offset_of_unfinished(),
                });
            }
            let at = self.pos as u64;
            match self.parser.step(&self.buf[self.pos..], at) {
                Ok(Some((record, used))) => {
                    self.pos += used;
                    if record.is_some() {
                        return Ok(record);
                    }
                }
                Ok(None) => return self.fail(EventLogError::Truncated { offset: at }),
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Reads everything left.
    pub fn read_all(mut self) -> Result<Vec<Record>, EventLogError> {
        let mut out = Vec::new();
        while let Some(r) = self.next()? {
            out.push(r);
        }
        Ok(out)
    }

    /// The offset of the next byte to read.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// The position of the last event record read: its sequence number, or right after a
    /// segment start the position just before the segment's base ([`Position::NONE`] before
    /// any segment).
    pub fn position(&self) -> Position {
        self.parser.position
    }

    fn offset_of_unfinished(&self) -> u64 {
        // Only a header without its segment start ends here: point at the header.
        self.pos.saturating_sub(crate::wire::HEADER_LEN) as u64
    }

    fn fail<T>(&mut self, e: EventLogError) -> Result<T, EventLogError> {
        self.failed = Some(e.clone());
        Err(e)
    }
}

/// Decodes a stream that arrives in pieces of any size (the log as the backup receives it).
///
/// [`Decoder::push`] the bytes as they come, then call [`Decoder::next`] until it returns
/// `Ok(None)` ("need more bytes"). When the stream is over, [`Decoder::finish`] says whether
/// it ended cleanly or was cut inside a record.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    parser: Parser,
    failed: Option<EventLogError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder at the start of a stream (which begins with a segment header).
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            base: 0,
            parser: Parser::new(),
            failed: None,
        }
    }

    /// Adds bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete record, or `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)] // `None` means "not yet", not "never": no iterator.
    pub fn next(&mut self) -> Result<Option<Record>, EventLogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            let at = self.base + self.start as u64;
            match self.parser.step(&self.buf[self.start..], at) {
                Ok(Some((record, used))) => {
                    self.start += used;
                    if record.is_some() {
                        return Ok(record);
                    }
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// Ends the stream: `Ok(())` if it ended between records (all of them returned by
    /// [`Decoder::next`]), [`EventLogError::Truncated`] if it ended inside one.
    pub fn finish(&self) -> Result<(), EventLogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.start == self.buf.len() && self.parser.at_boundary() {
            return Ok(());
        }
        let mut offset = self.base + self.start as u64;
        if self.start == self.buf.len() {
            offset = offset.saturating_sub(crate::wire::HEADER_LEN as u64);
        }
        Err(EventLogError::Truncated { offset })
    }

    /// Bytes of the stream decoded so far (the offset of the first byte not yet used).
    pub fn offset(&self) -> u64 {
        self.base + self.start as u64
    }

    /// Bytes received but not yet decoded (part of a record).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The position a receiver can acknowledge once it has stored what was decoded: the
    /// sequence number of the last event record returned, or right after a segment start the
    /// position just before the segment's base ([`Position::NONE`] before any segment).
    pub fn position(&self) -> Position {
        self.parser.position
    }
}

/// Where one segment lies in a finished input, as found by [`segments`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpan {
    /// Its bytes, from its header to the end of its segment end (or of the input, if open).
    pub range: Range<usize>,
    /// Its segment start.
    pub start: SegmentStart,
    /// The sequence number after its last event; `None` if the segment is still open.
    pub next_seq: Option<u64>,
}

/// Decodes a finished input and returns its segments, in order.
pub fn segments(buf: &[u8]) -> Result<Vec<SegmentSpan>, EventLogError> {
    let mut reader = Reader::new(buf);
    let mut out: Vec<SegmentSpan> = Vec::new();
    let mut at = 0;
    while let Some(record) = reader.next()? {
        match record {
            Record::SegmentStart(start) => out.push(SegmentSpan {
                range: at..reader.offset(),
                start,
                next_seq: None,
            }),
            Record::SegmentEnd(end) => {
                if let Some(s) = out.last_mut() {
                    s.next_seq = Some(end.next_seq);
                }
            }
            Record::Event(_) => {}
        }
        if let Some(s) = out.last_mut() {
            s.range.end = reader.offset();
        }
        at = reader.offset();
    }
    Ok(out)
}
