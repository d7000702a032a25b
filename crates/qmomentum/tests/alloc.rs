//! The training step allocates nothing of its own once warmed up. What allocates in it is the
//! `gemm` crate, which takes a packing buffer per call (`dyn_stack::MemBuffer::new` in
//! gemm-common); so the test counts the allocations of each of 40 steps (both cores, the batch
//! split over two replicas on the runtime's worker pool) and compares them with those of the
//! same GEMM calls made on their own.
//!
//! gemm also makes a thread-local slab on a thread's first product. Which thread runs which half
//! depends on the scheduler (on a loaded machine the caller may run both halves for a while), so
//! a slab can appear in any step, the reference's included: the reference is the least count of
//! several rounds, and as many steps as there are pool threads (one slab each, a few allocations)
//! may count more. An allocation of our own in the step would show in every step.

use qmomentum::config::TrainConfig;
use qmomentum::data::Dataset;
use qmomentum::optim::OptimizerConfig;
use qmomentum::quant::Scheme;
use qmomentum::train::Trainer;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static ON: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn counted(f: impl FnOnce()) -> usize {
    COUNT.store(0, Ordering::SeqCst);
    ON.store(true, Ordering::SeqCst);
    f();
    ON.store(false, Ordering::SeqCst);
    COUNT.load(Ordering::SeqCst)
}

/// Allocations of the GEMM calls of one step of the 784-128-64-10 MLP at batch 128 split in two
/// halves of 64: per half, 3 forward products, 3 weight gradients, 2 input gradients.
fn gemm_allocations_per_step() -> usize {
    use qmomentum::gemm::{matmul, Op};
    type Call = Box<dyn FnMut() + Send>;
    let half = || -> Vec<Call> {
        let (b, dims) = (64usize, [784usize, 128, 64, 10]);
        let buf = |n: usize| vec![0.5f32; n];
        let mut calls: Vec<Call> = Vec::new();
        for l in 0..3 {
            let (i, o) = (dims[l], dims[l + 1]);
            let (x, w, mut y) = (buf(b * i), buf(i * o), buf(b * o));
            calls.push(Box::new(move || matmul(b, o, i, &x, Op::N, &w, Op::N, &mut y, false)));
            let (x, dy, mut dw) = (buf(b * i), buf(b * o), buf(i * o));
            calls.push(Box::new(move || matmul(i, o, b, &x, Op::T, &dy, Op::N, &mut dw, false)));
            if l > 0 {
                let (dy, w, mut dx) = (buf(b * o), buf(i * o), buf(b * i));
                calls.push(Box::new(move || matmul(b, i, o, &dy, Op::N, &w, Op::T, &mut dx, false)));
            }
        }
        calls
    };
    let (mut a, mut b) = (half(), half());
    let run = |v: &mut Vec<Call>| v.iter_mut().for_each(|c| c());
    // The two halves of a step run on the caller and the pool's worker, as in training (the
    // first calls on a thread also create gemm's thread-local slab: warm both up first).
    for _ in 0..3 {
        qmomentum_runtime::pool::join(|| run(&mut a), || run(&mut b));
    }
    (0..10)
        .map(|_| {
            counted(|| {
                qmomentum_runtime::pool::join(|| run(&mut a), || run(&mut b));
            })
        })
        .min()
        .unwrap_or(0)
}

/// The most allocations a thread's first gemm product was seen to add (7, on a loaded machine).
const SLAB_ALLOCATIONS: usize = 8;

#[test]
fn training_steps_allocate_nothing_of_their_own() {
    let per_step = gemm_allocations_per_step();
    eprintln!("the gemm crate: {per_step} allocations per step");
    let (train, _) =
        Dataset::load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")).unwrap();
    for scheme in [Scheme::Fp32, Scheme::W8a8, Scheme::W4a4, Scheme::Binary] {
        let cfg = TrainConfig {
            quant: scheme,
            optimizer: OptimizerConfig {
                lr: 0.01,
                clip_norm: Some(5.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut t = Trainer::new(cfg).unwrap();
        for _ in 0..5 {
            t.step(&train, None).unwrap();
        }
        let steps: Vec<usize> = (0..40)
            .map(|_| {
                counted(|| {
                    t.step(&train, None).unwrap();
                })
            })
            .collect();
        eprintln!("{scheme}: allocations per step {steps:?}");
        // One gemm slab per thread that can run a share: the pool's workers and the caller.
        let threads = qmomentum_runtime::pool::threads().max(2);
        let fewer = steps.iter().filter(|&&n| n < per_step).count();
        let more = steps.iter().filter(|&&n| n > per_step).count();
        let extra: usize = steps.iter().map(|&n| n.saturating_sub(per_step)).sum();
        assert!(
            fewer == 0 && more <= threads && extra <= SLAB_ALLOCATIONS * threads,
            "{scheme}: allocations per step {steps:?}, its GEMMs {per_step} \
             ({more} steps allocated more, {extra} allocations in all; {fewer} steps fewer)"
        );
    }
}
