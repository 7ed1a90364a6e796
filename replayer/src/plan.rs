//! What to replay: the records of a log from a segment start on, indexed by sequence number
//! and by thread.

use std::collections::{BTreeMap, HashMap, VecDeque};

use rrc_eventlog::{Event, EventLogError, EventRecord, Reader, Record, SegmentStart, Thread};

/// Why a log cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The log does not decode (truncated, corrupt, a gap in its numbering).
    #[error("the log does not decode: {0}")]
    Decode(#[from] EventLogError),
    /// No segment starts where replay should start.
    #[error("no segment of the log starts at record #{0} (replay starts at a checkpoint's cut)")]
    NoSegment(u64),
    /// The log holds no segment at all.
    #[error("the log is empty")]
    Empty,
}

/// The records to replay, from a segment start on.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The segment replay starts at: its base and the threads alive there.
    pub start: SegmentStart,
    records: BTreeMap<u64, EventRecord>,
    per_thread: HashMap<Thread, VecDeque<u64>>,
    last: u64,
}

impl Plan {
    /// The plan of the finished log `bytes`, from the segment starting at `from_seq` (the cut
    /// of the checkpoint restored), or from the first segment.
    pub fn from_log(bytes: &[u8], from_seq: Option<u64>) -> Result<Plan, PlanError> {
        let records = Reader::new(bytes).read_all()?;
        Plan::from_records(records, from_seq)
    }

    /// The plan of decoded records (see [`Plan::from_log`]).
    pub fn from_records(records: Vec<Record>, from_seq: Option<u64>) -> Result<Plan, PlanError> {
        let mut start = None;
        let mut out = BTreeMap::new();
        let mut per_thread: HashMap<Thread, VecDeque<u64>> = HashMap::new();
        for r in records {
            match r {
                Record::SegmentStart(s) => {
                    if start.is_none() && from_seq.is_none_or(|f| f == s.base_seq) {
                        start = Some(s);
                    }
                }
                Record::SegmentEnd(_) => {}
                Record::Event(e) if start.is_some() => {
                    if e.thread != Thread::NONE {
                        per_thread.entry(e.thread).or_default().push_back(e.seq);
                    }
                    out.insert(e.seq, e);
                }
                Record::Event(_) => {}
            }
        }
        let start = match (start, from_seq) {
            (Some(s), _) => s,
            (None, Some(f)) => return Err(PlanError::NoSegment(f)),
            (None, None) => return Err(PlanError::Empty),
        };
        let last = out
            .keys()
            .next_back()
            .copied()
            .unwrap_or(start.base_seq.saturating_sub(1));
        Ok(Plan {
            start,
            records: out,
            per_thread,
            last,
        })
    }

    /// The record numbered `seq`.
    pub fn record(&self, seq: u64) -> Option<&EventRecord> {
        self.records.get(&seq)
    }

    /// The number of the last record.
    pub fn last_seq(&self) -> u64 {
        self.last
    }

    /// The sequence number of `thread`'s next record not yet taken.
    pub fn next_of(&self, thread: Thread) -> Option<u64> {
        self.per_thread
            .get(&thread)
            .and_then(|q| q.front().copied())
    }

    /// Takes `thread`'s next record (it must be `seq`).
    pub fn take(&mut self, thread: Thread, seq: u64) {
        if let Some(q) = self.per_thread.get_mut(&thread) {
            if q.front() == Some(&seq) {
                q.pop_front();
            }
        }
    }

    /// How many records the plan holds, by kind.
    pub fn kinds(&self) -> BTreeMap<&'static str, u64> {
        let mut k = BTreeMap::new();
        for r in self.records.values() {
            *k.entry(r.event.kind_name()).or_default() += 1;
        }
        k
    }
}

/// Whether a record belongs to no thread's execution (nothing to do at replay in a fresh
/// process: ingress packets rebuild TCP state on failover, which is not built yet; gap and
/// unrecordable reports are counted).
pub fn is_passive(e: &Event) -> bool {
    matches!(
        e,
        Event::IngressPacket { .. } | Event::Unrecordable { .. } | Event::Gap { .. }
    )
}
