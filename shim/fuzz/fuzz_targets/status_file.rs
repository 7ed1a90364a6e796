//! Fuzzes the reader of `rrc-status.json` (what `containerd-shim-rrc-v2 status` reads from every
//! bundle): a status or an error naming the file, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_shim::status;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("/fuzz/rrc-status.json");
    if let Ok(s) = status::decode(data, path) {
        let _ = status::render_detail(&s);
    }
});
