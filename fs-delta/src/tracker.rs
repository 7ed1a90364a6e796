//! The primary's side: walking the upper directory and writing what changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::format::{self, Bytes, Entry, Index, Meta, SpecialKind, Xattr, BLOB_PREFIX, INDEX};
use crate::FsDeltaError;

/// A file whose change time is this close to the end of the walk is sent again next time: a
/// write right after the walk could land in the same coarse timestamp tick and leave size,
/// mtime and ctime unchanged (git's "racy clean" problem). 20 ms is two ticks at `HZ=100`.
pub const RACY_WINDOW: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Whiteout,
    Special,
}

/// What the tracker remembers of one path, as last sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stat {
    kind: Kind,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    target: Option<Vec<u8>>,
    opaque: bool,
}

impl Stat {
    fn of(kind: Kind, md: &Metadata) -> Stat {
        Stat {
            kind,
            size: if kind == Kind::Dir { 0 } else { md.size() },
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev(),
            target: None,
            opaque: false,
        }
    }

    /// A whiteout is compared by kind only: overlay shares one whiteout inode between many
    /// names, so its link count and ctime change whenever another whiteout is made.
    fn whiteout() -> Stat {
        Stat {
            kind: Kind::Whiteout,
            size: 0,
            mtime: (0, 0),
            ctime: (0, 0),
            ino: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
            opaque: false,
        }
    }
}

#[derive(Clone, Debug)]
struct Seen {
    stat: Stat,
    racy: bool,
}

type State = BTreeMap<Vec<u8>, Seen>;

/// Counts of one delta.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// It was a full delta (first one, or after [`Tracker::reset`]).
    pub full: bool,
    /// Paths looked at in the upper directory.
    pub scanned: usize,
    /// `delete` entries (whiteouts and paths gone from the upper directory).
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
    /// Bytes of file content copied into the delta.
    pub bytes: u64,
    /// Wall time taken.
    pub elapsed: Duration,
}

/// The primary's memory of what it has sent: one record per path of the upper directory (type,
/// size, mtime, ctime, inode, mode, owner, symlink target, opacity).
///
/// Each [`Tracker::delta`] compares the upper directory with that memory and writes what
/// differs. The backup must apply every delta, in order; if a delta is not delivered (its epoch
/// was abandoned before the backup committed it), call [`Tracker::undo_last`] so the next delta
/// carries its changes too. When a new backup pairs, call [`Tracker::reset`]: the next delta is a
/// full one, for a fresh rootfs.
#[derive(Debug)]
pub struct Tracker {
    sent: State,
    previous: Option<(State, bool)>,
    full_next: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

impl Tracker {
    /// A tracker that has sent nothing: its first delta is a full one.
    pub fn new() -> Tracker {
        Tracker {
            sent: State::new(),
            previous: None,
            full_next: true,
        }
    }

    /// Forgets everything sent: the next delta is a full one (for a new backup, whose rootfs has
    /// an empty upper directory).
    pub fn reset(&mut self) {
        self.sent.clear();
        self.previous = None;
        self.full_next = true;
    }

    /// Forgets the last delta as if it had never been taken, because it will never be applied
    /// (its epoch was abandoned). Returns false when there is nothing to undo (already undone, or
    /// no delta since the last reset). Only the last delta can be undone.
    pub fn undo_last(&mut self) -> bool {
        match self.previous.take() {
            Some((state, full)) => {
                self.sent = state;
                self.full_next = full;
                true
            }
            None => false,
        }
    }

    /// Paths remembered (for tests and statistics).
    pub fn tracked(&self) -> usize {
        self.sent.len()
    }

    /// Walks `upper` (an overlay upper directory, or any directory) and writes into `out`
    /// (created; it must not hold anything yet) the delta from what was sent before to what
    /// `upper` holds now. The container should be stopped meanwhile: files changing during the
    /// walk are sent again next time, but this delta may then hold a file's content from the
    /// middle of a write. On error nothing is remembered: the next call starts from the same
    /// state (remove `out`).
    pub fn delta(&mut self, upper: &Path, out: &Path) -> Result<DeltaStats, FsDeltaError> {
        let started = Instant::now();
        let full = self.full_next;
        prepare_out(out)?;
        let empty = State::new();
        let mut walk = Walk {
            out,
            upper,
            prev: if full { &empty } else { &self.sent },
            next: State::new(),
            deletes: Vec::new(),
            dirs: Vec::new(),
            files: Vec::new(),
            links: Vec::new(),
            symlinks: Vec::new(),
            specials: Vec::new(),
            inodes: HashMap::new(),
            stats: DeltaStats {
                full,
                ..DeltaStats::default()
            },
        };
        let root = fs::symlink_metadata(upper).map_err(FsDeltaError::io("stat", upper))?;
        if !root.is_dir() {
            return Err(FsDeltaError::Io {
                what: "walk",
                path: upper.to_path_buf(),
                source: std::io::Error::from(ErrorKind::NotADirectory),
            });
        }
        walk.dir(upper.to_path_buf(), Vec::new(), &root, false)?;
        walk.gone();

        // Racy entries: changed within RACY_WINDOW of the end of the walk.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(RACY_WINDOW);
        let limit = (
            i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            i64::from(now.subsec_nanos()),
        );
        for seen in walk.next.values_mut() {
            if seen.stat.kind != Kind::Whiteout && seen.stat.ctime >= limit {
                seen.racy = true;
            }
        }

        let mut stats = walk.stats;
        let mut entries = walk.deletes;
        let dirs: Vec<Entry> = walk.dirs.into_iter().flatten().collect();
        stats.deletes = entries.len();
        stats.dirs = dirs.len();
        stats.opaque = dirs
            .iter()
            .filter(|e| matches!(e, Entry::Dir { opaque: true, .. }))
            .count();
        stats.files = walk.files.len();
        stats.links = walk.links.len();
        stats.symlinks = walk.symlinks.len();
        stats.specials = walk.specials.len();
        entries.extend(dirs);
        entries.extend(walk.files);
        entries.extend(walk.links);
        entries.extend(walk.symlinks);
        entries.extend(walk.specials);
        write_index(
            out,
            &Index {
                format: format::FORMAT.to_string(),
                version: format::VERSION,
                full,
                entries,
            },
        )?;
        let next = walk.next;
        let before = std::mem::replace(&mut self.sent, next);
        self.previous = Some((before, full));
        self.full_next = false;
        stats.elapsed = started.elapsed();
        Ok(stats)
    }
}

fn prepare_out(out: &Path) -> Result<(), FsDeltaError> {
    fs::create_dir_all(out).map_err(FsDeltaError::io("create", out))?;
    let mut it = fs::read_dir(out).map_err(FsDeltaError::io("read", out))?;
    if it.next().is_some() {
        return Err(FsDeltaError::OutNotEmpty {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

fn write_index(out: &Path, index: &Index) -> Result<(), FsDeltaError> {
    let tmp = out.join(".index.json.tmp");
    let path = out.join(INDEX);
    let f = File::create(&tmp).map_err(FsDeltaError::io("create", &tmp))?;
    let mut w = BufWriter::new(f);
    serde_json::to_writer(&mut w, index).map_err(|e| FsDeltaError::Io {
        what: "write",
        path: tmp.clone(),
        source: std::io::Error::other(e),
    })?;
    w.write_all(b"\n")
        .map_err(FsDeltaError::io("write", &tmp))?;
    w.flush().map_err(FsDeltaError::io("write", &tmp))?;
    // The index appears only once complete: a delta without one is unfinished.
    fs::rename(&tmp, &path).map_err(FsDeltaError::io("rename", &path))
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        let mut v = Vec::with_capacity(rel.len() + 1 + name.len());
        v.extend_from_slice(rel);
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// What the extended attributes of a path say.
#[derive(Default)]
struct Xattrs {
    carried: Vec<Xattr>,
    opaque: bool,
    whiteout: bool,
    redirect: bool,
    metacopy: bool,
}

fn overlay_attr(name: &[u8], attr: &[u8]) -> bool {
    let strip = |p: &[u8]| name.strip_prefix(p).is_some_and(|rest| rest == attr);
    strip(b"trusted.overlay.") || strip(b"user.overlay.")
}

fn read_xattrs(path: &Path) -> Result<Xattrs, FsDeltaError> {
    let mut x = Xattrs::default();
    let names = match list_xattrs(path) {
        Ok(n) => n,
        Err(e) if e == rustix::io::Errno::NOTSUP || e == rustix::io::Errno::NOENT => return Ok(x),
        Err(e) => {
            return Err(FsDeltaError::io("list extended attributes of", path)(
                e.into(),
            ))
        }
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if overlay_attr(name, b"opaque") {
            x.opaque = get_xattr(path, name)?.as_deref() == Some(b"y");
        } else if overlay_attr(name, b"whiteout") {
            x.whiteout = true;
        } else if overlay_attr(name, b"redirect") {
            x.redirect = true;
        } else if overlay_attr(name, b"metacopy") {
            x.metacopy = true;
        } else if format::carried_xattr(name) {
            let Ok(text) = std::str::from_utf8(name) else {
                tracing::warn!(path = %path.display(), "extended attribute with a non-UTF-8 name not carried");
                continue;
            };
            if let Some(value) = get_xattr(path, name)? {
                x.carried.push(Xattr {
                    name: text.to_string(),
                    value: format::hex(&value),
                });
            }
        }
    }
    Ok(x)
}

fn list_xattrs(path: &Path) -> rustix::io::Result<Vec<u8>> {
    crate::format::grow(|buf| rustix::fs::llistxattr(path, buf))
}

/// One attribute's value; `None` when it vanished meanwhile.
fn get_xattr(path: &Path, name: &[u8]) -> Result<Option<Vec<u8>>, FsDeltaError> {
    let name = OsStr::from_bytes(name);
    match crate::format::grow(|buf| rustix::fs::lgetxattr(path, name, buf)) {
        Ok(v) => Ok(Some(v)),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(FsDeltaError::io("read extended attribute of", path)(
            e.into(),
        )),
    }
}

fn meta(md: &Metadata, xattrs: Vec<Xattr>) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: u32::try_from(md.mtime_nsec()).unwrap_or(0),
        xattrs,
    }
}

struct Walk<'a> {
    out: &'a Path,
    upper: &'a Path,
    prev: &'a State,
    next: State,
    deletes: Vec<Entry>,
    /// Pre-order; `None` for a directory that turned out to need no entry.
    dirs: Vec<Option<Entry>>,
    files: Vec<Entry>,
    links: Vec<Entry>,
    symlinks: Vec<Entry>,
    specials: Vec<Entry>,
    /// (device, inode) of files with several links sent in this delta, and the path sent.
    inodes: HashMap<(u64, u64), Vec<u8>>,
    stats: DeltaStats,
}

impl Walk<'_> {
    fn changed(&self, rel: &[u8], stat: &Stat, forced: bool) -> bool {
        forced
            || match self.prev.get(rel) {
                None => true,
                Some(p) => p.racy || p.stat != *stat,
            }
    }

    fn unsupported(&self, abs: &Path, what: &str) -> FsDeltaError {
        FsDeltaError::Unsupported {
            path: abs.to_path_buf(),
            what: what.to_string(),
        }
    }

    /// Walks one directory; returns whether it or anything below it has an entry.
    fn dir(
        &mut self,
        abs: PathBuf,
        rel: Vec<u8>,
        md: &Metadata,
        forced: bool,
    ) -> Result<bool, FsDeltaError> {
        let x = read_xattrs(&abs)?;
        if x.redirect {
            return Err(self.unsupported(&abs, "directory renamed with overlay redirect_dir"));
        }
        // The root's opacity means nothing to overlay.
        let opaque = x.opaque && !rel.is_empty();
        let mut stat = Stat::of(Kind::Dir, md);
        stat.opaque = opaque;
        let changed = self.changed(&rel, &stat, forced);
        let newly_opaque = opaque
            && (forced
                || self.prev.get(&rel).is_none_or(|p| {
                    p.stat.kind != Kind::Dir || !p.stat.opaque || p.stat.ino != stat.ino
                }));
        let slot = self.dirs.len();
        self.dirs.push(None);

        let mut names = Vec::new();
        for entry in fs::read_dir(&abs).map_err(FsDeltaError::io("read", &abs))? {
            let entry = entry.map_err(FsDeltaError::io("read", &abs))?;
            names.push(entry.file_name());
        }
        names.sort();
        let mut below = false;
        for name in names {
            let child_rel = join(&rel, name.as_bytes());
            below |= self.entry(abs.join(&name), child_rel, forced || newly_opaque)?;
        }
        let emitted = changed || below || newly_opaque;
        if emitted {
            self.dirs[slot] = Some(Entry::Dir {
                path: Bytes(rel.clone()),
                opaque: newly_opaque,
                meta: meta(md, x.carried),
            });
        }
        self.next.insert(rel, Seen { stat, racy: false });
        Ok(emitted)
    }

    /// Looks at one path below the root; returns whether it or anything below has an entry.
    fn entry(&mut self, abs: PathBuf, rel: Vec<u8>, forced: bool) -> Result<bool, FsDeltaError> {
        let md = match fs::symlink_metadata(&abs) {
            Ok(m) => m,
            // Gone since the directory was read (the container is not frozen): as if never seen.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(FsDeltaError::io("stat", &abs)(e)),
        };
        self.stats.scanned += 1;
        let ft = md.file_type();
        if ft.is_dir() {
            return self.dir(abs, rel, &md, forced);
        }
        let whiteout = if ft.is_char_device() {
            md.rdev() == 0
        } else if ft.is_file() && md.size() == 0 {
            read_xattrs(&abs)?.whiteout
        } else {
            false
        };
        if whiteout {
            let stat = Stat::whiteout();
            let changed = self.changed(&rel, &stat, forced);
            if changed {
                self.deletes.push(Entry::Delete {
                    path: Bytes(rel.clone()),
                });
            }
            self.next.insert(rel, Seen { stat, racy: false });
            return Ok(changed);
        }
        if ft.is_file() {
            return self.file(abs, rel, &md, forced);
        }
        if ft.is_symlink() {
            let target = match fs::read_link(&abs) {
                Ok(t) => t.into_os_string().into_vec(),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(FsDeltaError::io("read link", &abs)(e)),
            };
            let mut stat = Stat::of(Kind::Symlink, &md);
            stat.target = Some(target.clone());
            let changed = self.changed(&rel, &stat, forced);
            if changed {
                self.symlinks.push(Entry::Symlink {
                    path: Bytes(rel.clone()),
                    target: Bytes(target),
                    meta: meta(&md, Vec::new()),
                });
            }
            self.next.insert(rel, Seen { stat, racy: false });
            return Ok(changed);
        }
        let kind = if ft.is_fifo() {
            SpecialKind::Fifo
        } else if ft.is_socket() {
            SpecialKind::Socket
        } else if ft.is_char_device() {
            SpecialKind::Char
        } else {
            SpecialKind::Block
        };
        let stat = Stat::of(Kind::Special, &md);
        let changed = self.changed(&rel, &stat, forced);
        if changed {
            let dev = md.rdev();
            let (major, minor) = match kind {
                SpecialKind::Char | SpecialKind::Block => {
                    (rustix::fs::major(dev), rustix::fs::minor(dev))
                }
                _ => (0, 0),
            };
            self.specials.push(Entry::Special {
                path: Bytes(rel.clone()),
                kind,
                major,
                minor,
                meta: meta(&md, Vec::new()),
            });
        }
        self.next.insert(rel, Seen { stat, racy: false });
        Ok(changed)
    }

    fn file(
        &mut self,
        abs: PathBuf,
        rel: Vec<u8>,
        md: &Metadata,
        forced: bool,
    ) -> Result<bool, FsDeltaError> {
        let stat = Stat::of(Kind::File, md);
        if !self.changed(&rel, &stat, forced) {
            self.next.insert(rel, Seen { stat, racy: false });
            return Ok(false);
        }
        if md.nlink() > 1 {
            if let Some(first) = self.inodes.get(&(md.dev(), md.ino())) {
                self.links.push(Entry::Link {
                    path: Bytes(rel.clone()),
                    target: Bytes(first.clone()),
                });
                self.next.insert(rel, Seen { stat, racy: false });
                return Ok(true);
            }
        }
        let x = read_xattrs(&abs)?;
        if x.metacopy {
            return Err(self.unsupported(&abs, "metadata-only copy-up (overlay metacopy=on)"));
        }
        let mut src = match open_source(&abs) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(FsDeltaError::io("open", &abs)(e)),
        };
        // The stat recorded is the one taken before copying: a change during the copy is seen
        // (and sent) next time.
        let fmd = src.metadata().map_err(FsDeltaError::io("stat", &abs))?;
        let blob = format!("{BLOB_PREFIX}{:06}", self.stats.files + 1);
        let dst_path = self.out.join(&blob);
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .map_err(FsDeltaError::io("create", &dst_path))?;
        // std's copy between two files uses copy_file_range (or sendfile) underneath.
        let copied = std::io::copy(&mut src, &mut dst).map_err(|e| FsDeltaError::Io {
            what: "copy",
            path: abs.clone(),
            source: e,
        })?;
        self.stats.files += 1;
        self.stats.bytes += copied;
        let stat = Stat::of(Kind::File, &fmd);
        let racy = copied != fmd.size();
        if fmd.nlink() > 1 {
            self.inodes.insert((fmd.dev(), fmd.ino()), rel.clone());
        }
        self.files.push(Entry::File {
            path: Bytes(rel.clone()),
            blob,
            size: copied,
            meta: meta(&fmd, x.carried),
        });
        self.next.insert(rel, Seen { stat, racy });
        Ok(true)
    }

    /// Paths sent before and no longer in the upper directory become deletions, except below a
    /// path deleted in this same delta.
    fn gone(&mut self) {
        let mut deleted: HashSet<Vec<u8>> = self
            .deletes
            .iter()
            .map(|e| e.path().as_bytes().to_vec())
            .collect();
        let mut extra = Vec::new();
        for path in self.prev.keys() {
            if path.is_empty() || self.next.contains_key(path) {
                continue;
            }
            let under_deleted = path
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'/')
                .any(|(i, _)| deleted.contains(&path[..i]));
            if !under_deleted {
                deleted.insert(path.clone());
                extra.push(Entry::Delete {
                    path: Bytes(path.clone()),
                });
            }
        }
        tracing::trace!(upper = %self.upper.display(), gone = extra.len(), "paths gone from upper");
        self.deletes.extend(extra);
    }
}

/// Opens a file of the upper directory for copying: never through a symbolic link, and without
/// touching its access time when allowed (`O_NOATIME` needs ownership or `CAP_FOWNER`).
fn open_source(abs: &Path) -> std::io::Result<File> {
    use rustix::fs::OFlags;
    let flags = (OFlags::NOFOLLOW | OFlags::CLOEXEC).bits();
    let noatime = OFlags::NOATIME.bits();
    let open = |f: u32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(i32::try_from(f).unwrap_or(0))
            .open(abs)
    };
    match open(flags | noatime) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => open(flags),
        r => r,
    }
}
