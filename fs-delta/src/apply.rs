//! The backup's side: applying deltas through the mounted rootfs.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags, UTIME_OMIT,
};
use rustix::io::Errno;

use crate::format::{self, Entry, Index, Meta, SpecialKind};
use crate::FsDeltaError;

/// Counts of what was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Deltas applied.
    pub deltas: usize,
    /// `delete` entries.
    pub deletes: usize,
    /// `dir` entries.
    pub dirs: usize,
    /// ... of which opaque (emptied first).
    pub opaque: usize,
    /// `file` entries.
    pub files: usize,
    /// `link` entries.
    pub links: usize,
    /// `symlink` entries.
    pub symlinks: usize,
    /// `special` entries.
    pub specials: usize,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Wall time taken.
    pub elapsed: Duration,
}

impl ApplyStats {
    fn add(&mut self, o: &ApplyStats) {
        self.deltas += o.deltas;
        self.deletes += o.deletes;
        self.dirs += o.dirs;
        self.opaque += o.opaque;
        self.files += o.files;
        self.links += o.links;
        self.symlinks += o.symlinks;
        self.specials += o.specials;
        self.bytes += o.bytes;
        self.elapsed += o.elapsed;
    }
}

/// Applies one delta to `rootfs`: the *mounted* root file system of the backup's container (its
/// overlay's merged directory), so the backup's overlay records the changes in its own upper
/// directory. Checks the whole delta first ([`crate::read_index`]); then, in order: deletions
/// (`rm -rf`), directories (opaque ones emptied), regular files (written to a temporary name in
/// the same directory, then renamed over the old one: a reader never sees half a file), hard
/// links, symbolic links, special files; last, directories' owner, mode, xattrs and mtime,
/// deepest first.
///
/// Every path is opened beneath `rootfs` with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`:
/// an entry that would leave the rootfs or go through a symbolic link is refused
/// ([`FsDeltaError::Escape`]). Applying the same delta twice gives the same tree, so a delta
/// whose application was interrupted can be applied again.
pub fn apply(delta: &Path, rootfs: &Path) -> Result<ApplyStats, FsDeltaError> {
    let index = format::read_index(delta)?;
    apply_index(&index, delta, rootfs)
}

/// Applies deltas in the order given (the epochs committed since pairing, oldest first), after
/// checking every one of them: a corrupt delta anywhere in the chain is refused before anything
/// is written.
pub fn apply_chain<P: AsRef<Path>>(
    deltas: &[P],
    rootfs: &Path,
) -> Result<ApplyStats, FsDeltaError> {
    let mut indexes = Vec::with_capacity(deltas.len());
    for d in deltas {
        indexes.push(format::read_index(d.as_ref())?);
    }
    let mut total = ApplyStats::default();
    for (index, d) in indexes.iter().zip(deltas) {
        total.add(&apply_index(index, d.as_ref(), rootfs)?);
    }
    Ok(total)
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

struct Root<'a> {
    fd: OwnedFd,
    path: &'a Path,
    index: PathBuf,
}

fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn is_dir(fd: BorrowedFd<'_>, name: &[u8]) -> Result<Option<bool>, Errno> {
    match rustix::fs::statat(fd, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(
            FileType::from_raw_mode(st.st_mode) == FileType::Directory,
        )),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `rm -rf name` relative to `dir`, never following a symbolic link. Absent is fine.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    match is_dir(dir, name)? {
        None => Ok(()),
        Some(false) => match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        },
        Some(true) => {
            let sub = rustix::fs::openat(
                dir,
                os(name),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            empty_dir(sub.as_fd())?;
            match rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

/// Removes everything inside `dir`.
fn empty_dir(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut names = Vec::new();
    let mut it = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = it.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_tree(dir, &n)?;
    }
    Ok(())
}

fn tmp_name() -> String {
    format!(
        ".rrc-fsd-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates something under a fresh temporary name with `make`, trying another name when one is
/// taken (a file of the container could have it).
fn make_tmp<T>(mut make: impl FnMut(&str) -> Result<T, Errno>) -> Result<(String, T), Errno> {
    let mut tries = 0;
    loop {
        let tmp = tmp_name();
        match make(&tmp) {
            Ok(v) => return Ok((tmp, v)),
            Err(Errno::EXIST) if tries < 100 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

fn timestamps(m: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: m.mtime,
            tv_nsec: i64::from(m.mtime_nsec),
        },
    }
}

fn uid_gid(m: &Meta) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    // read_index refused -1, the only value these constructors reject.
    (
        Some(rustix::fs::Uid::from_raw(m.uid)),
        Some(rustix::fs::Gid::from_raw(m.gid)),
    )
}

/// Sets owner, then mode (a chown clears set-uid/set-gid), then xattrs (a chown clears
/// `security.capability`), then mtime, on an open file or directory. With `sync`, carried
/// extended attributes the entry does not list are removed.
fn set_meta(fd: BorrowedFd<'_>, m: &Meta, sync: bool) -> Result<(), (&'static str, Errno)> {
    let (u, g) = uid_gid(m);
    rustix::fs::fchown(fd, u, g).map_err(|e| ("chown", e))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(m.mode)).map_err(|e| ("chmod", e))?;
    if sync {
        let buf = format::grow(|b| rustix::fs::flistxattr(fd, b)).map_err(|e| ("listxattr", e))?;
        for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if format::carried_xattr(name) && !m.xattrs.iter().any(|x| x.name.as_bytes() == name) {
                match rustix::fs::fremovexattr(fd, os(name)) {
                    Ok(()) | Err(Errno::NODATA) => {}
                    Err(e) => return Err(("removexattr", e)),
                }
            }
        }
    }
    for x in &m.xattrs {
        // read_index checked the value is hexadecimal.
        let value = format::unhex(&x.value).unwrap_or_default();
        rustix::fs::fsetxattr(fd, x.name.as_str(), &value, XattrFlags::empty())
            .map_err(|e| ("setxattr", e))?;
    }
    rustix::fs::futimens(fd, &timestamps(m)).map_err(|e| ("set times", e))
}

impl Root<'_> {
    fn err(&self, what: &'static str, rel: &[u8], e: Errno) -> FsDeltaError {
        match e {
            Errno::LOOP | Errno::XDEV => FsDeltaError::Escape {
                index: self.index.clone(),
                entry: String::from_utf8_lossy(rel).into_owned(),
                rootfs: self.path.to_path_buf(),
                problem: format!(
                    "{what}: the path goes through a symbolic link or leaves the rootfs ({e})"
                ),
            },
            _ => FsDeltaError::Io {
                what,
                path: self.path.join(os(rel)),
                source: e.into(),
            },
        }
    }

    /// Opens a directory of the rootfs, refusing symbolic links on the way, the last component
    /// included (`RESOLVE_NO_SYMLINKS` answers `ELOOP`; `O_NOFOLLOW` would say `ENOTDIR`).
    fn open_dir(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        if rel.is_empty() {
            rustix::fs::openat(&self.fd, ".", flags, Mode::empty())
        } else {
            rustix::fs::openat2(&self.fd, os(rel), flags, Mode::empty(), RESOLVE)
        }
    }

    fn parent(&self, rel: &[u8]) -> Result<(OwnedFd, Vec<u8>), FsDeltaError> {
        let (dir, name) = split(rel);
        let fd = self
            .open_dir(dir)
            .map_err(|e| self.err("open parent directory of", rel, e))?;
        Ok((fd, name.to_vec()))
    }

    /// Moves `tmp` over `name` in `dir`, first removing a directory that is in the way.
    fn replace(
        &self,
        dir: BorrowedFd<'_>,
        tmp: &str,
        name: &[u8],
        rel: &[u8],
    ) -> Result<(), FsDeltaError> {
        let r = (|| {
            if is_dir(dir, name)? == Some(true) {
                remove_tree(dir, name)?;
            }
            rustix::fs::renameat(dir, tmp, dir, os(name))
        })();
        if let Err(e) = r {
            let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
            return Err(self.err("rename into place", rel, e));
        }
        Ok(())
    }

    fn delete(&self, rel: &[u8]) -> Result<(), FsDeltaError> {
        let (dir, name) = split(rel);
        let fd = match self.open_dir(dir) {
            Ok(fd) => fd,
            // Nothing there: nothing to delete.
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(self.err("open parent directory of", rel, e)),
        };
        remove_tree(fd.as_fd(), name).map_err(|e| self.err("remove", rel, e))
    }

    fn dir(&self, rel: &[u8], opaque: bool) -> Result<(), FsDeltaError> {
        if rel.is_empty() {
            return Ok(());
        }
        let (fd, name) = self.parent(rel)?;
        let fd = fd.as_fd();
        match is_dir(fd, &name).map_err(|e| self.err("stat", rel, e))? {
            Some(true) => {
                if opaque {
                    let d = self.open_dir(rel).map_err(|e| self.err("open", rel, e))?;
                    empty_dir(d.as_fd()).map_err(|e| self.err("empty", rel, e))?;
                }
            }
            other => {
                if other.is_some() {
                    remove_tree(fd, &name).map_err(|e| self.err("remove", rel, e))?;
                }
                rustix::fs::mkdirat(fd, os(&name), Mode::from_raw_mode(0o700))
                    .map_err(|e| self.err("create directory", rel, e))?;
            }
        }
        Ok(())
    }

    fn dir_meta(&self, rel: &[u8], m: &Meta) -> Result<(), FsDeltaError> {
        let d = self.open_dir(rel).map_err(|e| self.err("open", rel, e))?;
        set_meta(d.as_fd(), m, true).map_err(|(what, e)| self.err(what, rel, e))
    }

    fn file(&self, rel: &[u8], blob: &Path, m: &Meta) -> Result<u64, FsDeltaError> {
        let mut src = File::open(blob).map_err(FsDeltaError::io("open", blob))?;
        let (dir, name) = self.parent(rel)?;
        let dir = dir.as_fd();
        let (tmp, fd) = make_tmp(|tmp| {
            rustix::fs::openat(
                dir,
                tmp,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })
        .map_err(|e| self.err("create a temporary file next to", rel, e))?;
        let mut dst = File::from(fd);
        let written = (|| {
            let n = std::io::copy(&mut src, &mut dst).map_err(|e| FsDeltaError::Io {
                what: "write",
                path: self.path.join(os(rel)),
                source: e,
            })?;
            set_meta(dst.as_fd(), m, false).map_err(|(what, e)| self.err(what, rel, e))?;
            Ok(n)
        })();
        drop(dst);
        match written {
            Ok(n) => {
                self.replace(dir, &tmp, &name, rel)?;
                Ok(n)
            }
            Err(e) => {
                let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
                Err(e)
            }
        }
    }

    fn link(&self, rel: &[u8], target: &[u8]) -> Result<(), FsDeltaError> {
        let (tdir, tname) = self.parent(target)?;
        let (dir, name) = self.parent(rel)?;
        let (tmp, ()) =
            make_tmp(|tmp| rustix::fs::linkat(&tdir, os(&tname), &dir, tmp, AtFlags::empty()))
                .map_err(|e| self.err("hard link", rel, e))?;
        self.replace(dir.as_fd(), &tmp, &name, rel)?;
        // rename() between two names of one inode does nothing and leaves the temporary name.
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        Ok(())
    }

    fn symlink(&self, rel: &[u8], target: &[u8], m: &Meta) -> Result<(), FsDeltaError> {
        let (dir, name) = self.parent(rel)?;
        let dir = dir.as_fd();
        let (tmp, ()) = make_tmp(|tmp| rustix::fs::symlinkat(os(target), dir, tmp))
            .map_err(|e| self.err("create symbolic link", rel, e))?;
        let (u, g) = uid_gid(m);
        let r = rustix::fs::chownat(dir, tmp.as_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ("chown", e))
            .and_then(|()| {
                rustix::fs::utimensat(dir, tmp.as_str(), &timestamps(m), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ("set times", e))
            });
        if let Err((what, e)) = r {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(self.err(what, rel, e));
        }
        self.replace(dir, &tmp, &name, rel)
    }

    fn special(
        &self,
        rel: &[u8],
        kind: SpecialKind,
        major: u32,
        minor: u32,
        m: &Meta,
    ) -> Result<(), FsDeltaError> {
        let (dir, name) = self.parent(rel)?;
        let dir = dir.as_fd();
        let ft = match kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Socket => FileType::Socket,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        let (tmp, ()) = make_tmp(|tmp| {
            rustix::fs::mknodat(
                dir,
                tmp,
                ft,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(major, minor),
            )
        })
        .map_err(|e| self.err("mknod", rel, e))?;
        let (u, g) = uid_gid(m);
        let r = rustix::fs::chownat(dir, tmp.as_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ("chown", e))
            .and_then(|()| {
                rustix::fs::chmodat(
                    dir,
                    tmp.as_str(),
                    Mode::from_raw_mode(m.mode),
                    AtFlags::empty(),
                )
                .map_err(|e| ("chmod", e))
            })
            .and_then(|()| {
                rustix::fs::utimensat(dir, tmp.as_str(), &timestamps(m), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ("set times", e))
            });
        if let Err((what, e)) = r {
            let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
            return Err(self.err(what, rel, e));
        }
        self.replace(dir, &tmp, &name, rel)
    }
}

/// Applies a checked index.
fn apply_index(index: &Index, delta: &Path, rootfs: &Path) -> Result<ApplyStats, FsDeltaError> {
    let started = Instant::now();
    let fd = rustix::fs::open(
        rootfs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FsDeltaError::io("open rootfs", rootfs)(e.into()))?;
    let root = Root {
        fd,
        path: rootfs,
        index: delta.join(format::INDEX),
    };
    let mut stats = ApplyStats {
        deltas: 1,
        ..ApplyStats::default()
    };
    let mut dirs = Vec::new();
    for e in &index.entries {
        match e {
            Entry::Delete { path } => {
                root.delete(path.as_bytes())?;
                stats.deletes += 1;
            }
            Entry::Dir { path, opaque, meta } => {
                root.dir(path.as_bytes(), *opaque)?;
                dirs.push((path.as_bytes(), meta));
                stats.dirs += 1;
                stats.opaque += usize::from(*opaque);
            }
            Entry::File {
                path, blob, meta, ..
            } => {
                stats.bytes += root.file(path.as_bytes(), &delta.join(blob), meta)?;
                stats.files += 1;
            }
            Entry::Link { path, target } => {
                root.link(path.as_bytes(), target.as_bytes())?;
                stats.links += 1;
            }
            Entry::Symlink { path, target, meta } => {
                root.symlink(path.as_bytes(), target.as_bytes(), meta)?;
                stats.symlinks += 1;
            }
            Entry::Special {
                path,
                kind,
                major,
                minor,
                meta,
            } => {
                root.special(path.as_bytes(), *kind, *major, *minor, meta)?;
                stats.specials += 1;
            }
        }
    }
    // Directories last, deepest first: creating and renaming entries changed their mtimes.
    for (path, meta) in dirs.iter().rev() {
        root.dir_meta(path, meta)?;
    }
    stats.elapsed = started.elapsed();
    tracing::debug!(delta = %delta.display(), rootfs = %rootfs.display(), ?stats, "delta applied");
    Ok(stats)
}
