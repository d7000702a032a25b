//! Whole models: every kernel tier gives bit-identical logits, files round-trip exactly, and
//! the threaded entry points agree with `run`.

mod common;

use common::{binary_all_model, binary_head_model, mixed_model, random_model, Kind, Rng};
use qmomentum_runtime::{Error, KernelKind, Model};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn models() -> Vec<(&'static str, Model)> {
    let mut rng = Rng(2024);
    vec![
        (
            "int8 odd sizes",
            random_model(
                &mut rng,
                37,
                &[(Kind::I8, 29, "relu_u8"), (Kind::I8, 70, "u8"), (Kind::I8, 5, "logits")],
            ),
        ),
        (
            "int8 mnist shape",
            random_model(
                &mut rng,
                784,
                &[
                    (Kind::I8, 128, "relu_u8"),
                    (Kind::I8, 64, "relu_u8"),
                    (Kind::I8, 10, "logits"),
                ],
            ),
        ),
        ("mixed", mixed_model(&mut rng)),
        ("binary head", binary_head_model(&mut rng)),
        ("binary all", binary_all_model(&mut rng)),
    ]
}

#[test]
fn all_tiers_agree_bit_for_bit() {
    let mut rng = Rng(99);
    for (name, model) in models() {
        // 130 rows: two full 64-row blocks and a partial one.
        let batch = 130;
        let x = rng.bytes(batch * model.input().size);
        let mut ws = model.workspace(batch);
        let want = bits(model.run_with(KernelKind::Scalar, &mut ws, &x, batch).unwrap());
        // The model must not be degenerate: logits vary across samples.
        let distinct: std::collections::BTreeSet<u32> = want.iter().copied().collect();
        assert!(distinct.len() > batch / 2, "{name}: degenerate model");
        for kind in KernelKind::available() {
            let got = bits(model.run_with(kind, &mut ws, &x, batch).unwrap());
            assert_eq!(got, want, "{name}: {kind:?} differs from scalar");
            // Row by row (batch 1, the latency path) gives the same too.
            let mut ws1 = model.workspace(1);
            for b in [0, 63, 64, 129] {
                let row = &x[b * model.input().size..(b + 1) * model.input().size];
                let got = bits(model.run_with(kind, &mut ws1, row, 1).unwrap());
                assert_eq!(got, want[b * model.num_classes()..(b + 1) * model.num_classes()]);
            }
        }
    }
}

#[test]
fn file_round_trip_is_exact() {
    let mut rng = Rng(5);
    for (name, model) in models() {
        let bytes = model.to_bytes().unwrap();
        let again = Model::from_bytes(&bytes).unwrap();
        assert_eq!(again.layers(), model.layers(), "{name}");
        assert_eq!(again.input(), model.input(), "{name}");
        assert_eq!(
            again.to_bytes().unwrap(),
            bytes,
            "{name}: serialisation not deterministic"
        );
        let batch = 17;
        let x = rng.bytes(batch * model.input().size);
        assert_eq!(
            bits(&model.logits(&x, batch, 1).unwrap()),
            bits(&again.logits(&x, batch, 1).unwrap()),
            "{name}"
        );
    }
}

#[test]
fn save_and_load() {
    let dir = std::env::temp_dir().join(format!("qmomentum-runtime-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.qmm");
    let (_, model) = models().remove(2);
    model.save(&path).unwrap();
    let names = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(), ["model.qmm"]);
    let again = Model::load(&path).unwrap();
    assert_eq!(again.layers(), model.layers());
    // Overwriting works too.
    model.save(&path).unwrap();
    assert_eq!(names(), ["model.qmm"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_onto_a_directory_fails_and_leaves_nothing_behind() {
    let parent = std::env::temp_dir().join(format!("qmomentum-runtime-test-savedir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    let dir = parent.join("out");
    std::fs::create_dir_all(&dir).unwrap();
    let (_, model) = models().remove(0);
    let err = model.save(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(&err, Error::Io { path, .. } if path == &dir), "{err:?}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("is a directory"), "{msg}");
    // Neither the parent nor the directory holds a temporary file (or anything else).
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&parent), ["out"]);
    assert!(names(&dir).is_empty());
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn threads_and_chunks_agree_with_run() {
    let mut rng = Rng(77);
    // 130 rows: 64-row pieces with a partial one; 1000 rows: 64-row pieces on 2 threads;
    // 2600 rows: 256-row pieces.
    for ((name, model), batch) in models()
        .into_iter()
        .flat_map(|m| [130, 1000, 2600].map(|b| (m.clone(), b)))
    {
        let x = rng.bytes(batch * model.input().size);
        let mut ws = model.workspace(batch);
        let want = model.run(&mut ws, &x, batch).unwrap().to_vec();
        let classes = model.num_classes();
        let argmax: Vec<u32> = want
            .chunks(classes)
            .map(|r| {
                let mut best = 0;
                for j in 1..classes {
                    if r[j] > r[best] {
                        best = j;
                    }
                }
                best as u32
            })
            .collect();
        for threads in [0, 1, 2, 3, 16] {
            assert_eq!(
                bits(&model.logits(&x, batch, threads).unwrap()),
                bits(&want),
                "{name} {threads}"
            );
            assert_eq!(model.predict(&x, batch, threads).unwrap(), argmax, "{name} {threads}");
        }
        assert!(model.predict(&[], 0, 2).unwrap().is_empty());
    }
}

#[test]
fn run_rejects_bad_arguments() {
    let models = models();
    let (_, a) = &models[0];
    let (_, b) = &models[1];
    let mut ws = a.workspace(4);
    let x = vec![0u8; 5 * a.input().size];
    assert!(matches!(
        a.run(&mut ws, &x, 5),
        Err(Error::BatchTooLarge { batch: 5, max_batch: 4 })
    ));
    assert!(matches!(a.run(&mut ws, &x[1..], 4), Err(Error::InputLength { .. })));
    assert!(matches!(b.run(&mut ws, &x, 1), Err(Error::WorkspaceMismatch)));
    assert!(a.predict(&x, 4, 1).is_err());
    let msg = a.run(&mut ws, &x[..10], 1).unwrap_err().to_string();
    assert_eq!(msg, "input has 10 values, expected 37 (batch 1 × 37)");
    // A clone shares the shape, so it may share workspaces.
    let c = a.clone();
    assert!(c.run(&mut ws, &x[..4 * 37], 4).is_ok());
    assert_eq!(a.run(&mut ws, &[], 0).unwrap(), &[] as &[f32]);
}

#[test]
fn quantize_input_rounds_half_to_even() {
    let mut rng = Rng(1);
    let mut model = random_model(&mut rng, 6, &[(Kind::I8, 2, "logits")]);
    let mut input = model.input().clone();
    input.scale = 0.5;
    input.zero_point = 10;
    model = Model::new(input, model.layers().to_vec()).unwrap();
    let x = [0.25f32, 0.75, -100.0, 1000.0, f32::NAN, -5.25];
    let mut q = [0u8; 6];
    model.quantize_input(&x, &mut q).unwrap();
    // 0.25/0.5 = 0.5 → 0; 0.75/0.5 = 1.5 → 2; clamps; NaN → zero point; -10.5 → -10.
    assert_eq!(q, [10, 12, 0, 255, 10, 0]);
    assert!(model.quantize_input(&x, &mut q[..5]).is_err());
}

#[test]
fn debug_shows_shapes_not_weights() {
    let (_, model) = models().remove(1);
    let s = format!("{model:?}");
    assert!(s.contains("dense_i8 784→128 relu_u8"), "{s}");
    assert!(s.len() < 500, "{s}");
}

#[test]
fn output_qmax_is_optional_and_round_trips() {
    use qmomentum_runtime::Output;
    let mut rng = Rng(8);
    let model = random_model(&mut rng, 20, &[(Kind::I8, 30, "relu_u8"), (Kind::I8, 4, "logits")]);
    let mut layers = model.layers().to_vec();
    let qmax_of = |l: &qmomentum_runtime::Layer| match l.output() {
        Output::U8 { qmax, .. } => *qmax,
        _ => unreachable!(),
    };
    for q in [255u8, 15, 3] {
        if let qmomentum_runtime::Layer::DenseI8 {
            output: Output::U8 { qmax, zero_point, .. },
            ..
        } = &mut layers[0]
        {
            *qmax = q;
            *zero_point = 1;
        }
        let m = Model::new(model.input().clone(), layers.clone()).unwrap();
        let bytes = m.to_bytes().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        // The default is not written, so 8-bit files look exactly like the spec's example.
        assert_eq!(text.contains("output_qmax"), q != 255);
        let again = Model::from_bytes(&bytes).unwrap();
        assert_eq!(qmax_of(&again.layers()[0]), q);
        // Every tier agrees with the reloaded model on the narrow grid too.
        let x = rng.bytes(50 * 20);
        for kind in KernelKind::available() {
            let mut ws = m.workspace(50);
            assert_eq!(
                bits(m.run_with(kind, &mut ws, &x, 50).unwrap()),
                bits(
                    again
                        .run_with(KernelKind::Scalar, &mut again.workspace(50), &x, 50)
                        .unwrap()
                )
            );
        }
    }
}

#[test]
fn layers_wider_than_the_i32_accumulator_are_rejected() {
    use qmomentum_runtime::{InputSpec, Layer, Output};
    let inputs = 1usize << 31;
    let input = InputSpec {
        size: inputs,
        scale: 1.0,
        zero_point: 0,
        binarize_at: Some(1),
        shape: None,
    };
    // The size check comes before the weight's, so no 256 MiB tensor is needed.
    let layer = Layer::DenseBin {
        inputs,
        outputs: 1,
        weight: Vec::new(),
        output: Output::Logits {
            scale: vec![1.0],
            bias: Some(vec![0.0]),
        },
    };
    let err = Model::new(input, vec![layer]).unwrap_err().to_string();
    assert!(
        err.contains("layers[0].in") && err.contains("2147483648 is too large"),
        "{err}"
    );
}
