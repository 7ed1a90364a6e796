//! Fuzzes the decoder of the control messages a peer sends on the replication channel (after a
//! successful handshake, so from an authenticated but possibly buggy peer): a message or an
//! error, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_shim::replica::wire::Control;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Control::decode(data) {
        // What decodes must encode and decode to the same message.
        assert_eq!(Control::decode(&m.encode()).ok(), Some(m));
    }
});
