//! The recorder's test program (`testprogs/rrctest.c`), compiled with `cc` on first use (kept
//! in the temp dir, per source version): for the tests of this crate and of the replayer,
//! which replays its recordings. Not part of the recorder's interface.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SRC: &str = include_str!("../testprogs/rrctest.c");

/// The compiled program's path. Panics if `cc` (build-essential) is missing or fails: tests
/// cannot run without it.
pub fn path() -> &'static Path {
    static PROG: OnceLock<PathBuf> = OnceLock::new();
    PROG.get_or_init(|| {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in SRC.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        let dir = std::env::temp_dir().join("rrc-recorder-tests");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let out = dir.join(format!("rrctest-{h:016x}"));
        if out.exists() {
            return out;
        }
        let tmp = dir.join(format!("rrctest-{h:016x}.{}", std::process::id()));
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/testprogs/rrctest.c");
        let st = std::process::Command::new("cc")
            .args(["-O1", "-pthread", "-o"])
            .arg(&tmp)
            .arg(src)
            .status()
            .expect("cc (build-essential) is needed to build the recorder's test program");
        assert!(st.success(), "cc failed on {src}");
        std::fs::rename(&tmp, &out).expect("rename");
        out
    })
}
