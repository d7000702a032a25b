//! `qmomentum evaluate` and `qmomentum predict`: a checkpoint or an integer model, on the test
//! set or on the user's own files (images, folders of images, .npy arrays).

use crate::inputs::{DataArgs, ModelFile};
use crate::output::{warn, write_output};
use anyhow::{bail, Result};
use clap::Args;
use qmomentum::data::files::{load_inputs, ImageOptions, Invert};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint (float or quantized) or an integer model file (.qmm).
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A checkpoint (float or quantized) or an integer model file (.qmm).
    model: PathBuf,
    /// Images (PNG, JPEG: any size and colour, converted like the training data; the conversion
    /// is printed on stderr), folders of images, or .npy arrays (uint8 pixels, or float in [0, 1]).
    /// None: the test set of --data.
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Only the first N samples.
    #[arg(long)]
    limit: Option<usize>,
    /// Write the predictions to this file instead of stdout (`-` is stdout).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Output format.
    #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
    format: String,
    /// Also write the logits (before any softmax) to this file, a float32 `.npy` array of shape
    /// [samples, classes].
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Class names, one per line in label order (default: those stored in the model file).
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Invert images so the background is dark like Fashion-MNIST's: auto (when the border is
    /// light), always, never.
    #[arg(long, default_value = "auto")]
    invert: String,
}

/// Logits of `n` rows of u8 pixels, from either kind of model.
fn logits(model: &mut ModelFile, pixels: &[u8], n: usize) -> Result<(Vec<f32>, usize)> {
    match model {
        ModelFile::Checkpoint(t) => {
            let m = &mut t.model;
            let (f, c) = (m.input_size, m.classes());
            let mut out = Vec::with_capacity(n * c);
            let mut rng = qmomentum::rng::Rng::new(0, 0);
            for start in (0..n).step_by(1024) {
                let b = (n - start).min(1024);
                qmomentum::data::normalise(&pixels[start * f..(start + b) * f], m.input_mut(b));
                out.extend_from_slice(m.forward(b, false, true, &mut rng));
            }
            Ok((out, c))
        }
        ModelFile::Integer(m) => {
            let c = m.layers().last().map(|l| l.outputs()).unwrap_or(0);
            let mut ws = m.workspace(n.clamp(1, 1024));
            let f = m.input().size;
            let mut out = Vec::with_capacity(n * c);
            for start in (0..n).step_by(1024) {
                let b = (n - start).min(1024);
                out.extend_from_slice(m.run(&mut ws, &pixels[start * f..(start + b) * f], b)?);
            }
            Ok((out, c))
        }
    }
}

fn input_size(model: &ModelFile) -> usize {
    match model {
        ModelFile::Checkpoint(t) => t.model.input_size,
        ModelFile::Integer(m) => m.input().size,
    }
}

fn stored_class_names(model: &ModelFile) -> Option<Vec<String>> {
    match model {
        ModelFile::Checkpoint(t) => t.class_names.clone(),
        ModelFile::Integer(m) => m.class_names().map(|v| v.to_vec()),
    }
}

/// Softmax of one row (stable), in place.
fn softmax(row: &mut [f32]) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in row.iter_mut() {
        *v /= s;
    }
}

pub fn evaluate(a: EvalArgs) -> Result<()> {
    let mut model = ModelFile::load(&a.model)?;
    let (dir, test) = a.data.load_test()?;
    let kind = match &mut model {
        ModelFile::Checkpoint(t) => {
            let (loss, acc) = t.evaluate(&test)?;
            outln!(
                "test loss {loss:.4}  accuracy {acc:.4}  ({} samples of {}, float simulation of {})",
                test.len(),
                dir.display(),
                a.model.display()
            )?;
            return Ok(());
        }
        ModelFile::Integer(m) => {
            if test.features != m.input().size {
                bail!(
                    "{}: the model reads {} values per sample, the images in {} have {}",
                    a.model.display(),
                    m.input().size,
                    dir.display(),
                    test.features
                );
            }
            "integer runtime"
        }
    };
    let (lg, c) = logits(&mut model, &test.images, test.len())?;
    if let Some(&max) = test.labels.iter().max() {
        if max as usize >= c {
            bail!("the test labels go up to {max}, the model has {c} outputs");
        }
    }
    let (mut loss, mut correct) = (0.0f64, 0usize);
    let mut row = vec![0.0f32; c];
    for (r, &y) in lg.chunks_exact(c).zip(&test.labels) {
        row.copy_from_slice(r);
        if qmomentum::metrics::argmax(&row) == y as u32 {
            correct += 1;
        }
        softmax(&mut row);
        loss -= (row[y as usize].max(1e-12) as f64).ln();
    }
    let n = test.len().max(1) as f64;
    outln!(
        "test loss {:.4}  accuracy {:.4}  ({} samples of {}, {kind} on {})",
        loss / n,
        correct as f64 / n,
        test.len(),
        dir.display(),
        a.model.display()
    )?;
    Ok(())
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let mut model = ModelFile::load(&a.model)?;
    let f = input_size(&model);
    let invert: Invert = a.invert.parse()?;
    let names = match &a.class_names {
        Some(p) => Some(qmomentum::data::read_class_names(p)?),
        None => stored_class_names(&model),
    };
    // Samples: the user's files, or the test set (with its labels).
    let (pixels, sources, labels): (Vec<u8>, Vec<String>, Option<Vec<u8>>) = if a.inputs.is_empty() {
        let (dir, test) = a.data.load_test()?;
        if test.features != f {
            bail!(
                "{}: the model reads {f} values per sample, the images in {} have {}",
                a.model.display(),
                dir.display(),
                test.features
            );
        }
        let n = a.limit.unwrap_or(test.len()).min(test.len());
        let src = (0..n).map(|i| format!("test[{i}]")).collect();
        (test.images[..n * f].to_vec(), src, Some(test.labels[..n].to_vec()))
    } else {
        let side = (f as f64).sqrt().round() as usize;
        if side * side != f {
            bail!(
                "{}: the model reads {f} values per sample, not a square image: pass a .npy array of that many values",
                a.model.display()
            );
        }
        let opts = ImageOptions {
            height: side,
            width: side,
            invert,
        };
        let inp = load_inputs(&a.inputs, &opts)?;
        for note in &inp.notes {
            eprintln!("{note}");
        }
        if inp.features != f {
            bail!(
                "the inputs have {} values per sample, the model reads {f}",
                inp.features
            );
        }
        let n = a.limit.unwrap_or(inp.len()).min(inp.len());
        (inp.rows[..n * f].to_vec(), inp.names[..n].to_vec(), None)
    };
    if let Some(o) = &a.output {
        let data_files = if a.inputs.is_empty() {
            qmomentum::data::test_files(&a.data.resolve()?)
        } else {
            vec![]
        };
        let mut inputs: Vec<&std::path::Path> = a.inputs.iter().map(|p| p.as_path()).collect();
        inputs.extend(data_files.iter().map(|p| p.as_path()));
        inputs.push(&a.model);
        crate::output::refuse_if_input(o, &inputs)?;
    }
    if let Some(o) = &a.logits {
        let mut inputs: Vec<&std::path::Path> = a.inputs.iter().map(|p| p.as_path()).collect();
        inputs.push(&a.model);
        crate::output::refuse_if_input(o, &inputs)?;
    }
    let n = sources.len();
    let (mut lg, c) = logits(&mut model, &pixels, n)?;
    if let Some(p) = &a.logits {
        write_output(p, &npy_f32(&lg, n, c))?;
    }
    if let Some(names) = &names {
        if names.len() != c {
            warn(format!(
                "{} class names for a model of {c} outputs: names are not shown",
                names.len()
            ));
        }
    }
    let names = names.filter(|v| v.len() == c);
    let class = |k: usize| names.as_ref().map(|v| v[k].clone()).unwrap_or_else(|| k.to_string());
    let mut rows = Vec::with_capacity(n);
    for (i, r) in lg.chunks_exact_mut(c).enumerate() {
        let k = qmomentum::metrics::argmax(r) as usize;
        softmax(r);
        rows.push((i, k, r[k]));
    }
    let mut out = String::new();
    if a.format == "json" {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|&(i, k, p)| {
                let mut o = serde_json::json!({
                    "index": i, "source": sources[i], "predicted": k, "class": class(k),
                    "probability": json_f32(p),
                });
                if let Some(l) = &labels {
                    o["label"] = serde_json::json!(l[i]);
                }
                o
            })
            .collect();
        out = serde_json::to_string_pretty(&v)?;
        out.push('\n');
    } else {
        out.push_str(if labels.is_some() {
            "index,source,label,predicted,class,probability\n"
        } else {
            "index,source,predicted,class,probability\n"
        });
        for &(i, k, p) in &rows {
            let label = labels.as_ref().map(|l| format!("{},", l[i])).unwrap_or_default();
            writeln!(
                out,
                "{i},{},{label}{k},{},{p:.5}",
                csv_field(&sources[i]),
                csv_field(&class(k))
            )?;
        }
    }
    match &a.output {
        Some(p) => write_output(p, out.as_bytes())?,
        None => crate::output::stdout_bytes(out.as_bytes())?,
    }
    Ok(())
}

/// A little-endian float32 `.npy` file (format version 1.0) of shape `[rows, cols]`.
fn npy_f32(v: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64,
    // ending in a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * v.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// An f32 as the JSON number of its shortest decimal form (`0.786`, not `0.7860000133514404`).
pub fn json_f32(x: f32) -> serde_json::Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}
