//! rrc's replication of a container's writable layer.
//!
//! A container runs on an overlay rootfs (containerd's overlayfs snapshotter:
//! `lowerdir=…,upperdir=…,workdir=…`): everything it writes lands in the upper directory. CRIU
//! does not copy files, so each epoch the primary sends, with the checkpoint, what changed in the
//! upper directory since the previous epoch, and the backup makes its own rootfs (another overlay
//! mount of the same image, with its own upper directory) show exactly the primary's files.
//!
//! This crate owns that delta and nothing else: [`Tracker`] (primary) walks an upper directory
//! and writes a delta directory; [`apply`] / [`apply_chain`] (backup) apply deltas through the
//! backup's mounted rootfs. It does not mount anything, freeze the container, move deltas over
//! the network or decide when to take one: the shim does (see the crate's README for capturing a
//! consistent delta from a CRIU `post-dump` action script).
//!
//! # What the tracker compares
//!
//! Per path of the upper directory it remembers what it last sent: file type, size, mtime and
//! ctime (nanoseconds), inode, mode, owner, rdev, symbolic link target, and whether a directory
//! is opaque. A path is sent again when any of these differ. ctime changes with every content,
//! owner, mode, link or xattr change and cannot be set by the container, so a write that keeps
//! size and mtime is still seen. A file whose ctime is within [`RACY_WINDOW`] of the end of the
//! walk is sent again next time (a later write could fall in the same coarse timestamp tick).
//! Whiteouts are compared by kind only (overlay shares one whiteout inode between names).
//!
//! # Delta format, version 1
//!
//! A delta is a *flat* directory (so `rrc_checkpoint::transfer::send_dir` carries it as is):
//!
//! * `index.json`, written last (a delta without it is unfinished): one JSON object
//!   `{"format": "rrc-fs-delta", "version": 1, "full": BOOL, "entries": [ENTRY, ...]}`;
//! * `blob-000001`, `blob-000002`, ...: the content of each regular file carried.
//!
//! Each `ENTRY` has an `"op"` and a `"path"`, relative to the root (`""` is the root, allowed only
//! for `dir`; never absolute; no `.`, `..` or empty component). Paths and link targets are JSON
//! strings when valid UTF-8, else arrays of byte values. Entries come in apply order, by phase:
//!
//! | op | fields | apply |
//! |---|---|---|
//! | `delete` | `path` | `rm -rf` (absent is fine): overlay whiteouts (char device 0:0, or an xattr whiteout), and paths gone from the upper directory |
//! | `dir` | `path`, `opaque`, `meta` | make it a directory (replacing a non-directory); `opaque`: empty it first (overlay's `trusted.overlay.opaque=y`: nothing below comes from the lower layers) |
//! | `file` | `path`, `blob`, `size`, `meta` | write the blob to a temporary name in the same directory, set meta, rename over the path |
//! | `link` | `path`, `target` | hard link to `target`, a `file` earlier in the same delta |
//! | `symlink` | `path`, `target`, `meta` | create under a temporary name, owner and mtime, rename |
//! | `special` | `path`, `kind` (`fifo`, `socket`, `char`, `block`), `major`, `minor`, `meta` | `mknod`, owner, mode, mtime, rename |
//!
//! `meta` is `{"mode": st_mode & 0o7777, "uid", "gid", "mtime": seconds, "mtime_nsec",
//! "xattrs": [{"name", "value": hex}]}`. Directories' meta is applied after everything else,
//! deepest first. A parent directory is always in the delta when anything below it is, so its
//! mtime is restored after the backup's own writes into it.
//!
//! A `full` delta (the first one of a [`Tracker`], or after [`Tracker::reset`]) describes the
//! whole upper directory and must be applied to a fresh rootfs (empty upper directory). An
//! incremental one applies to the state the previous delta left. A reader refuses an index with
//! another `format` or `version` ([`FsDeltaError::UnknownVersion`]), an index that does not parse
//! (truncated), entries out of phase order, bad paths, and blobs that are missing or of the wrong
//! size ([`FsDeltaError::Corrupt`]), all before touching the rootfs. Content integrity is the
//! transfer's job (SHA-256 over every file in `rrc_checkpoint::transfer`).
//!
//! # Epochs at the backup
//!
//! The delta of epoch *e* travels in the same transfer as checkpoint *e* and is committed with
//! it. Deltas depend on each other, so the backup applies **every committed delta, in epoch
//! order, exactly once**, straight after it commits (the backup's container does not run, so its
//! rootfs is free), and before it commits the next epoch. At failover it therefore has nothing
//! to do but finish an application in progress. A delta of an epoch that never commits is never
//! applied, and the primary, which abandons that epoch, calls [`Tracker::undo_last`] so the next
//! delta carries those changes too. If the backup keeps deltas instead of applying them at once,
//! [`apply_chain`] applies a list of them in order after checking all of them. Applying a delta
//! twice gives the same tree, so an application interrupted by an error can be retried; if it
//! cannot complete, the backup must ask to be paired again (fresh rootfs, full delta).
//!
//! # What is not carried
//!
//! * atime and ctime (ctime cannot be set; atime is left as the backup's write made it);
//! * extended attributes other than `user.*` (except overlay's `user.overlay.*`) and
//!   `security.capability`: no ACLs (`system.posix_acl_*`), SELinux labels (`security.selinux`),
//!   `trusted.*` or IMA/EVM;
//! * holes in sparse files (a file is copied as bytes); file flags (`chattr`);
//! * hard links between a file changed in this delta and an unchanged one (each name is then
//!   carried as a copy until the inode changes again);
//! * overlay features that keep state outside the upper tree: `redirect_dir` and `metacopy`
//!   ([`FsDeltaError::Unsupported`]; both are off by default and with containerd's snapshotter);
//!   an upper entry removed behind overlay's back (not through the mount) reads as a deletion;
//! * volumes and bind mounts: only the upper directory is walked;
//! * numeric owners are copied as they are: primary and backup need the same user namespace
//!   mapping (both use the same image).

mod apply;
mod error;
mod format;
mod tracker;

pub use apply::{apply, apply_chain, ApplyStats};
pub use error::FsDeltaError;
pub use format::{
    read_index, Bytes, Entry, Index, Meta, SpecialKind, Xattr, BLOB_PREFIX, FORMAT, INDEX, VERSION,
};
pub use tracker::{DeltaStats, Tracker, RACY_WINDOW};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_overlay;
#[cfg(test)]
mod tests_prop;
#[cfg(test)]
mod testutil;
