//! Fuzzes the replication channel's decoders: frames and handshake hellos from the network must
//! never crash a shim, and a decoded frame must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_channel::frame;
use rrc_channel::handshake::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((f, used))) = frame::decode(data) {
        let again = frame::encode(f.kind, f.seq, &f.payload).expect("decoded frames re-encode");
        assert_eq!(&data[..used], &again[..]);
    }
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }
});
