//! CRIU's statistics files: `stats-dump` and `stats-restore`, which CRIU writes into its work
//! directory at the end of a dump or a restore.
//!
//! There is no `crit` here, so the few fields rrc reports are decoded by hand. A CRIU "service"
//! image is `IMG_SERVICE_MAGIC` (u32 LE), the image's own magic (`STATS_MAGIC`), then one entry: a
//! u32 LE length and that many bytes of protobuf, a `StatsEntry` (CRIU's `images/stats.proto`):
//!
//! ```text
//! message stats_entry { optional dump_stats_entry dump = 1; optional restore_stats_entry restore = 2; }
//! message dump_stats_entry {
//!   required uint32 freezing_time = 1; required uint32 frozen_time = 2;     // microseconds
//!   required uint32 memdump_time = 3;  required uint32 memwrite_time = 4;   // microseconds
//!   required uint64 pages_scanned = 5; required uint64 pages_skipped_parent = 6;
//!   required uint64 pages_written = 7; ...more optional counters }
//! message restore_stats_entry {
//!   required uint64 pages_compared = 1; required uint64 pages_skipped_cow = 2;
//!   required uint32 forking_time = 3;   required uint32 restore_time = 4;  // microseconds
//!   optional uint64 pages_restored = 5; }
//! ```

use std::path::Path;
use std::time::Duration;

/// CRIU's magic for service files (stats, irmap cache), first in the file.
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// CRIU's magic of the stats image, second in the file.
pub const STATS_MAGIC: u32 = 0x5709_3306;

/// Name of the dump statistics file in CRIU's work directory.
pub const STATS_DUMP_FILE: &str = "stats-dump";
/// Name of the restore statistics file in CRIU's work directory.
pub const STATS_RESTORE_FILE: &str = "stats-restore";

/// Why a statistics file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is shorter than its header says.
    #[error("CRIU stats image truncated: {0}")]
    Truncated(&'static str),
    /// The magics are not CRIU's stats magics.
    #[error("not a CRIU stats image: magics {0:#010x} {1:#010x}")]
    BadMagic(u32, u32),
    /// The protobuf is malformed.
    #[error("malformed CRIU stats entry: {0}")]
    Malformed(&'static str),
    /// The entry has no `dump` (or no `restore`) part, or lacks a required field.
    #[error("CRIU stats entry has no {0}")]
    Missing(&'static str),
}

/// What CRIU measured during a dump (from `stats-dump`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpStats {
    /// From the start of freezing until every task was frozen. With the cgroup v1 freezer CRIU
    /// polls `freezer.state` every 100 ms, so this is either well under a millisecond (every task
    /// was already in a freezable sleep) or about 100 ms, during which the tasks are frozen.
    pub freezing: Duration,
    /// From the end of freezing until the tasks run again (or are killed).
    pub frozen: Duration,
    /// Time spent collecting memory pages (inside `frozen`).
    pub memdump: Duration,
    /// Time spent writing memory pages (inside `frozen`).
    pub memwrite: Duration,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Pages skipped because a parent image had them (pre-dump chains only).
    pub pages_skipped_parent: u64,
    /// Pages written to the image.
    pub pages_written: u64,
}

impl DumpStats {
    /// An upper bound of how long the container was stopped: `freezing + frozen` (the tasks stop
    /// within microseconds of the start of freezing, and CRIU may then sleep up to 100 ms before
    /// it notices).
    pub fn paused(&self) -> Duration {
        self.freezing + self.frozen
    }
}

/// What CRIU measured during a restore (from `stats-restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages compared (auto-dedup).
    pub pages_compared: u64,
    /// Pages skipped because they were shared copy-on-write.
    pub pages_skipped_cow: u64,
    /// Time spent forking the task tree.
    pub forking: Duration,
    /// Time spent restoring.
    pub restore: Duration,
    /// Pages restored, if CRIU recorded it.
    pub pages_restored: Option<u64>,
}

/// Reads and decodes a `stats-dump` file.
pub fn read_dump_stats(path: &Path) -> Result<DumpStats, StatsError> {
    decode_dump_stats(&read(path)?)
}

/// Reads and decodes a `stats-restore` file.
pub fn read_restore_stats(path: &Path) -> Result<RestoreStats, StatsError> {
    decode_restore_stats(&read(path)?)
}

fn read(path: &Path) -> Result<Vec<u8>, StatsError> {
    std::fs::read(path).map_err(|source| StatsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Decodes the bytes of a `stats-dump` file.
pub fn decode_dump_stats(file: &[u8]) -> Result<DumpStats, StatsError> {
    let dump = sub_message(entry(file)?, 1)?.ok_or(StatsError::Missing("dump part"))?;
    let f = Fields::parse(dump)?;
    Ok(DumpStats {
        freezing: f.micros(1, "freezing_time")?,
        frozen: f.micros(2, "frozen_time")?,
        memdump: f.micros(3, "memdump_time")?,
        memwrite: f.micros(4, "memwrite_time")?,
        pages_scanned: f.required(5, "pages_scanned")?,
        pages_skipped_parent: f.required(6, "pages_skipped_parent")?,
        pages_written: f.required(7, "pages_written")?,
    })
}

/// Decodes the bytes of a `stats-restore` file.
pub fn decode_restore_stats(file: &[u8]) -> Result<RestoreStats, StatsError> {
    let restore = sub_message(entry(file)?, 2)?.ok_or(StatsError::Missing("restore part"))?;
    let f = Fields::parse(restore)?;
    Ok(RestoreStats {
        pages_compared: f.required(1, "pages_compared")?,
        pages_skipped_cow: f.required(2, "pages_skipped_cow")?,
        forking: f.micros(3, "forking_time")?,
        restore: f.micros(4, "restore_time")?,
        pages_restored: f.get(5),
    })
}

/// The protobuf bytes of the file's single entry, after checking the header.
fn entry(file: &[u8]) -> Result<&[u8], StatsError> {
    let word = |at: usize| -> Result<u32, StatsError> {
        file.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or(StatsError::Truncated("header"))
    };
    let (m1, m2) = (word(0)?, word(4)?);
    if m1 != IMG_SERVICE_MAGIC || m2 != STATS_MAGIC {
        return Err(StatsError::BadMagic(m1, m2));
    }
    let len = usize::try_from(word(8)?).map_err(|_| StatsError::Malformed("entry length"))?;
    file.get(12..12 + len)
        .ok_or(StatsError::Truncated("entry shorter than its length"))
}

/// The last length-delimited field `number` of `msg`, if any.
fn sub_message(msg: &[u8], number: u64) -> Result<Option<&[u8]>, StatsError> {
    let mut found = None;
    let mut r = Reader { buf: msg, pos: 0 };
    while !r.done() {
        let key = r.varint()?;
        match (key >> 3, key & 7) {
            (n, 2) => {
                let bytes = r.bytes()?;
                if n == number {
                    found = Some(bytes);
                }
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(found)
}

/// The varint fields of a message (the only scalar kind in CRIU's stats), by field number.
struct Fields(Vec<(u64, u64)>);

impl Fields {
    fn parse(msg: &[u8]) -> Result<Fields, StatsError> {
        let mut out = Vec::new();
        let mut r = Reader { buf: msg, pos: 0 };
        while !r.done() {
            let key = r.varint()?;
            match key & 7 {
                0 => out.push((key >> 3, r.varint()?)),
                wire => r.skip(wire)?,
            }
        }
        Ok(Fields(out))
    }

    /// The last value of field `n` (protobuf: the last one wins).
    fn get(&self, n: u64) -> Option<u64> {
        self.0.iter().rev().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    fn required(&self, n: u64, name: &'static str) -> Result<u64, StatsError> {
        self.get(n).ok_or(StatsError::Missing(name))
    }

    fn micros(&self, n: u64, name: &'static str) -> Result<Duration, StatsError> {
        self.required(n, name).map(Duration::from_micros)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn byte(&mut self) -> Result<u8, StatsError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(StatsError::Malformed("truncated field"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, StatsError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StatsError::Malformed("varint longer than 10 bytes"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StatsError> {
        let len = usize::try_from(self.varint()?).map_err(|_| StatsError::Malformed("length"))?;
        let end = self
            .pos
            .checked_add(len)
            .ok_or(StatsError::Malformed("length"))?;
        let b = self
            .buf
            .get(self.pos..end)
            .ok_or(StatsError::Malformed("field longer than its message"))?;
        self.pos = end;
        Ok(b)
    }

    fn skip(&mut self, wire: u64) -> Result<(), StatsError> {
        let n = match wire {
            0 => return self.varint().map(|_| ()),
            1 => 8,
            2 => return self.bytes().map(|_| ()),
            5 => 4,
            _ => return Err(StatsError::Malformed("unknown wire type")),
        };
        self.pos = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(StatsError::Malformed("truncated fixed-size field"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from CRIU 4.2.1 after `runc checkpoint --leave-running --tcp-established` of an
    /// idle redis 7.0 container (Linux 6.18, cgroup v1).
    const REAL_DUMP: &[u8] = include_bytes!("testdata/stats-dump");
    /// Captured from CRIU 4.2.1 after `runc restore --detach` of that redis.
    const REAL_RESTORE: &[u8] = include_bytes!("testdata/stats-restore");

    #[test]
    fn decodes_a_real_stats_dump() {
        let s = decode_dump_stats(REAL_DUMP).expect("decodes");
        assert_eq!(
            s,
            DumpStats {
                freezing: Duration::from_micros(570),
                frozen: Duration::from_micros(59_100),
                memdump: Duration::from_micros(3_034),
                memwrite: Duration::from_micros(1_487),
                pages_scanned: 726,
                pages_skipped_parent: 0,
                pages_written: 609,
            }
        );
        assert_eq!(s.paused(), Duration::from_micros(59_670));
    }

    #[test]
    fn decodes_a_real_stats_restore() {
        let s = decode_restore_stats(REAL_RESTORE).expect("decodes");
        assert_eq!(
            s,
            RestoreStats {
                pages_compared: 0,
                pages_skipped_cow: 0,
                forking: Duration::from_micros(2),
                restore: Duration::from_micros(160_371),
                pages_restored: Some(616),
            }
        );
        // A dump file has no restore part, and the other way round.
        assert!(matches!(
            decode_restore_stats(REAL_DUMP),
            Err(StatsError::Missing(_))
        ));
        assert!(matches!(
            decode_dump_stats(REAL_RESTORE),
            Err(StatsError::Missing(_))
        ));
    }

    #[test]
    fn refuses_damaged_files() {
        assert!(matches!(
            decode_dump_stats(&REAL_DUMP[..6]),
            Err(StatsError::Truncated(_))
        ));
        assert!(matches!(
            decode_dump_stats(&REAL_DUMP[..REAL_DUMP.len() - 1]),
            Err(StatsError::Truncated(_))
        ));
        let mut bad = REAL_DUMP.to_vec();
        bad[4] ^= 1;
        assert!(matches!(
            decode_dump_stats(&bad),
            Err(StatsError::BadMagic(_, _))
        ));
        // An entry whose inner length runs past its end.
        let mut bad = REAL_DUMP.to_vec();
        bad[13] = 0x7f;
        assert!(matches!(
            decode_dump_stats(&bad),
            Err(StatsError::Malformed(_))
        ));
        // A varint that never ends.
        let mut file = REAL_DUMP[..12].to_vec();
        file[8..12].copy_from_slice(&11u32.to_le_bytes());
        file.extend_from_slice(&[0x08; 1]);
        file.extend_from_slice(&[0xff; 10]);
        assert!(matches!(
            decode_dump_stats(&file),
            Err(StatsError::Malformed(_))
        ));
    }

    #[test]
    fn skips_unknown_fields() {
        // dump { freezing=1 frozen=2 memdump=3 memwrite=4 scanned=5 skipped=6 written=7,
        //        field 15 fixed64, field 16 bytes, field 17 fixed32 }
        let mut dump = vec![
            0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4, 0x28, 5, 0x30, 6, 0x38, 7,
        ];
        dump.extend_from_slice(&[0x79, 1, 2, 3, 4, 5, 6, 7, 8]);
        dump.extend_from_slice(&[0x82, 0x01, 2, 0xaa, 0xbb]);
        dump.extend_from_slice(&[0x8d, 0x01, 1, 2, 3, 4]);
        let mut entry = vec![0x0a, u8::try_from(dump.len()).expect("small")];
        entry.extend_from_slice(&dump);
        let mut file = Vec::new();
        file.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        file.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        file.extend_from_slice(&u32::try_from(entry.len()).expect("small").to_le_bytes());
        file.extend_from_slice(&entry);
        let s = decode_dump_stats(&file).expect("decodes");
        assert_eq!(s.frozen, Duration::from_micros(2));
        assert_eq!(s.pages_written, 7);
    }
}
