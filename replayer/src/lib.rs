//! rrc's replayer: replays a container's event log on its processes (issue 5, the recovery
//! side of hybrid mode).
//!
//! # What it owns, what it must not touch
//!
//! It owns the replay of an rrc event log ([`rrc_eventlog`]) onto traced processes: the
//! records taken in their recorded container-wide order, each recorded result injected into
//! the thread that made the call (return value and every byte written), the calls that order
//! threads or create and end them run for real at their turn, the recorded intervals enforced
//! as minimums, and a divergence (the execution no longer matches the log) detected and
//! reported ([`engine`]). It reads the log ([`plan`]); it uses the recorder's tracing
//! primitives (`rrc_recorder::ptrace`, its vDSO patching and syscall table) so that replay and
//! recording agree on what each system call is. It must not touch the network, the
//! checkpoint store or the container's lifecycle: restoring a checkpoint, rebuilding TCP state
//! and taking over the address belong to the shim and its crates. Like the recorder it runs as
//! a process of its own (`rrc-replayer`), never inside the shim, whose reaper steals ptrace
//! stops.
//!
//! # State
//!
//! Built: the engine, on a process started afresh under the recorder's filter (the first
//! record of a recording), for single- and multi-threaded programs, forks and execs; tested on
//! real recordings (time, randomness, file reads, threads on a mutex). Not yet: replay on a
//! process restored from a checkpoint, descriptors from a replayed `accept`, signals sent from
//! outside, TCP state, the failover itself (see `docs/hybrid-mode.md`).

pub mod engine;
pub mod plan;

pub use engine::{Divergence, ReplayError, ReplaySummary, Replayer};
pub use plan::{Plan, PlanError};

#[cfg(test)]
mod tests;
