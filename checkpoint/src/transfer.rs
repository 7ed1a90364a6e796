//! Moving a checkpoint (a directory of CRIU image files) from primary to backup, and committing
//! it there atomically.
//!
//! The sender turns an image directory into a sequence of [`Piece`]s: `Begin` (epoch, file
//! count), for each file `File` (name, size) then its bytes in `Chunk`s, and `End` (epoch,
//! SHA-256 over every name, size and byte in order). The receiver ([`Store`]) writes the pieces
//! into a staging directory and, only when `End` arrives and the digest, file count and sizes all
//! match, syncs it and swaps it in as the committed checkpoint in one `rename`. A transfer cut
//! short, reordered or corrupted never replaces the committed checkpoint: the last committed one
//! stays until the next commits.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Largest chunk of file bytes in one piece.
pub const CHUNK: usize = 1024 * 1024;

/// Errors of checkpoint transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading or writing files failed.
    #[error("{what} {path}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A piece that cannot be decoded.
    #[error("malformed checkpoint piece: {0}")]
    Malformed(String),
    /// Pieces out of order or not matching what was announced.
    #[error("checkpoint transfer out of order: {0}")]
    Sequence(String),
    /// The received checkpoint is not what the sender had.
    #[error("checkpoint of epoch {epoch} is corrupt: {problem}; the previous checkpoint stays committed")]
    Corrupt {
        /// The epoch.
        epoch: u64,
        /// What does not match.
        problem: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TransferError + 'a {
    move |err| TransferError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// One piece of a checkpoint on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A checkpoint starts.
    Begin {
        /// Its epoch.
        epoch: u64,
        /// How many files follow.
        files: u32,
    },
    /// A file starts.
    File {
        /// Its name (no directories).
        name: String,
        /// Its size.
        size: u64,
    },
    /// Bytes of the current file.
    Chunk(Vec<u8>),
    /// The checkpoint ends.
    End {
        /// Its epoch.
        epoch: u64,
        /// SHA-256 over every name, size and byte, in order.
        digest: [u8; 32],
    },
}

impl Piece {
    /// Encodes: a tag byte, then the fields (integers little endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Piece::Begin { epoch, files } => {
                v.push(1);
                v.extend_from_slice(&epoch.to_le_bytes());
                v.extend_from_slice(&files.to_le_bytes());
            }
            Piece::File { name, size } => {
                v.push(2);
                v.extend_from_slice(&size.to_le_bytes());
                v.extend_from_slice(name.as_bytes());
            }
            Piece::Chunk(bytes) => {
                v.push(3);
                v.extend_from_slice(bytes);
            }
            Piece::End { epoch, digest } => {
                v.push(4);
                v.extend_from_slice(&epoch.to_le_bytes());
                v.extend_from_slice(digest);
            }
        }
        v
    }

    /// Decodes a piece; refuses anything malformed.
    pub fn decode(b: &[u8]) -> Result<Piece, TransferError> {
        let bad = |m: &str| TransferError::Malformed(m.to_string());
        let (&tag, rest) = b.split_first().ok_or_else(|| bad("empty piece"))?;
        let u64_at = |s: &[u8]| -> Result<u64, TransferError> {
            s.get(..8)
                .and_then(|x| x.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| bad("short integer"))
        };
        match tag {
            1 => {
                if rest.len() != 12 {
                    return Err(bad("begin must be 12 bytes"));
                }
                let files = rest[8..12]
                    .try_into()
                    .map(u32::from_le_bytes)
                    .map_err(|_| bad("short file count"))?;
                Ok(Piece::Begin {
                    epoch: u64_at(rest)?,
                    files,
                })
            }
            2 => {
                let size = u64_at(rest)?;
                let name = std::str::from_utf8(&rest[8..])
                    .map_err(|_| bad("file name is not UTF-8"))?
                    .to_string();
                if name.is_empty()
                    || name.len() > 255
                    || name.contains('/')
                    || name == "."
                    || name == ".."
                    || name.contains('\0')
                {
                    return Err(bad(&format!("unsafe file name {name:?}")));
                }
                Ok(Piece::File { name, size })
            }
            3 => Ok(Piece::Chunk(rest.to_vec())),
            4 => {
                if rest.len() != 40 {
                    return Err(bad("end must be 40 bytes"));
                }
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&rest[8..40]);
                Ok(Piece::End {
                    epoch: u64_at(rest)?,
                    digest,
                })
            }
            t => Err(bad(&format!("unknown piece tag {t}"))),
        }
    }
}

fn hash_file_header(h: &mut Sha256, name: &str, size: u64) {
    h.update(u32::try_from(name.len()).unwrap_or(u32::MAX).to_le_bytes());
    h.update(name.as_bytes());
    h.update(size.to_le_bytes());
}

/// Turns an image directory into pieces, calling `emit` for each (in order). Only regular files
/// directly in `dir` are sent, sorted by name.
pub fn send_dir(
    dir: &Path,
    epoch: u64,
    mut emit: impl FnMut(Piece) -> Result<(), TransferError>,
) -> Result<(), TransferError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("read", dir))? {
        let entry = entry.map_err(io("read", dir))?;
        let meta = entry.metadata().map_err(io("stat", &entry.path()))?;
        if meta.is_file() {
            if let Some(name) = entry.file_name().to_str() {
                files.push(name.to_string());
            }
        }
    }
    files.sort();
    emit(Piece::Begin {
        epoch,
        files: u32::try_from(files.len()).unwrap_or(u32::MAX),
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    for name in files {
        let path = dir.join(&name);
        let mut f = File::open(&path).map_err(io("open", &path))?;
        let size = f.metadata().map_err(io("stat", &path))?.len();
        hash_file_header(&mut h, &name, size);
        emit(Piece::File {
            name: name.clone(),
            size,
        })?;
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            f.read_exact(&mut buf[..want]).map_err(io("read", &path))?;
            h.update(&buf[..want]);
            emit(Piece::Chunk(buf[..want].to_vec()))?;
            left -= want as u64;
        }
    }
    emit(Piece::End {
        epoch,
        digest: h.finalize().into(),
    })
}

struct Incoming {
    epoch: u64,
    files_left: u32,
    dir: PathBuf,
    file: Option<(File, PathBuf, u64)>,
    hash: Sha256,
}

/// The backup's checkpoint store: a staging area and the committed checkpoint.
pub struct Store {
    root: PathBuf,
    incoming: Option<Incoming>,
    committed: Option<u64>,
}

const COMMITTED: &str = "committed";
const EPOCH_FILE: &str = "rrc-epoch";

impl Store {
    /// Opens (creating) a store under `root`; a committed checkpoint found there is kept, any
    /// staging left over is removed.
    pub fn open(root: &Path) -> Result<Store, TransferError> {
        fs::create_dir_all(root).map_err(io("create", root))?;
        for entry in fs::read_dir(root).map_err(io("read", root))? {
            let entry = entry.map_err(io("read", root))?;
            if entry.file_name() != COMMITTED {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(io("remove", &p))?;
            }
        }
        let committed = fs::read_to_string(root.join(COMMITTED).join(EPOCH_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Store {
            root: root.to_path_buf(),
            incoming: None,
            committed,
        })
    }

    /// The committed checkpoint: its epoch and directory.
    pub fn committed(&self) -> Option<(u64, PathBuf)> {
        self.committed.map(|e| (e, self.root.join(COMMITTED)))
    }

    /// Applies one piece; returns the epoch when this piece committed a checkpoint.
    pub fn apply(&mut self, piece: Piece) -> Result<Option<u64>, TransferError> {
        let result = self.apply_inner(piece);
        if result.is_err() {
            self.abandon();
        }
        result
    }

    /// Drops a partly received checkpoint (the committed one stays).
    pub fn abandon(&mut self) {
        if let Some(inc) = self.incoming.take() {
            let _ = fs::remove_dir_all(&inc.dir);
        }
    }

    fn apply_inner(&mut self, piece: Piece) -> Result<Option<u64>, TransferError> {
        let seq = |m: String| TransferError::Sequence(m);
        match piece {
            Piece::Begin { epoch, files } => {
                self.abandon();
                if self.committed.is_some_and(|c| epoch <= c) {
                    return Err(seq(format!(
                        "epoch {epoch} is not newer than the committed {}",
                        self.committed.unwrap_or(0)
                    )));
                }
                let dir = self.root.join(format!("staging-{epoch}"));
                fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                self.incoming = Some(Incoming {
                    epoch,
                    files_left: files,
                    dir,
                    file: None,
                    hash: Sha256::new(),
                });
                Ok(None)
            }
            Piece::File { name, size } => {
                let inc = self
                    .incoming
                    .as_mut()
                    .ok_or_else(|| seq("file before begin".into()))?;
                if let Some((_, path, left)) = &inc.file {
                    if *left != 0 {
                        return Err(seq(format!("{} ended {left} bytes short", path.display())));
                    }
                }
                if inc.files_left == 0 {
                    return Err(seq("more files than announced".into()));
                }
                inc.files_left -= 1;
                hash_file_header(&mut inc.hash, &name, size);
                let path = inc.dir.join(&name);
                let f = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io("create", &path))?;
                inc.file = Some((f, path, size));
                Ok(None)
            }
            Piece::Chunk(bytes) => {
                let inc = self
                    .incoming
                    .as_mut()
                    .ok_or_else(|| seq("chunk before begin".into()))?;
                let (f, path, left) = inc
                    .file
                    .as_mut()
                    .ok_or_else(|| seq("chunk before file".into()))?;
                let n = bytes.len() as u64;
                if n > *left {
                    return Err(seq(format!("{} longer than announced", path.display())));
                }
                f.write_all(&bytes).map_err(io("write", path))?;
                inc.hash.update(&bytes);
                *left -= n;
                Ok(None)
            }
            Piece::End { epoch, digest } => {
                let mut inc = self
                    .incoming
                    .take()
                    .ok_or_else(|| seq("end before begin".into()))?;
                // From here on, `inc.dir` is ours to remove on failure.
                let fail = |inc: &Incoming, e: TransferError| {
                    let _ = fs::remove_dir_all(&inc.dir);
                    e
                };
                let corrupt = |problem: String| TransferError::Corrupt {
                    epoch: inc.epoch,
                    problem,
                };
                if epoch != inc.epoch {
                    let e = corrupt(format!("ends as epoch {epoch}"));
                    return Err(fail(&inc, e));
                }
                if inc.files_left != 0 {
                    let e = corrupt(format!("{} announced files never came", inc.files_left));
                    return Err(fail(&inc, e));
                }
                if let Some((f, path, left)) = inc.file.take() {
                    if left != 0 {
                        let e = corrupt(format!("{} is {left} bytes short", path.display()));
                        return Err(fail(&inc, e));
                    }
                    if let Err(e) = f.sync_all() {
                        return Err(fail(&inc, io("sync", &path)(e)));
                    }
                }
                let got: [u8; 32] = inc.hash.clone().finalize().into();
                if got != digest {
                    let e = corrupt("content digest does not match the sender's".into());
                    return Err(fail(&inc, e));
                }
                let epoch_file = inc.dir.join(EPOCH_FILE);
                if let Err(e) = fs::write(&epoch_file, epoch.to_string()) {
                    return Err(fail(&inc, io("write", &epoch_file)(e)));
                }
                self.swap_in(&inc.dir).map_err(|e| fail(&inc, e))?;
                self.committed = Some(epoch);
                Ok(Some(epoch))
            }
        }
    }

    /// Makes `staged` the committed checkpoint: one rename (exchange when one exists), then the
    /// old one is removed.
    fn swap_in(&self, staged: &Path) -> Result<(), TransferError> {
        let dir = File::open(staged).map_err(io("open", staged))?;
        dir.sync_all().map_err(io("sync", staged))?;
        let committed = self.root.join(COMMITTED);
        if committed.exists() {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                staged,
                rustix::fs::CWD,
                &committed,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| io("swap in", staged)(e.into()))?;
            // `staged` now holds the previous checkpoint.
            fs::remove_dir_all(staged).map_err(io("remove", staged))?;
        } else {
            fs::rename(staged, &committed).map_err(io("rename", staged))?;
        }
        let root = File::open(&self.root).map_err(io("open", &self.root))?;
        root.sync_all().map_err(io("sync", &self.root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(files: &[(&str, usize, u8)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("dir");
        for (name, size, byte) in files {
            fs::write(d.path().join(name), vec![*byte; *size]).expect("write");
        }
        d
    }

    fn pieces(dir: &Path, epoch: u64) -> Vec<Piece> {
        let mut v = Vec::new();
        send_dir(dir, epoch, |p| {
            v.push(Piece::decode(&p.encode()).expect("roundtrip"));
            Ok(())
        })
        .expect("send");
        v
    }

    fn same_files(a: &Path, b: &Path) {
        for entry in fs::read_dir(a).expect("read") {
            let entry = entry.expect("entry");
            let other = b.join(entry.file_name());
            assert_eq!(
                fs::read(entry.path()).expect("a"),
                fs::read(&other).expect("b")
            );
        }
    }

    #[test]
    fn a_complete_transfer_commits_and_replaces_the_previous() {
        let img1 = image_dir(&[("pages-1.img", 3 * CHUNK + 5, 1), ("core-1.img", 100, 2)]);
        let img2 = image_dir(&[("pages-1.img", 10, 3)]);
        let root = tempfile::tempdir().expect("root");
        let mut store = Store::open(root.path()).expect("open");
        let mut done = None;
        for p in pieces(img1.path(), 1) {
            done = store.apply(p).expect("apply");
        }
        assert_eq!(done, Some(1));
        let (epoch, dir) = store.committed().expect("committed");
        assert_eq!(epoch, 1);
        same_files(img1.path(), &dir);
        for p in pieces(img2.path(), 2) {
            store.apply(p).expect("apply");
        }
        let (epoch, dir) = store.committed().expect("committed");
        assert_eq!(epoch, 2);
        same_files(img2.path(), &dir);
        assert!(
            !dir.join("core-1.img").exists(),
            "old checkpoint's files are gone"
        );
        // Survives a restart of the backup.
        let store = Store::open(root.path()).expect("reopen");
        assert_eq!(store.committed().map(|c| c.0), Some(2));
    }

    #[test]
    fn a_cut_or_corrupt_transfer_never_replaces_the_committed_one() {
        let img = image_dir(&[("pages-1.img", CHUNK + 7, 9), ("core-1.img", 64, 4)]);
        let root = tempfile::tempdir().expect("root");
        let mut store = Store::open(root.path()).expect("open");
        for p in pieces(img.path(), 1) {
            store.apply(p).expect("apply");
        }

        // Truncated: the transfer stops before End, then a new one begins.
        let all = pieces(img.path(), 2);
        for p in all.iter().take(all.len() - 2).cloned() {
            store.apply(p).expect("apply");
        }
        assert_eq!(store.committed().map(|c| c.0), Some(1));

        // A flipped byte in a chunk: caught by the digest at End.
        let mut bad = pieces(img.path(), 3);
        if let Some(Piece::Chunk(b)) = bad.iter_mut().find(|p| matches!(p, Piece::Chunk(_))) {
            b[0] ^= 1;
        }
        let mut result = Ok(None);
        for p in bad {
            result = store.apply(p);
            if result.is_err() {
                break;
            }
        }
        assert!(
            matches!(result, Err(TransferError::Corrupt { epoch: 3, .. })),
            "{result:?}"
        );
        assert_eq!(store.committed().map(|c| c.0), Some(1));
        same_files(img.path(), &store.committed().expect("still there").1);

        // Announced sizes and counts are enforced; stale epochs are refused.
        let mut short = pieces(img.path(), 4);
        short.retain(|p| !matches!(p, Piece::Chunk(c) if c.len() == 64));
        let result: Result<Vec<_>, _> = short.into_iter().map(|p| store.apply(p)).collect();
        assert!(result.is_err());
        let stale = pieces(img.path(), 1);
        assert!(store.apply(stale[0].clone()).is_err());
        assert_eq!(store.committed().map(|c| c.0), Some(1));
        // No staging directory is left behind.
        let left: Vec<_> = fs::read_dir(root.path()).expect("read").collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn malformed_pieces_are_refused() {
        for bytes in [
            &b""[..],
            &[9][..],
            &[1, 0, 0][..],
            &[2, 0, 0, 0, 0, 0, 0, 0, 0, b'.', b'.'][..],
            &[2, 0, 0, 0, 0, 0, 0, 0, 0, b'a', b'/', b'b'][..],
            &[4, 1][..],
        ] {
            assert!(Piece::decode(bytes).is_err(), "{bytes:?}");
        }
    }

    /// Primary to backup over the real replication channel (loopback TCP): the backup commits
    /// the checkpoint and acknowledges the End piece; the primary sees the acknowledgement.
    #[tokio::test]
    async fn over_the_replication_channel() {
        use rrc_channel::{connect, establish, Config, Role};
        let img = image_dir(&[("pages-1.img", 2 * CHUNK + 3, 7), ("core-1.img", 10, 1)]);
        let key = b"0123456789abcdef0123456789abcdef".to_vec();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let root = tempfile::tempdir().expect("root");
        let store_root = root.path().to_path_buf();
        let backup_key = key.clone();
        let backup = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let mut ch = establish(s, Config::new(backup_key, "redis-1", Role::Backup))
                .await
                .expect("backup side");
            let mut store = Store::open(&store_root).expect("store");
            loop {
                let m = ch.recv().await.expect("piece");
                let piece = Piece::decode(&m.payload).expect("decode");
                if let Some(epoch) = store.apply(piece).expect("apply") {
                    ch.acknowledge(m.seq).await.expect("ack");
                    return (epoch, store.committed().expect("committed").1);
                }
            }
        });
        let ch = connect(&addr, Config::new(key, "redis-1", Role::Primary))
            .await
            .expect("primary side");
        let mut pieces = Vec::new();
        send_dir(img.path(), 1, |p| {
            pieces.push(p);
            Ok(())
        })
        .expect("pack");
        let mut last = 0;
        for p in pieces {
            last = ch.send(1, &p.encode()).await.expect("send");
        }
        ch.wait_acked(last).await.expect("committed at the backup");
        let (epoch, dir) = backup.await.expect("backup task");
        assert_eq!(epoch, 1);
        same_files(img.path(), &dir);
    }
}
