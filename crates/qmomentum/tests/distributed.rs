//! The trainer's data-parallel path, with in-process "ranks" (`distributed::ThreadGroup`, sums
//! in rank order) instead of MPI: what is reduced, and that it is all that must be. The MPI runs
//! themselves are tested in `qmomentum-cli/tests/mpi.rs` (feature `mpi`).
//!
//! The reference is the single-process trainer: two ranks of one thread compute the very rows
//! and sums that one process of two threads does (`distributed::shard`), so their weights,
//! optimizer state, batch-norm running statistics, observers and oscillation state must be
//! bit-identical; three ranks add the shares in another order, so they agree to rounding.

use qmomentum::config::TrainConfig;
use qmomentum::data::Dataset;
use qmomentum::distributed::{Collective, ThreadGroup};
use qmomentum::train::Trainer;
use std::path::Path;
use std::sync::{Arc, OnceLock};

fn data() -> &'static (Dataset, Dataset) {
    static D: OnceLock<(Dataset, Dataset)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist");
        let (train, test) = Dataset::load_mnist_dir(&dir).expect("the shipped Fashion-MNIST");
        let cut = |d: &Dataset, n: usize| Dataset {
            images: d.images[..n * d.features].to_vec(),
            labels: d.labels[..n].to_vec(),
            features: d.features,
            classes: d.classes,
            shape: d.shape.clone(),
        };
        // 3,000 samples in batches of 120: 25 steps an epoch.
        (cut(&train, 3000), cut(&test, 1000))
    })
}

fn config(toml_text: &str) -> TrainConfig {
    let c: TrainConfig = toml::from_str(toml_text).expect("test config");
    c.validate().expect("valid test config");
    c
}

/// An MLP with batch norm and dropout (both must agree across ranks), float.
const BN_DROPOUT: &str = r#"
epochs = 2
batch_size = 120
threads = 2
[optimizer]
lr = 0.01
momentum = 0.9
clip_norm = 5.0
[model]
input = 784
layers = [
  { type = "dense", units = 64 },
  { type = "batch_norm", momentum = 0.9 },
  { type = "activation", activation = "relu" },
  { type = "dropout", rate = 0.2 },
  { type = "dense", units = 10, activation = "softmax" },
]
"#;

/// The design document's MLP with W8A8 fake quantization, oscillation dampening (added on rank
/// 0 only) and tracking.
const W8A8_DAMPENED: &str = r#"
epochs = 2
batch_size = 120
threads = 2
quant = "w8a8"
[optimizer]
lr = 0.01
momentum = 0.9
[oscillation]
dampening = 0.01
"#;

/// Binary hidden layers trained by Bop.
const BINARY_BOP: &str = r#"
epochs = 2
batch_size = 120
threads = 2
quant = "binary"
[optimizer]
lr = 0.01
momentum = 0.9
"#;

/// Everything a run's future depends on, as bits: parameters, optimizer state, buffers
/// (running statistics, oscillation state, frozen codes), observers.
fn state(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut out: Vec<(String, Vec<u32>)> = t
        .model
        .params_iter()
        .map(|p| (p.name.clone(), bits(&p.value)))
        .collect();
    out.extend(t.model.buffers_iter().map(|b| (b.name.clone(), bits(&b.value))));
    out.extend(t.model.tracker_states().map(|b| (b.name.clone(), bits(&b.value))));
    for (i, s) in t.optimizer.state.iter().enumerate() {
        out.push((
            format!("optimizer state {i}"),
            format!("{s:?}").bytes().map(u32::from).collect(),
        ));
    }
    for (i, l) in t.model.layers.iter().enumerate() {
        if let Some(a) = l.act_quant() {
            out.push((
                format!("observer {i}"),
                format!("{:?}", a.observer).bytes().map(u32::from).collect(),
            ));
        }
    }
    out
}

fn single(cfg: &TrainConfig) -> Trainer {
    let (train, test) = data();
    let mut t = Trainer::new(cfg.clone()).unwrap();
    t.fit(train, Some(test), |_, _| {}).unwrap();
    t
}

/// `ranks` trainers of one thread each, joined by a `ThreadGroup`, trained to the end.
fn ranks(cfg: &TrainConfig, n: usize) -> Vec<Trainer> {
    let (train, test) = data();
    let mut cfg = cfg.clone();
    cfg.threads = 1;
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|g| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let mut t = Trainer::new(cfg).unwrap();
                    t.set_collective(Arc::new(g), None).unwrap();
                    t.fit(train, Some(test), |_, _| {}).unwrap();
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_identical(a: &Trainer, b: &Trainer, what: &str) {
    for ((na, va), (nb, vb)) in state(a).iter().zip(state(b).iter()) {
        assert_eq!(na, nb);
        assert!(va == vb, "{what}: {na} differs");
    }
    assert_eq!(a.history.epochs.len(), b.history.epochs.len());
    for (x, y) in a.history.epochs.iter().zip(&b.history.epochs) {
        assert_eq!((x.loss, x.accuracy), (y.loss, y.accuracy), "{what}: epoch {}", x.epoch);
        // Validation is shared among the ranks and summed: equal to rounding of the sum.
        assert!((x.val_loss.unwrap() - y.val_loss.unwrap()).abs() < 1e-5, "{what}");
        assert_eq!(x.val_accuracy, y.val_accuracy, "{what}");
    }
}

#[test]
fn two_ranks_of_one_thread_are_bit_identical_to_one_process_of_two_threads() {
    // (name, config, training accuracy its second epoch reaches on these 3,000 samples)
    for (name, text, reaches) in [
        ("bn+dropout", BN_DROPOUT, 0.6),
        ("w8a8+dampening", W8A8_DAMPENED, 0.6),
        ("binary bop", BINARY_BOP, 0.3),
    ] {
        let cfg = config(text);
        let reference = single(&cfg);
        let rs = ranks(&cfg, 2);
        for (r, t) in rs.iter().enumerate() {
            assert_identical(t, &reference, &format!("{name}, rank {r}"));
            assert_eq!(t.world_size, 2);
        }
        let acc = reference.history.epochs[1].accuracy;
        assert!(acc > reaches, "{name} learns: accuracy {acc}");
    }
}

#[test]
fn three_ranks_agree_with_each_other_exactly_and_with_one_process_to_rounding() {
    let cfg = config(BN_DROPOUT);
    let rs = ranks(&cfg, 3);
    // Every rank holds the same model (the same reduced gradient and statistics each step).
    assert_identical(&rs[1], &rs[0], "rank 1 vs rank 0");
    assert_identical(&rs[2], &rs[0], "rank 2 vs rank 0");
    // Against one process: the same update up to summation order. (Batch norm normalises each
    // share by its own statistics, as it does per thread in one process, and dropout draws
    // per share: so the comparison uses the model without them.)
    let plain = config(
        &BN_DROPOUT
            .replace("  { type = \"batch_norm\", momentum = 0.9 },\n", "")
            .replace("  { type = \"dropout\", rate = 0.2 },\n", ""),
    );
    let reference = single(&plain);
    let rs = ranks(&plain, 3);
    for (p, q) in rs[0].model.params_iter().zip(reference.model.params_iter()) {
        let scale = q.value.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = p
            .value
            .iter()
            .zip(&q.value)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{}: max |Δ| {diff} against max |w| {scale}",
            p.name
        );
    }
}

#[test]
fn a_batch_that_does_not_divide_among_the_ranks_is_refused_before_training() {
    let mut cfg = config(BN_DROPOUT);
    cfg.batch_size = 128;
    let g = ThreadGroup::new(3).remove(0);
    let mut t = Trainer::new(cfg).unwrap();
    let e = t
        .set_collective(Arc::new(g) as Arc<dyn Collective>, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_size = 128") && e.contains("3 ranks"), "{e}");
}

#[test]
fn an_epoch_whose_last_batch_has_fewer_rows_than_ranks_is_refused() {
    let (train, _) = data();
    let mut cfg = config(BN_DROPOUT);
    // 2 × 1,497 + 2 samples: a last batch of 2 rows for 3 ranks.
    cfg.batch_size = 1497;
    let short = Dataset {
        images: train.images[..(2 * 1497 + 2) * 784].to_vec(),
        labels: train.labels[..2 * 1497 + 2].to_vec(),
        ..train.clone()
    };
    // One "rank" of a group of 3 refuses at its first step, before any collective call.
    let g = ThreadGroup::new(3).remove(0);
    let mut t = Trainer::new(cfg).unwrap();
    t.set_collective(Arc::new(g), None).unwrap();
    let e = t.step(&short, None).unwrap_err().to_string();
    assert!(e.contains("last batch would hold 2") && e.contains("3 ranks"), "{e}");
}
