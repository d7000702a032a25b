//! `qmomentum._native`: the native half of the Python package.
//!
//! The Keras-shaped API (`qmomentum.keras`) is written in Python (`python/qmomentum/`); it checks
//! and normalises what users pass (dtypes, shapes, labels) and calls the classes here, which wrap
//! the library's public API without re-implementing any of it:
//!
//! * [`PyTrainer`] — a [`Trainer`]: built from the JSON form of a [`TrainConfig`] (the same
//!   structure as the CLI's `--config` TOML), trained one [`Trainer::step`] at a time with the
//!   GIL released during each step and `Python::check_signals` between steps (Ctrl-C raises
//!   `KeyboardInterrupt` at the next step boundary, the trainer stays consistent and can go on),
//!   evaluated, quantized after training (PTQ), exported, and saved/loaded as the CLI's
//!   checkpoints (`checkpoint::save`/`load`, byte for byte the CLI's format).
//! * [`PyDataset`] — a [`Dataset`] (u8 pixels, u8 labels) made once from numpy arrays.
//! * [`PyRuntime`] — the integer runtime's [`rt::Model`].
//!
//! Arrays are read through numpy's array interface (`__array_interface__`): the pointer, the
//! `typestr` and the shape of a C-contiguous array. The module therefore needs no numpy headers
//! and builds against the stable ABI (abi3, Python ≥ 3.9); the runtime reads the caller's pixels
//! in place, without a copy.

use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList};
use qmomentum::config::TrainConfig;
use qmomentum::data::Dataset;
use qmomentum::quant::ptq::{quantize_float_model, Calibration};
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use qmomentum_runtime as rt;
use std::path::PathBuf;

/// The library's error as the Python exception that fits it: I/O → `OSError`, divergence →
/// `FloatingPointError`-like `RuntimeError`, everything about values, shapes and files → `ValueError`.
/// The message is the library's own (the CLI prints the same words).
fn to_py(e: qmomentum::Error) -> PyErr {
    use qmomentum::Error as E;
    match e {
        E::Io { .. } => PyOSError::new_err(e.to_string()),
        E::Diverged(_) | E::Encode { .. } => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn rt_to_py(e: rt::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A C-contiguous array seen through `__array_interface__`.
struct ArrayView {
    ptr: usize,
    shape: Vec<usize>,
}

impl ArrayView {
    /// Reads `obj.__array_interface__`, requiring `typestr` (e.g. `|u1`, `<f4`) and C order.
    fn of(obj: &Bound<'_, PyAny>, typestrs: &[&str], what: &str) -> PyResult<(Self, String)> {
        let ai = obj
            .getattr("__array_interface__")
            .map_err(|_| PyTypeError::new_err(format!("{what}: expected a numpy array")))?;
        let typestr: String = ai.get_item("typestr")?.extract()?;
        if !typestrs.contains(&typestr.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "{what}: array of type {typestr}, expected one of {typestrs:?}"
            )));
        }
        let strides = ai.call_method1("get", ("strides",))?;
        if !strides.is_none() {
            return Err(PyValueError::new_err(format!(
                "{what}: the array is not C-contiguous (pass numpy.ascontiguousarray(x))"
            )));
        }
        let (ptr, _readonly): (usize, bool) = ai.get_item("data")?.extract()?;
        let shape: Vec<usize> = ai.get_item("shape")?.extract()?;
        let align = match typestr.as_str() {
            "<f4" | "<u4" => 4,
            "<f8" => 8,
            _ => 1,
        };
        if ptr % align != 0 {
            return Err(PyValueError::new_err(format!(
                "{what}: the array's data are not aligned"
            )));
        }
        Ok((ArrayView { ptr, shape }, typestr))
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements. The lifetime is that of the borrow of the Python object, which the caller
    /// holds for the whole call.
    fn slice<'a, T>(&self, _owner: &'a Bound<'_, PyAny>) -> &'a [T] {
        let n = self.len();
        if n == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the data pointer that the array reported for `n` elements of the
        // `typestr` checked in `of` (T is that element type), C-contiguous (no strides) and
        // aligned for T (checked in `of`). The array object `_owner` is borrowed for 'a, so its
        // buffer is neither freed nor reallocated (numpy cannot resize an array while another
        // reference to it exists). Concurrent writes from another Python thread are the
        // caller's business, as with any buffer-protocol consumer.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, n) }
    }
}

/// Pixels from `x`: u8 as they are; floats in [0, 1] as `round(x·255)`, the CLI's rule for float
/// `.npy` inputs (`data::files`), with its wording for values outside [0, 1] (NaN included).
fn pixels(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(Vec<u8>, Vec<usize>)> {
    let (v, t) = ArrayView::of(obj, &["|u1", "<f4", "<f8"], what)?;
    let out = match t.as_str() {
        "|u1" => v.slice::<u8>(obj).to_vec(),
        "<f4" => floats_to_pixels(v.slice::<f32>(obj).iter().map(|&x| x as f64), &v.shape, "float32")?,
        _ => floats_to_pixels(v.slice::<f64>(obj).iter().copied(), &v.shape, "float64")?,
    };
    Ok((out, v.shape))
}

fn floats_to_pixels(xs: impl Iterator<Item = f64>, shape: &[usize], dtype: &str) -> PyResult<Vec<u8>> {
    let mut out = Vec::with_capacity(shape.iter().product());
    for (c, x) in xs.enumerate() {
        if !(0.0..=1.0).contains(&x) {
            let mut idx = vec![0usize; shape.len()];
            let mut r = c;
            for (i, &d) in shape.iter().enumerate().rev() {
                idx[i] = r % d.max(1);
                r /= d.max(1);
            }
            return Err(PyValueError::new_err(format!(
                "{dtype} value {x} at index {idx:?} is outside [0, 1] (float arrays must hold pixel/255; \
                 for 0–255 pixels pass uint8)"
            )));
        }
        out.push((x * 255.0).round() as u8);
    }
    Ok(out)
}

/// The bytes of 4-byte numbers in native order (what numpy's `uint32`/`float32` read).
fn ne_bytes<T: Copy + NeBytes>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|x| x.ne()).collect()
}

/// `to_ne_bytes` of the 4-byte numbers handed to numpy.
trait NeBytes {
    fn ne(self) -> [u8; 4];
}
impl NeBytes for u32 {
    fn ne(self) -> [u8; 4] {
        self.to_ne_bytes()
    }
}
impl NeBytes for f32 {
    fn ne(self) -> [u8; 4] {
        self.to_ne_bytes()
    }
}

/// A data set held by the native side: pixels as u8 (`features` per sample), labels as u8.
#[pyclass(name = "Dataset", module = "qmomentum._native", frozen)]
struct PyDataset {
    inner: Dataset,
}

#[pymethods]
impl PyDataset {
    /// `Dataset(x, y, features, classes)`: `x` is a uint8/float32/float64 C-contiguous array of
    /// `n` samples, `y` a uint8 array of `n` labels below `classes` (the Python layer converts
    /// int32/int64 labels after checking their range).
    #[new]
    fn new(x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>, features: usize, classes: usize) -> PyResult<Self> {
        let (images, shape) = pixels(x, "x")?;
        let (lv, _) = ArrayView::of(y, &["|u1"], "y")?;
        let labels = lv.slice::<u8>(y).to_vec();
        let n = shape.first().copied().unwrap_or(0);
        if features == 0 || images.len() != n * features {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: x holds {} values for {n} samples, the model reads {features} per sample",
                images.len()
            )));
        }
        if labels.len() != n {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: {} labels but x has {n} samples",
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            return Err(PyValueError::new_err(format!(
                "label {l} at index {i} is out of range (classes = {classes})"
            )));
        }
        Ok(PyDataset {
            inner: Dataset {
                images,
                labels,
                features,
                classes,
                shape: shape[1..].to_vec(),
            },
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

/// `(index, kind, output shape, parameters, MACs per sample)` of a layer.
type PlanRow = (usize, String, Vec<usize>, usize, usize);

/// A training run: model, optimizer, position, history (the library's `Trainer`).
#[pyclass(name = "Trainer", module = "qmomentum._native")]
struct PyTrainer {
    inner: Trainer,
}

fn parse_config(json: &str) -> PyResult<TrainConfig> {
    let cfg: TrainConfig = serde_json::from_str(json).map_err(|e| {
        PyValueError::new_err(format!(
            "invalid config: {}",
            qmomentum::config::humanize_serde(&e.to_string())
        ))
    })?;
    cfg.validate().map_err(to_py)?;
    Ok(cfg)
}

#[pymethods]
impl PyTrainer {
    /// A fresh run from the JSON form of a `TrainConfig` (the CLI's config file, as JSON).
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let cfg = parse_config(config_json)?;
        Ok(PyTrainer {
            inner: Trainer::new(cfg).map_err(to_py)?,
        })
    }

    /// Load a checkpoint written by `save` or by the CLI (`qmomentum train`, `quantize`).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let t = py.detach(|| qmomentum::checkpoint::load(&path)).map_err(to_py)?;
        Ok(PyTrainer { inner: t })
    }

    /// Write a checkpoint (atomically), in the CLI's format.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let t = &self.inner;
        py.detach(|| qmomentum::checkpoint::save(t, &path)).map_err(to_py)
    }

    /// The configuration as JSON.
    fn config_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.config).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Set the run's length and batch size before a `fit` (`epochs` is the total, counted from
    /// the start of the run). Refuses a change of batch size inside an epoch.
    fn set_run(&mut self, epochs: usize, batch_size: usize, shuffle: bool, validation_split: f32) -> PyResult<()> {
        let t = &mut self.inner;
        if t.step_in_epoch > 0 && batch_size != t.config.batch_size {
            return Err(PyValueError::new_err(format!(
                "invalid batch_size = {batch_size}: the run stopped inside an epoch (step {}) with batch size {}; \
                 finish the epoch with that batch size",
                t.step_in_epoch, t.config.batch_size
            )));
        }
        let mut c = t.config.clone();
        c.epochs = epochs;
        c.batch_size = batch_size;
        c.shuffle = shuffle;
        c.validation_split = validation_split;
        c.validate().map_err(to_py)?;
        t.config = c;
        Ok(())
    }

    /// Train until the end of the current epoch (or the end of the run): one `Trainer::step` at
    /// a time with the GIL released, Python's signal handlers run between steps. Returns the
    /// epoch's record as a dict, or None when the run was already finished.
    #[pyo3(signature = (train, validation=None))]
    fn train_epoch<'py>(
        &mut self,
        py: Python<'py>,
        train: &PyDataset,
        validation: Option<&PyDataset>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let (tr, val) = (&train.inner, validation.map(|v| &v.inner));
        loop {
            if let Err(e) = py.check_signals() {
                if e.is_instance_of::<PyKeyboardInterrupt>(py) {
                    let t = &self.inner;
                    return Err(PyKeyboardInterrupt::new_err(format!(
                        "interrupted at epoch {}, step {} (global step {}); the model is consistent \
                         (fit again to continue, save to keep it)",
                        t.epoch + 1,
                        t.step_in_epoch,
                        t.global_step
                    )));
                }
                return Err(e);
            }
            let t = &mut self.inner;
            let r = py.detach(|| t.step(tr, val)).map_err(to_py)?;
            let Some(r) = r else { return Ok(None) };
            if let Some(rec) = r.epoch {
                let d = PyDict::new(py);
                d.set_item("epoch", rec.epoch)?;
                d.set_item("loss", rec.loss)?;
                d.set_item("accuracy", rec.accuracy)?;
                if let (Some(l), Some(a)) = (rec.val_loss, rec.val_accuracy) {
                    d.set_item("val_loss", l)?;
                    d.set_item("val_accuracy", a)?;
                }
                d.set_item("lr", rec.lr)?;
                d.set_item("seconds", rec.seconds)?;
                d.set_item("samples_per_sec", rec.samples_per_sec)?;
                d.set_item("skipped_steps", rec.skipped_steps)?;
                d.set_item("steps", r.of)?;
                return Ok(Some(d));
            }
        }
    }

    /// `(loss, accuracy)` on a data set (no training).
    fn evaluate(&mut self, py: Python<'_>, data: &PyDataset) -> PyResult<(f32, f32)> {
        let t = &mut self.inner;
        py.detach(|| t.evaluate(&data.inner)).map_err(to_py)
    }

    /// Outputs (probabilities of a softmax head) of the samples of `x` (uint8, or floats in
    /// [0, 1]): `n × classes` float32 values as the bytes of a bytearray (numpy wraps it).
    fn predict<'py>(&mut self, py: Python<'py>, x: &Bound<'_, PyAny>) -> PyResult<Bound<'py, PyByteArray>> {
        let (px, shape) = pixels(x, "x")?;
        let f = self.inner.model.input_size;
        let n = shape.first().copied().unwrap_or(0);
        if px.len() != n * f {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: the data have {} features per sample, the model reads {f}",
                px.len().checked_div(n).unwrap_or(0)
            )));
        }
        let model = &mut self.inner.model;
        let out = py.detach(|| {
            let mut xf = vec![0f32; px.len()];
            qmomentum::data::normalise(&px, &mut xf);
            ne_bytes(&model.predict(&xf, n))
        });
        Ok(PyByteArray::new(py, &out))
    }

    /// Post-training quantization (the CLI's `quantize`): batch norms folded, activations
    /// calibrated on the first `batches` batches of `batch_size` samples of `data`. The trainer
    /// becomes the quantized model (a new run at epoch 0 of `epochs`, for QAT fine-tuning).
    fn quantize(
        &mut self,
        py: Python<'_>,
        scheme: &str,
        data: &PyDataset,
        batches: usize,
        batch_size: usize,
        calibration: &str,
    ) -> PyResult<()> {
        let scheme: Scheme = scheme.parse().map_err(to_py)?;
        if scheme == Scheme::Fp32 {
            return Err(PyValueError::new_err(
                "invalid quant = fp32: post-training quantization makes a quantized model; pick w8a8, w4a8, w4a4, w2a2 or ternary",
            ));
        }
        if matches!(scheme, Scheme::Binary | Scheme::BinaryAll) {
            return Err(PyValueError::new_err(format!(
                "invalid quant = {scheme}: post-training quantization supports w8a8, w4a8, w4a4, w2a2 and ternary \
                 (binary networks need training: compile(quant=\"{scheme}\"))"
            )));
        }
        let method: Calibration = calibration.parse().map_err(to_py)?;
        let float = &self.inner;
        let (folded, q) = py
            .detach(|| {
                quantize_float_model(
                    &float.model,
                    &float.config.model,
                    scheme,
                    &data.inner,
                    batches,
                    batch_size,
                    method,
                )
            })
            .map_err(to_py)?;
        let mut cfg = float.config.clone();
        cfg.model = folded;
        cfg.quant = scheme;
        cfg.epochs = 1;
        cfg.schedule_epochs = None;
        cfg.freeze_observers_after = None;
        let mut t = Trainer::new(cfg).map_err(to_py)?;
        t.model = q;
        t.data = float.data.clone();
        t.class_names = float.class_names.clone();
        self.inner = t;
        Ok(())
    }

    /// Unfreeze the activation observers (after PTQ, before QAT fine-tuning, as the CLI does).
    fn unfreeze_observers(&mut self) {
        for a in self.inner.model.layers.iter_mut().filter_map(|l| l.act_quant_mut()) {
            if let Some(o) = a.observer.as_mut() {
                o.frozen = false;
            }
        }
    }

    /// Write the integer model file (`.qmm`) of a quantized model; returns its size in bytes.
    fn export(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        let t = &self.inner;
        let m = qmomentum::export::to_runtime(&t.model)
            .map_err(to_py)?
            .with_class_names(t.class_names.clone());
        let bytes = m.to_bytes().map_err(rt_to_py)?;
        py.detach(|| rt::io::write_file(&path, &bytes))
            .map_err(|e| PyOSError::new_err(format!("{}: {e}", path.display())))?;
        Ok(bytes.len())
    }

    /// `[(name, shape, float32 bytes)]` of every trained parameter, in model order.
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for p in self.inner.model.params_iter() {
            let bytes: Vec<u8> = p.value.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.append((p.name.clone(), p.shape.clone(), PyBytes::new(py, &bytes)))?;
        }
        Ok(out)
    }

    /// Replace every parameter's values (`[(name, float32 bytes)]`, the order of `weights`).
    fn set_weights(&mut self, values: Vec<(String, Vec<u8>)>) -> PyResult<()> {
        let n = self.inner.model.params_iter().count();
        if values.len() != n {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: {} arrays given, the model has {n} parameter tensors",
                values.len()
            )));
        }
        for (p, (name, b)) in self.inner.model.params_iter().zip(&values) {
            if b.len() != p.value.len() * 4 {
                return Err(PyValueError::new_err(format!(
                    "shape mismatch: {name}: {} values given, the model has {:?} ({} values)",
                    b.len() / 4,
                    p.shape,
                    p.value.len()
                )));
            }
            if let Some(i) = b
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
            {
                return Err(PyValueError::new_err(format!("{name}[{i}] is not finite")));
            }
        }
        for (p, (_, b)) in self.inner.model.params_iter_mut().zip(&values) {
            for (v, c) in p.value.iter_mut().zip(b.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// `[(index, kind, output shape, parameters, MACs per sample)]` of every layer.
    fn plan(&self) -> PyResult<Vec<PlanRow>> {
        let cfg = &self.inner.config.model;
        let plan = cfg.plan().map_err(to_py)?;
        Ok(plan
            .iter()
            .zip(&cfg.layers)
            .map(|(p, l)| {
                let kind = serde_json::to_value(l)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                    .unwrap_or_default();
                let shape = if p.output.h == 1 && p.output.w == 1 && cfg.input_shape.is_none() {
                    vec![p.output.c]
                } else if p.output.h == 1 && p.output.w == 1 {
                    vec![p.output.len()]
                } else {
                    vec![p.output.h, p.output.w, p.output.c]
                };
                let params = p.params.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
                (p.index, kind, shape, params, p.macs)
            })
            .collect())
    }

    /// Parameters in the model (the optimizer state and quantizer grids excluded).
    fn param_count(&self) -> usize {
        self.inner.model.param_count()
    }

    /// A one-line description of the optimizer, in the CLI's words.
    fn optimizer_summary(&self) -> String {
        self.inner.config.optimizer.to_string()
    }

    /// The finished epochs' records as JSON (`history.json` of the CLI).
    fn history_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.history).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// 0-based epoch in progress.
    #[getter]
    fn epoch(&self) -> usize {
        self.inner.epoch
    }

    /// Steps done inside the epoch in progress.
    #[getter]
    fn step_in_epoch(&self) -> usize {
        self.inner.step_in_epoch
    }

    /// Optimizer steps done.
    #[getter]
    fn global_step(&self) -> u64 {
        self.inner.global_step
    }

    /// Output classes.
    #[getter]
    fn classes(&self) -> usize {
        self.inner.model.classes()
    }

    /// Values per input sample.
    #[getter]
    fn input_size(&self) -> usize {
        self.inner.model.input_size
    }

    /// Class names in label order, if known.
    #[getter]
    fn class_names(&self) -> Option<Vec<String>> {
        self.inner.class_names.clone()
    }

    #[setter]
    fn set_class_names(&mut self, names: Option<Vec<String>>) -> PyResult<()> {
        if let Some(n) = &names {
            if n.len() != self.inner.model.classes() {
                return Err(PyValueError::new_err(format!(
                    "{} class names for a model of {} outputs",
                    n.len(),
                    self.inner.model.classes()
                )));
            }
        }
        self.inner.class_names = names;
        Ok(())
    }
}

/// An integer model (`.qmm`) in the integer-only runtime.
#[pyclass(name = "Runtime", module = "qmomentum._native", frozen)]
struct PyRuntime {
    model: rt::Model,
}

impl PyRuntime {
    /// The u8 input of `x` (uint8 read in place; float32 quantized on the model's input grid)
    /// and the number of samples.
    fn with_input<R>(&self, x: &Bound<'_, PyAny>, f: impl FnOnce(&[u8], usize) -> PyResult<R>) -> PyResult<R> {
        let (v, t) = ArrayView::of(x, &["|u1", "<f4"], "x")?;
        let size = self.model.input().size;
        let n = v.shape.first().copied().unwrap_or(0);
        if v.shape.is_empty() || v.len() != n * size {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: x has shape {:?}, the model reads {size} values per sample",
                v.shape
            )));
        }
        if t == "|u1" {
            f(v.slice::<u8>(x), n)
        } else {
            let xf = v.slice::<f32>(x);
            if let Some(i) = xf.iter().position(|v| v.is_nan()) {
                return Err(PyValueError::new_err(format!("x holds NaN at flat index {i}")));
            }
            let mut q = vec![0u8; xf.len()];
            self.model.quantize_input(xf, &mut q).map_err(rt_to_py)?;
            f(&q, n)
        }
    }
}

#[pymethods]
impl PyRuntime {
    /// Load an integer model file.
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        let model = rt::Model::load(&path).map_err(|e| PyValueError::new_err(format!("{}: {e}", path.display())))?;
        Ok(PyRuntime { model })
    }

    /// Class indices (u32, native byte order) of the samples of `x`, as a bytearray, on
    /// `threads` threads (0 = one per core).
    fn predict<'py>(&self, py: Python<'py>, x: &Bound<'_, PyAny>, threads: usize) -> PyResult<Bound<'py, PyByteArray>> {
        self.with_input(x, |input, n| {
            let m = &self.model;
            let p = py
                .detach(|| m.predict(input, n, threads).map(|p| ne_bytes(&p)))
                .map_err(rt_to_py)?;
            Ok(PyByteArray::new(py, &p))
        })
    }

    /// Logits (f32, native byte order, `n × classes`) as a bytearray.
    fn logits<'py>(&self, py: Python<'py>, x: &Bound<'_, PyAny>, threads: usize) -> PyResult<Bound<'py, PyByteArray>> {
        self.with_input(x, |input, n| {
            let m = &self.model;
            let l = py
                .detach(|| m.logits(input, n, threads).map(|l| ne_bytes(&l)))
                .map_err(rt_to_py)?;
            Ok(PyByteArray::new(py, &l))
        })
    }

    /// Values per input sample.
    #[getter]
    fn input_size(&self) -> usize {
        self.model.input().size
    }

    /// Input shape `[h, w, c]` if the model has one.
    #[getter]
    fn input_shape(&self) -> Option<Vec<usize>> {
        self.model.input().shape.map(|s| s.to_vec())
    }

    /// Output classes.
    #[getter]
    fn classes(&self) -> usize {
        self.model.num_classes()
    }

    /// Class names stored in the file.
    #[getter]
    fn class_names(&self) -> Option<Vec<String>> {
        self.model.class_names().map(|n| n.to_vec())
    }

    /// The kernel tier in use (`AMX-INT8`, `AVX-512 VNNI`, `AVX2`, `scalar`).
    #[getter]
    fn kernel(&self) -> String {
        self.model.kernel().to_string()
    }
}

/// `(train_images, train_labels, test_images, test_labels, sample_shape)` of an MNIST-layout
/// folder, as bytearrays (numpy wraps them without a copy).
#[allow(clippy::type_complexity)]
#[pyfunction]
fn load_mnist_dir<'py>(
    py: Python<'py>,
    dir: PathBuf,
) -> PyResult<(
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Bound<'py, PyByteArray>,
    Vec<usize>,
)> {
    let (train, test) = py.detach(|| Dataset::load_mnist_dir(&dir)).map_err(to_py)?;
    Ok((
        PyByteArray::new(py, &train.images),
        PyByteArray::new(py, &train.labels),
        PyByteArray::new(py, &test.images),
        PyByteArray::new(py, &test.labels),
        train.shape.clone(),
    ))
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTrainer>()?;
    m.add_class::<PyDataset>()?;
    m.add_class::<PyRuntime>()?;
    m.add_function(wrap_pyfunction!(load_mnist_dir, m)?)?;
    // The repository's data folder as seen when this module was built (found again by
    // `qmomentum.datasets` when the package was installed from a clone).
    m.add(
        "SOURCE_DATA_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/fashion-mnist"),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
