//! Unit tests on plain directories standing in for an upper directory and a rootfs.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{FileType, Mode, XattrFlags, CWD};
use tempfile::TempDir;

use crate::testutil::{assert_same, settle, snapshot};
use crate::*;

struct Bed {
    _t: TempDir,
    upper: std::path::PathBuf,
    root: std::path::PathBuf,
    deltas: std::path::PathBuf,
    n: usize,
    tracker: Tracker,
}

impl Bed {
    fn new() -> Bed {
        let t = tempfile::tempdir().unwrap();
        let upper = t.path().join("upper");
        let root = t.path().join("root");
        let deltas = t.path().join("deltas");
        for d in [&upper, &root, &deltas] {
            fs::create_dir(d).unwrap();
        }
        Bed {
            upper,
            root,
            deltas,
            n: 0,
            _t: t,
            tracker: Tracker::new(),
        }
    }

    fn u(&self, p: &str) -> std::path::PathBuf {
        self.upper.join(p)
    }

    /// Takes a delta and returns its directory and stats.
    fn take(&mut self) -> (std::path::PathBuf, DeltaStats) {
        self.n += 1;
        let out = self.deltas.join(format!("d{}", self.n));
        let s = self.tracker.delta(&self.upper, &out).unwrap();
        (out, s)
    }

    /// Takes a delta, applies it to the root, checks the trees are equal.
    fn sync(&mut self) -> (Index, DeltaStats, ApplyStats) {
        let (out, s) = self.take();
        let index = read_index(&out).unwrap();
        let a = apply(&out, &self.root).unwrap();
        assert_same(&self.upper, &self.root);
        (index, s, a)
    }
}

fn mknod(p: &Path, ft: FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        CWD,
        p,
        ft,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

fn setx(p: &Path, name: &str, v: &[u8]) {
    rustix::fs::lsetxattr(p, name, v, XattrFlags::empty()).unwrap();
}

fn paths(index: &Index, op: &str) -> Vec<String> {
    index
        .entries
        .iter()
        .filter(|e| {
            let s = serde_json::to_value(e).unwrap();
            s["op"] == op
        })
        .map(|e| e.path().to_string())
        .collect()
}

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn full_then_incremental() {
    let mut b = Bed::new();
    fs::create_dir_all(b.u("etc/app")).unwrap();
    fs::write(b.u("etc/app/conf"), "a=1\n").unwrap();
    fs::write(b.u("etc/keep"), "keep").unwrap();
    fs::write(b.u("big"), vec![7u8; 300_000]).unwrap();
    fs::set_permissions(b.u("big"), fs::Permissions::from_mode(0o4751)).unwrap();
    symlink("app/conf", b.u("etc/link")).unwrap();
    settle();
    let (index, s, a) = b.sync();
    assert!(index.full && s.full);
    assert_eq!((s.files, s.symlinks), (3, 1));
    assert_eq!(a.bytes, 300_000 + 4 + 4);
    assert_eq!(paths(&index, "dir"), ["", "etc", "etc/app"]);

    // Nothing changed: nothing to send.
    let (index, s, _) = b.sync();
    assert!(!index.full);
    assert!(index.entries.is_empty(), "{:?}", index.entries);
    assert_eq!(s.scanned, 6);

    // Modify in place keeping the size, then with another size; delete; add.
    fs::write(b.u("etc/app/conf"), "a=2\n").unwrap();
    fs::write(b.u("etc/keep"), "kept longer").unwrap();
    fs::remove_file(b.u("big")).unwrap();
    fs::write(b.u("etc/new"), "").unwrap();
    settle();
    let (index, s, a) = b.sync();
    assert_eq!(paths(&index, "delete"), ["big"]);
    let mut files = paths(&index, "file");
    files.sort();
    assert_eq!(files, ["etc/app/conf", "etc/keep", "etc/new"]);
    // Parents of what changed come along (their mtimes), not the untouched symlink.
    assert_eq!(paths(&index, "dir"), ["", "etc", "etc/app"]);
    assert!(paths(&index, "symlink").is_empty());
    assert_eq!((s.deletes, a.deletes), (1, 1));
}

#[test]
fn same_size_same_mtime_rewrite_is_seen_through_ctime() {
    let mut b = Bed::new();
    fs::write(b.u("f"), "one").unwrap();
    settle();
    b.sync();
    let md = fs::metadata(b.u("f")).unwrap();
    fs::write(b.u("f"), "two").unwrap();
    // Put the mtime back: only ctime tells.
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: md.atime(),
            tv_nsec: md.atime_nsec(),
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec(),
        },
    };
    rustix::fs::utimensat(CWD, b.u("f"), &t, rustix::fs::AtFlags::empty()).unwrap();
    settle();
    let (index, _, _) = b.sync();
    assert_eq!(paths(&index, "file"), ["f"]);
    assert_eq!(fs::read(b.root.join("f")).unwrap(), b"two");
}

#[test]
fn racy_files_are_sent_again() {
    let mut b = Bed::new();
    fs::write(b.u("f"), "x").unwrap();
    // No settle: f changed within the racy window of this walk.
    b.sync();
    settle();
    let (index, _, _) = b.sync();
    assert_eq!(paths(&index, "file"), ["f"]);
    let (index, _, _) = b.sync();
    assert!(index.entries.is_empty());
}

#[test]
fn whiteouts_delete_in_the_rootfs() {
    if !is_root() {
        eprintln!("SKIP: mknod of a whiteout needs root");
        return;
    }
    let mut b = Bed::new();
    // The rootfs shows the image's files; the upper has whiteouts for two of them.
    fs::create_dir_all(b.root.join("etc/dir/sub")).unwrap();
    fs::write(b.root.join("etc/passwd"), "root").unwrap();
    fs::write(b.root.join("etc/dir/sub/x"), "x").unwrap();
    fs::create_dir(b.u("etc")).unwrap();
    mknod(&b.u("etc/passwd"), FileType::CharacterDevice, 0, 0);
    mknod(&b.u("etc/dir"), FileType::CharacterDevice, 0, 0);
    // An xattr whiteout (a zero-size file marked by overlay) too.
    fs::write(b.u("etc/xw"), "").unwrap();
    setx(&b.u("etc/xw"), "trusted.overlay.whiteout", b"");
    fs::write(b.root.join("etc/xw"), "lower").unwrap();
    settle();
    let (out, _) = b.take();
    let index = read_index(&out).unwrap();
    let mut d = paths(&index, "delete");
    d.sort();
    assert_eq!(d, ["etc/dir", "etc/passwd", "etc/xw"]);
    apply(&out, &b.root).unwrap();
    assert!(!b.root.join("etc/passwd").exists());
    assert!(!b.root.join("etc/dir").exists());
    assert!(!b.root.join("etc/xw").exists());
    // An unchanged whiteout is not sent again, even though overlay may link more names to it.
    let (out, _) = b.take();
    assert!(read_index(&out).unwrap().entries.is_empty());
}

#[test]
fn opaque_directory_is_emptied_once() {
    let mut b = Bed::new();
    fs::create_dir_all(b.root.join("var/cache/old")).unwrap();
    fs::write(b.root.join("var/cache/old/f"), "old").unwrap();
    fs::write(b.root.join("var/keep"), "lower").unwrap();
    fs::create_dir_all(b.u("var/cache")).unwrap();
    setx(&b.u("var/cache"), "trusted.overlay.opaque", b"y");
    fs::write(b.u("var/cache/new"), "new").unwrap();
    settle();
    let (out, s) = b.take();
    assert_eq!(s.opaque, 1);
    apply(&out, &b.root).unwrap();
    assert!(!b.root.join("var/cache/old").exists());
    assert_eq!(fs::read(b.root.join("var/cache/new")).unwrap(), b"new");
    assert!(
        b.root.join("var/keep").exists(),
        "only the opaque dir is emptied"
    );

    // Next epoch: a new file in the (already opaque) directory; nothing is emptied again.
    fs::write(b.u("var/cache/second"), "2").unwrap();
    settle();
    let (out, s) = b.take();
    assert_eq!((s.opaque, s.files), (0, 1));
    apply(&out, &b.root).unwrap();
    assert!(b.root.join("var/cache/new").exists());
    assert!(b.root.join("var/cache/second").exists());

    // `x` marks a directory holding xattr whiteouts; it is not opaque.
    fs::create_dir(b.u("notopaque")).unwrap();
    setx(&b.u("notopaque"), "trusted.overlay.opaque", b"x");
    let (out, s) = b.take();
    assert_eq!(s.opaque, 0);
    apply(&out, &b.root).unwrap();
}

#[test]
fn removed_trees_are_one_deletion_and_types_can_change() {
    let mut b = Bed::new();
    fs::create_dir_all(b.u("a/b/c")).unwrap();
    fs::write(b.u("a/b/c/f"), "f").unwrap();
    fs::write(b.u("a/b/g"), "g").unwrap();
    fs::create_dir_all(b.u("t/d")).unwrap();
    fs::write(b.u("t/d/x"), "x").unwrap();
    fs::write(b.u("t/f"), "f").unwrap();
    symlink("/nowhere", b.u("t/s")).unwrap();
    settle();
    b.sync();
    fs::remove_dir_all(b.u("a")).unwrap();
    // dir -> file, file -> dir, symlink -> dir
    fs::remove_dir_all(b.u("t/d")).unwrap();
    fs::write(b.u("t/d"), "now a file").unwrap();
    fs::remove_file(b.u("t/f")).unwrap();
    fs::create_dir(b.u("t/f")).unwrap();
    fs::write(b.u("t/f/inside"), "i").unwrap();
    fs::remove_file(b.u("t/s")).unwrap();
    fs::create_dir(b.u("t/s")).unwrap();
    settle();
    let (index, _, _) = b.sync();
    let d = paths(&index, "delete");
    assert!(d.contains(&"a".to_string()), "{d:?}");
    assert!(!d.iter().any(|p| p.starts_with("a/")), "{d:?}");
}

#[test]
fn hard_links_stay_links() {
    let mut b = Bed::new();
    fs::create_dir(b.u("d")).unwrap();
    fs::write(b.u("d/one"), "shared").unwrap();
    fs::hard_link(b.u("d/one"), b.u("two")).unwrap();
    settle();
    let (index, s, _) = b.sync();
    assert_eq!((s.files, s.links), (1, 1));
    assert_eq!(paths(&index, "link"), ["two"]);
    let i1 = fs::metadata(b.root.join("d/one")).unwrap().ino();
    let i2 = fs::metadata(b.root.join("two")).unwrap().ino();
    assert_eq!(i1, i2);
    // A third name: the inode's ctime changes, all names come again; applying is harmless.
    fs::hard_link(b.u("two"), b.u("three")).unwrap();
    settle();
    let (_, s, _) = b.sync();
    assert_eq!((s.files, s.links), (1, 2));
    assert_eq!(fs::metadata(b.root.join("three")).unwrap().nlink(), 3);
    // Applying again (the same-inode rename case) leaves no temporary names.
    let (out, _) = b.take();
    apply(&out, &b.root).unwrap();
    assert_same(&b.upper, &b.root);
}

#[test]
fn special_files() {
    if !is_root() {
        eprintln!("SKIP: device nodes need root");
        return;
    }
    let mut b = Bed::new();
    mknod(&b.u("fifo"), FileType::Fifo, 0, 0);
    mknod(&b.u("null"), FileType::CharacterDevice, 1, 3);
    mknod(&b.u("blk"), FileType::BlockDevice, 7, 200);
    mknod(&b.u("sock"), FileType::Socket, 0, 0);
    fs::set_permissions(b.u("fifo"), fs::Permissions::from_mode(0o620)).unwrap();
    rustix::fs::chownat(
        CWD,
        b.u("null"),
        Some(rustix::fs::Uid::from_raw(12)),
        Some(rustix::fs::Gid::from_raw(34)),
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    settle();
    let (_, s, _) = b.sync();
    assert_eq!(s.specials, 4);
}

#[test]
fn owners_modes_times_and_xattrs() {
    let mut b = Bed::new();
    fs::create_dir(b.u("d")).unwrap();
    fs::write(b.u("d/f"), "x").unwrap();
    setx(&b.u("d/f"), "user.mime", b"text/plain");
    setx(&b.u("d"), "user.a", b"1");
    setx(&b.u("d"), "user.b", b"2");
    // Not carried: overlay's own and trusted.* attributes.
    setx(&b.u("d"), "user.overlay.origin", b"zz");
    setx(&b.u("d"), "trusted.other", b"zz");
    fs::set_permissions(b.u("d"), fs::Permissions::from_mode(0o2750)).unwrap();
    if is_root() {
        // A file capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2).
        let cap: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        fs::write(b.u("d/cap"), "bin").unwrap();
        rustix::fs::chownat(
            CWD,
            b.u("d/cap"),
            Some(rustix::fs::Uid::from_raw(1000)),
            Some(rustix::fs::Gid::from_raw(1000)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        fs::set_permissions(b.u("d/cap"), fs::Permissions::from_mode(0o4755)).unwrap();
        setx(&b.u("d/cap"), "security.capability", &cap);
    }
    settle();
    b.sync();
    let mut v = [0u8; 16];
    assert!(rustix::fs::lgetxattr(b.root.join("d"), "user.overlay.origin", &mut v[..]).is_err());
    if is_root() {
        let md = fs::metadata(b.root.join("d/cap")).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o7777), (1000, 0o4755));
    }
    // A removed attribute is removed at the backup.
    rustix::fs::lremovexattr(b.u("d"), "user.b").unwrap();
    settle();
    b.sync();
}

#[test]
fn non_utf8_names_round_trip() {
    let mut b = Bed::new();
    let name = OsStr::from_bytes(b"caf\xe9 \"q\"\n");
    fs::write(b.upper.join(name), "bytes").unwrap();
    symlink(OsStr::from_bytes(b"\xff\xfe"), b.u("weird-link")).unwrap();
    settle();
    let (index, _, _) = b.sync();
    let json = fs::read_to_string(b.deltas.join("d1").join(INDEX)).unwrap();
    assert!(json.contains("[99,97,102,233,"), "{json}");
    assert_eq!(index.entries.len(), 3);
}

#[test]
fn undo_last_carries_changes_into_the_next_delta() {
    let mut b = Bed::new();
    fs::write(b.u("f"), "1").unwrap();
    settle();
    b.sync();
    fs::write(b.u("f"), "22").unwrap();
    settle();
    let (_lost, s) = b.take(); // its epoch is abandoned: never applied
    assert_eq!(s.files, 1);
    assert!(b.tracker.undo_last());
    assert!(!b.tracker.undo_last());
    let (index, _, _) = b.sync();
    assert_eq!(paths(&index, "file"), ["f"]);
}

#[test]
fn reset_makes_a_full_delta_and_errors_keep_state() {
    let mut b = Bed::new();
    fs::write(b.u("f"), "1").unwrap();
    settle();
    b.sync();
    // An output directory that is not empty is refused and nothing is remembered.
    let busy = b.deltas.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("x"), "").unwrap();
    fs::write(b.u("g"), "2").unwrap();
    settle();
    let e = b.tracker.delta(&b.upper, &busy).unwrap_err();
    assert!(matches!(e, FsDeltaError::OutNotEmpty { .. }), "{e}");
    let (index, _, _) = b.sync();
    assert_eq!(paths(&index, "file"), ["g"]);
    b.tracker.reset();
    let (out, s) = b.take();
    assert!(s.full && read_index(&out).unwrap().full);
    assert_eq!(s.files, 2);
}

#[test]
fn applying_twice_gives_the_same_tree() {
    let mut b = Bed::new();
    fs::create_dir_all(b.u("x/y")).unwrap();
    fs::write(b.u("x/y/f"), "f").unwrap();
    symlink("y/f", b.u("x/l")).unwrap();
    settle();
    let (out, _) = b.take();
    apply(&out, &b.root).unwrap();
    apply(&out, &b.root).unwrap();
    assert_same(&b.upper, &b.root);
    fs::remove_dir_all(b.u("x/y")).unwrap();
    fs::create_dir(b.u("x/y")).unwrap();
    setx(&b.u("x/y"), "trusted.overlay.opaque", b"y");
    fs::write(b.u("x/y/g"), "g").unwrap();
    settle();
    let (out, _) = b.take();
    apply(&out, &b.root).unwrap();
    apply(&out, &b.root).unwrap();
    assert_same(&b.upper, &b.root);
}

fn write_index(dir: &Path, json: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(INDEX), json).unwrap();
}

#[test]
fn corrupt_and_unknown_deltas_are_refused_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let d = t.path().join("d");

    // Missing index.
    fs::create_dir(&d).unwrap();
    let e = apply(&d, &root).unwrap_err();
    assert!(matches!(e, FsDeltaError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("index.json"), "{e}");

    // Truncated index.
    let full = r#"{"format":"rrc-fs-delta","version":1,"full":false,"entries":[{"op":"dir","path":"a","opaque":false,"meta":{"mode":493,"uid":0,"gid":0,"mtime":1,"mtime_nsec":0}}]}"#;
    write_index(&d, &full[..full.len() - 5]);
    let e = apply(&d, &root).unwrap_err();
    assert!(matches!(e, FsDeltaError::Corrupt { .. }), "{e}");
    assert!(
        e.to_string().contains(&d.join(INDEX).display().to_string()),
        "{e}"
    );
    assert!(!root.join("a").exists());

    // Unknown version.
    write_index(&d, &full.replace("\"version\":1", "\"version\":2"));
    let e = apply(&d, &root).unwrap_err();
    assert!(
        matches!(e, FsDeltaError::UnknownVersion { found: 2, .. }),
        "{e}"
    );
    // Wrong format.
    write_index(&d, &full.replace("rrc-fs-delta", "other"));
    assert!(matches!(
        apply(&d, &root).unwrap_err(),
        FsDeltaError::Corrupt { .. }
    ));

    // A blob missing, or of the wrong size.
    let file = |blob: &str, size: u64| {
        format!(
            r#"{{"format":"rrc-fs-delta","version":1,"full":false,"entries":[{{"op":"file","path":"f","blob":"{blob}","size":{size},"meta":{{"mode":420,"uid":0,"gid":0,"mtime":1,"mtime_nsec":0}}}}]}}"#
        )
    };
    write_index(&d, &file("blob-000001", 3));
    let e = apply(&d, &root).unwrap_err();
    assert!(e.to_string().contains("blob-000001"), "{e}");
    fs::write(d.join("blob-000001"), "abcd").unwrap();
    let e = apply(&d, &root).unwrap_err();
    assert!(e.to_string().contains("4 bytes"), "{e}");
    write_index(&d, &file("../blob-000001", 4));
    assert!(matches!(
        apply(&d, &root).unwrap_err(),
        FsDeltaError::Corrupt { .. }
    ));
    write_index(&d, &file("blob-000001", 4));
    apply(&d, &root).unwrap();
    assert_eq!(fs::read(root.join("f")).unwrap(), b"abcd");

    // Out of phase order: a file before a delete.
    let bad = file("blob-000001", 4).replace("}]}", r#"},{"op":"delete","path":"x"}]}"#);
    write_index(&d, &bad);
    let e = apply(&d, &root).unwrap_err();
    assert!(e.to_string().contains("apply order"), "{e}");

    // A link to something not in the delta.
    write_index(
        &d,
        r#"{"format":"rrc-fs-delta","version":1,"full":false,"entries":[{"op":"link","path":"l","target":"etc/shadow"}]}"#,
    );
    assert!(matches!(
        apply(&d, &root).unwrap_err(),
        FsDeltaError::Corrupt { .. }
    ));
}

#[test]
fn paths_escaping_the_rootfs_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "safe").unwrap();
    symlink(&outside, root.join("s")).unwrap();
    symlink("../outside", root.join("rel")).unwrap();
    let d = t.path().join("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("blob-000001"), "evil").unwrap();
    let with = |entries: &str| {
        write_index(
            &d,
            &format!(
                r#"{{"format":"rrc-fs-delta","version":1,"full":false,"entries":[{entries}]}}"#
            ),
        )
    };
    let meta = r#"{"mode":420,"uid":0,"gid":0,"mtime":1,"mtime_nsec":0}"#;
    for p in [
        "../outside/victim",
        "/etc/x",
        "a/../../x",
        "a//b",
        "./a",
        "",
    ] {
        with(&format!(
            r#"{{"op":"file","path":"{p}","blob":"blob-000001","size":4,"meta":{meta}}}"#
        ));
        let e = apply(&d, &root).unwrap_err();
        assert!(matches!(e, FsDeltaError::Corrupt { .. }), "{p}: {e}");
    }
    // Well-formed paths through symbolic links in the rootfs.
    for p in ["s/victim", "rel/victim", "s/new"] {
        with(&format!(
            r#"{{"op":"file","path":"{p}","blob":"blob-000001","size":4,"meta":{meta}}}"#
        ));
        let e = apply(&d, &root).unwrap_err();
        assert!(matches!(e, FsDeltaError::Escape { .. }), "{p}: {e}");
        assert!(e.to_string().contains(p), "{e}");
        with(&format!(r#"{{"op":"delete","path":"{p}"}}"#));
        let e = apply(&d, &root).unwrap_err();
        assert!(matches!(e, FsDeltaError::Escape { .. }), "{p}: {e}");
        with(&format!(
            r#"{{"op":"dir","path":"{p}","opaque":true,"meta":{meta}}}"#
        ));
        assert!(matches!(
            apply(&d, &root).unwrap_err(),
            FsDeltaError::Escape { .. }
        ));
    }
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"safe");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    // Replacing the symbolic link itself is fine: it is the last component.
    with(&format!(
        r#"{{"op":"file","path":"s","blob":"blob-000001","size":4,"meta":{meta}}}"#
    ));
    apply(&d, &root).unwrap();
    assert!(fs::symlink_metadata(root.join("s")).unwrap().is_file());
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"safe");
}

#[test]
fn a_chain_is_checked_before_anything_is_applied() {
    let mut b = Bed::new();
    fs::write(b.u("one"), "1").unwrap();
    settle();
    let (d1, _) = b.take();
    fs::write(b.u("two"), "2").unwrap();
    settle();
    let (d2, _) = b.take();
    fs::write(
        d2.join(INDEX),
        "{\"format\":\"rrc-fs-delta\",\"version\":1,",
    )
    .unwrap();
    let e = apply_chain(&[&d1, &d2], &b.root).unwrap_err();
    assert!(e.to_string().contains(&d2.display().to_string()), "{e}");
    assert!(snapshot(&b.root).len() == 1, "nothing applied");
    // Intact, the chain gives the primary's tree.
    fs::remove_dir_all(&d2).unwrap();
    b.tracker.undo_last();
    let (d2, _) = b.take();
    let s = apply_chain(&[&d1, &d2], &b.root).unwrap();
    assert_eq!((s.deltas, s.files), (2, 2));
    assert_same(&b.upper, &b.root);
}

#[test]
fn overlay_features_that_cannot_be_carried_are_refused() {
    let mut b = Bed::new();
    fs::create_dir(b.u("moved")).unwrap();
    setx(&b.u("moved"), "trusted.overlay.redirect", b"/orig");
    let out = b.deltas.join("x");
    let e = b.tracker.delta(&b.upper, &out).unwrap_err();
    assert!(matches!(e, FsDeltaError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("redirect_dir"), "{e}");
    fs::remove_dir(b.u("moved")).unwrap();
    fs::write(b.u("meta"), "").unwrap();
    setx(&b.u("meta"), "trusted.overlay.metacopy", b"");
    let out = b.deltas.join("y");
    let e = b.tracker.delta(&b.upper, &out).unwrap_err();
    assert!(e.to_string().contains("metacopy"), "{e}");
}

/// The cost of a delta, which adds to the container's frozen time when taken from CRIU's
/// `post-dump` action script: `cargo test -p rrc-fs-delta --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn delta_cost() {
    let mut b = Bed::new();
    for d in 0..100 {
        fs::create_dir(b.u(&format!("d{d}"))).unwrap();
        for f in 0..100 {
            fs::write(b.u(&format!("d{d}/f{f}")), vec![b'x'; 4096]).unwrap();
        }
    }
    settle();
    let (_, s) = b.take();
    eprintln!("full, 10000 files of 4 KiB in 100 dirs: {:?}", s.elapsed);
    let (_, s) = b.take();
    eprintln!(
        "nothing changed: {:?} ({} entries scanned)",
        s.elapsed, s.scanned
    );
    for d in 0..10 {
        for f in 0..10 {
            fs::write(b.u(&format!("d{d}/f{f}")), vec![b'y'; 4096]).unwrap();
        }
    }
    settle();
    let (_, s) = b.take();
    eprintln!("100 files changed: {:?} ({} files)", s.elapsed, s.files);
}
