//! `qmomentum info FILE`: what a checkpoint or an integer model holds, in words.

use crate::inputs::ModelFile;
use anyhow::{Context, Result};
use clap::Args;
use qmomentum::layers::Layer;
use qmomentum_runtime::{Layer as RtLayer, Output};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A checkpoint or an integer model file (.qmm).
    file: PathBuf,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    match ModelFile::from_bytes(&a.file, &bytes)? {
        ModelFile::Checkpoint(t) => checkpoint(&a.file, &t),
        ModelFile::Integer(m) => integer(&a.file, bytes.len(), &m),
    }
}

fn checkpoint(path: &std::path::Path, t: &qmomentum::train::Trainer) -> Result<()> {
    let c = &t.config;
    outln!("checkpoint {}", path.display())?;
    outln!(
        "  progress       {} of {} epochs done{} ({} steps in total)",
        t.epoch,
        c.epochs,
        if t.step_in_epoch > 0 {
            format!(", {} steps into the next", t.step_in_epoch)
        } else {
            String::new()
        },
        t.global_step
    )?;
    if let Some(d) = &t.data {
        let sum = d
            .files
            .first()
            .map(|f| &f.sha256[..12.min(f.sha256.len())])
            .unwrap_or("");
        outln!("  data           {} (train images sha256 {sum}…)", d.path)?;
    }
    if let Some(n) = &t.class_names {
        outln!("  classes        {}", n.join(", "))?;
    }
    outln!("  quantization   {}", c.quant)?;
    outln!("  optimizer      {}", c.optimizer)?;
    outln!(
        "  training       batch {}, seed {}, {} thread(s){}",
        c.batch_size,
        c.seed,
        c.threads,
        c.schedule_epochs
            .map(|e| format!(", schedule over {e} epochs"))
            .unwrap_or_default()
    )?;
    outln!("  model          {}", c.model.summary())?;
    let plan = c.model.plan()?;
    outln!(
        "  {:<5} {:<16} {:<14} {:>10} {:>12}  quantization",
        "layer",
        "kind",
        "output shape",
        "params",
        "MACs/sample"
    )?;
    for (l, p) in t.model.layers.iter().zip(&plan) {
        let params: usize = p.params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        let kind = match l {
            Layer::Dense(d) => format!("dense {}", d.activation),
            Layer::Conv2d(c) => {
                // A 1-bit output replaces the activation by a sign; a batch norm kept after a
                // binary kernel (not folded into it) reads "conv2d→bn".
                let act = if c.out.act.sign() {
                    "sign".to_string()
                } else {
                    c.out.activation.to_string()
                };
                match c.bn.as_deref() {
                    Some(f) if f.fold_scale => format!("conv2d+bn {act}"),
                    Some(_) => format!("conv2d→bn {act}"),
                    None => format!("conv2d {act}"),
                }
            }
            Layer::Folded(i) => format!("(in layer {i})"),
            Layer::Activation(a) => a.to_string(),
            Layer::Dropout(d) => format!("dropout {}", d.rate),
            other => other.kind().to_string(),
        };
        let q = match l {
            Layer::Dense(d) => {
                let grid = d
                    .output_qparams()
                    .map(|q| format!(", grid scale {:.5} zero point {}", q.scale, q.zero_point))
                    .unwrap_or_default();
                format!("{}{grid}", bop_aware(&d.quant, d.wq.bop))
            }
            Layer::Conv2d(c) => {
                let grid = c
                    .output_qparams()
                    .map(|q| format!(", grid scale {:.5} zero point {}", q.scale, q.zero_point))
                    .unwrap_or_default();
                format!("{}{grid}", bop_aware(&c.quant, c.wq.bop))
            }
            _ => String::new(),
        };
        outln!(
            "  {:<5} {:<16} {:<14} {:>10} {:>12}  {q}",
            p.index,
            kind,
            p.output.to_string(),
            params,
            p.macs
        )?;
    }
    outln!(
        "  MACs/sample    {} (inference)",
        plan.iter().map(|p| p.macs).sum::<usize>()
    )?;
    outln!("  parameters     {}", t.model.param_count())?;
    if let Some(last) = t.history.epochs.last() {
        let val = match (last.val_loss, last.val_accuracy) {
            (Some(l), Some(a)) => format!(", validation loss {l:.4} accuracy {a:.4}"),
            _ => String::new(),
        };
        outln!(
            "  last epoch     {}: loss {:.4} accuracy {:.4}{val}",
            last.epoch,
            last.loss,
            last.accuracy
        )?;
    }
    Ok(())
}

/// Bits a set of i8 codes needs (`±7` → 4, `±1` → 2 or ternary …).
fn code_bits(w: &[i8]) -> u32 {
    let m = w.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0) as u32;
    match m {
        0 | 1 => 2,
        _ => 33 - (m).leading_zeros(),
    }
}

fn integer(path: &std::path::Path, size: usize, m: &qmomentum_runtime::Model) -> Result<()> {
    outln!("integer model {} ({size} bytes)", path.display())?;
    let inp = m.input();
    outln!(
        "  input          {} values, u8 with scale {} zero point {}{}",
        inp.size,
        inp.scale,
        inp.zero_point,
        inp.binarize_at
            .map(|t| format!(", binarized at pixel ≥ {t}"))
            .unwrap_or_default()
    )?;
    let mut wbits = Vec::new();
    let mut abits = Vec::new();
    for (i, l) in m.layers().iter().enumerate() {
        let (what, weights) = match l {
            RtLayer::DenseI8 { weight, .. } | RtLayer::Conv2dI8 { weight, .. } => {
                let b = code_bits(weight);
                let ternary = weight.iter().all(|&v| (-1..=1).contains(&v));
                wbits.push(if ternary {
                    "ternary".to_string()
                } else {
                    format!("{b}-bit")
                });
                (
                    l.kind_name(),
                    if ternary {
                        "ternary codes {-1, 0, 1} in int8".to_string()
                    } else {
                        format!(
                            "int8 codes within ±{} ({b}-bit)",
                            weight.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0)
                        )
                    },
                )
            }
            RtLayer::DenseBin { .. } => {
                wbits.push("binary".into());
                ("dense_bin", "±1 weights, one bit each (XNOR-popcount)".to_string())
            }
            RtLayer::Conv2dBin { .. } => {
                wbits.push("binary".into());
                (
                    "conv2d_bin",
                    "±1 weights, one bit each (XNOR-popcount, padding +1)".to_string(),
                )
            }
            // Pooling layers.
            _ => (l.kind_name(), "no weights".to_string()),
        };
        let out = match l.output() {
            Output::U8 {
                relu, qmax, zero_point, ..
            } => {
                let bits = 32 - (*qmax as u32).leading_zeros();
                abits.push(bits);
                format!(
                    "{}u8 on {} levels ({bits}-bit), zero point {zero_point}",
                    if *relu { "relu, " } else { "" },
                    *qmax as u32 + 1
                )
            }
            Output::SignBits { .. } => {
                abits.push(1);
                "sign bits".into()
            }
            Output::Logits { .. } => "logits (dequantized to f32)".into(),
            Output::InputGrid if matches!(l, RtLayer::MaxPoolBin { .. }) => "bits (the OR of the window)".into(),
            Output::InputGrid => "u8 on its input's grid".into(),
        };
        outln!("  layer {i}: {what} {}→{}, {weights} → {out}", l.inputs(), l.outputs())?;
    }
    if let Some(n) = m.class_names() {
        outln!("  classes        {}", n.join(", "))?;
    }
    // Stored size per layer against the same weights in f32.
    let storage = m.layer_storage();
    let (mut total, mut total_f32) = (0usize, 0usize);
    for (i, st) in storage.iter().enumerate() {
        if st.weights == 0 {
            continue;
        }
        total += st.weight_bytes;
        total_f32 += st.f32_weight_bytes();
        outln!(
            "  layer {i} weights: {} at {} bit(s) = {} bytes ({:.3}× f32)",
            st.weights,
            st.weight_bits,
            st.weight_bytes,
            st.ratio_to_f32()
        )?;
    }
    if total_f32 > 0 {
        outln!(
            "  weights        {total} bytes stored, {total_f32} as f32 ({:.3}×)",
            total as f64 / total_f32 as f64
        )?;
    }
    let a = abits.iter().copied().min().unwrap_or(8);
    let hidden_w: Vec<&String> = if wbits.len() > 2 {
        wbits[1..wbits.len() - 1].iter().collect()
    } else {
        wbits.iter().collect()
    };
    let scheme = if wbits.iter().all(|w| w == "binary") {
        "binary-all".to_string()
    } else if wbits.iter().skip(1).all(|w| w == "binary") {
        "binary (int8 first layer)".to_string()
    } else if hidden_w.iter().all(|w| *w == "ternary") {
        format!("ternary weights, {a}-bit activations")
    } else {
        let w = hidden_w
            .iter()
            .filter_map(|w| w.strip_suffix("-bit").and_then(|b| b.parse::<u32>().ok()))
            .max()
            .unwrap_or(8);
        format!("w{w}a{a}")
    };
    outln!("  scheme         {scheme} (read from the codes and grids in the file)")?;
    Ok(())
}

/// A layer's quantization as `info` prints it: Bop's ±1 weights carry the fixed scale
/// `1/√fan_in`, not the per-channel `mean|w|` of latent binary weights.
fn bop_aware(q: &qmomentum::quant::LayerQuant, bop: bool) -> String {
    let s = q.to_string();
    if bop {
        s.replace("binary ±α (per-channel mean|w|)", "binary ±1/√fan_in (Bop)")
    } else {
        s
    }
}
