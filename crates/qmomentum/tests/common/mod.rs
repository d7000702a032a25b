//! Shared by the agreement tests: the integer runtime against the training simulation.
#![allow(dead_code)]

use qmomentum::data::Dataset;
use qmomentum::export::to_runtime;
use qmomentum::metrics::argmax_rows;
use qmomentum_runtime::KernelKind;

/// The runtime (every available kernel tier, after a round trip through the file format, in
/// batches of 1000, and `predict` on 2 threads) against the simulation on `test`: ≥ 99.9 % of
/// identical predictions and accuracies within 0.1 point.
pub fn agreement(model: &mut qmomentum::model::Sequential, test: &Dataset, label: &str) {
    let n = test.len();
    let mut x = vec![0.0f32; test.images.len()];
    qmomentum::data::normalise(&test.images, &mut x);
    let probs = model.predict(&x, n);
    let mut sim = Vec::new();
    argmax_rows(&probs, 10, &mut sim);
    let rt = to_runtime(model).unwrap();
    let rt = qmomentum_runtime::Model::from_bytes(&rt.to_bytes().unwrap()).unwrap();
    let mut per_kernel = Vec::new();
    for k in KernelKind::ALL.into_iter().filter(|k| k.is_available()) {
        let mut ws = rt.workspace(1000);
        let mut p = Vec::new();
        for start in (0..n).step_by(1000) {
            let b = (n - start).min(1000);
            let logits = rt
                .run_with(k, &mut ws, &test.images[start * 784..(start + b) * 784], b)
                .unwrap();
            let mut q = Vec::new();
            argmax_rows(logits, 10, &mut q);
            p.extend(q);
        }
        per_kernel.push(p);
    }
    for p in &per_kernel[1..] {
        assert_eq!(p, &per_kernel[0], "{label}: kernels disagree");
    }
    let got = rt.predict(&test.images, n, 2).unwrap();
    assert_eq!(got, per_kernel[0]);
    let same = got.iter().zip(&sim).filter(|(a, b)| a == b).count();
    let acc = |p: &[u32]| p.iter().zip(&test.labels).filter(|(a, &l)| **a == l as u32).count() as f64 / n as f64;
    let (a_rt, a_sim) = (acc(&got), acc(&sim));
    eprintln!("{label}: agreement {same}/{n}, accuracy runtime {a_rt:.4} simulation {a_sim:.4}");
    assert!(
        same as f64 >= 0.999 * n as f64,
        "{label}: only {same}/{n} predictions agree"
    );
    assert!(
        (a_rt - a_sim).abs() <= 0.001 + 1e-9,
        "{label}: accuracy {a_rt} vs {a_sim}"
    );
}
