//! Low-bit weight storage (`weight_bits` 4 and 2): the writer picks the narrowest width, the
//! file holds packed codes, and reading back gives the same codes and the same logits as the
//! 8-bit storage of those codes, on every kernel tier.

mod common;

use common::{cnn_small_model, mixed_model, random_model, Kind, Rng};
use qmomentum_runtime::{KernelKind, Layer, Model, Output};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `model` with the codes of its int8 layers `which` mapped into the signed `bits`-bit range
/// (symmetric, so the activations do not all clamp: [-7, 7] at 4 bits, the ternary {-1, 0, 1}
/// at 2; the kernel property tests cover the codes -8 and -2).
fn narrowed(model: &Model, which: &[usize], bits: u32) -> Model {
    let lo = 1 - (1i32 << (bits - 1));
    let span = 1 - 2 * lo;
    let map = |w: &mut Vec<i8>| {
        for v in w.iter_mut() {
            *v = (lo + (i32::from(*v) + 128) % span) as i8;
        }
    };
    // Accumulators shrink by about 2^(8 − bits): scale the u8 outputs up as much.
    let boost = |o: &mut Output| {
        if let Output::U8 { shift, .. } = o {
            for r in shift.iter_mut() {
                *r = (*r - (8 - bits as i32)).max(-30);
            }
        }
    };
    let mut layers = model.layers().to_vec();
    for &i in which {
        match &mut layers[i] {
            Layer::DenseI8 { weight, output, .. } | Layer::Conv2dI8 { weight, output, .. } => {
                map(weight);
                boost(output);
            }
            _ => panic!("layer {i} has no int8 weights"),
        }
    }
    Model::new(model.input().clone(), layers).unwrap()
}

/// The metadata document and the tensors' (dtype, shape) of a file.
fn inspect(bytes: &[u8]) -> (Value, SafeTensors<'_>) {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let doc: Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["qmomentum"]).unwrap();
    (doc, SafeTensors::deserialize(bytes).unwrap())
}

/// Writes `model`, checks the widths and tensor shapes in the file, reads it back and checks
/// codes and logits against the 8-bit storage of the same model on every tier.
fn check_round_trip(name: &str, model: &Model, want_bits: &[(usize, u64, usize, usize)]) {
    let packed = model.to_bytes().unwrap();
    let plain = model.to_bytes_min_weight_bits(8).unwrap();
    assert!(packed.len() < plain.len(), "{name}: {} ≥ {}", packed.len(), plain.len());
    let (doc, st) = inspect(&packed);
    for &(i, b, rows, row_bytes) in want_bits {
        assert_eq!(doc["layers"][i]["weight_bits"].as_u64(), Some(b), "{name} layer {i}");
        let t = st.tensor(&format!("layers.{i}.weight")).unwrap();
        assert_eq!(t.dtype(), Dtype::U8, "{name} layer {i}");
        assert_eq!(t.shape(), [rows, row_bytes], "{name} layer {i}");
    }
    let (doc8, _) = inspect(&plain);
    assert!(doc8.to_string().find("weight_bits").is_none());

    let a = Model::from_bytes(&packed).unwrap();
    let b = Model::from_bytes(&plain).unwrap();
    assert_eq!(a.layers(), model.layers(), "{name}: codes changed");
    assert_eq!(b.layers(), model.layers(), "{name}: codes changed (8-bit)");
    assert_eq!(a.to_bytes().unwrap(), packed, "{name}: not deterministic");
    assert_eq!(b.to_bytes().unwrap(), packed, "{name}: 8-bit file re-written narrow");

    let mut rng = Rng(77);
    let batch = 70;
    let x = rng.bytes(batch * model.input().size);
    let mut ws = b.workspace(batch);
    let want = bits(b.run_with(KernelKind::Scalar, &mut ws, &x, batch).unwrap());
    let distinct: std::collections::BTreeSet<u32> = want.iter().copied().collect();
    assert!(
        distinct.len() > batch / 2,
        "{name}: degenerate model, {} distinct",
        distinct.len()
    );
    for kind in KernelKind::available() {
        for (what, m) in [("packed", &a), ("8-bit", &b)] {
            let mut ws = m.workspace(batch);
            let got = bits(m.run_with(kind, &mut ws, &x, batch).unwrap());
            assert_eq!(got, want, "{name} ({what} file): {kind:?} differs");
        }
    }
}

#[test]
fn four_and_two_bit_mlp_round_trip() {
    let mut rng = Rng(2024);
    let base = random_model(
        &mut rng,
        37,
        &[(Kind::I8, 29, "relu_u8"), (Kind::I8, 70, "u8"), (Kind::I8, 5, "logits")],
    );
    // Layer 0 at 4 bits (37 codes per row: an odd row, padded), layer 1 ternary-range at 2
    // bits (29 codes: 8 bytes, 3 padding bits pairs), layer 2 stays 8-bit.
    let m = narrowed(&narrowed(&base, &[0], 4), &[1], 2);
    check_round_trip("mlp 4/2/8", &m, &[(0, 4, 29, 19), (1, 2, 70, 8)]);
    let s = m.layer_storage();
    assert_eq!(
        (s[0].weights, s[0].weight_bits, s[0].weight_bytes),
        (37 * 29, 4, 29 * 19)
    );
    assert_eq!(
        (s[1].weights, s[1].weight_bits, s[1].weight_bytes),
        (29 * 70, 2, 70 * 8)
    );
    assert_eq!((s[2].weights, s[2].weight_bits, s[2].weight_bytes), (70 * 5, 8, 70 * 5));
    assert_eq!(s[0].f32_weight_bytes(), 4 * 37 * 29);
    assert!((s[1].ratio_to_f32() - 560.0 / 8120.0).abs() < 1e-12);
    // Bias (4 B) and multiplier/shift (8 B) per channel come on top.
    assert_eq!(s[0].tensor_bytes, 29 * 19 + 29 * 12);

    // A ternary model: codes in {-1, 0, 1} in every layer.
    let ternary = narrowed(&base, &[0, 1, 2], 2);
    check_round_trip("ternary", &ternary, &[(0, 2, 29, 10), (1, 2, 70, 8), (2, 2, 5, 18)]);
}

#[test]
fn four_bit_mnist_mlp_is_a_quarter_of_f32() {
    let mut rng = Rng(7);
    let base = random_model(
        &mut rng,
        784,
        &[
            (Kind::I8, 128, "relu_u8"),
            (Kind::I8, 64, "relu_u8"),
            (Kind::I8, 10, "logits"),
        ],
    );
    let m = narrowed(&base, &[0, 1], 4);
    check_round_trip("mnist 4-bit hidden", &m, &[(0, 4, 128, 392), (1, 4, 64, 64)]);
    let s = m.layer_storage();
    assert_eq!(s[0].weight_bytes * 8, s[0].f32_weight_bytes());
}

#[test]
fn four_bit_convolutions_round_trip() {
    let mut rng = Rng(3);
    let cnn = cnn_small_model(&mut rng);
    // conv 1: 32 × 9 codes (5 bytes per row, padded); conv 2: 64 × 288 codes; dense 3136 → 10.
    let m = narrowed(&cnn, &[0, 2, 4], 4);
    check_round_trip(
        "cnn-small 4-bit",
        &m,
        &[(0, 4, 32, 5), (2, 4, 64, 144), (4, 4, 10, 1568)],
    );
    let m2 = narrowed(&cnn, &[2], 2);
    check_round_trip("cnn-small conv 2 at 2 bits", &m2, &[(2, 2, 64, 72)]);
}

#[test]
fn mixed_models_keep_eight_bits_where_codes_need_them() {
    let mut rng = Rng(9);
    let m = mixed_model(&mut rng);
    let bytes = m.to_bytes().unwrap();
    assert_eq!(bytes, m.to_bytes_min_weight_bits(8).unwrap());
    assert!(m.to_bytes_min_weight_bits(3).is_err());
    assert_eq!(Model::from_bytes(&bytes).unwrap().layers(), m.layers());
}
