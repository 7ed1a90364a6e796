//! `containerd-shim-rrc-v2`: rrc's containerd shim (task API v2).
//!
//! The shim owns a container's lifecycle as containerd sees it: it serves containerd's task API,
//! drives runc, reports exits and events, and reads rrc's configuration (OCI annotations under
//! `io.containerd.rrc.` and the runtime's TOML file, see the `rrc-config` crate). With no rrc
//! configuration (mode `off`) it behaves as containerd's runc shim. Replicated modes are refused
//! at Create until they are built; they never fall back silently to an unreplicated container.
//!
//! Layout, after containerd's Rust runc shim: [`service`] (start/delete subcommands, the daemon),
//! [`task`] (the RPCs), [`container`] and [`process`] (state), [`runc`] (reaper-aware runc calls),
//! [`io`] (FIFOs and terminals), [`logging`] (log URIs), [`options`] (runtime options), [`oom`] (OOM events).
//! [`status`] is the operator view: the `rrc-status.json` file a replicating shim keeps in its
//! bundle, and the `status` subcommand that lists and renders those files.

pub mod container;
pub mod io;
pub mod logging;
pub mod oom;
pub mod options;
pub mod process;
pub mod replica;
pub mod runc;
pub mod service;
pub mod status;
pub mod task;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.rrc.v2";
