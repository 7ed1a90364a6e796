//! rrc's container checkpoints.
//!
//! This crate owns taking a checkpoint of a runc container and restoring one: it drives
//! `runc checkpoint` and `runc restore` (CRIU underneath) for a given runc root, decodes CRIU's
//! own statistics ([`stats`]), and seals every finished image directory with a checksummed marker
//! ([`manifest`]) that a restore verifies first, so an incomplete or corrupt image is refused and
//! never half-restored. [`transfer`] moves an image directory to the backup as a stream of pieces
//! and commits it there atomically.
//!
//! It touches only what it is given: the runc root (through runc), the image and work
//! directories, and the CRIU configuration file a container's spec names in the
//! [`CRIU_CONFIG_ANNOTATION`] annotation (only when a network-lock method is asked for). It does
//! not create containers, bundles, network namespaces or cgroups, and it never reaps children
//! itself: commands run through a [`CommandRunner`], so the shim, whose reaper owns every child's
//! exit status, plugs in its own.
//!
//! # What runc 1.1 and CRIU 4.2 do with a container (measured; see the integration test)
//!
//! * A network namespace given by path in the spec is dumped as *external*
//!   (`--external net[<inode>]:extRootNetNS`) and joined again on restore (runc opens the path
//!   in the restore bundle's spec and passes it with `--inherit-fd`): the namespace itself, its
//!   addresses and routes are not in the image. The restore target namespace must have the
//!   container's address and a route to every TCP peer, and must not still hold the old
//!   connections (an orphaned socket with the same 4-tuple makes CRIU fail with "Can't connect
//!   inet socket back: Cannot assign requested address").
//! * With `--tcp-established` CRIU locks the network inside that namespace while the container is
//!   frozen (every packet in or out that CRIU did not mark is dropped), both on dump and on
//!   restore. The method is CRIU's `network-lock` option, which runc has no flag for: see
//!   [`NetworkLock`]. Packets a peer sends meanwhile are retransmitted by TCP, so a client sees
//!   at least the pause, and at least one retransmission timeout (200 ms) if it sent then.
//! * CRIU writes `stats-dump`, `dump.log`, `stats-restore` and `restore.log` into the *work*
//!   directory, not the image directory; runc adds `descriptors.json` to the image directory.
//! * The container's standard streams must be pipes (or files inside its mounts) to be dumped:
//!   a FIFO or file opened from the host's mounts makes CRIU fail ("Can't lookup mount=…").
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), rrc_checkpoint::CheckpointError> {
//! use rrc_checkpoint::{Checkpointer, DumpOptions, RestoreOptions};
//! let c = Checkpointer::new("/run/containerd/runc/default");
//! let dump = c.dump("redis1", "/var/lib/rrc/img/1".as_ref(), &DumpOptions::default()).await?;
//! println!("frozen {:?}, {} bytes", dump.stats.map(|s| s.frozen), dump.image_bytes);
//! let restored = c
//!     .restore("redis1-b", "/bundles/redis1".as_ref(), &dump.image_dir, RestoreOptions::default())
//!     .await?;
//! println!("pid {}", restored.pid);
//! # Ok(()) }
//! ```

pub mod checkpointer;
pub mod manifest;
pub mod runner;
pub mod stats;
pub mod transfer;

pub use checkpointer::{
    criu_errors, resolve_binary, CgroupsMode, CheckpointError, Checkpointer, DumpOptions,
    DumpReport, NetworkLock, RestoreOptions, RestoreReport, RestoreStdio, RestoredStdio,
    CRIU_CONFIG_ANNOTATION,
};
pub use manifest::{ManifestError, MARKER};
pub use runner::{CommandRunner, TokioRunner};
pub use stats::{DumpStats, RestoreStats, StatsError};
pub use transfer::{send_dir, Piece, Store, TransferError};
