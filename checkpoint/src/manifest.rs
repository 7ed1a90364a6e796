//! Sealed image directories: the `rrc-complete` marker.
//!
//! After a dump succeeded, [`seal`] writes `rrc-complete` into the image directory: every file
//! CRIU and runc wrote there, with its size and CRC-32C, and a last line that checks the marker
//! itself. It is written to a temporary name and renamed, so it exists only complete. [`verify`]
//! checks a directory against its marker before anything is restored from it: a directory without
//! the marker (a dump that did not finish, a copy that did not finish), with a file missing, of
//! another size or with other contents is refused. Files not named in the marker (a restore's
//! `stats-restore`, say) are ignored.
//!
//! CRC-32C guards against truncation and corruption in storage or transfer, not against someone
//! who wants to forge an image: images are authenticated by the channel that carries them.
//!
//! Format (text, one line each):
//!
//! ```text
//! rrc-complete 1
//! <crc32c, 8 hex digits> <size in bytes> <file name>
//! ...
//! end <number of files> <crc32c of every byte above this line, 8 hex digits>
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Name of the marker file in a sealed image directory.
pub const MARKER: &str = "rrc-complete";
const HEADER: &str = "rrc-complete 1";
const TMP_SUFFIX: &str = ".tmp";

/// Why an image directory cannot be sealed or is not complete.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// No marker: the dump (or its copy) did not finish.
    #[error(
        "image directory {dir} is incomplete: it has no {MARKER} marker (the dump or its copy did not finish)"
    )]
    Unsealed {
        /// The image directory.
        dir: PathBuf,
    },
    /// The marker itself is damaged.
    #[error("image directory {dir}: its {MARKER} marker is damaged: {why}")]
    BadMarker {
        /// The image directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file the marker names is missing.
    #[error("image directory {dir} is incomplete: {file} is missing")]
    Missing {
        /// The image directory.
        dir: PathBuf,
        /// The missing file's name.
        file: String,
    },
    /// A file has another size than when it was sealed.
    #[error("image directory {dir} is corrupt: {file} has {actual} bytes, {expected} when sealed")]
    Size {
        /// The image directory.
        dir: PathBuf,
        /// The file's name.
        file: String,
        /// Size when sealed.
        expected: u64,
        /// Size now.
        actual: u64,
    },
    /// A file has other contents than when it was sealed.
    #[error(
        "image directory {dir} is corrupt: {file} has CRC-32C {actual:08x}, {expected:08x} when sealed"
    )]
    Checksum {
        /// The image directory.
        dir: PathBuf,
        /// The file's name.
        file: String,
        /// Checksum when sealed.
        expected: u32,
        /// Checksum now.
        actual: u32,
    },
    /// Something in the directory is not a plain file, or has a name the marker cannot hold.
    #[error("image directory {dir}: cannot seal {entry}: {why}")]
    Unsealable {
        /// The image directory.
        dir: PathBuf,
        /// The entry.
        entry: String,
        /// Why.
        why: &'static str,
    },
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One file of a sealed image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFile {
    /// File name (no directory part).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// CRC-32C of the contents.
    pub crc32c: u32,
}

/// The contents of a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The sealed files, sorted by name.
    pub files: Vec<SealedFile>,
}

impl Manifest {
    /// Total size of the sealed files, in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn render(&self) -> String {
        let mut text = format!("{HEADER}\n");
        for f in &self.files {
            text.push_str(&format!("{:08x} {} {}\n", f.crc32c, f.size, f.name));
        }
        let crc = crc32c::crc32c(text.as_bytes());
        text.push_str(&format!("end {} {crc:08x}\n", self.files.len()));
        text
    }

    fn parse(dir: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let bad = |why: String| ManifestError::BadMarker {
            dir: dir.to_path_buf(),
            why,
        };
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| bad("too short".into()))?;
        let (body, last) = text.split_at(body_end);
        let mut end = last.trim_end_matches('\n').split(' ');
        let (Some("end"), Some(count), Some(crc), None) =
            (end.next(), end.next(), end.next(), end.next())
        else {
            return Err(bad(format!("no end line (last line {last:?})")));
        };
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad(format!("bad checksum {crc:?}")))?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err(bad("its checksum does not match its contents".into()));
        }
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad(format!("first line is not {HEADER:?}")));
        }
        let mut files = Vec::new();
        for line in lines {
            let mut parts = line.splitn(3, ' ');
            let (Some(crc), Some(size), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(format!("bad line {line:?}")));
            };
            let crc32c =
                u32::from_str_radix(crc, 16).map_err(|_| bad(format!("bad line {line:?}")))?;
            let size = size
                .parse()
                .map_err(|_| bad(format!("bad line {line:?}")))?;
            if !plain_name(name) {
                return Err(bad(format!("bad file name {name:?}")));
            }
            files.push(SealedFile {
                name: name.to_string(),
                size,
                crc32c,
            });
        }
        if count.parse::<usize>().ok() != Some(files.len()) {
            return Err(bad(format!(
                "end line counts {count} files, {} listed",
                files.len()
            )));
        }
        Ok(Manifest { files })
    }
}

/// A name the marker can hold and that stays inside the directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\n', '\r', '\0'])
        && name != MARKER
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Size and CRC-32C of a file, read to its end.
fn checksum(path: &Path) -> Result<(u64, u32), ManifestError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(path)(e)),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        crc = crc32c::crc32c_append(crc, chunk);
        size += n as u64;
    }
    Ok((size, crc))
}

/// Seals `dir`: writes the marker naming every regular file in it. Fails on anything else (a
/// subdirectory, a symlink, a name with a newline): the image directory is CRIU's and runc's
/// alone. A marker already there is replaced.
pub fn seal(dir: &Path) -> Result<Manifest, ManifestError> {
    let tmp_name = format!("{MARKER}{TMP_SUFFIX}");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let unsealable = |why| ManifestError::Unsealable {
            dir: dir.to_path_buf(),
            entry: name.to_string_lossy().into_owned(),
            why,
        };
        let Some(name) = name.to_str() else {
            return Err(unsealable("its name is not UTF-8"));
        };
        if name == MARKER || name == tmp_name {
            continue;
        }
        if !plain_name(name) {
            return Err(unsealable("its name cannot be recorded"));
        }
        let kind = entry.file_type().map_err(io(&entry.path()))?;
        if !kind.is_file() {
            return Err(unsealable("not a regular file"));
        }
        let (size, crc32c) = checksum(&entry.path())?;
        files.push(SealedFile {
            name: name.to_string(),
            size,
            crc32c,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest { files };
    let tmp = dir.join(&tmp_name);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(manifest.render().as_bytes())
        .map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    let marker = dir.join(MARKER);
    std::fs::rename(&tmp, &marker).map_err(io(&marker))?;
    Ok(manifest)
}

/// Removes the marker of `dir`, if any (before the directory is reused or deleted).
pub fn unseal(dir: &Path) -> Result<(), ManifestError> {
    let marker = dir.join(MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&marker)(e)),
    }
}

/// Checks `dir` against its marker: every file named there exists with the recorded size and
/// checksum. Returns the manifest.
pub fn verify(dir: &Path) -> Result<Manifest, ManifestError> {
    let marker = dir.join(MARKER);
    let text = match std::fs::read(&marker) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ManifestError::Unsealed {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&marker)(e)),
    };
    let text = String::from_utf8(text).map_err(|_| ManifestError::BadMarker {
        dir: dir.to_path_buf(),
        why: "not UTF-8".into(),
    })?;
    let manifest = Manifest::parse(dir, &text)?;
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing {
                    dir: dir.to_path_buf(),
                    file: f.name.clone(),
                })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        if !meta.is_file() {
            return Err(ManifestError::Missing {
                dir: dir.to_path_buf(),
                file: f.name.clone(),
            });
        }
        if meta.len() != f.size {
            return Err(ManifestError::Size {
                dir: dir.to_path_buf(),
                file: f.name.clone(),
                expected: f.size,
                actual: meta.len(),
            });
        }
        let (size, crc) = checksum(&path)?;
        if size != f.size {
            return Err(ManifestError::Size {
                dir: dir.to_path_buf(),
                file: f.name.clone(),
                expected: f.size,
                actual: size,
            });
        }
        if crc != f.crc32c {
            return Err(ManifestError::Checksum {
                dir: dir.to_path_buf(),
                file: f.name.clone(),
                expected: f.crc32c,
                actual: crc,
            });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("pages-1.img"), vec![7u8; 3 * 4096 + 5]).expect("write");
        std::fs::write(d.path().join("core-1.img"), b"core").expect("write");
        std::fs::write(d.path().join("descriptors.json"), b"[\"/dev/null\"]").expect("write");
        std::fs::write(d.path().join("empty.img"), b"").expect("write");
        d
    }

    #[test]
    fn seal_then_verify() {
        let d = image_dir();
        let sealed = seal(d.path()).expect("seal");
        assert_eq!(sealed.files.len(), 4);
        assert_eq!(sealed.total_bytes(), 3 * 4096 + 5 + 4 + 13);
        assert_eq!(verify(d.path()).expect("verify"), sealed);
        // Files that appear later (a restore's statistics) are ignored.
        std::fs::write(d.path().join("stats-restore"), b"x").expect("write");
        verify(d.path()).expect("verify with an extra file");
        // Sealing again replaces the marker.
        let again = seal(d.path()).expect("seal again");
        assert_eq!(again.files.len(), 5);
        assert!(!d.path().join("rrc-complete.tmp").exists());
    }

    #[test]
    fn refuses_unsealed_truncated_missing_and_corrupt() {
        let d = image_dir();
        let e = verify(d.path()).expect_err("unsealed");
        assert!(matches!(e, ManifestError::Unsealed { .. }), "{e}");
        assert!(e.to_string().contains("incomplete"), "{e}");

        seal(d.path()).expect("seal");
        let pages = d.path().join("pages-1.img");
        let f = File::options().write(true).open(&pages).expect("open");
        f.set_len(4096).expect("truncate");
        drop(f);
        let e = verify(d.path()).expect_err("truncated");
        assert!(
            matches!(&e, ManifestError::Size { file, expected, actual: 4096, .. } if file == "pages-1.img" && *expected == 3 * 4096 + 5),
            "{e}"
        );

        std::fs::remove_file(&pages).expect("remove");
        let e = verify(d.path()).expect_err("missing");
        assert!(
            matches!(&e, ManifestError::Missing { file, .. } if file == "pages-1.img"),
            "{e}"
        );

        std::fs::write(&pages, vec![7u8; 3 * 4096 + 5]).expect("write");
        verify(d.path()).expect("restored contents");
        std::fs::write(d.path().join("core-1.img"), b"cORE").expect("write");
        let e = verify(d.path()).expect_err("corrupt");
        assert!(
            matches!(&e, ManifestError::Checksum { file, .. } if file == "core-1.img"),
            "{e}"
        );
    }

    #[test]
    fn refuses_a_damaged_marker() {
        let d = image_dir();
        seal(d.path()).expect("seal");
        let marker = d.path().join(MARKER);
        let text = std::fs::read_to_string(&marker).expect("read");

        // Cut short (the last line lost).
        let cut = &text[..text.trim_end().rfind('\n').expect("lines")];
        std::fs::write(&marker, cut).expect("write");
        let e = verify(d.path()).expect_err("cut");
        assert!(matches!(e, ManifestError::BadMarker { .. }), "{e}");

        // A size edited to match a truncated file.
        let edited = text.replace(" 12293 pages-1.img", " 4096 pages-1.img");
        assert_ne!(edited, text);
        std::fs::write(&marker, edited).expect("write");
        let e = verify(d.path()).expect_err("edited");
        assert!(e.to_string().contains("checksum"), "{e}");

        std::fs::write(&marker, "").expect("write");
        assert!(matches!(
            verify(d.path()),
            Err(ManifestError::BadMarker { .. })
        ));
        std::fs::write(&marker, text).expect("write");
        verify(d.path()).expect("intact again");
        unseal(d.path()).expect("unseal");
        assert!(matches!(
            verify(d.path()),
            Err(ManifestError::Unsealed { .. })
        ));
        unseal(d.path()).expect("unseal twice");
    }

    #[test]
    fn refuses_to_seal_what_is_not_an_image_file() {
        let d = image_dir();
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        let e = seal(d.path()).expect_err("subdirectory");
        assert!(matches!(e, ManifestError::Unsealable { .. }), "{e}");
        std::fs::remove_dir(d.path().join("sub")).expect("rmdir");
        std::fs::write(d.path().join("a\nb"), b"").expect("write");
        assert!(matches!(
            seal(d.path()),
            Err(ManifestError::Unsealable { .. })
        ));
    }

    #[test]
    fn names_with_spaces_survive() {
        let d = image_dir();
        std::fs::write(d.path().join("a b.img"), b"xy").expect("write");
        let m = seal(d.path()).expect("seal");
        assert!(m.files.iter().any(|f| f.name == "a b.img"));
        assert_eq!(verify(d.path()).expect("verify"), m);
    }
}
