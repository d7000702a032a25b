//! The checkpoint loader on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qmomentum::checkpoint::from_bytes(data, std::path::Path::new("fuzz"));
});
