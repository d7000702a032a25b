//! PyTorch `state_dict`s saved with safetensors, in ([`import_state_dict`]) and out
//! ([`export_state_dict`]). `doc/pytorch.md` is the user's guide; the rules in short:
//!
//! * **Modules.** A tensor name is `<module>.<tensor>` (split at the last dot: `0.weight`,
//!   `features.3.running_var`). The modules that hold tensors are matched, in order, with the
//!   config's layers that have parameters (dense, conv2d, batch_norm); layers without parameters
//!   (activations, pooling, flatten, dropout) have no counterpart, so any index numbering works.
//!   The order is the natural order of the module names (numeric parts compared as numbers:
//!   `2` < `10`), which is the definition order of an `nn.Sequential`, nested or not; when the
//!   names differ in a non-numeric part (`features.0` and `classifier.1`, `conv1` and `fc`) the
//!   order cannot be told from them and the caller passes it ([`import_state_dict`]'s `names`).
//! * **Tensors.** `nn.Linear`: `weight [out, in]`, `bias [out]` → our `[in, out]` kernel.
//!   `nn.Conv2d`: `weight [out, in/groups, kh, kw]` → our HWIO `[kh·kw·in/groups, out]`.
//!   `nn.BatchNorm1d/2d`: `weight` (γ), `bias` (β), `running_mean`, `running_var`, and
//!   `num_batches_tracked` (an integer scalar, optional, not used: our running statistics follow
//!   the config's momentum). Every name, shape and dtype is checked; all mismatches are collected
//!   and the first ones listed with both shapes.
//! * **Flatten.** PyTorch flattens NCHW as `(c, h, w)`, we flatten NHWC as `(h, w, c)`: the
//!   columns of a dense layer after a flatten of a spatial tensor (and a batch norm over the
//!   flattened features) are permuted, `ours[(y·w + x)·c + ch] = torch[ch·h·w + y·w + x]`.
//! * **dtypes.** f32 as is; f16, bf16 and f64 converted to f32 (f64 rounded to nearest); any
//!   other dtype for a weight is refused by name, as is a non-finite value.
//!
//! The export writes the same names and layouts with the indices of the `nn.Sequential` that
//! [`sequential_definition`] prints (stored in the file's metadata as `qmomentum.sequential`).

use crate::config::{LayerConfig, ModelConfig, PlannedLayer, TrainConfig};
use crate::error::{Error, Result};
use crate::layers::conv2d::Geometry;
use crate::layers::{Activation, Layer, Shape};
use crate::train::Trainer;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// Mismatches listed in an error before "… and N more".
const SHOWN: usize = 8;

/// The metadata key of the `nn.Sequential` definition in an exported file.
pub const DEFINITION_KEY: &str = "qmomentum.sequential";

/// What a layer with parameters expects from its PyTorch module.
#[derive(Clone, Debug)]
struct Slot {
    /// Our layer index.
    layer: usize,
    /// `dense 10`, `conv2d 32 3×3`, `batch_norm 32`.
    what: String,
    /// `(tensor, PyTorch shape)` of the required tensors.
    tensors: Vec<(&'static str, Vec<usize>)>,
    /// Batch norm: `num_batches_tracked` is accepted.
    bn: bool,
    /// Dense or batch norm after a flatten of this spatial shape: the features are permuted.
    flatten_from: Option<Shape>,
}

/// The layers with parameters of `cfg`, in order, with what PyTorch holds for each.
fn slots(cfg: &ModelConfig) -> Result<Vec<Slot>> {
    let plan = cfg.plan()?;
    let mut out = Vec::new();
    // The spatial shape a flat vector was flattened from (NHWC here, CHW in PyTorch).
    let mut flat_from: Option<Shape> = None;
    for (l, p) in cfg.layers.iter().zip(&plan) {
        let spatial = p.input.h * p.input.w > 1;
        match l {
            LayerConfig::Dense { units, .. } => {
                let from = if spatial { Some(p.input) } else { flat_from };
                let n = p.input.len();
                out.push(Slot {
                    layer: p.index,
                    what: format!("dense {units}"),
                    tensors: vec![("weight", vec![*units, n]), ("bias", vec![*units])],
                    bn: false,
                    flatten_from: from.filter(|s| s.c > 1),
                });
                flat_from = None;
            }
            LayerConfig::Conv2d {
                filters,
                kernel_size,
                groups,
                ..
            } => {
                let k = kernel_size.get();
                out.push(Slot {
                    layer: p.index,
                    what: format!("conv2d {filters} {}×{}", k[0], k[1]),
                    tensors: vec![
                        ("weight", vec![*filters, p.input.c / groups, k[0], k[1]]),
                        ("bias", vec![*filters]),
                    ],
                    bn: false,
                    flatten_from: None,
                });
                flat_from = None;
            }
            LayerConfig::BatchNorm { .. } => {
                let c = p.input.c;
                out.push(Slot {
                    layer: p.index,
                    what: format!("batch_norm {c}"),
                    tensors: ["weight", "bias", "running_mean", "running_var"]
                        .into_iter()
                        .map(|n| (n, vec![c]))
                        .collect(),
                    bn: true,
                    flatten_from: if spatial { None } else { flat_from.filter(|s| s.c > 1) },
                });
            }
            LayerConfig::Flatten => {
                if spatial {
                    flat_from = Some(p.input);
                }
            }
            LayerConfig::Dropout { .. } | LayerConfig::Activation { .. } => {}
            LayerConfig::MaxPool2d { .. } | LayerConfig::AvgPool2d { .. } | LayerConfig::GlobalAvgPool => {
                flat_from = None
            }
        }
    }
    Ok(out)
}

/// For a vector flattened from `s`: the PyTorch (CHW) index of each of our (HWC) indices.
fn chw_index(s: Shape) -> impl Fn(usize) -> usize {
    move |j| {
        let (pos, ch) = (j / s.c, j % s.c);
        ch * s.h * s.w + pos
    }
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

/// A module name split into parts for the natural order.
fn parts(prefix: &str) -> Vec<&str> {
    if prefix.is_empty() {
        Vec::new()
    } else {
        prefix.split('.').collect()
    }
}

fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(i), Ok(j)) => i.cmp(&j),
            _ => x.cmp(y),
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Two module names whose order is not told by their names (they first differ in a part that
/// is not a number on both sides, or one is a prefix of the other).
fn ambiguous(a: &str, b: &str) -> bool {
    let (pa, pb) = (parts(a), parts(b));
    match pa.iter().zip(&pb).find(|(x, y)| x != y) {
        Some((x, y)) => !(x.parse::<u64>().is_ok() && y.parse::<u64>().is_ok()),
        None => true,
    }
}

/// A tensor of the file, converted to f32 (or the reason it cannot be).
fn to_f32(v: &TensorView) -> std::result::Result<Vec<f32>, String> {
    let d = v.data();
    let out: Vec<f32> = match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} (expected F32; F16, BF16 and F64 are converted)"
            ))
        }
    };
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "a non-finite value ({}) at index {i}{}",
            out[i],
            if v.dtype() == Dtype::F64 {
                " (after rounding to f32)"
            } else {
                ""
            }
        ));
    }
    Ok(out)
}

/// IEEE half precision to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value m · 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// The result of an import: the model as a fresh run (epoch 0 of the config's epochs) and
/// what the caller should tell the user.
pub struct Imported {
    /// The trainer holding the imported weights and batch-norm statistics.
    pub trainer: Trainer,
    /// `(module, our layer index, what)` for each module, in the order used.
    pub mapping: Vec<(String, usize, String)>,
    /// Tensors read.
    pub tensors: usize,
    /// Conventions the user should check (epsilon, momentum).
    pub notes: Vec<String>,
}

/// Read a PyTorch `state_dict` (safetensors `bytes`, `path` for messages) into a new trainer of
/// `config`. `names`, when given, are the module names in layer order (for state_dicts whose
/// names do not tell the order). Every missing, extra, misshaped or badly typed tensor is an
/// error; the message lists the first ones with both shapes, then the file's modules and the
/// config's layers side by side.
pub fn import_state_dict(bytes: &[u8], path: &Path, config: TrainConfig, names: Option<&[String]>) -> Result<Imported> {
    config.validate()?;
    let slots = slots(&config.model)?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::data(path, format!("not a readable safetensors file ({e})")))?;
    // Module → its tensors.
    let mut modules: BTreeMap<String, Vec<(String, TensorView)>> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let (m, t) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        modules.entry(m.to_string()).or_default().push((t.to_string(), view));
    }
    let order: Vec<String> = match names {
        Some(list) => {
            let mut seen = std::collections::HashSet::new();
            for n in list {
                if !seen.insert(n.as_str()) {
                    return Err(Error::config("names", n, "a module is named twice"));
                }
            }
            list.to_vec()
        }
        None => {
            let mut v: Vec<String> = modules.keys().cloned().collect();
            v.sort_by(|a, b| natural_cmp(a, b));
            for (i, a) in v.iter().enumerate() {
                if let Some(b) = v[i + 1..].iter().find(|b| ambiguous(a, b)) {
                    return Err(Error::data(
                        path,
                        format!(
                            "the module names '{a}' and '{b}' do not tell their order (only numeric parts do, as in an \
                             nn.Sequential); pass the modules with parameters in layer order: --names {}",
                            v.join(",")
                        ),
                    ));
                }
            }
            v
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let mut values: HashMap<(usize, &'static str), Vec<f32>> = HashMap::new();
    let mut mapping = Vec::new();
    let mut tensors = 0usize;
    let full = |m: &str, t: &str| {
        if m.is_empty() {
            t.to_string()
        } else {
            format!("{m}.{t}")
        }
    };
    for (k, m) in order.iter().enumerate() {
        let Some(found) = modules.get(m) else {
            problems.push(format!("module '{m}' (--names) has no tensor in the file"));
            continue;
        };
        let Some(slot) = slots.get(k) else {
            for (t, v) in found {
                problems.push(format!(
                    "extra '{}' {} (the config has only {} layers with parameters)",
                    full(m, t),
                    shape_str(v.shape()),
                    slots.len()
                ));
            }
            continue;
        };
        mapping.push((m.clone(), slot.layer, slot.what.clone()));
        let at = format!("layer {} ({})", slot.layer, slot.what);
        for (t, want) in &slot.tensors {
            let name = full(m, t);
            match found.iter().find(|(n, _)| n == t) {
                None => problems.push(format!("missing '{name}' {}, for {at}", shape_str(want))),
                Some((_, v)) if v.shape() != want.as_slice() => problems.push(format!(
                    "misshaped '{name}': the file has {}, {at} needs {}",
                    shape_str(v.shape()),
                    shape_str(want)
                )),
                Some((_, v)) => match to_f32(v) {
                    Ok(x) => {
                        values.insert((k, t), x);
                        tensors += 1;
                    }
                    Err(why) => problems.push(format!("'{name}' {}: {why}", shape_str(v.shape()))),
                },
            }
        }
        for (t, v) in found {
            if slot.tensors.iter().any(|(n, _)| n == t) {
                continue;
            }
            if slot.bn && t == "num_batches_tracked" {
                if v.shape().iter().product::<usize>() != 1 || !matches!(v.dtype(), Dtype::I64 | Dtype::I32) {
                    problems.push(format!(
                        "'{}' is {:?} {}, expected an integer scalar",
                        full(m, t),
                        v.dtype(),
                        shape_str(v.shape())
                    ));
                } else {
                    tensors += 1;
                }
                continue;
            }
            problems.push(format!(
                "extra '{}' {} in the module of {at} (it holds {})",
                full(m, t),
                shape_str(v.shape()),
                slot.tensors.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for slot in slots.iter().skip(order.len()) {
        problems.push(format!(
            "missing a module for layer {} ({}): {} ({} module(s) of the file matched, {} layers with parameters in the config)",
            slot.layer,
            slot.what,
            slot.tensors
                .iter()
                .map(|(n, s)| format!("{n} {}", shape_str(s)))
                .collect::<Vec<_>>()
                .join(", "),
            order.len(),
            slots.len()
        ));
    }
    if names.is_some() {
        for (m, ts) in &modules {
            if !order.contains(m) {
                for (t, v) in ts {
                    problems.push(format!(
                        "extra '{}' {} (module not in --names)",
                        full(m, t),
                        shape_str(v.shape())
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        let mut msg = format!(
            "the state_dict does not fit the config's model ({}): {} mismatch{}",
            config.model.summary(),
            problems.len(),
            if problems.len() == 1 { "" } else { "es" }
        );
        for p in problems.iter().take(SHOWN) {
            let _ = write!(msg, "\n  {p}");
        }
        if problems.len() > SHOWN {
            let _ = write!(msg, "\n  … and {} more", problems.len() - SHOWN);
        }
        let _ = write!(msg, "\n  the file's modules, in the order used: ");
        let desc: Vec<String> = order
            .iter()
            .map(|m| {
                let ts = modules
                    .get(m)
                    .map(|v| {
                        // PyTorch's order of a module's tensors, then any others by name.
                        let rank = |t: &str| {
                            ["weight", "bias", "running_mean", "running_var"]
                                .iter()
                                .position(|n| *n == t)
                                .unwrap_or(4)
                        };
                        let mut v: Vec<_> = v.iter().filter(|(t, _)| t != "num_batches_tracked").collect();
                        v.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
                        v.iter()
                            .map(|(t, v)| format!("{t} {}", shape_str(v.shape())))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                format!("'{m}' ({ts})")
            })
            .collect();
        msg += &desc.join("; ");
        let _ = write!(
            msg,
            "\n  the config's layers with parameters: {}",
            slots
                .iter()
                .map(|s| format!(
                    "{} {} ({})",
                    s.layer,
                    s.what,
                    s.tensors
                        .iter()
                        .map(|(n, s)| format!("{n} {}", shape_str(s)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        return Err(Error::data(path, msg));
    }
    let mut t = Trainer::new(config)?;
    let mut notes = Vec::new();
    for (k, slot) in slots.iter().enumerate() {
        let mut take = |n: &'static str| values.remove(&(k, n)).unwrap_or_default();
        match slot_layer_mut(&mut t.model, slot.layer) {
            TargetMut::Dense(d) => {
                let (w, b) = (take("weight"), take("bias"));
                let (n_in, n_out) = (d.inputs, d.outputs);
                let col: Box<dyn Fn(usize) -> usize> = match slot.flatten_from {
                    Some(s) => Box::new(chw_index(s)),
                    None => Box::new(|j| j),
                };
                for j in 0..n_in {
                    let jt = col(j);
                    for o in 0..n_out {
                        d.weight.value[j * n_out + o] = w[o * n_in + jt];
                    }
                }
                d.bias.value = b;
                if d.bop() {
                    return Err(Error::config(
                        "quant",
                        t.config.quant,
                        format!(
                            "layer {} has binary weights trained by Bop (±1 values): import into quant = \"fp32\" and quantize, or set latent_binary",
                            slot.layer
                        ),
                    ));
                }
            }
            TargetMut::Conv2d(c) => {
                let (w, b) = (take("weight"), take("bias"));
                let [kh, kw] = c.geo.kernel;
                let cout = c.out_shape.c;
                let cg = c.geo.input.c / c.groups;
                for o in 0..cout {
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let row = (ky * kw + kx) * cg + ci;
                                c.weight.value[row * cout + o] = w[((o * cg + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                }
                c.bias.value = b;
                if c.wq.bop {
                    return Err(Error::config(
                        "quant",
                        t.config.quant,
                        format!(
                            "layer {} has binary weights trained by Bop (±1 values): import into quant = \"fp32\" and quantize, or set latent_binary",
                            slot.layer
                        ),
                    ));
                }
            }
            TargetMut::BatchNorm(bn) => {
                let perm = |v: Vec<f32>| match slot.flatten_from {
                    Some(s) => {
                        let f = chw_index(s);
                        (0..v.len()).map(|j| v[f(j)]).collect()
                    }
                    None => v,
                };
                bn.gamma.value = perm(take("weight"));
                bn.beta.value = perm(take("bias"));
                bn.running_mean.value = perm(take("running_mean"));
                let var = perm(take("running_var"));
                if let Some(i) = var.iter().position(|v| *v < 0.0) {
                    return Err(Error::data(
                        path,
                        format!("'{}.running_var' is negative ({}) at channel {i}", mapping[k].0, var[i]),
                    ));
                }
                bn.running_var.value = var;
                if (bn.epsilon - 1e-5).abs() > 1e-9 {
                    notes.push(format!(
                        "layer {} (batch_norm): the config's epsilon is {}, PyTorch's BatchNorm default is 1e-5; the model computes with {} (set epsilon in the config to the PyTorch model's eps)",
                        slot.layer, bn.epsilon, bn.epsilon
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(Imported {
        trainer: t,
        mapping,
        tensors,
        notes,
    })
}

/// A float as Python source (`1e-5`, `0.1`).
fn py_f32(v: f32) -> String {
    format!("{v:?}")
}

fn act_module(a: Activation, last: bool) -> Option<String> {
    match a {
        Activation::Linear => None,
        Activation::Relu => Some("nn.ReLU()".into()),
        Activation::Sigmoid => Some("nn.Sigmoid()".into()),
        Activation::Tanh => Some("nn.Tanh()".into()),
        // The final softmax is fused with the loss (nn.CrossEntropyLoss takes logits).
        Activation::Softmax if last => None,
        Activation::Softmax => Some("nn.Softmax(dim=1)".into()),
    }
}

/// The `nn.Sequential` of a model: Python source (an expression that `eval` with `nn` in scope
/// turns into the module) and, for each of our layers with parameters, its module index.
/// Notes on what PyTorch cannot express exactly go into the third value.
pub fn sequential_definition(cfg: &ModelConfig) -> Result<(String, HashMap<usize, usize>, Vec<String>)> {
    let plan: Vec<PlannedLayer> = cfg.plan()?;
    let mut modules: Vec<(String, String)> = Vec::new();
    let mut index_of = HashMap::new();
    let mut notes = Vec::new();
    let n = cfg.layers.len();
    if cfg.input_shape.is_none() {
        // An MLP: PyTorch's data pipelines hand it images, so it starts with a Flatten.
        modules.push(("nn.Flatten()".into(), "the input as a vector".into()));
    }
    for (i, (l, p)) in cfg.layers.iter().zip(&plan).enumerate() {
        let last = i + 1 == n;
        let tag = format!("qmomentum layer {i}");
        let spatial = p.input.h * p.input.w > 1;
        match l {
            LayerConfig::Dense { units, activation, .. } => {
                if spatial {
                    modules.push(("nn.Flatten()".into(), format!("{tag}: dense on a {} input", p.input)));
                }
                index_of.insert(i, modules.len());
                modules.push((
                    format!("nn.Linear({}, {units})", p.input.len()),
                    format!("{tag}: dense"),
                ));
                if let Some(a) = act_module(*activation, last) {
                    modules.push((a, format!("{tag}: activation")));
                }
            }
            LayerConfig::Conv2d {
                filters,
                kernel_size,
                strides,
                padding,
                dilation_rate,
                groups,
                activation,
                ..
            } => {
                let (k, s, d) = (kernel_size.get(), strides.get(), dilation_rate.get());
                let g = Geometry::new(i, p.input, *filters, k, s, d, *padding)?;
                let [t, le, b, r] = g.pad;
                let pad = if t == b && le == r {
                    format!("({t}, {le})")
                } else {
                    modules.push((
                        format!("nn.ZeroPad2d(({le}, {r}, {t}, {b}))"),
                        format!("{tag}: asymmetric padding"),
                    ));
                    "(0, 0)".into()
                };
                index_of.insert(i, modules.len());
                let mut m = format!(
                    "nn.Conv2d({}, {filters}, kernel_size=({}, {}), stride=({}, {}), padding={pad}",
                    p.input.c, k[0], k[1], s[0], s[1]
                );
                if d != [1, 1] {
                    let _ = write!(m, ", dilation=({}, {})", d[0], d[1]);
                }
                if *groups != 1 {
                    let _ = write!(m, ", groups={groups}");
                }
                m.push(')');
                modules.push((m, format!("{tag}: conv2d")));
                if let Some(a) = act_module(*activation, last) {
                    modules.push((a, format!("{tag}: activation")));
                }
            }
            LayerConfig::BatchNorm {
                momentum,
                torch_momentum,
                epsilon,
            } => {
                let m = match (torch_momentum, momentum) {
                    (Some(p), _) => *p,
                    // 1 − 0.9 in f32 is 0.100000024: rounded to 6 digits, as a user would write it.
                    (None, Some(k)) => format!("{:.6e}", 1.0 - *k as f64).parse().unwrap_or(1.0 - k),
                    (None, None) => 0.01,
                };
                if torch_momentum.is_none() {
                    notes.push(format!(
                        "layer {i}: Keras-convention momentum {} is PyTorch momentum {} (PyTorch updates the running variance with the unbiased batch variance)",
                        momentum.unwrap_or(0.99),
                        py_f32(m)
                    ));
                }
                let kind = if spatial { "BatchNorm2d" } else { "BatchNorm1d" };
                index_of.insert(i, modules.len());
                modules.push((
                    format!(
                        "nn.{kind}({}, eps={}, momentum={})",
                        p.input.c,
                        py_f32(*epsilon),
                        py_f32(m)
                    ),
                    format!("{tag}: batch_norm"),
                ));
            }
            LayerConfig::MaxPool2d {
                pool_size,
                strides,
                padding,
            }
            | LayerConfig::AvgPool2d {
                pool_size,
                strides,
                padding,
            } => {
                let max = matches!(l, LayerConfig::MaxPool2d { .. });
                let k = pool_size.get();
                let s = strides.unwrap_or(*pool_size).get();
                let g = Geometry::new(i, p.input, p.input.c, k, s, [1, 1], *padding)?;
                let [t, le, b, r] = g.pad;
                let pad = if t == b && le == r && 2 * t <= k[0] && 2 * le <= k[1] {
                    format!("({t}, {le})")
                } else if max {
                    modules.push((
                        format!("nn.ConstantPad2d(({le}, {r}, {t}, {b}), float('-inf'))"),
                        format!("{tag}: asymmetric padding (ignored by the max)"),
                    ));
                    "(0, 0)".into()
                } else {
                    notes.push(format!(
                        "layer {i}: average pooling with padding {:?} (not counted) has no exact PyTorch module; the definition pads symmetrically",
                        g.pad
                    ));
                    format!("({}, {})", t.max(b), le.max(r))
                };
                let m = if max {
                    format!(
                        "nn.MaxPool2d(kernel_size=({}, {}), stride=({}, {}), padding={pad})",
                        k[0], k[1], s[0], s[1]
                    )
                } else {
                    format!(
                        "nn.AvgPool2d(kernel_size=({}, {}), stride=({}, {}), padding={pad}, count_include_pad=False)",
                        k[0], k[1], s[0], s[1]
                    )
                };
                modules.push((m, tag));
            }
            LayerConfig::GlobalAvgPool => {
                modules.push(("nn.AdaptiveAvgPool2d(1)".into(), format!("{tag}: global_avg_pool")));
                modules.push(("nn.Flatten()".into(), format!("{tag}: global_avg_pool")));
            }
            LayerConfig::Dropout { rate } => modules.push((format!("nn.Dropout(p={})", py_f32(*rate)), tag)),
            LayerConfig::Activation { activation } => {
                if let Some(a) = act_module(*activation, last) {
                    modules.push((a, tag));
                }
            }
            LayerConfig::Flatten => modules.push(("nn.Flatten()".into(), format!("{tag}: flatten"))),
        }
    }
    if let Some(t) = cfg.binarize_input {
        notes.push(format!(
            "the model binarizes its input (x ≥ {t} → +1, else −1): apply that before the nn.Sequential"
        ));
    }
    let mut src = String::from("nn.Sequential(\n");
    for (k, (m, c)) in modules.iter().enumerate() {
        let _ = writeln!(src, "    {m},  # {k}: {c}");
    }
    src.push(')');
    Ok((src, index_of, notes))
}

/// What [`export_state_dict`] produced.
pub struct Exported {
    /// The safetensors file.
    pub bytes: Vec<u8>,
    /// The `nn.Sequential` definition (also in the metadata).
    pub definition: String,
    /// Tensors written.
    pub tensors: usize,
    /// What the user should know (latent weights of a quantized model, parameters left out).
    pub notes: Vec<String>,
}

/// Write the model of `t` as a PyTorch `state_dict` (safetensors, f32; `num_batches_tracked` as
/// an i64 scalar holding the optimizer steps taken), with the names of the `nn.Sequential` of
/// [`sequential_definition`], stored in the metadata under [`DEFINITION_KEY`].
pub fn export_state_dict(t: &Trainer) -> Result<Exported> {
    let cfg = &t.config.model;
    let (definition, index_of, mut notes) = sequential_definition(cfg)?;
    let slots = slots(cfg)?;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    for slot in &slots {
        let idx = index_of.get(&slot.layer).copied().ok_or_else(|| {
            Error::Shape(format!(
                "layer {} ({}) has no module in the definition",
                slot.layer, slot.what
            ))
        })?;
        let shape = |n: &str| {
            slot.tensors
                .iter()
                .find(|(t, _)| *t == n)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        match slot_layer(&t.model, slot.layer) {
            Target::Dense(d) => {
                let (n_in, n_out) = (d.inputs, d.outputs);
                let mut w = vec![0.0f32; n_in * n_out];
                let col: Box<dyn Fn(usize) -> usize> = match slot.flatten_from {
                    Some(s) => Box::new(chw_index(s)),
                    None => Box::new(|j| j),
                };
                for j in 0..n_in {
                    let jt = col(j);
                    for o in 0..n_out {
                        w[o * n_in + jt] = d.weight.value[j * n_out + o];
                    }
                }
                owned.push((format!("{idx}.weight"), Dtype::F32, shape("weight"), f32b(&w)));
                owned.push((format!("{idx}.bias"), Dtype::F32, shape("bias"), f32b(&d.bias.value)));
            }
            Target::Conv2d(c) => {
                let [kh, kw] = c.geo.kernel;
                let cout = c.out_shape.c;
                let cg = c.geo.input.c / c.groups;
                let mut w = vec![0.0f32; c.weight.value.len()];
                for o in 0..cout {
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let row = (ky * kw + kx) * cg + ci;
                                w[((o * cg + ci) * kh + ky) * kw + kx] = c.weight.value[row * cout + o];
                            }
                        }
                    }
                }
                owned.push((format!("{idx}.weight"), Dtype::F32, shape("weight"), f32b(&w)));
                owned.push((format!("{idx}.bias"), Dtype::F32, shape("bias"), f32b(&c.bias.value)));
            }
            Target::BatchNorm(bn) => {
                let perm = |v: &[f32]| -> Vec<f32> {
                    match slot.flatten_from {
                        Some(s) => {
                            let f = chw_index(s);
                            let mut out = vec![0.0; v.len()];
                            for (j, x) in v.iter().enumerate() {
                                out[f(j)] = *x;
                            }
                            out
                        }
                        None => v.to_vec(),
                    }
                };
                for (name, v) in [
                    ("weight", &bn.gamma.value),
                    ("bias", &bn.beta.value),
                    ("running_mean", &bn.running_mean.value),
                    ("running_var", &bn.running_var.value),
                ] {
                    owned.push((format!("{idx}.{name}"), Dtype::F32, shape(name), f32b(&perm(v))));
                }
                owned.push((
                    format!("{idx}.num_batches_tracked"),
                    Dtype::I64,
                    vec![],
                    (t.global_step as i64).to_le_bytes().to_vec(),
                ));
            }
            _ => {}
        }
    }
    if t.config.quant != crate::quant::Scheme::Fp32 {
        notes.push(format!(
            "the checkpoint is quantized ({}): the state_dict holds its latent float weights (what QAT trains), not the quantized ones; PyTorch runs them in float",
            t.config.quant
        ));
    }
    let left: Vec<String> = t
        .model
        .params_iter()
        .filter(|p| p.name.ends_with(".act_step"))
        .map(|p| p.name.clone())
        .collect();
    if !left.is_empty() {
        notes.push(format!(
            "left out (no PyTorch counterpart): the LSQ steps {}",
            left.join(", ")
        ));
    }
    let tensors = owned.len();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::encode(format!("tensor {n}"), e))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (DEFINITION_KEY.to_string(), definition.clone()),
        ("qmomentum.model".to_string(), cfg.summary()),
    ]);
    if !notes.is_empty() {
        meta.insert("qmomentum.notes".to_string(), notes.join("\n"));
    }
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::encode("state_dict", e))?;
    let bytes = sorted_header(bytes)?;
    Ok(Exported {
        bytes,
        definition,
        tensors,
        notes,
    })
}

/// The same safetensors file with its JSON header written in a fixed order (entries and metadata
/// keys sorted), padded with spaces to a multiple of 8 bytes as the format asks. `safetensors`
/// takes the metadata as a `HashMap`, whose order changes from run to run, so without this the
/// same checkpoint exported twice gave different bytes. The tensor data and its offsets are
/// untouched.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::encode("state_dict header", why.to_string());
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .ok_or_else(|| bad("shorter than its length field"))?;
    let end = n.checked_add(8).ok_or_else(|| bad("header length overflows"))?;
    let header = bytes.get(8..end).ok_or_else(|| bad("shorter than its header"))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| Error::encode("state_dict header", e))?;
    if let Some(m) = entries.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(m.take()).map_err(|e| Error::encode("state_dict metadata", e))?;
        *m = serde_json::to_value(sorted).map_err(|e| Error::encode("state_dict metadata", e))?;
    }
    let mut json = serde_json::to_string(&entries).map_err(|e| Error::encode("state_dict header", e))?;
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - end);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// What a state_dict slot maps to: the layer at that index of the config, or, for a batch norm
/// folded into the convolution before it for QAT, that batch norm (its parameters are the
/// unfused network's, as PyTorch's `ConvBn2d` keeps `bn.weight`, `bn.running_var`, …).
enum Target<'a> {
    Dense(&'a crate::layers::Dense),
    Conv2d(&'a crate::layers::Conv2d),
    BatchNorm(&'a crate::layers::BatchNorm),
    Other,
}

/// [`Target`], mutable.
enum TargetMut<'a> {
    Dense(&'a mut crate::layers::Dense),
    Conv2d(&'a mut crate::layers::Conv2d),
    BatchNorm(&'a mut crate::layers::BatchNorm),
    Other,
}

fn slot_layer(m: &crate::model::Sequential, k: usize) -> Target<'_> {
    match &m.layers[k] {
        Layer::Dense(d) => Target::Dense(d),
        Layer::Conv2d(c) => Target::Conv2d(c),
        Layer::BatchNorm(b) => Target::BatchNorm(b),
        Layer::Folded(_) => m.batch_norm_at(k).map_or(Target::Other, Target::BatchNorm),
        _ => Target::Other,
    }
}

fn slot_layer_mut(m: &mut crate::model::Sequential, k: usize) -> TargetMut<'_> {
    if matches!(m.layers[k], Layer::Folded(_)) {
        return m.batch_norm_at_mut(k).map_or(TargetMut::Other, TargetMut::BatchNorm);
    }
    match &mut m.layers[k] {
        Layer::Dense(d) => TargetMut::Dense(d),
        Layer::Conv2d(c) => TargetMut::Conv2d(c),
        Layer::BatchNorm(b) => TargetMut::BatchNorm(b),
        _ => TargetMut::Other,
    }
}
