//! Fuzzes the stdio parser: whatever strings containerd sends, the shim answers with a value or
//! an error, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_shim::io::Stdio;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (a, b, c) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let _ = Stdio::new(a, b, c, false);
});
