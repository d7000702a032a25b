//! Checkpoints in safetensors: weights, optimizer state, config, position in the run and the
//! generator state, written atomically (temporary file, fsync, rename, fsync of the folder), so a
//! crash or a full disk leaves the previous checkpoint as it was.
//!
//! Tensors: `param.<name>` (f32 weights as trained: latent floats, or ±1 for Bop), `optim.<name>`
//! (velocity / Bop average) and, for every quantized layer, `int.layers.<i>.weight` (the i8 codes
//! of `ŵ`, `[inputs, outputs]`) with `int.layers.<i>.weight_scale` (f32 per output channel). The
//! header's `qmomentum` metadata is JSON: config, epoch, step, RNG state, observers, history.

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::quant::WeightQuant;
use crate::train::{EpochProgress, History, Trainer};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "qmomentum-checkpoint";
const VERSION: u32 = 1;

/// Saved state of one activation observer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObserverState {
    /// Layer index.
    pub layer: usize,
    /// Range.
    pub min: f32,
    /// Range.
    pub max: f32,
    /// LSQ step.
    pub lsq_scale: f32,
    /// Seen a batch.
    pub initialized: bool,
    /// Frozen.
    pub frozen: bool,
    /// The grid in force, as `(scale, zero_point)`, for readers that want integer parameters.
    pub qparams: Option<(f32, i32)>,
}

/// The JSON metadata of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Always `qmomentum-checkpoint`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Epochs finished.
    pub epoch: usize,
    /// Steps done in the epoch in progress.
    pub step_in_epoch: usize,
    /// Steps done in total.
    pub global_step: u64,
    /// Steps taken per parameter (optimizer).
    pub optimizer_steps: Vec<u64>,
    /// Epoch in progress.
    pub progress: EpochProgress,
    /// Finished epochs.
    pub history: History,
    /// Observers.
    pub observers: Vec<ObserverState>,
    /// The data the run trained on (folder and SHA-256 sums), checked on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataIdentity>,
    /// Names of the classes, in label order (shown by `predict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// Oscillation counters of the epoch in progress: `[layer, flips, oscillations, steps]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oscillation_counts: Vec<[u64; 4]>,
    /// Processes of the data-parallel run that wrote it (absent: 1, a single process).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serialise a trainer to bytes.
pub fn to_bytes(t: &Trainer) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in t.model.params() {
        owned.push((
            format!("param.{}", p.name),
            Dtype::F32,
            p.shape.clone(),
            f32_bytes(&p.value),
        ));
    }
    let params = t.model.params();
    for (st, p) in t.optimizer.state.iter().zip(&params) {
        match &st.q8 {
            // 8-bit state: the codes and the block maxima, as they are (resume is bit-exact).
            Some(q) => {
                owned.push((
                    format!("optim8.{}", p.name),
                    Dtype::U8,
                    vec![q.codes.len()],
                    q.codes.clone(),
                ));
                owned.push((
                    format!("optim8absmax.{}", p.name),
                    Dtype::F32,
                    vec![q.absmax.len()],
                    f32_bytes(&q.absmax),
                ));
            }
            None => owned.push((
                format!("optim.{}", p.name),
                Dtype::F32,
                p.shape.clone(),
                f32_bytes(&st.buffer),
            )),
        }
    }
    for b in t.model.buffers_iter() {
        owned.push((
            format!("buffer.{}", b.name),
            Dtype::F32,
            b.shape.clone(),
            f32_bytes(&b.value),
        ));
    }
    // The trackers' previous codes, made in their f32 form (`OscillationTracker::state`).
    for b in t.model.tracker_states() {
        owned.push((format!("buffer.{}", b.name), Dtype::F32, b.shape, f32_bytes(&b.value)));
    }
    let mut observers = Vec::new();
    for (index, l) in t.model.layers.iter().enumerate() {
        if let Some(a) = l.act_quant() {
            if let Some(o) = &a.observer {
                observers.push(ObserverState {
                    layer: index,
                    min: o.min,
                    max: o.max,
                    lsq_scale: a.step.as_ref().map(|p| p.value[0]).unwrap_or(o.lsq_scale),
                    initialized: o.initialized,
                    frozen: o.frozen,
                    qparams: a.output_qparams().map(|q| (q.scale, q.zero_point)),
                });
            }
        }
        if let Some((w, wq)) = l.weight_quant() {
            if wq.quant.is_some() {
                // The codes from a copy of the quantizer alone (the trainer's state is not
                // touched; cloning the whole model here also copied every activation buffer,
                // +120 MB at each checkpoint of a cnn-small run).
                let mut wq = wq.clone();
                // A batch norm folded in for QAT: the deployed kernel is W·γ/σ.
                let kernel = match l {
                    Layer::Conv2d(c) => c.bn.as_deref().map(|f| f.folded_kernel(&w.value)),
                    _ => None,
                };
                let kernel = kernel.as_deref().unwrap_or(&w.value);
                wq.quantize(kernel);
                let outputs = w.shape[1];
                let (w_hat, scales) = (wq.weights(kernel), wq.scales());
                let codes: Vec<u8> = w_hat
                    .chunks_exact(outputs)
                    .flat_map(|row| {
                        row.iter()
                            .zip(scales)
                            .map(|(&w, &s)| (w / s).round_ties_even().clamp(-128.0, 127.0) as i8 as u8)
                    })
                    .collect();
                owned.push((format!("int.layers.{index}.weight"), Dtype::I8, w.shape.clone(), codes));
                owned.push((
                    format!("int.layers.{index}.weight_scale"),
                    Dtype::F32,
                    vec![outputs],
                    f32_bytes(scales),
                ));
            }
        }
    }
    let meta = Meta {
        format: FORMAT.into(),
        version: VERSION,
        config: t.config.clone(),
        epoch: t.epoch,
        step_in_epoch: t.step_in_epoch,
        global_step: t.global_step,
        world_size: t.world_size,
        optimizer_steps: t.optimizer.state.iter().map(|s| s.steps).collect(),
        // Wall-clock timings stay out of the checkpoint (they live in history.csv/json), so two
        // runs of the same command write byte-identical checkpoints.
        progress: EpochProgress {
            seconds: 0.0,
            tracking_seconds: 0.0,
            ..t.progress.clone()
        },
        history: History {
            epochs: t
                .history
                .epochs
                .iter()
                .map(|r| crate::train::EpochRecord {
                    seconds: 0.0,
                    samples_per_sec: 0.0,
                    comm_seconds: None,
                    tracking_seconds: r.tracking_seconds.map(|_| 0.0),
                    ..r.clone()
                })
                .collect(),
        },
        observers,
        data: t.data.clone(),
        class_names: t.class_names.clone(),
        oscillation_counts: t
            .model
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                l.quant_parts()
                    .and_then(|(w, _)| w.tracker.as_ref())
                    .map(|tr| (i, tr.counts()))
            })
            .map(|(i, [a, b, c])| [i as u64, a, b, c])
            .collect(),
    };
    let json = serde_json::to_string(&meta).map_err(|e| Error::encode("checkpoint metadata", e))?;
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::encode(format!("checkpoint tensor {n}"), e))
        })
        .collect::<Result<_>>()?;
    let info = HashMap::from([("qmomentum".to_string(), json)]);
    safetensors::serialize(views, Some(info)).map_err(|e| Error::encode("checkpoint", e))
}

/// Write `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the
/// folder; on any failure the temporary file is removed and `path` is untouched. One function
/// for the whole project: [`qmomentum_runtime::io::write_file`] (which also writes through
/// devices and FIFOs instead of replacing them).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    qmomentum_runtime::io::write_file(path, bytes).map_err(|e| Error::io(path, e))
}

/// Save a checkpoint atomically. Weights that became NaN or infinite (an update too large for
/// f32, even with finite gradients) are refused, so the previous checkpoint stays loadable.
pub fn save(t: &Trainer, path: &Path) -> Result<()> {
    check_weights_finite(t, path)?;
    write_atomic(path, &to_bytes(t)?)
}

/// The test [`save`] makes before writing `path`: every weight is finite (a `Diverged` error
/// otherwise). Data-parallel ranks that write nothing make it at the same steps, so that a
/// divergence ends every rank the same way.
pub fn check_weights_finite(t: &Trainer, path: &Path) -> Result<()> {
    for p in t.model.params_iter() {
        if let Some(i) = p.value.iter().position(|v| !v.is_finite()) {
            return Err(Error::Diverged(format!(
                "training diverged by global step {}: {}[{i}] is {} after an update (the learning rate, now {}, is too large for f32). \
                 Nothing was written to {}; the checkpoint there, if any, is the last good one",
                t.global_step,
                p.name,
                p.value[i],
                t.optimizer.lr_at(t.global_step.saturating_sub(1)),
                path.display()
            )));
        }
    }
    Ok(())
}

/// Read the metadata of a checkpoint.
pub fn read_meta(bytes: &[u8], path: &Path) -> Result<Meta> {
    if bytes.len() < 8 {
        return Err(Error::checkpoint(
            path,
            format!(
                "truncated: {} bytes, a safetensors file starts with an 8-byte header length",
                bytes.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if n > bytes.len() as u64 - 8 {
        return Err(Error::checkpoint(
            path,
            format!(
                "truncated or not a safetensors file: the header claims {n} bytes, the file has {}",
                bytes.len()
            ),
        ));
    }
    let (_, md) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("truncated or corrupt safetensors file ({e})")))?;
    let json = md
        .metadata()
        .as_ref()
        .and_then(|m| m.get("qmomentum"))
        .ok_or_else(|| Error::checkpoint(path, "no 'qmomentum' metadata: not a qmomentum checkpoint"))?;
    let meta: Meta = serde_json::from_str(json).map_err(|e| {
        Error::checkpoint(
            path,
            format!("metadata: {}", crate::config::humanize_serde(&e.to_string())),
        )
    })?;
    if meta.format != FORMAT || meta.version != VERSION {
        return Err(Error::checkpoint(
            path,
            format!(
                "format {:?} version {} (expected {FORMAT:?} version {VERSION})",
                meta.format, meta.version
            ),
        ));
    }
    Ok(meta)
}

fn read_f32(st: &SafeTensors, name: &str, shape: &[usize], path: &Path) -> Result<Vec<f32>> {
    let v = st
        .tensor(name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{name}'")))?;
    if v.dtype() != Dtype::F32 {
        return Err(Error::checkpoint(
            path,
            format!("tensor '{name}' has dtype {:?}, expected F32", v.dtype()),
        ));
    }
    if v.shape() != shape {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor '{name}' has shape {:?}, the model needs {:?} (a checkpoint of another model?)",
                v.shape(),
                shape
            ),
        ));
    }
    let out: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(Error::checkpoint(
            path,
            format!("tensor '{name}' holds a non-finite value ({}) at index {i}", out[i]),
        ));
    }
    Ok(out)
}

/// An 8-bit optimizer state: `optim8.NAME` (U8 codes) and `optim8absmax.NAME` (F32 block maxima).
fn read_q8(st: &SafeTensors, name: &str, n: usize, path: &Path) -> Result<crate::optim::state8::Quantized8> {
    let codes_name = format!("optim8.{name}");
    let v = st
        .tensor(&codes_name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{codes_name}'")))?;
    if v.dtype() != Dtype::U8 || v.shape() != [n] {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor '{codes_name}' is {:?} {:?}, expected U8 [{n}]",
                v.dtype(),
                v.shape()
            ),
        ));
    }
    let codes = v.data().to_vec();
    let blocks = n.div_ceil(crate::optim::state8::BLOCK);
    let absmax = read_f32(st, &format!("optim8absmax.{name}"), &[blocks], path)?;
    if let Some(i) = absmax.iter().position(|a| *a < 0.0) {
        return Err(Error::checkpoint(
            path,
            format!("tensor 'optim8absmax.{name}' is negative at block {i}"),
        ));
    }
    Ok(crate::optim::state8::Quantized8 { codes, absmax })
}

/// A buffer tensor: like [`read_f32`], but NaN is allowed in the oscillation state (it marks "no
/// code seen yet" and "not frozen"); infinities are not.
fn read_buffer(st: &SafeTensors, name: &str, shape: &[usize], path: &Path) -> Result<Vec<f32>> {
    let v = st
        .tensor(name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{name}'")))?;
    if v.dtype() != Dtype::F32 || v.shape() != shape {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor '{name}' is {:?} {:?}, expected F32 {shape:?}",
                v.dtype(),
                v.shape()
            ),
        ));
    }
    let out: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let nan_ok = name.ends_with(".osc_last")
        || name.ends_with(".osc_frozen")
        || name.ends_with(".osc_ema_code")
        || name.ends_with(".w_scale");
    if name.ends_with(".w_scale") {
        // Not fixed yet (all NaN), or positive finite scales.
        let all_nan = out.iter().all(|s| s.is_nan());
        let ok = |s: f32| all_nan || (s > 0.0 && s.is_finite());
        if let Some(i) = out.iter().position(|&s| !ok(s)) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor '{name}' holds the scale {} at index {i}: a scale is a finite number > 0",
                    out[i]
                ),
            ));
        }
    }
    if name.ends_with(".osc_frozen") {
        // A frozen code is an integer on an 8-bit grid at most (NaN: not frozen).
        if let Some(i) = out
            .iter()
            .position(|&c| !c.is_nan() && (c.fract() != 0.0 || !(-128.0..=127.0).contains(&c)))
        {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor '{name}' holds {} at index {i}, not an integer code in [-128, 127]",
                    out[i]
                ),
            ));
        }
    }
    if let Some(i) = out.iter().position(|x| x.is_infinite() || (x.is_nan() && !nan_ok)) {
        return Err(Error::checkpoint(
            path,
            format!("tensor '{name}' holds {} at index {i}", out[i]),
        ));
    }
    Ok(out)
}

/// Rebuild a trainer from checkpoint bytes; `path` names the file in errors.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Trainer> {
    let meta = read_meta(bytes, path)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "truncated or corrupt tensor data ({e}): the file has {} bytes",
                bytes.len()
            ),
        )
    })?;
    meta.config
        .validate()
        .map_err(|e| Error::checkpoint(path, format!("config: {e}")))?;
    // The weights the config asks for must be in the file before anything is allocated for them:
    // a small file whose config claims a huge layer is refused here, not by an allocation abort.
    let plan = meta
        .config
        .model
        .plan()
        .map_err(|e| Error::checkpoint(path, format!("config: {e}")))?;
    for l in &plan {
        for (name, shape) in &l.params {
            let name = format!("param.{name}");
            match st.tensor(&name) {
                Ok(v) if v.shape() == shape.as_slice() => {}
                Ok(v) => {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor '{name}' has shape {:?}, the config's layer {} needs {shape:?} (a checkpoint of another model?)",
                            v.shape(),
                            l.index
                        ),
                    ))
                }
                Err(_) => return Err(Error::checkpoint(path, format!("missing tensor '{name}'"))),
            }
        }
    }
    if let Some(names) = &meta.class_names {
        let classes = plan.last().map(|l| l.output.len()).unwrap_or(0);
        if names.len() != classes {
            return Err(Error::checkpoint(
                path,
                format!("class_names has {} names for a model of {classes} outputs", names.len()),
            ));
        }
    }
    let mut t = Trainer::new(meta.config.clone()).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let n_params = t.model.params().len();
    let mut values = Vec::with_capacity(n_params);
    let mut buffers = Vec::with_capacity(n_params);
    let eight_bit = meta.config.optimizer.state_bits == 8;
    let bop = matches!(meta.config.optimizer.binary, crate::optim::BinaryOptimizer::Bop { .. });
    for p in t.model.params() {
        values.push(read_f32(&st, &format!("param.{}", p.name), &p.shape, path)?);
        if !meta.optimizer_steps.is_empty() {
            let q8 = eight_bit
                && p.len() >= crate::optim::state8::MIN_VALUES
                && !(p.kind == crate::layers::ParamKind::Binary && bop);
            if q8 {
                buffers.push((Vec::new(), Some(read_q8(&st, &p.name, p.len(), path)?)));
            } else {
                buffers.push((read_f32(&st, &format!("optim.{}", p.name), &p.shape, path)?, None));
            }
        }
    }
    for (p, v) in t.model.params_mut().into_iter().zip(values) {
        p.value = v;
    }
    if !meta.optimizer_steps.is_empty() {
        if meta.optimizer_steps.len() != n_params {
            return Err(Error::checkpoint(
                path,
                format!(
                    "optimizer_steps has {} entries for {n_params} parameters",
                    meta.optimizer_steps.len()
                ),
            ));
        }
        t.optimizer.state = t
            .model
            .params()
            .iter()
            .zip(buffers)
            .zip(&meta.optimizer_steps)
            .map(|((p, (b, q8)), &s)| crate::optim::ParamState {
                name: p.name.clone(),
                buffer: b,
                q8,
                steps: s,
            })
            .collect();
    }
    let mut buffer_values = Vec::new();
    for b in t.model.buffers_iter() {
        let name = format!("buffer.{}", b.name);
        // Oscillation state is new in this version: older checkpoints start tracking afresh.
        if (b.name.contains(".osc_") || b.name.ends_with(".w_scale")) && st.tensor(&name).is_err() {
            buffer_values.push(None);
            continue;
        }
        // A checkpoint from before the lazy frequencies (its state is `osc_state`, not
        // `osc_last`) holds true frequencies where this version stores them with decay pending:
        // its tracker starts afresh too, frequencies included.
        if let Some(layer) = b.name.strip_suffix(".osc_freq") {
            if st.tensor(&format!("buffer.{layer}.osc_last")).is_err() {
                buffer_values.push(None);
                continue;
            }
        }
        buffer_values.push(Some(read_buffer(&st, &name, &b.shape, path)?));
    }
    for (b, v) in t.model.buffers_iter_mut().zip(buffer_values) {
        if let Some(v) = v {
            b.value = v;
        }
    }
    // The trackers' previous codes (absent from older checkpoints: those start afresh).
    for tr in t
        .model
        .layers
        .iter_mut()
        .filter_map(|l| l.weight_quant_mut().and_then(|(_, w)| w.tracker.as_mut()))
    {
        let name = format!("buffer.{}", tr.state_name());
        if st.tensor(&name).is_ok() {
            let n = tr.freq.value.len();
            let v = read_buffer(&st, &name, &[n], path)?;
            tr.set_state(&v);
        }
    }
    for l in t.model.layers.iter_mut() {
        if let Some((w, wq)) = l.weight_quant_mut() {
            if let Some((i, c)) = wq.invalid_frozen_code() {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor 'buffer.{}' holds the frozen code {c} at index {i}, outside the grid of {}",
                        wq.frozen.as_ref().map_or("", |f| f.name.as_str()),
                        w.name
                    ),
                ));
            }
        }
    }
    t.model.refresh_freeze_masks();
    for o in &meta.observers {
        let a = t
            .model
            .layers
            .get_mut(o.layer)
            .and_then(|l| l.act_quant_mut())
            .ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!("observer for layer {} which has no output quantizer", o.layer),
                )
            })?;
        let obs = a.observer.as_mut().ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("observer for layer {} which has no activation quantizer", o.layer),
            )
        })?;
        if !(o.min.is_finite() && o.max.is_finite() && o.lsq_scale.is_finite()) {
            return Err(Error::checkpoint(
                path,
                format!("observer of layer {} has a non-finite range", o.layer),
            ));
        }
        obs.min = o.min;
        obs.max = o.max;
        obs.lsq_scale = o.lsq_scale;
        obs.initialized = o.initialized;
        obs.frozen = o.frozen;
        if let Some(p) = a.step.as_mut() {
            p.value[0] = o.lsq_scale;
        }
    }
    for (index, l) in t.model.layers.iter_mut().enumerate() {
        let Some((w, wq)) = l.weight_quant_mut() else { continue };
        if wq.quant.is_some() && st.tensor(&format!("int.layers.{index}.weight")).is_err() {
            return Err(Error::checkpoint(
                path,
                format!("missing tensor 'int.layers.{index}.weight'"),
            ));
        }
        if let Some(WeightQuant::Binary { .. }) = wq.quant {
            if wq.bop && w.value.iter().any(|&v| v != 1.0 && v != -1.0) {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor 'param.{}' must hold only ±1 (Bop weights)", w.name),
                ));
            }
        }
    }
    let n_epochs = meta.config.epochs;
    if meta.epoch > n_epochs {
        return Err(Error::checkpoint(
            path,
            format!("epoch {} is beyond the configured {n_epochs} epochs", meta.epoch),
        ));
    }
    // Counters are bounded by what a run can reach, so nothing downstream overflows.
    let bs = meta.config.batch_size as u64;
    let p = &meta.progress;
    let bad = if (meta.step_in_epoch as u64).saturating_mul(bs) > 1 << 40 {
        Some(format!("step_in_epoch {} is beyond any data set", meta.step_in_epoch))
    } else if meta.global_step > 1 << 48 {
        Some(format!("global_step {} is beyond any run", meta.global_step))
    } else if let Some(s) = meta.optimizer_steps.iter().find(|&&s| s > meta.global_step) {
        Some(format!(
            "optimizer_steps holds {s}, more than global_step {}",
            meta.global_step
        ))
    } else if p.correct > p.seen
        || p.seen > (meta.step_in_epoch as u64).saturating_mul(bs)
        || p.skipped > meta.step_in_epoch as u64
    {
        Some(format!(
            "progress (correct {}, seen {}, skipped {}) does not fit step {} of batch {bs}",
            p.correct, p.seen, p.skipped, meta.step_in_epoch
        ))
    } else {
        meta.history
            .epochs
            .iter()
            .find(|r| {
                ![r.loss, r.accuracy, r.lr].iter().all(|v| v.is_finite())
                    || [r.val_loss, r.val_accuracy].iter().flatten().any(|v| !v.is_finite())
            })
            .map(|r| format!("history epoch {} holds a non-finite value", r.epoch))
    };
    if let Some(why) = bad {
        return Err(Error::checkpoint(path, why));
    }
    t.epoch = meta.epoch;
    t.step_in_epoch = meta.step_in_epoch;
    t.global_step = meta.global_step;
    t.world_size = meta.world_size.max(1);
    t.progress = meta.progress;
    t.history = meta.history;
    t.data = meta.data;
    t.class_names = meta.class_names;
    for [i, a, b, c] in meta.oscillation_counts {
        if let Some(tr) = t
            .model
            .layers
            .get_mut(i as usize)
            .and_then(|l| l.weight_quant_mut())
            .and_then(|(_, w)| w.tracker.as_mut())
        {
            tr.set_counts([a, b, c]);
        }
    }
    Ok(t)
}

/// Load a checkpoint file.
pub fn load(path: &Path) -> Result<Trainer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}
