//! Running a model: per-thread workspaces, row blocking, batch splitting over threads.
//!
//! A batch is processed in blocks of [`BLOCK_ROWS`] rows; each block goes through all layers
//! before the next starts, so a block's activations (u8 rows or bit rows, plus one i32
//! accumulator tile) stay in L1/L2 while the packed weights are shared by all blocks.
//!
//! Between the u8 input and the final logits every value is an integer: each layer is a dense
//! kernel (u8/i8 or u64 bits in, i32 out) followed by an integer epilogue (i32 → u8 or bits);
//! only the last layer's epilogue, [`crate::kernels::dequantize`], converts i32 to f32. The
//! layers themselves are compiled ops (`crate::ops`); this module only owns the buffers, the
//! batch loop and the threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::aligned::Aligned;
use crate::error::Error;
use crate::kernels::KernelKind;
use crate::model::Model;
use crate::ops::{In, Out, Produces, Scratch, ScratchSize};

pub use crate::ops::ACC_ROWS;

/// Most rows pushed through all layers at a time.
pub const BLOCK_ROWS: usize = 64;

/// Bytes of activations per block that the block size aims for: models whose layers output
/// more than `BLOCK_BYTES / BLOCK_ROWS` bytes per sample (image models) run in smaller blocks,
/// down to one sample, so that a block's activations stay in L2.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Most rows per [`Model::run`] call inside [`Model::predict`] / [`Model::logits`]; smaller
/// batches are cut in pieces of down to [`BLOCK_ROWS`] rows so that every thread gets several.
pub const CHUNK_ROWS: usize = 256;

/// One layer's output activations for a block of rows.
#[derive(Debug)]
enum Act {
    /// `[rows, stride]` u8.
    U8 { buf: Aligned<u8>, stride: usize },
    /// `[rows, words]` u64 bit rows.
    Bits { buf: Aligned<u64>, words: usize },
}

impl Act {
    fn input(&self) -> In<'_> {
        match self {
            Act::U8 { buf, stride } => In::U8 {
                x: buf,
                stride: *stride,
            },
            Act::Bits { buf, words } => In::Bits { x: buf, words: *words },
        }
    }

    fn output(&mut self) -> Out<'_> {
        match self {
            Act::U8 { buf, stride } => Out::U8 {
                y: buf,
                stride: *stride,
            },
            Act::Bits { buf, words } => Out::Bits { y: buf, words: *words },
        }
    }
}

/// Scratch memory for running one model on up to `max_batch` rows per call, on one thread.
///
/// Create it once with [`Model::workspace`] and reuse it: [`Model::run`] then allocates
/// nothing.
#[derive(Debug)]
pub struct Workspace {
    model_id: u64,
    max_batch: usize,
    block: usize,
    /// The i32 accumulator tile, as large as the largest layer asks for.
    acc: Aligned<i32>,
    /// u8 patches of a convolution (im2col), as large as the largest layer asks for.
    col: Aligned<u8>,
    /// u32 sums of an average pooling.
    sums: Aligned<u32>,
    /// u64 bit patches of a binary convolution.
    bits: Aligned<u64>,
    /// Outputs of every layer but the last.
    acts: Vec<Act>,
    /// `[max_batch, classes]`.
    logits: Vec<f32>,
    /// The input block packed to bits, for a model with a binarized input.
    input_bits: Aligned<u64>,
}

impl Workspace {
    /// The largest batch [`Model::run`] accepts with this workspace.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

impl Model {
    /// Scratch memory for batches of up to `max_batch` rows.
    pub fn workspace(&self, max_batch: usize) -> Workspace {
        let n = self.compiled.len();
        let hidden = &self.compiled[..n.saturating_sub(1)];
        // Bytes of activations per sample (rows padded as below).
        let row_bytes: usize = hidden
            .iter()
            .map(|l| match l.produces() {
                Produces::Bits { bits } => 8 * bits.div_ceil(64),
                Produces::U8 { stride, .. } => stride,
                Produces::Logits { classes } => classes.next_multiple_of(64),
            })
            .sum();
        let block = max_batch
            .clamp(1, BLOCK_ROWS)
            .min((BLOCK_BYTES / row_bytes.max(1)).max(1));
        let scratch = self
            .compiled
            .iter()
            .map(|l| l.scratch(block))
            .fold(ScratchSize::default(), ScratchSize::max);
        let acts = hidden
            .iter()
            .map(|l| match l.produces() {
                Produces::Bits { bits } => {
                    let words = bits.div_ceil(64);
                    Act::Bits {
                        buf: Aligned::zeroed(block * words),
                        words,
                    }
                }
                Produces::U8 { stride, .. } => Act::U8 {
                    buf: Aligned::zeroed(block * stride),
                    stride,
                },
                // Logits only occur on the last layer (validation), so this is never used.
                Produces::Logits { classes } => {
                    let stride = classes.next_multiple_of(64);
                    Act::U8 {
                        buf: Aligned::zeroed(block * stride),
                        stride,
                    }
                }
            })
            .collect();
        Workspace {
            model_id: self.id,
            max_batch,
            block,
            acc: Aligned::zeroed(scratch.acc),
            col: Aligned::zeroed(scratch.col),
            sums: Aligned::zeroed(scratch.sums),
            bits: Aligned::zeroed(scratch.bits),
            acts,
            logits: vec![0.0; max_batch * self.num_classes()],
            input_bits: Aligned::zeroed(if self.input.binarize_at.is_some() {
                block * self.input.size.div_ceil(64)
            } else {
                0
            }),
        }
    }

    /// Runs `batch` samples (`input` is `[batch, input.size]` u8) and returns the logits,
    /// `[batch, classes]`, borrowed from the workspace. Allocation-free.
    ///
    /// Uses the best kernel tier of this CPU ([`Model::kernel`]).
    pub fn run<'w>(&self, ws: &'w mut Workspace, input: &[u8], batch: usize) -> Result<&'w [f32], Error> {
        self.run_with(self.kernel, ws, input, batch)
    }

    /// [`Model::run`] with a chosen kernel tier; fails if this CPU lacks it.
    /// All tiers give bit-identical logits.
    pub fn run_with<'w>(
        &self,
        kernel: KernelKind,
        ws: &'w mut Workspace,
        input: &[u8],
        batch: usize,
    ) -> Result<&'w [f32], Error> {
        if ws.model_id != self.id {
            return Err(Error::WorkspaceMismatch);
        }
        if batch > ws.max_batch {
            return Err(Error::BatchTooLarge {
                batch,
                max_batch: ws.max_batch,
            });
        }
        let size = self.input.size;
        self.check_input(input, batch)?;
        if !kernel.is_available() {
            return Err(Error::KernelUnavailable(kernel));
        }
        let classes = self.num_classes();
        let Workspace {
            block,
            acc,
            col,
            sums,
            bits,
            acts,
            logits,
            input_bits,
            ..
        } = ws;
        let mut scratch = Scratch { acc, col, sums, bits };
        let in_words = size.div_ceil(64);
        let mut start = 0;
        while start < batch {
            let rows = (*block).min(batch - start);
            let x = &input[start * size..(start + rows) * size];
            if let Some(t) = self.input.binarize_at {
                pack_bits(kernel, x, size, t, &mut input_bits[..rows * in_words]);
            }
            for (l, layer) in self.compiled.iter().enumerate() {
                let (done, rest) = acts.split_at_mut(l);
                let x = match l.checked_sub(1) {
                    Some(p) => done[p].input(),
                    None if self.input.binarize_at.is_some() => In::Bits {
                        x: input_bits,
                        words: in_words,
                    },
                    None => In::U8 { x, stride: size },
                };
                let y = match rest.first_mut() {
                    Some(act) => act.output(),
                    None => Out::Logits {
                        y: &mut logits[start * classes..(start + rows) * classes],
                        stride: classes,
                    },
                };
                layer.run(kernel, x, rows, y, &mut scratch)?;
            }
            start += rows;
        }
        Ok(&ws.logits[..batch * classes])
    }

    /// Predicted class (argmax of the logits; the lowest index wins ties) for each sample,
    /// splitting the batch over `threads` threads (0 = one per available core; never more than
    /// the cores, nor than one per 64 rows).
    ///
    /// With more than one thread the calling thread works alongside the workers of a
    /// process-wide pool, started at the first such call; they spin for 200 µs after each batch
    /// and then sleep (see `doc/runtime.md`). The result does not depend on `threads`.
    pub fn predict(&self, input: &[u8], batch: usize, threads: usize) -> Result<Vec<u32>, Error> {
        let mut out = vec![0u32; batch];
        self.par_rows(input, batch, threads, 1, &mut out, |logits, out| {
            for (o, row) in out.iter_mut().zip(logits.chunks_exact(self.num_classes())) {
                *o = argmax(row);
            }
        })?;
        Ok(out)
    }

    /// The logits, `[batch, classes]`, splitting the batch over `threads` threads as
    /// [`Model::predict`] does.
    pub fn logits(&self, input: &[u8], batch: usize, threads: usize) -> Result<Vec<f32>, Error> {
        let classes = self.num_classes();
        let mut out = vec![0f32; batch * classes];
        self.par_rows(input, batch, threads, classes, &mut out, |logits, out| {
            out.copy_from_slice(logits)
        })?;
        Ok(out)
    }

    /// Maps real inputs to the model's u8 inputs: `q = clamp(round(x / scale) + zero_point,
    /// 0, 255)`, where `round` is `f32::round_ties_even` (half to even, like numpy and
    /// PyTorch). NaN maps to `zero_point`. `x` and `out` must have the same length.
    pub fn quantize_input(&self, x: &[f32], out: &mut [u8]) -> Result<(), Error> {
        if x.len() != out.len() {
            return Err(Error::OutputLength {
                got: out.len(),
                expected: x.len(),
            });
        }
        let scale = self.input.scale;
        let zp = f32::from(self.input.zero_point);
        for (q, &v) in out.iter_mut().zip(x) {
            let r = (v / scale).round_ties_even() + zp;
            // `as u8` saturates, but clamp first to make the rule explicit; NaN → zero point.
            *q = if r.is_nan() {
                self.input.zero_point
            } else {
                r.clamp(0.0, 255.0) as u8
            };
        }
        Ok(())
    }

    fn check_input(&self, input: &[u8], batch: usize) -> Result<(), Error> {
        let size = self.input.size;
        let expected = batch.checked_mul(size);
        if expected != Some(input.len()) {
            return Err(Error::InputLength {
                got: input.len(),
                expected: expected.unwrap_or(usize::MAX),
                batch,
                size,
            });
        }
        Ok(())
    }

    /// Runs the batch in pieces of [`BLOCK_ROWS`] to [`CHUNK_ROWS`] rows on up to `threads`
    /// threads (one workspace each) and hands each piece's logits to `f` with the matching
    /// `per_row`-wide slice of `out`.
    ///
    /// The threads are the caller and the workers of a persistent pool ([`crate::pool`]), and
    /// the pieces are handed out one at a time from a shared counter rather than as one
    /// contiguous range per thread, so a worker that joins late costs nothing but its own
    /// share. Which thread runs a piece does not change its result.
    fn par_rows<T: Send>(
        &self,
        input: &[u8],
        batch: usize,
        threads: usize,
        per_row: usize,
        out: &mut [T],
        f: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> Result<(), Error> {
        self.check_input(input, batch)?;
        if batch == 0 {
            return Ok(());
        }
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let threads = threads.min(batch.div_ceil(BLOCK_ROWS)).max(1);
        let threads = if threads > 1 {
            threads.min(crate::pool::threads())
        } else {
            1
        };
        let size = self.input.size;
        if threads == 1 {
            let mut ws = self.workspace(batch.min(CHUNK_ROWS));
            for (xc, oc) in input
                .chunks(CHUNK_ROWS * size)
                .zip(out.chunks_mut(CHUNK_ROWS * per_row))
            {
                f(self.run(&mut ws, xc, xc.len() / size)?, oc);
            }
            return Ok(());
        }
        // About 4 pieces per thread, so a late start is absorbed (measured on the binary MLP,
        // 2 threads: 64-row pieces took batch 256 from 17 to 25 M samples/s, while at batch
        // 10 000 256-row pieces were 6 % faster than 64-row ones, in one probe).
        let chunk = (batch / (4 * threads) / BLOCK_ROWS * BLOCK_ROWS).clamp(BLOCK_ROWS, CHUNK_ROWS);
        // Each piece is taken by exactly one thread (the counter hands out every index once),
        // so its lock is never contended; it only proves the exclusive borrow to the compiler.
        let tasks: Vec<Mutex<(&[u8], &mut [T])>> = input
            .chunks(chunk * size)
            .zip(out.chunks_mut(chunk * per_row))
            .map(Mutex::new)
            .collect();
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let job = || {
            let mut ws = self.workspace(chunk.min(batch));
            while let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) {
                let result = match task.lock() {
                    Ok(mut guard) => {
                        let (xc, oc) = &mut *guard;
                        self.run(&mut ws, xc, xc.len() / size).map(|logits| f(logits, oc))
                    }
                    Err(_) => Err(Error::WorkerPanicked),
                };
                if let Err(e) = result {
                    // Stop handing out pieces; keep the first error.
                    next.store(tasks.len(), Ordering::Relaxed);
                    let mut slot = failed.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e);
                }
            }
        };
        if !crate::pool::run(threads, &job) {
            return Err(Error::WorkerPanicked);
        }
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Index of the largest value; the first one wins ties (and NaN never wins). The one argmax of
/// the project: the trainer's metrics use it too, so float and integer predictions break ties
/// alike.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (j, &v) in row.iter().enumerate() {
        if v > best.1 || j == 0 {
            best = (j, v);
        }
    }
    best.0 as u32
}

/// Bit `k` of a row = `x[k] ≥ threshold`; rows of `size` u8 into rows of `ceil(size/64)` words,
/// padding bits 0 (as the weights' padding, so they never count in `in − 2·popcount(x ^ w)`).
///
/// Takes whole rows: `x.len() / size` of them, or as many as `out` has room for.
fn pack_bits(kernel: KernelKind, x: &[u8], size: usize, threshold: u8, out: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, KernelKind::Avx512Vnni | KernelKind::Amx) && kernel.is_available() {
        // SAFETY: `kernel.is_available()` was just checked (cached by `std`, so cheap; `run_with`
        // has checked it too): the CPU has AVX-512 F/BW/VL/VNNI, which covers the F/BW that
        // `pack_bits_avx512` is compiled for. It has no other precondition.
        unsafe { pack_bits_avx512(x, size, threshold, out) };
        return;
    }
    let _ = kernel;
    pack_bits_scalar(x, size, threshold, out);
}

/// The scalar (and AVX2) tier of [`pack_bits`]. Never inlined, so that it is a symbol of its
/// own for `scripts/check-integer-kernels.sh` (one call per block of rows: no measurable cost).
#[inline(never)]
fn pack_bits_scalar(x: &[u8], size: usize, threshold: u8, out: &mut [u64]) {
    let words = size.div_ceil(64);
    for (row, o) in x.chunks_exact(size).zip(out.chunks_exact_mut(words)) {
        for (chunk, w) in row.chunks(64).zip(o.iter_mut()) {
            let mut bits = 0u64;
            for (b, &v) in chunk.iter().enumerate() {
                bits |= ((v >= threshold) as u64) << b;
            }
            *w = bits;
        }
    }
}

/// One `vpcmpub` per 64 pixels: the compare mask is the bit word. Whole words use plain loads;
/// the tail of a row is loaded with a mask and compared under it, so padding bits stay 0
/// whatever the threshold.
///
/// # Safety
/// The CPU must support AVX-512 F/BW. (That is all: rows are taken with `chunks_exact`, so
/// every pointer below stays inside a row of `size` bytes whatever the slice lengths.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_bits_avx512(x: &[u8], size: usize, threshold: u8, out: &mut [u64]) {
    use std::arch::x86_64::*;
    let words = size.div_ceil(64);
    let full = size / 64;
    let tail = size % 64;
    let tail_lanes: u64 = (1u64 << tail).wrapping_sub(1);
    let t = _mm512_set1_epi8(threshold as i8);
    for (row, o) in x.chunks_exact(size).zip(out.chunks_exact_mut(words)) {
        let p = row.as_ptr();
        for (w, word) in o[..full].iter_mut().enumerate() {
            // SAFETY: `row` has exactly `size` bytes (`chunks_exact`) and `w < full = size/64`,
            // so bytes `64w..64w + 64` lie inside it; `loadu` has no alignment requirement.
            let v = unsafe { _mm512_loadu_si512(p.add(w * 64).cast()) };
            *word = _mm512_cmpge_epu8_mask(v, t);
        }
        if tail > 0 {
            // SAFETY: `64·full < size`, so `p + 64·full` is inside `row`; the masked load reads
            // only its low `tail = size − 64·full` bytes, which exist, and AVX-512 masked loads
            // neither access nor fault on masked-off bytes.
            let v = unsafe { _mm512_maskz_loadu_epi8(tail_lanes, p.add(full * 64).cast()) };
            o[full] = _mm512_mask_cmpge_epu8_mask(tail_lanes, v, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_bit_packing_equals_scalar_for_every_threshold_and_odd_sizes() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for size in [1usize, 7, 63, 64, 65, 127, 784] {
            let x: Vec<u8> = (0..3 * size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            for t in [0u8, 1, 127, 128, 255] {
                let words = size.div_ceil(64);
                let mut a = vec![0u64; 3 * words];
                let mut b = vec![0u64; 3 * words];
                pack_bits_scalar(&x, size, t, &mut a);
                for k in KernelKind::ALL.into_iter().filter(|k| k.is_available()) {
                    pack_bits(k, &x, size, t, &mut b);
                    assert_eq!(a, b, "size {size} threshold {t} kernel {k:?}");
                }
            }
        }
    }
}
