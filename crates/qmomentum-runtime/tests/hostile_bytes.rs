//! `Model::from_bytes` must never panic: random bytes, and valid files with random mutations
//! (bit flips, overwritten bytes, truncation, header-length changes, metadata edits).

mod common;

use common::{base_binary, base_cnn, base_int8, base_packed, cnn_small_model, mixed_model, Rng};
use proptest::prelude::*;
use qmomentum_runtime::Model;

fn valid_files() -> Vec<Vec<u8>> {
    vec![
        base_int8().bytes(),
        base_binary().bytes(),
        mixed_model(&mut Rng(3)).to_bytes().unwrap(),
        base_cnn().bytes(),
        base_packed().bytes(),
    ]
}

/// Loads, and if that succeeds, also runs the model once (a file that loads must run).
fn load_and_maybe_run(bytes: &[u8]) {
    if let Ok(model) = Model::from_bytes(bytes) {
        let x = vec![7u8; model.input().size];
        let mut ws = model.workspace(1);
        model.run(&mut ws, &x, 1).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_do_not_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        load_and_maybe_run(&bytes);
    }

    #[test]
    fn random_header_lengths_do_not_panic(len in any::<u64>(), rest in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(rest);
        prop_assert!(Model::from_bytes(&bytes).is_err());
    }

    #[test]
    fn mutated_files_do_not_panic(
        which in 0usize..4,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_files().swap_remove(which);
        for (at, value, how) in edits {
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = value,
                1 => bytes[i] ^= 1 << (value % 8),
                // Edits inside the JSON header: digits and structure characters.
                2 => bytes[i] = b"0123456789-[]{}\",:e."[usize::from(value) % 20],
                _ => bytes[i] = bytes[i].wrapping_add(1),
            }
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        load_and_maybe_run(&bytes);
    }
}

#[test]
fn metadata_numbers_at_the_limits_do_not_panic() {
    // Sizes near usize::MAX must not overflow shape arithmetic.
    for size in [
        "18446744073709551615",
        "9223372036854775808",
        "4294967296",
        "0",
        "-1",
        "1e30",
        "null",
    ] {
        for field in ["in", "out"] {
            let mut raw = base_int8();
            raw.doc["layers"][0][field] = serde_json::from_str(size).unwrap();
            assert!(Model::from_bytes(&raw.bytes()).is_err(), "{field} = {size}");
        }
        let mut raw = base_binary();
        raw.doc["layers"][1]["in"] = serde_json::from_str(size).unwrap();
        assert!(Model::from_bytes(&raw.bytes()).is_err(), "bin in = {size}");
        let mut raw = base_int8();
        raw.doc["input"]["size"] = serde_json::from_str(size).unwrap();
        assert!(Model::from_bytes(&raw.bytes()).is_err(), "input.size = {size}");
    }
    // The same for every number of a convolution and a pooling layer.
    for size in [
        "18446744073709551615",
        "9223372036854775808",
        "4294967296",
        "65537",
        "0",
        "-1",
        "1e30",
        "null",
    ] {
        let v: serde_json::Value = serde_json::from_str(size).unwrap();
        let conv_fields: [(&str, serde_json::Value); 9] = [
            ("in_shape", serde_json::json!([v, 6, 2])),
            ("in_shape", serde_json::json!([6, 6, v])),
            ("out", v.clone()),
            ("kernel", serde_json::json!([3, v])),
            ("stride", serde_json::json!([v, 1])),
            ("padding", serde_json::json!([1, 1, v, 1])),
            ("dilation", serde_json::json!([v, v])),
            ("groups", v.clone()),
            ("input_zero_point", v.clone()),
        ];
        for (field, value) in conv_fields {
            if size == "0" && (field == "padding" || field == "input_zero_point") {
                continue; // valid values
            }
            let mut raw = base_cnn();
            raw.doc["layers"][0][field] = value.clone();
            assert!(Model::from_bytes(&raw.bytes()).is_err(), "conv {field} = {value}");
        }
        for (field, value) in [
            ("kernel", serde_json::json!([v, 2])),
            ("padding", serde_json::json!([0, v, 0, 0])),
        ] {
            if size == "0" && field == "padding" {
                continue; // a valid value
            }
            let mut raw = base_cnn();
            raw.doc["layers"][1][field] = value.clone();
            assert!(Model::from_bytes(&raw.bytes()).is_err(), "pool {field} = {value}");
        }
        let mut raw = base_cnn();
        raw.doc["input"]["shape"] = serde_json::json!([6, v, 2]);
        assert!(Model::from_bytes(&raw.bytes()).is_err(), "input.shape = {size}");
    }
    // A real CNN file loads and runs.
    load_and_maybe_run(&cnn_small_model(&mut Rng(4)).to_bytes().unwrap());
    // Deeply nested JSON is rejected, not a stack overflow.
    let mut raw = base_int8();
    raw.doc = serde_json::Value::String("[".repeat(100_000));
    assert!(Model::from_bytes(&raw.bytes()).is_err());
}
