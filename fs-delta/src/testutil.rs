//! Helpers for the tests: tree snapshots and comparison, overlay mounts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a tree comparison looks at for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Option<Vec<u8>>,
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub type Tree = BTreeMap<Vec<u8>, Node>;

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut buf = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(p, &mut buf[..]) {
        Ok(n) => n,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if crate::format::carried_xattr(name) {
            let mut v = vec![0u8; 65536];
            let osn = std::ffi::OsStr::from_bytes(name);
            if let Ok(k) = rustix::fs::lgetxattr(p, osn, &mut v[..]) {
                v.truncate(k);
                out.push((name.to_vec(), v));
            }
        }
    }
    out.sort();
    out
}

/// Everything under `root` (the root itself as `""`), not following symbolic links.
pub fn snapshot(root: &Path) -> Tree {
    let mut t = Tree::new();
    walk(root, Vec::new(), &mut t);
    t
}

fn walk(p: &Path, rel: Vec<u8>, t: &mut Tree) {
    let md = fs::symlink_metadata(p).unwrap();
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else {
        "block"
    };
    let node = Node {
        kind,
        mode: if ft.is_symlink() {
            0
        } else {
            md.mode() & 0o7777
        },
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        content: ft.is_file().then(|| fs::read(p).unwrap()),
        target: ft
            .is_symlink()
            .then(|| fs::read_link(p).unwrap().as_os_str().as_bytes().to_vec()),
        rdev: if ft.is_char_device() || ft.is_block_device() {
            md.rdev()
        } else {
            0
        },
        xattrs: if ft.is_file() || ft.is_dir() {
            xattrs(p)
        } else {
            Vec::new()
        },
    };
    t.insert(rel.clone(), node);
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(n.as_bytes());
            walk(&p.join(&n), r, t);
        }
    }
}

/// Differences between two trees, readable; empty when equal.
pub fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (k, na) in a {
        match b.get(k) {
            None => out.push(format!("only in primary: {:?}", String::from_utf8_lossy(k))),
            Some(nb) if na != nb => out.push(format!(
                "differs: {:?}\n  primary {:?}\n  backup  {:?}",
                String::from_utf8_lossy(k),
                short(na),
                short(nb)
            )),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("only in backup: {:?}", String::from_utf8_lossy(k)));
        }
    }
    out
}

fn short(n: &Node) -> String {
    let mut n = n.clone();
    let c = n.content.take().map(|c| {
        if c.len() > 40 {
            format!("{} bytes", c.len())
        } else {
            format!("{:?}", String::from_utf8_lossy(&c))
        }
    });
    format!("{n:?} content={c:?}")
}

#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    let d = diff(&snapshot(a), &snapshot(b));
    assert!(d.is_empty(), "trees differ:\n{}", d.join("\n"));
}

/// An overlay mount, unmounted on drop.
pub struct Overlay {
    pub upper: PathBuf,
    pub merged: PathBuf,
}

impl Overlay {
    /// Mounts lower + a new upper under `dir`; `None` (with a message) when mounting fails.
    pub fn mount(lower: &Path, dir: &Path) -> Option<Overlay> {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let merged = dir.join("merged");
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Overlay { upper, merged }),
            Ok(o) => {
                eprintln!(
                    "SKIP: cannot mount an overlay (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.merged).status();
    }
}

/// Waits past the racy window so what was just written counts as settled.
pub fn settle() {
    std::thread::sleep(crate::RACY_WINDOW + std::time::Duration::from_millis(10));
}
