//! The IDX reader (raw and gzip) on arbitrary bytes: an error or a dataset, never a panic, and
//! no allocation beyond what the bytes justify.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = qmomentum::data::idx::parse_idx(data, std::path::Path::new("fuzz")) {
        let total = idx.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(total, Some(idx.data.len()));
    }
});
