//! rrc's test bed and end-to-end tests.
//!
//! [`testbed`] builds test hosts (network namespaces joined by a bridge in a "switch" namespace,
//! addresses in 198.18.0.0/15), each able to run its own containerd with rrc's shim on its `PATH`,
//! and tears everything down again. [`cri`] configures containerd's CRI plugin for rrc and talks
//! CRI to it. [`pair`] is a replicated redis (primary, backup, clients). [`checker`] is the redis client that witnesses "no acknowledged write lost, no
//! connection broken". The tests in `tests/` and the `rrc-demo` and `rrc-bench` programs are built on them.
//!
//! The tests need root, containerd, runc and the local images (`integration/setup.sh`); without
//! them they print `SKIPPED: …` and pass, unless `RRC_REQUIRE_INTEGRATION=1` (set by `make test`),
//! which makes them fail instead. They use the shim binary built by `cargo build` (or
//! `$RRC_SHIM_BIN`).

pub mod checker;
pub mod cri;
pub mod load;
pub mod pair;
pub mod testbed;

pub use testbed::*;
