//! Writing a log: [`Writer`] numbers the events, frames them and appends them to any
//! [`std::io::Write`] (a `Vec<u8>` for a buffer the recorder ships in pieces).

use std::io::Write;

use crate::event::{Event, Record, SegmentEnd, SegmentStart, Thread};
use crate::position::{CheckpointCut, Position};
use crate::wire::{encode_event, encode_header, encode_record};
use crate::EventLogError;

/// Appends a container's log to `W`, numbering events densely from the first segment's base.
///
/// Each call encodes into a scratch buffer and hands `W` one `write_all`, so `W` sees only
/// whole headers and records. If `W` fails, the writer is finished: `W` may hold part of a
/// record, and every later call returns [`EventLogError::WriterFailed`]. Encoding errors (a
/// record over the size limit, too many arguments) write nothing and leave the writer usable.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    container_id: String,
    epoch: u64,
    next_seq: u64,
    open: bool,
    failed: bool,
    written: u64,
    scratch: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Starts a log on `out`: writes a segment header and `start`. Events are numbered from
    /// `start.base_seq`.
    pub fn new(out: W, start: SegmentStart) -> Result<Writer<W>, EventLogError> {
        let mut w = Writer {
            out,
            container_id: start.container_id.clone(),
            epoch: start.epoch,
            next_seq: start.base_seq,
            open: false,
            failed: false,
            written: 0,
            scratch: Vec::new(),
        };
        w.open_segment(start)?;
        Ok(w)
    }

    /// Appends an event of `thread` and returns its sequence number.
    pub fn append(
        &mut self,
        thread: Thread,
        interval_ns: u64,
        event: &Event,
    ) -> Result<u64, EventLogError> {
        self.usable()?;
        if !self.open {
            return Err(EventLogError::Unencodable(
                "no segment is open: start one before appending events".into(),
            ));
        }
        let seq = self.next_seq;
        self.scratch.clear();
        encode_event(seq, thread, interval_ns, event, &mut self.scratch)?;
        self.emit()?;
        self.next_seq = seq + 1;
        Ok(seq)
    }

    /// Closes the open segment (a [`SegmentEnd`]). The log is then complete; another segment
    /// may follow.
    pub fn end_segment(&mut self) -> Result<(), EventLogError> {
        self.usable()?;
        if !self.open {
            return Err(EventLogError::Unencodable(
                "no segment is open to end".into(),
            ));
        }
        self.scratch.clear();
        encode_record(
            &Record::SegmentEnd(SegmentEnd {
                next_seq: self.next_seq,
            }),
            &mut self.scratch,
        )?;
        self.emit()?;
        self.open = false;
        Ok(())
    }

    /// Opens a segment at [`Writer::next_seq`] (a header and a [`SegmentStart`]) for `epoch`,
    /// with the threads alive now.
    pub fn start_segment(&mut self, epoch: u64, live: Vec<Thread>) -> Result<(), EventLogError> {
        self.usable()?;
        if self.open {
            return Err(EventLogError::Unencodable(
                "a segment is already open: end it first".into(),
            ));
        }
        self.open_segment(SegmentStart {
            base_seq: self.next_seq,
            epoch,
            container_id: self.container_id.clone(),
            live,
        })
    }

    /// At a checkpoint: ends the open segment, starts the next one for `epoch` with the threads
    /// alive now, and returns the checkpoint's cut (the new segment's base).
    pub fn rotate(
        &mut self,
        epoch: u64,
        live: Vec<Thread>,
    ) -> Result<CheckpointCut, EventLogError> {
        if self.open {
            self.end_segment()?;
        }
        self.start_segment(epoch, live)?;
        Ok(CheckpointCut::at(self.next_seq))
    }

    /// Ends the open segment, if any, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, EventLogError> {
        if self.open {
            self.end_segment()?;
        }
        self.usable()?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// The sequence number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The position of the last event appended (just before the first segment's base if none).
    pub fn position(&self) -> Position {
        Position::before(self.next_seq)
    }

    /// The epoch of the current (or last) segment.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a segment is open.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Bytes written to the output so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The output.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The output, mutably (for instance to take the bytes out of a `Vec<u8>` after each
    /// batch: the writer keeps no offset into it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// The output, without ending the open segment.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn open_segment(&mut self, start: SegmentStart) -> Result<(), EventLogError> {
        let (epoch, base_seq) = (start.epoch, start.base_seq);
        self.scratch.clear();
        encode_header(&mut self.scratch);
        encode_record(&Record::SegmentStart(start), &mut self.scratch)?;
        self.emit()?;
        self.epoch = epoch;
        self.next_seq = base_seq;
        self.open = true;
        Ok(())
    }

    fn usable(&self) -> Result<(), EventLogError> {
        if self.failed {
            Err(EventLogError::WriterFailed)
        } else {
            Ok(())
        }
    }

    fn emit(&mut self) -> Result<(), EventLogError> {
        if let Err(e) = self.out.write_all(&self.scratch) {
            self.failed = true;
            return Err(e.into());
        }
        self.written += self.scratch.len() as u64;
        Ok(())
    }
}
