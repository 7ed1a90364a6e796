//! Tests on real overlay mounts (root only; skipped with a message otherwise): a primary overlay
//! written through its merged mount, deltas taken from its upper directory, applied through a
//! second overlay's merged mount (same lower, its own upper), merged trees compared.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::testutil::{assert_same, settle, Overlay};
use crate::*;

/// An image-like lower layer.
pub(crate) fn make_lower(lower: &Path) {
    fs::create_dir_all(lower.join("etc/conf.d")).unwrap();
    fs::create_dir_all(lower.join("usr/lib/app")).unwrap();
    fs::create_dir_all(lower.join("var/cache/pkg")).unwrap();
    fs::create_dir_all(lower.join("data")).unwrap();
    fs::write(lower.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(lower.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(lower.join("etc/conf.d/a"), "a\n").unwrap();
    fs::write(lower.join("usr/lib/app/lib.so"), vec![1u8; 10_000]).unwrap();
    fs::write(lower.join("var/cache/pkg/one"), "1").unwrap();
    fs::write(lower.join("var/cache/pkg/two"), "2").unwrap();
    symlink("usr/lib", lower.join("lib")).unwrap();
    fs::set_permissions(lower.join("data"), fs::Permissions::from_mode(0o1777)).unwrap();
}

/// Fields drop in order: the mounts go before the temporary directory holding them.
struct Pair {
    primary: Overlay,
    backup: Overlay,
    deltas: std::path::PathBuf,
    n: usize,
    tracker: Tracker,
    _t: tempfile::TempDir,
}

impl Pair {
    fn new() -> Option<Pair> {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        make_lower(&lower);
        let primary = Overlay::mount(&lower, &t.path().join("a"))?;
        let backup = Overlay::mount(&lower, &t.path().join("b"))?;
        let deltas = t.path().join("deltas");
        Some(Pair {
            primary,
            backup,
            deltas,
            n: 0,
            tracker: Tracker::new(),
            _t: t,
        })
    }

    fn m(&self, p: &str) -> std::path::PathBuf {
        self.primary.merged.join(p)
    }

    fn epoch(&mut self) -> (DeltaStats, ApplyStats) {
        self.n += 1;
        let out = self.deltas.join(format!("e{}", self.n));
        let s = self.tracker.delta(&self.primary.upper, &out).unwrap();
        let a = apply(&out, &self.backup.merged).unwrap();
        assert_same(&self.primary.merged, &self.backup.merged);
        (s, a)
    }
}

#[test]
fn overlay_to_overlay() {
    let Some(mut p) = Pair::new() else { return };
    // Epoch 1: the container writes new files, modifies and deletes image files.
    fs::write(p.m("etc/hosts"), "127.0.0.1 localhost\n198.18.0.2 peer\n").unwrap();
    fs::remove_file(p.m("etc/passwd")).unwrap();
    fs::create_dir_all(p.m("srv/www")).unwrap();
    fs::write(p.m("srv/www/index.html"), "<h1>hi</h1>").unwrap();
    fs::set_permissions(p.m("srv/www/index.html"), fs::Permissions::from_mode(0o640)).unwrap();
    symlink("../etc/hosts", p.m("srv/hosts")).unwrap();
    fs::write(p.m("data/tmpfile"), "t").unwrap();
    fs::hard_link(p.m("srv/www/index.html"), p.m("srv/index-link")).unwrap();
    settle();
    // The kernel made a real whiteout for the deleted image file.
    let wh = fs::symlink_metadata(p.primary.upper.join("etc/passwd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let (s, a) = p.epoch();
    assert!(s.full);
    assert_eq!(a.deletes, 1);
    assert!(!p.backup.merged.join("etc/passwd").exists());

    // Epoch 2: rm -rf an image directory and recreate it (an opaque dir), delete a file
    // that exists only in the upper layer, rewrite, chmod, and change a symlink.
    fs::remove_dir_all(p.m("var/cache/pkg")).unwrap();
    fs::create_dir(p.m("var/cache/pkg")).unwrap();
    fs::write(p.m("var/cache/pkg/three"), "3").unwrap();
    fs::remove_file(p.m("data/tmpfile")).unwrap();
    fs::write(p.m("srv/www/index.html"), "<h1>hello</h1>").unwrap();
    fs::set_permissions(p.m("etc/conf.d/a"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(p.m("srv/hosts")).unwrap();
    symlink("/etc/hosts", p.m("srv/hosts")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.m("srv/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    settle();
    let mut v = [0u8; 4];
    let opaque = rustix::fs::lgetxattr(
        p.primary.upper.join("var/cache/pkg"),
        "trusted.overlay.opaque",
        &mut v[..],
    );
    assert_eq!(opaque.ok().map(|n| &v[..n]), Some(&b"y"[..]));
    let (s, _) = p.epoch();
    assert!(!s.full);
    assert_eq!(s.opaque, 1);
    assert!(!p.backup.merged.join("var/cache/pkg/one").exists());
    assert!(!p.backup.merged.join("data/tmpfile").exists());

    // Epoch 3: a directory over the lib symlink of the image, a file over a directory, and
    // an unchanged tree (nothing but what changed is sent).
    fs::remove_file(p.m("lib")).unwrap();
    fs::create_dir(p.m("lib")).unwrap();
    fs::write(p.m("lib/own"), "own").unwrap();
    fs::remove_dir_all(p.m("srv/www")).unwrap();
    fs::write(p.m("srv/www"), "a file now").unwrap();
    settle();
    let (s, _) = p.epoch();
    // lib/own, srv/www, and srv/index-link: its inode lost a name, so its ctime changed.
    assert_eq!(s.files, 3, "{s:?}");
    let (s, _) = p.epoch();
    assert_eq!(s.files + s.deletes + s.dirs + s.symlinks, 0, "{s:?}");
}

#[test]
fn chain_applied_at_failover_equals_epoch_by_epoch() {
    let Some(mut p) = Pair::new() else { return };
    let mut kept = Vec::new();
    for e in 0..4 {
        fs::write(p.m(&format!("etc/e{e}")), format!("{e}")).unwrap();
        if e == 1 {
            fs::remove_file(p.m("etc/e0")).unwrap();
            fs::remove_file(p.m("etc/hosts")).unwrap();
        }
        if e == 2 {
            fs::remove_dir_all(p.m("etc/conf.d")).unwrap();
        }
        settle();
        p.n += 1;
        let out = p.deltas.join(format!("e{}", p.n));
        p.tracker.delta(&p.primary.upper, &out).unwrap();
        kept.push(out);
    }
    let s = apply_chain(&kept, &p.backup.merged).unwrap();
    assert_eq!(s.deltas, 4);
    assert_same(&p.primary.merged, &p.backup.merged);
}
