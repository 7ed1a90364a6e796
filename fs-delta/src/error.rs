//! The crate's one error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong taking or applying a delta. Each variant names the file and says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum FsDeltaError {
    /// A system call on a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("read", "copy", "rename", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The upper directory uses an overlay feature a delta cannot carry.
    #[error(
        "{path}: {what}; a delta cannot carry it: mount the container's overlay without \
         redirect_dir and metacopy (the kernel's defaults, as containerd's snapshotter does)"
    )]
    Unsupported {
        /// The file in the upper directory.
        path: PathBuf,
        /// The feature found.
        what: String,
    },
    /// [`crate::Tracker::delta`] was given an output directory that already holds files.
    #[error(
        "delta directory {path} already exists and is not empty; remove it or give a new directory"
    )]
    OutNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// The delta's index is missing, truncated or malformed.
    #[error(
        "delta index {path} is missing, truncated or corrupt: {problem}; nothing was applied: \
         discard this delta (and its epoch) and resynchronise with a full delta"
    )]
    Corrupt {
        /// The index file (or the blob it names).
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The delta was written in a format this build does not know.
    #[error(
        "delta index {path} has format version {found}, this build reads only version {known}; \
         run the same rrc version on primary and backup"
    )]
    UnknownVersion {
        /// The index file.
        path: PathBuf,
        /// The version it declares.
        found: u64,
        /// The version this build reads and writes.
        known: u32,
    },
    /// An entry of the delta would write outside the rootfs, or through a symbolic link.
    #[error(
        "refusing delta entry {entry:?} of {index}: {problem}; nothing outside {rootfs} was \
         touched: the delta is corrupt or hostile, resynchronise with a full delta"
    )]
    Escape {
        /// The index file.
        index: PathBuf,
        /// The entry's path as written in the index.
        entry: String,
        /// The rootfs it was applied to.
        rootfs: PathBuf,
        /// Why it is refused.
        problem: String,
    },
}

impl FsDeltaError {
    pub(crate) fn io(
        what: &'static str,
        path: impl AsRef<Path>,
    ) -> impl FnOnce(std::io::Error) -> FsDeltaError {
        let path = path.as_ref().to_path_buf();
        move |source| FsDeltaError::Io { what, path, source }
    }

    pub(crate) fn corrupt(path: &Path, problem: impl Into<String>) -> FsDeltaError {
        FsDeltaError::Corrupt {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}
