//! Fuzzes a delta's index reader: whatever a (damaged or hostile) `index.json` holds, reading it
//! gives an index that passed every check, or an error, never a crash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch delta directory for the whole run.
fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("rrc-fs-delta-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        // A blob the index may name.
        let _ = std::fs::write(d.join("blob-000000"), b"hello");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    if std::fs::write(d.join(rrc_fs_delta::INDEX), data).is_ok() {
        let _ = rrc_fs_delta::read_index(d);
    }
});
