//! Fuzzes the runtime-options decoder: containerd's bytes must never crash the shim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrc_shim::options::ShimOptions;

const TYPES: [&str; 5] = [
    "containerd.runc.v1.Options",
    "containerd.linux.runc.CreateOptions",
    "containerd.linux.runc.RuncOptions",
    "runtimeoptions.v1.Options",
    "example.Unknown",
];

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, rest)) = data.split_first() {
        let _ = ShimOptions::decode(TYPES[usize::from(selector) % TYPES.len()], rest);
    }
});
