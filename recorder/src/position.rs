//! The recorder's published log position: a small file both the recorder and the shim map into
//! memory.
//!
//! In hybrid mode an outgoing packet may leave once the backup holds every log byte the
//! recorder had written when the packet was produced. The recorder writes each record to its
//! output with one `write` and only then stores the output's new length here, before it
//! resumes the thread the record was about; the shim's output hold reads it when a packet
//! arrives, so a packet's tag is never smaller than the log it depends on.
//!
//! Layout (little endian, 4096 bytes, only the first 24 used):
//!
//! | offset | what |
//! |---|---|
//! | 0 | bytes of log written to the output so far |
//! | 8 | state: 0 starting, 1 attached (every thread seized and the segment open: the container may start), 2 ended |
//! | 16 | the recorder's pid |

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The file's size.
pub const FILE_LEN: usize = 4096;

/// [`SharedPosition::state`]: the recorder is still attaching.
pub const STATE_STARTING: u64 = 0;
/// [`SharedPosition::state`]: every thread is seized and the log's segment is open.
pub const STATE_ATTACHED: u64 = 1;
/// [`SharedPosition::state`]: the recording ended (every tracee is gone).
pub const STATE_ENDED: u64 = 2;

/// The mapped file.
#[derive(Debug)]
pub struct SharedPosition {
    ptr: *mut AtomicU64,
    _file: File,
}

// SAFETY: the mapping is only accessed through atomics; the pointer stays valid until drop.
unsafe impl Send for SharedPosition {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for SharedPosition {}

impl SharedPosition {
    /// Creates (or truncates) the file at `path` and maps it, every value zero.
    pub fn create(path: &Path) -> io::Result<SharedPosition> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(FILE_LEN as u64)?;
        SharedPosition::map(file)
    }

    /// Maps an existing file made by [`create`](Self::create).
    pub fn open(path: &Path) -> io::Result<SharedPosition> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len < FILE_LEN as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {len} bytes, not a recorder position file ({FILE_LEN} bytes)",
                    path.display()
                ),
            ));
        }
        SharedPosition::map(file)
    }

    fn map(file: File) -> io::Result<SharedPosition> {
        // SAFETY: maps FILE_LEN bytes of a file at least that long, shared, read-write; the
        // result is checked before use and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPosition {
            ptr: ptr.cast(),
            _file: file,
        })
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < 3);
        // SAFETY: the mapping is FILE_LEN bytes, page-aligned, so slots 0..3 (24 bytes) are in
        // bounds and 8-byte aligned; it lives as long as self; AtomicU64 has u64's layout.
        unsafe { &*self.ptr.add(i) }
    }

    /// Bytes of log written so far.
    pub fn written(&self) -> u64 {
        self.slot(0).load(Ordering::SeqCst)
    }

    /// Publishes the bytes written so far (they only grow).
    pub fn set_written(&self, n: u64) {
        self.slot(0).fetch_max(n, Ordering::SeqCst);
    }

    /// The recorder's state ([`STATE_STARTING`], [`STATE_ATTACHED`], [`STATE_ENDED`]).
    pub fn state(&self) -> u64 {
        self.slot(1).load(Ordering::SeqCst)
    }

    /// Sets the state.
    pub fn set_state(&self, state: u64) {
        self.slot(1).store(state, Ordering::SeqCst);
    }

    /// The recorder's pid (0 before it said).
    pub fn pid(&self) -> u64 {
        self.slot(2).load(Ordering::SeqCst)
    }

    /// Sets the recorder's pid.
    pub fn set_pid(&self, pid: u64) {
        self.slot(2).store(pid, Ordering::SeqCst);
    }
}

impl Drop for SharedPosition {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference outlives self.
        unsafe {
            libc::munmap(self.ptr.cast(), FILE_LEN);
        }
    }
}

/// A [`std::io::Write`] for the recorder's output: each `write` puts the whole buffer into the
/// file (a pipe to the shim) and then publishes the new total in `position`. rrc-eventlog's
/// writer hands over one record per `write_all`, so the published position is always at a
/// record boundary and covers every record written before.
#[derive(Debug)]
pub struct PublishingWriter<W: io::Write> {
    out: W,
    written: u64,
    position: std::sync::Arc<SharedPosition>,
}

impl<W: io::Write> PublishingWriter<W> {
    /// Writes to `out`, publishing in `position`.
    pub fn new(out: W, position: std::sync::Arc<SharedPosition>) -> Self {
        PublishingWriter {
            out,
            written: 0,
            position,
        }
    }
}

impl<W: io::Write> io::Write for PublishingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        self.out.flush()?;
        self.written += buf.len() as u64;
        self.position.set_written(self.written);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn two_mappings_see_the_same_values_and_writes_publish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos");
        let a = Arc::new(SharedPosition::create(&path).expect("create"));
        let b = SharedPosition::open(&path).expect("open");
        assert_eq!((b.written(), b.state(), b.pid()), (0, STATE_STARTING, 0));
        a.set_state(STATE_ATTACHED);
        a.set_pid(42);
        let mut w = PublishingWriter::new(Vec::new(), a.clone());
        w.write_all(b"0123456789").expect("write");
        w.write_all(b"abc").expect("write");
        assert_eq!(b.written(), 13);
        assert_eq!((b.state(), b.pid()), (STATE_ATTACHED, 42));
        // Positions never go back.
        a.set_written(5);
        assert_eq!(b.written(), 13);
    }

    #[test]
    fn a_short_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pos");
        std::fs::write(&path, b"short").expect("write");
        let err = SharedPosition::open(&path).expect_err("refused");
        assert!(
            err.to_string().contains("not a recorder position file"),
            "{err}"
        );
    }
}
