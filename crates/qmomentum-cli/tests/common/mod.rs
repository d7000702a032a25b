//! Helpers shared by the CLI test files: the binary, small data folders, running commands.
#![allow(dead_code)]

use qmomentum::data::Dataset;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qmomentum")
}

pub fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")
}

pub fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("qm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

/// A small MNIST-layout folder: the first `n_train` / `n_test` images of the shipped set.
pub fn small_data(n_train: usize, n_test: usize) -> PathBuf {
    // Made once per process: the tests run in parallel and share these folders.
    static FULL: OnceLock<(Dataset, Dataset)> = OnceLock::new();
    static MADE: std::sync::Mutex<Vec<(usize, usize, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap();
    if let Some((_, _, p)) = made.iter().find(|(a, b, _)| (*a, *b) == (n_train, n_test)) {
        return p.clone();
    }
    let (tr, te) = FULL.get_or_init(|| Dataset::load_mnist_dir(&shipped()).unwrap());
    let d = tmp(&format!("data-{n_train}-{n_test}"));
    let (nt, ns) = (n_train as u32, n_test as u32);
    write_idx(
        &d.join("train-images-idx3-ubyte"),
        &[nt, 28, 28],
        &tr.images[..n_train * 784],
    );
    write_idx(&d.join("train-labels-idx1-ubyte"), &[nt], &tr.labels[..n_train]);
    write_idx(
        &d.join("t10k-images-idx3-ubyte"),
        &[ns, 28, 28],
        &te.images[..n_test * 784],
    );
    write_idx(&d.join("t10k-labels-idx1-ubyte"), &[ns], &te.labels[..n_test]);
    made.push((n_train, n_test, d.clone()));
    d
}

/// `qmomentum train --data DATA --out OUT --quiet EXTRA…`
pub fn train(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", s(data), "--out", s(out), "--quiet"];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn weights(ckpt: &Path) -> Vec<Vec<f32>> {
    let t = qmomentum::checkpoint::load(ckpt).unwrap();
    t.model.params().iter().map(|p| p.value.clone()).collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
