//! Property tests: random create/modify/delete sequences over several epochs; after each epoch
//! the delta is applied and the backup's tree must equal the primary's. Some epochs are
//! abandoned (their delta never applied, `undo_last`), as when a checkpoint fails to commit.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use proptest::prelude::*;

use crate::testutil::{diff, snapshot, Overlay};
use crate::*;

/// The paths the operations pick from: some exist in the overlay tests' lower layer.
const PATHS: &[&str] = &[
    "a",
    "b",
    "d1",
    "d1/a",
    "d1/b",
    "d1/d2",
    "d1/d2/a",
    "etc",
    "etc/hosts",
    "etc/conf.d",
    "etc/conf.d/a",
    "var/cache/pkg",
    "var/cache/pkg/one",
    "lib",
    "lib/x",
];

/// Symbolic link targets: relative and without `..`, so they never leave the tree.
const TARGETS: &[&str] = &["a", "d1/a", "d1", "missing", "etc/hosts"];

#[derive(Debug, Clone)]
enum Op {
    Write(usize, Vec<u8>),
    Append(usize, Vec<u8>),
    Truncate(usize, u64),
    Mkdir(usize),
    Remove(usize),
    Symlink(usize, usize),
    Chmod(usize, u32),
    Rename(usize, usize),
    Link(usize, usize),
    Touch(usize, i64),
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    let content = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        3 => (p.clone(), content.clone()).prop_map(|(p, c)| Op::Write(p, c)),
        2 => (p.clone(), content).prop_map(|(p, c)| Op::Append(p, c)),
        1 => (p.clone(), 0u64..80).prop_map(|(p, l)| Op::Truncate(p, l)),
        3 => p.clone().prop_map(Op::Mkdir),
        3 => p.clone().prop_map(Op::Remove),
        1 => (p.clone(), 0..TARGETS.len()).prop_map(|(p, t)| Op::Symlink(p, t)),
        1 => (p.clone(), prop_oneof![Just(0o644u32), Just(0o600), Just(0o755), Just(0o4711)])
            .prop_map(|(p, m)| Op::Chmod(p, m)),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (p, 1_000_000_000i64..1_700_000_000).prop_map(|(p, t)| Op::Touch(p, t)),
    ]
}

/// An epoch: its operations, and whether its checkpoint is abandoned.
fn epochs() -> impl Strategy<Value = Vec<(Vec<Op>, bool)>> {
    proptest::collection::vec(
        (
            proptest::collection::vec(op(), 1..12),
            proptest::bool::weighted(0.15),
        ),
        1..6,
    )
}

fn not_symlink(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_symlink())
}

/// Runs one operation in `work`; failures (missing parent, wrong type, ...) are ignored, as
/// they would be for a program. Never follows a symbolic link out of the tree.
fn run(work: &Path, op: &Op) {
    let at = |i: &usize| work.join(PATHS[*i]);
    let _ = match op {
        Op::Write(p, c) if !at(p).is_symlink() => fs::write(at(p), c),
        Op::Append(p, c) if not_symlink(&at(p)) => {
            use std::io::Write;
            fs::OpenOptions::new()
                .append(true)
                .open(at(p))
                .and_then(|mut f| f.write_all(c))
        }
        Op::Truncate(p, l) if not_symlink(&at(p)) => fs::OpenOptions::new()
            .write(true)
            .open(at(p))
            .and_then(|f| f.set_len(*l)),
        Op::Mkdir(p) => fs::create_dir(at(p)),
        Op::Remove(p) => match fs::symlink_metadata(at(p)) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(at(p)),
            Ok(_) => fs::remove_file(at(p)),
            Err(e) => Err(e),
        },
        Op::Symlink(p, t) => symlink(TARGETS[*t], at(p)),
        Op::Chmod(p, m) if not_symlink(&at(p)) => {
            fs::set_permissions(at(p), fs::Permissions::from_mode(*m))
        }
        Op::Rename(a, b) => fs::rename(at(a), at(b)),
        Op::Link(a, b) => fs::hard_link(at(a), at(b)),
        Op::Touch(p, t) if not_symlink(&at(p)) => {
            let ts = rustix::fs::Timespec {
                tv_sec: *t,
                tv_nsec: 0,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                at(p),
                &rustix::fs::Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(std::io::Error::from)
        }
        _ => Ok(()),
    };
}

/// Runs the epochs: `work` is written to, `upper` is tracked, `rootfs` receives the deltas.
fn check(
    epochs: &[(Vec<Op>, bool)],
    work: &Path,
    upper: &Path,
    rootfs: &Path,
    deltas: &Path,
) -> Result<(), TestCaseError> {
    let mut tracker = Tracker::new();
    for (i, (ops, abandon)) in epochs.iter().enumerate() {
        for o in ops {
            run(work, o);
        }
        let out = deltas.join(format!("e{i}"));
        tracker.delta(upper, &out).unwrap();
        if *abandon {
            prop_assert!(tracker.undo_last());
            continue;
        }
        apply(&out, rootfs).unwrap();
        let d = diff(&snapshot(work), &snapshot(rootfs));
        prop_assert!(d.is_empty(), "after epoch {}:\n{}", i, d.join("\n"));
    }
    Ok(())
}

/// `PROPTEST_CASES` overrides the number of cases (for longer runs).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn random_epochs_on_plain_directories(epochs in epochs()) {
        let t = tempfile::tempdir().unwrap();
        let (upper, root, deltas) = (t.path().join("u"), t.path().join("r"), t.path().join("d"));
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&root).unwrap();
        check(&epochs, &upper, &upper, &root, &deltas)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]

    #[test]
    fn random_epochs_on_overlays(epochs in epochs()) {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        crate::tests_overlay::make_lower(&lower);
        let Some(a) = Overlay::mount(&lower, &t.path().join("a")) else { return Ok(()) };
        let Some(b) = Overlay::mount(&lower, &t.path().join("b")) else { return Ok(()) };
        check(&epochs, &a.merged, &a.upper, &b.merged, &t.path().join("d"))?;
    }
}
