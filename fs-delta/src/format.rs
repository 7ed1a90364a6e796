//! The delta's on-disk format: a flat directory holding `index.json` and one `blob-NNNNNN` file
//! per regular file carried. See the crate documentation for the full description.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::Path;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::FsDeltaError;

/// The value of the index's `format` field.
pub const FORMAT: &str = "rrc-fs-delta";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The index's file name inside a delta directory.
pub const INDEX: &str = "index.json";
/// The prefix of blob file names inside a delta directory.
pub const BLOB_PREFIX: &str = "blob-";

/// A byte string (a path relative to the root, or a symbolic link's target). In JSON it is a
/// string when it is valid UTF-8 and an array of byte values otherwise, so no file name is lost.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_seq(self.0.iter()),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of byte values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// An extended attribute carried with a file or directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Its name: `user.*` (but not `user.overlay.*`) or `security.capability`.
    pub name: String,
    /// Its value, hexadecimal.
    pub value: String,
}

/// Owner, permissions, modification time and extended attributes of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits including set-uid, set-gid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Carried extended attributes (regular files and directories only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

/// Kinds of special files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialKind {
    /// A named pipe.
    Fifo,
    /// A unix socket's file (the socket itself is CRIU's business).
    Socket,
    /// A character device other than overlay's 0:0 whiteout.
    Char,
    /// A block device.
    Block,
}

/// One operation of a delta. Paths are relative to the root (`""` is the root itself, allowed
/// only for `dir`), never absolute, and contain no `.` or `..` component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    /// Remove the path and everything below it (`rm -rf`); absent is fine.
    Delete {
        /// The path.
        path: Bytes,
    },
    /// Make the path a directory (replacing a non-directory there). `opaque`: empty it first
    /// (overlay's opaque directory: nothing below it comes from the lower layers). Its `meta` is
    /// applied after every other entry, deepest directory first.
    Dir {
        /// The path.
        path: Bytes,
        /// Empty the directory first.
        opaque: bool,
        /// Owner, mode, mtime, xattrs.
        meta: Meta,
    },
    /// A regular file whose content is the blob `blob` of the delta directory (`size` bytes).
    File {
        /// The path.
        path: Bytes,
        /// The blob's file name in the delta directory.
        blob: String,
        /// The blob's size.
        size: u64,
        /// Owner, mode, mtime, xattrs.
        meta: Meta,
    },
    /// A hard link to `target`, which is a `file` entry earlier in the same delta.
    Link {
        /// The new name.
        path: Bytes,
        /// The existing file.
        target: Bytes,
    },
    /// A symbolic link (its mode is not carried: Linux ignores it).
    Symlink {
        /// The path.
        path: Bytes,
        /// What it points to, as stored.
        target: Bytes,
        /// Owner and mtime (mode and xattrs are ignored).
        meta: Meta,
    },
    /// A fifo, socket file or device node (`mknod`).
    Special {
        /// The path.
        path: Bytes,
        /// Which kind.
        kind: SpecialKind,
        /// Device major number (0 for fifos and sockets).
        major: u32,
        /// Device minor number.
        minor: u32,
        /// Owner, mode, mtime.
        meta: Meta,
    },
}

impl Entry {
    /// The entry's path.
    pub fn path(&self) -> &Bytes {
        match self {
            Entry::Delete { path }
            | Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Link { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Special { path, .. } => path,
        }
    }

    /// The apply phase: entries must appear in non-decreasing phase order.
    pub(crate) fn phase(&self) -> u8 {
        match self {
            Entry::Delete { .. } => 0,
            Entry::Dir { .. } => 1,
            Entry::File { .. } => 2,
            Entry::Link { .. } => 3,
            Entry::Symlink { .. } => 4,
            Entry::Special { .. } => 5,
        }
    }
}

/// A delta's index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] for this build.
    pub version: u32,
    /// A full delta describes the whole upper directory and must be applied to a fresh rootfs
    /// (an empty upper directory); an incremental one to the state the previous delta left.
    pub full: bool,
    /// The operations, in apply order.
    pub entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Header {
    format: Option<String>,
    version: Option<serde_json::Value>,
}

/// Reads and checks a delta directory's index, and that every blob it names is there with the
/// right size. Nothing is applied. A delta that passes cannot make [`crate::apply`] write outside
/// its rootfs; it can still fail there on I/O errors or a rootfs that does not match.
pub fn read_index(delta: &Path) -> Result<Index, FsDeltaError> {
    let path = delta.join(INDEX);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FsDeltaError::corrupt(
                &path,
                "no index: the delta was not finished",
            ))
        }
        Err(e) => return Err(FsDeltaError::io("read", &path)(e)),
    };
    let header: Header = serde_json::from_slice(&text)
        .map_err(|e| FsDeltaError::corrupt(&path, format!("not a JSON object: {e}")))?;
    if header.format.as_deref() != Some(FORMAT) {
        return Err(FsDeltaError::corrupt(
            &path,
            format!("format is {:?}, expected {FORMAT:?}", header.format),
        ));
    }
    let found = header
        .version
        .as_ref()
        .and_then(|v| v.as_u64())
        .ok_or_else(|| FsDeltaError::corrupt(&path, "no numeric \"version\" field"))?;
    if found != u64::from(VERSION) {
        return Err(FsDeltaError::UnknownVersion {
            path,
            found,
            known: VERSION,
        });
    }
    let index: Index = serde_json::from_slice(&text)
        .map_err(|e| FsDeltaError::corrupt(&path, format!("bad entry: {e}")))?;
    validate(&index, delta, &path)?;
    Ok(index)
}

/// Checks a relative path: non-empty components, none `.` or `..`, no NUL, not absolute.
pub(crate) fn check_rel(p: &[u8]) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.len() > 4095 {
        return Err("path longer than PATH_MAX".into());
    }
    if p.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    if p.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Err("empty path component (\"//\" or trailing \"/\")".into()),
            b"." | b".." => return Err("\".\" or \"..\" component".into()),
            _ if c.len() > 255 => return Err("path component longer than NAME_MAX".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Is `name` an extended attribute a delta carries?
pub(crate) fn carried_xattr(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
}

/// Calls an xattr system call with a growing buffer until the answer fits (rustix versions
/// differ on whether an empty buffer queries the size, so none is used).
pub(crate) fn grow(
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match call(&mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Values and lists are at most 64 KiB (XATTR_SIZE_MAX, XATTR_LIST_MAX).
            Err(rustix::io::Errno::RANGE) if size < 1 << 17 => size *= 2,
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(D[usize::from(b >> 4)]));
        s.push(char::from(D[usize::from(b & 15)]));
    }
    s
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    b.chunks(2)
        .map(|p| match p {
            [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
            _ => None,
        })
        .collect()
}

fn check_meta(m: &Meta) -> Result<(), String> {
    if m.mode & !0o7777 != 0 {
        return Err(format!("mode {:o} has bits beyond 0o7777", m.mode));
    }
    if m.uid == u32::MAX || m.gid == u32::MAX {
        return Err("owner or group is -1".into());
    }
    if m.mtime_nsec >= 1_000_000_000 {
        return Err("mtime_nsec is not below 10^9".into());
    }
    for x in &m.xattrs {
        if !carried_xattr(x.name.as_bytes()) || x.name.contains('\0') {
            return Err(format!(
                "extended attribute {:?} is not one a delta carries",
                x.name
            ));
        }
        if unhex(&x.value).is_none() {
            return Err(format!(
                "extended attribute {:?}: value is not hexadecimal",
                x.name
            ));
        }
    }
    Ok(())
}

fn validate(index: &Index, delta: &Path, path: &Path) -> Result<(), FsDeltaError> {
    let mut phase = 0;
    let mut files: HashSet<&[u8]> = HashSet::new();
    for (i, e) in index.entries.iter().enumerate() {
        let bad = |problem: String| {
            FsDeltaError::corrupt(path, format!("entry {i} ({:?}): {problem}", e.path()))
        };
        if e.phase() < phase {
            return Err(bad("entries are not in apply order".into()));
        }
        phase = e.phase();
        let p = e.path().as_bytes();
        let root_ok = matches!(e, Entry::Dir { .. }) && p.is_empty();
        if !root_ok {
            check_rel(p).map_err(bad)?;
        }
        match e {
            Entry::Delete { .. } => {}
            Entry::Dir { meta, .. } | Entry::Special { meta, .. } => {
                check_meta(meta).map_err(bad)?
            }
            Entry::Symlink { target, meta, .. } => {
                check_meta(meta).map_err(bad)?;
                let t = target.as_bytes();
                if t.is_empty() || t.len() > 4095 || t.contains(&0) {
                    return Err(bad(
                        "symbolic link target empty, too long or with NUL".into()
                    ));
                }
            }
            Entry::Link { target, .. } => {
                if !files.contains(target.as_bytes()) {
                    return Err(bad(format!(
                        "hard link target {target:?} is not a file of this delta"
                    )));
                }
            }
            Entry::File {
                blob, size, meta, ..
            } => {
                check_meta(meta).map_err(bad)?;
                if !blob.starts_with(BLOB_PREFIX)
                    || blob.contains('/')
                    || blob.contains('\0')
                    || blob.len() > 255
                {
                    return Err(bad(format!(
                        "blob name {blob:?} is not a blob of this delta"
                    )));
                }
                let bp = delta.join(blob);
                let md = fs::symlink_metadata(&bp).map_err(|err| {
                    FsDeltaError::corrupt(&bp, format!("blob of entry {i} ({:?}): {err}", e.path()))
                })?;
                if !md.file_type().is_file() || md.file_type().is_symlink() {
                    return Err(FsDeltaError::corrupt(&bp, "blob is not a regular file"));
                }
                if md.len() != *size {
                    return Err(FsDeltaError::corrupt(
                        &bp,
                        format!("blob has {} bytes, the index says {size}", md.len()),
                    ));
                }
                files.insert(p);
            }
        }
    }
    Ok(())
}
