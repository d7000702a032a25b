//! ONNX export (`qmomentum::onnx`): the graph and initializers written for float and quantized
//! models, decoded back with the same `prost` messages, and the error for a layer without a
//! mapping. onnxruntime itself runs the exported files in
//! `crates/qmomentum-cli/tests/onnx/check_onnx.py` (CI).

use prost::Message;
use qmomentum::config::{ModelConfig, TrainConfig};
use qmomentum::data::Dataset;
use qmomentum::model::Sequential;
use qmomentum::onnx::proto::{data_type, ModelProto, TensorProto};
use qmomentum::onnx::{to_onnx, IR_VERSION, OPSET};
use qmomentum::quant::affine::bias_on_grid;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::path::Path;
use std::sync::OnceLock;

fn data() -> &'static (Dataset, Dataset) {
    static D: OnceLock<(Dataset, Dataset)> = OnceLock::new();
    D.get_or_init(|| {
        Dataset::load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")).unwrap()
    })
}

fn decode(bytes: &[u8]) -> ModelProto {
    ModelProto::decode(bytes).expect("the export decodes as a ModelProto")
}

fn init<'a>(m: &'a ModelProto, name: &str) -> &'a TensorProto {
    let g = m.graph.as_ref().unwrap();
    g.initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

fn f32s(t: &TensorProto) -> Vec<f32> {
    assert_eq!(t.data_type, Some(data_type::FLOAT));
    t.raw_data
        .as_ref()
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn ops(m: &ModelProto) -> Vec<String> {
    m.graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.clone().unwrap())
        .collect()
}

/// The design document's MLP, untrained (Glorot weights, zero biases).
fn float_mlp() -> Sequential {
    Sequential::from_config(&ModelConfig::default(), Scheme::Fp32, false, 0).unwrap()
}

#[test]
fn float_mlp_is_gemm_relu_with_float_initializers() {
    let model = float_mlp();
    let m = decode(&to_onnx(&model, &[("scheme".into(), "fp32".into())]).unwrap());
    assert_eq!(m.ir_version, Some(IR_VERSION));
    assert_eq!(m.opset_import[0].version, Some(OPSET));
    assert_eq!(
        ops(&m),
        ["Gemm", "Relu", "Gemm", "Relu", "Gemm", "Identity", "Softmax"],
        "dense + relu twice, the logits, then the softmax"
    );
    let g = m.graph.as_ref().unwrap();
    let io = |v: &qmomentum::onnx::proto::ValueInfoProto| {
        let t = v.r#type.as_ref().unwrap().tensor_type.as_ref().unwrap();
        let d = &t.shape.as_ref().unwrap().dim;
        (
            v.name.clone().unwrap(),
            d[0].dim_param.clone(),
            d[1].dim_value,
            t.elem_type,
        )
    };
    assert_eq!(
        io(&g.input[0]),
        ("input".into(), Some("batch".into()), Some(784), Some(data_type::FLOAT))
    );
    assert_eq!(
        io(&g.output[0]),
        ("logits".into(), Some("batch".into()), Some(10), Some(data_type::FLOAT))
    );
    assert_eq!(io(&g.output[1]).0, "probabilities");
    // Every parameter is there once, as f32, in our [in, out] layout (Gemm's B).
    let n: usize = g
        .initializer
        .iter()
        .map(|t| t.raw_data.as_ref().unwrap().len() / 4)
        .sum();
    assert_eq!(n, 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10);
    let w0 = init(&m, "layers.0.weight");
    assert_eq!(w0.dims, [784, 128]);
    let Some(qmomentum::layers::Layer::Dense(d)) = model.layers.first() else {
        panic!()
    };
    assert_eq!(f32s(w0), d.weight.value);
    assert_eq!(m.metadata_props[0].value.as_deref(), Some("fp32"));
}

fn ptq(scheme: Scheme) -> Sequential {
    let (train, _) = data();
    quantize_float_model(
        &float_mlp(),
        &ModelConfig::default(),
        scheme,
        train,
        2,
        128,
        Calibration::MinMax,
    )
    .unwrap()
    .1
}

#[test]
fn w8a8_mlp_stores_int8_weights_int32_biases_and_real_scales() {
    let mut model = ptq(Scheme::W8a8);
    let bytes = to_onnx(&model, &[]).unwrap();
    let m = decode(&bytes);
    let o = ops(&m);
    assert_eq!(o.iter().filter(|s| *s == "Gemm").count(), 3);
    assert_eq!(
        o.iter().filter(|s| *s == "QuantizeLinear").count(),
        3,
        "the input and two hidden grids"
    );
    // Layer 0: int8 codes [784, 128] (one byte each), 128 per-channel scales, int32 bias.
    let w = init(&m, "layers.0.weight_q");
    assert_eq!(
        (w.data_type, w.dims.as_slice()),
        (Some(data_type::INT8), &[784i64, 128][..])
    );
    assert_eq!(w.raw_data.as_ref().unwrap().len(), 784 * 128);
    let scales = f32s(init(&m, "layers.0.weight_scale"));
    let Some(qmomentum::layers::Layer::Dense(d)) = model.layers.first_mut() else {
        panic!()
    };
    let (w_hat, s_w) = d.effective_weights();
    assert_eq!(scales, s_w, "the quantizer's own per-channel scales");
    let codes = w.raw_data.as_ref().unwrap();
    for (k, row) in w_hat.chunks_exact(128).enumerate().step_by(97) {
        for (j, &v) in row.iter().enumerate() {
            assert_eq!(
                codes[k * 128 + j] as i8 as f32 * s_w[j],
                v,
                "code·scale = ŵ at [{k}, {j}]"
            );
        }
    }
    let s_w = s_w.to_vec();
    let b = init(&m, "layers.0.bias_q");
    assert_eq!(b.data_type, Some(data_type::INT32));
    let b_codes: Vec<i32> = b
        .raw_data
        .as_ref()
        .unwrap()
        .chunks_exact(4)
        .map(|x| i32::from_le_bytes(x.try_into().unwrap()))
        .collect();
    let s_in = 1.0 / 255.0;
    for (j, &c) in b_codes.iter().enumerate() {
        assert_eq!(c, bias_on_grid(d.bias.value[j], s_in, s_w[j]).0);
    }
    let bs = f32s(init(&m, "layers.0.bias_scale"));
    assert_eq!(bs[5], (s_in as f64 * s_w[5] as f64) as f32);
    // The hidden grid is the calibrated one.
    let qp = d.output_qparams().unwrap();
    assert_eq!(f32s(init(&m, "layers.0.output.scale")), [qp.scale]);
    let z = init(&m, "layers.0.output.zero_point");
    assert_eq!(
        (z.data_type, z.raw_data.as_deref()),
        (Some(data_type::UINT8), Some(&[qp.zero_point as u8][..]))
    );
    // Integer initializers: the file is about a quarter of the float one.
    let float = to_onnx(&float_mlp(), &[]).unwrap();
    let ratio = bytes.len() as f64 / float.len() as f64;
    assert!(ratio <= 0.3, "{} / {} = {ratio}", bytes.len(), float.len());
}

#[test]
fn w4a8_weights_are_int4_two_per_byte_low_nibble_first() {
    let mut model = ptq(Scheme::W4a8);
    let m = decode(&to_onnx(&model, &[]).unwrap());
    // The presets keep the first and last layers at 8 bits: layer 1 is the 4-bit one.
    assert_eq!(init(&m, "layers.0.weight_q").data_type, Some(data_type::INT8));
    let w = init(&m, "layers.1.weight_q");
    assert_eq!(
        (w.data_type, w.dims.as_slice()),
        (Some(data_type::INT4), &[128i64, 64][..])
    );
    let raw = w.raw_data.as_ref().unwrap();
    assert_eq!(raw.len(), 128 * 64 / 2);
    let Some(qmomentum::layers::Layer::Dense(d)) = model.layers.get_mut(1) else {
        panic!()
    };
    let (w_hat, s_w) = d.effective_weights();
    let mut nonzero = 0;
    for (i, &v) in w_hat.iter().enumerate() {
        let nib = (raw[i / 2] >> (4 * (i % 2))) & 0x0F;
        let code = ((nib << 4) as i8) >> 4; // sign-extend the nibble
        assert!((-8..=7).contains(&code));
        assert_eq!(code as f32 * s_w[i % 64], v, "weight {i}");
        nonzero += (code != 0) as usize;
    }
    assert!(nonzero > 1000, "real codes, not zeros");
}

#[test]
fn a_layer_without_mapping_is_an_error_naming_it() {
    // A stand-alone tanh between two quantized dense layers: the integer graph has no operator
    // for it (the `.qmm` export refuses it too).
    let mut cfg: TrainConfig = toml::from_str(
        r#"
        epochs = 1
        [optimizer]
        lr = 0.01
        [model]
        input = 784
        layers = [
          { type = "dense", units = 16, activation = "linear", quant = { weights = { kind = "int", bits = 8 }, activations = { bits = 8 } } },
          { type = "activation", activation = "tanh" },
          { type = "dense", units = 10, activation = "softmax", quant = { weights = { kind = "int", bits = 8 } } },
        ]
        "#,
    )
    .unwrap();
    cfg.quant = Scheme::W8a8;
    let mut t = Trainer::new(cfg).unwrap();
    t.fit(&data().0, None, |_, _| {}).unwrap();
    let e = to_onnx(&t.model, &[]).unwrap_err().to_string();
    assert!(e.contains("layers[1] (activation)"), "{e}");
    assert!(e.contains("tanh") && e.contains("no integer mapping"), "{e}");
    // The same network in float maps (Tanh in float).
    let float = Sequential::from_config(
        &toml::from_str::<TrainConfig>(
            r#"
            [model]
            input = 784
            layers = [
              { type = "dense", units = 16 },
              { type = "activation", activation = "tanh" },
              { type = "dense", units = 10, activation = "softmax" },
            ]
            "#,
        )
        .unwrap()
        .model,
        Scheme::Fp32,
        false,
        0,
    )
    .unwrap();
    let m = decode(&to_onnx(&float, &[]).unwrap());
    assert_eq!(ops(&m), ["Gemm", "Tanh", "Gemm", "Identity", "Softmax"]);
}
