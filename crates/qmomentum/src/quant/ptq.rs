//! Post-training quantization: calibrate activation ranges of a quantized model on a few batches.
//!
//! Layers are calibrated in order, each on the outputs of the already-quantized layers before it
//! (so the range of layer i sees the rounding of layers < i). Methods:
//! * `min_max` — the smallest and largest value seen;
//! * `percentile(p)` — the `(100 − p)`-th and `p`-th percentiles (clips rare outliers);
//! * `mse` — the clipping range `[lo·c, hi·c]`, c ∈ (0, 1], that minimises the mean squared
//!   fake-quantization error over the calibration values (searched on a grid of 100).

use super::affine::QParams;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Sequential;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// Calibration rule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Calibration {
    /// Min and max.
    MinMax,
    /// Percentile `p` in (50, 100].
    Percentile {
        /// e.g. 99.99.
        p: f32,
    },
    /// Minimum mean squared error.
    Mse,
}

impl std::str::FromStr for Calibration {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "minmax" || s == "min_max" {
            return Ok(Calibration::MinMax);
        }
        if s == "mse" {
            return Ok(Calibration::Mse);
        }
        if let Some(p) = s.strip_prefix("percentile") {
            let p = p.trim_start_matches([':', '=']);
            let p: f32 = if p.is_empty() {
                99.99
            } else {
                p.parse()
                    .map_err(|_| Error::config("calibration", s, "percentile needs a number, e.g. percentile:99.99"))?
            };
            if !(p > 50.0 && p <= 100.0) {
                return Err(Error::config("calibration", s, "the percentile must be in (50, 100]"));
            }
            return Ok(Calibration::Percentile { p });
        }
        Err(Error::config(
            "calibration",
            s,
            "expected minmax, percentile[:P] or mse",
        ))
    }
}

/// The range chosen for `values` (which may be reordered).
pub fn choose_range(values: &mut [f32], bits: u32, method: Calibration) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    match method {
        Calibration::MinMax => (lo, hi),
        Calibration::Percentile { p } => {
            values.sort_unstable_by(|a, b| a.total_cmp(b));
            let n = values.len();
            let at = |q: f64| values[((q / 100.0) * (n - 1) as f64).round() as usize];
            (at(100.0 - p as f64), at(p as f64))
        }
        Calibration::Mse => {
            let (mut best, mut best_c) = (f64::INFINITY, 1.0f32);
            for i in 1..=100 {
                let c = i as f32 / 100.0;
                let qp = QParams::asymmetric(lo * c, hi * c, bits);
                let err: f64 = values.iter().map(|&v| ((qp.fake_quant(v) - v) as f64).powi(2)).sum();
                if err < best {
                    best = err;
                    best_c = c;
                }
            }
            (lo * best_c, hi * best_c)
        }
    }
}

/// Calibrate every activation observer of `model` on the first `batches` batches of `data`
/// (in order, no shuffling), then freeze the observers.
pub fn calibrate(
    model: &mut Sequential,
    data: &Dataset,
    batches: usize,
    batch_size: usize,
    method: Calibration,
) -> Result<()> {
    if data.features != model.input_size {
        return Err(Error::Shape(format!(
            "calibration data have {} features per sample, the model reads {}",
            data.features, model.input_size
        )));
    }
    if batches == 0 || batch_size == 0 {
        return Err(Error::config(
            "calibration batches",
            batches,
            "need at least one batch of at least one sample",
        ));
    }
    let n = batches.saturating_mul(batch_size).min(data.len());
    if n == 0 {
        return Err(Error::config(
            "calibration data",
            0,
            "no samples to calibrate on (the training set is empty)",
        ));
    }
    let mut rng = Rng::new(0, 0);
    let mut labels = vec![0u32; batch_size];
    for li in 0..model.layers.len() {
        let Some(obs) = model.layers[li].act_quant_mut().and_then(|a| a.observer.take()) else {
            continue;
        };
        let bits = obs.bits;
        let mut values = Vec::new();
        for start in (0..n).step_by(batch_size) {
            let b = (n - start).min(batch_size);
            let idx: Vec<usize> = (start..start + b).collect();
            let x = model.input_mut(b);
            data.gather_normalised(&idx, x, &mut labels[..b]);
            model.forward(b, false, false, &mut rng);
            values.extend_from_slice(model.layer_output(li, b));
        }
        let (lo, hi) = choose_range(&mut values, bits, method);
        let Some(a) = model.layers[li].act_quant_mut() else {
            continue;
        };
        let mut obs = obs;
        obs.set_range(lo, hi);
        obs.frozen = true;
        if let Some(p) = a.step.as_mut() {
            p.value[0] = obs.qparams().scale;
        }
        a.observer = Some(obs);
    }
    Ok(())
}

/// Post-training quantization of a float model: a model of the same architecture with the
/// quantization of `scheme` (per-layer `quant` of the config wins), the float weights and biases
/// copied, and the activation ranges calibrated on `batches` batches of `data`. Batch norms are
/// first folded into the layers before them ([`Sequential::fold_batch_norm`]), as the integer
/// model computes them; the returned config is the folded architecture.
pub fn quantize_float_model(
    float: &Sequential,
    cfg: &crate::config::ModelConfig,
    scheme: super::Scheme,
    data: &Dataset,
    batches: usize,
    batch_size: usize,
    method: Calibration,
) -> Result<(crate::config::ModelConfig, Sequential)> {
    if let Some((i, _)) = float.layers.iter().enumerate().find(|(_, l)| {
        l.quant_parts()
            .is_some_and(|(w, a)| w.quant.is_some() || a.quant.is_some())
    }) {
        return Err(Error::config(
            "checkpoint",
            format!("layer {i} is quantized"),
            "post-training quantization starts from a float (fp32) checkpoint",
        ));
    }
    let (cfg, float) = float.fold_batch_norm(cfg)?;
    let mut q = Sequential::from_config(&cfg, scheme, false, 0)?;
    let (n_src, n_dst) = (
        float.params_iter().count(),
        q.params_iter()
            .filter(|p| p.kind != crate::layers::ParamKind::Scale)
            .count(),
    );
    if n_src != n_dst {
        return Err(Error::Shape(format!(
            "the checkpoint has {n_src} parameter tensors, the config {n_dst}"
        )));
    }
    // Same config, same names: copy by name (learned steps of the quantized model stay as
    // calibration sets them).
    for s in float.params_iter() {
        let d = q
            .params_iter_mut()
            .find(|p| p.name == s.name)
            .ok_or_else(|| Error::Shape(format!("the quantized model has no parameter {}", s.name)))?;
        if d.shape != s.shape {
            return Err(Error::Shape(format!(
                "{}: the checkpoint has {:?}, the config {:?}",
                s.name, s.shape, d.shape
            )));
        }
        d.value.copy_from_slice(&s.value);
    }
    calibrate(&mut q, data, batches, batch_size, method)?;
    Ok((cfg, q))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn methods_by_hand() {
        let mut v: Vec<f32> = (0..=100).map(|i| i as f32).collect();
        v.push(1000.0); // one outlier
        assert_eq!(choose_range(&mut v.clone(), 8, Calibration::MinMax), (0.0, 1000.0));
        let (_, hi) = choose_range(&mut v.clone(), 8, Calibration::Percentile { p: 99.0 });
        assert_eq!(hi, 100.0);
        // 1001 values in [0, 1000] and one at 10^4, 2 bits: keeping the outlier puts every inlier
        // on 0 or 3333 (error ≈ 3.3e8); clipping at ~1000 costs the outlier 8.1e7 but the inliers
        // only ≈ 1e7, so MSE clips.
        let mut w: Vec<f32> = (0..=1000).map(|i| i as f32).collect();
        w.push(10_000.0);
        let (_, hi) = choose_range(&mut w, 2, Calibration::Mse);
        assert!(hi < 2000.0, "MSE clips the outlier at 2 bits: {hi}");
        assert!("percentile:101".parse::<Calibration>().is_err());
        assert_eq!(
            "percentile".parse::<Calibration>().unwrap(),
            Calibration::Percentile { p: 99.99 }
        );
    }
}
