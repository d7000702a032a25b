//! Data-parallel training: the collective operations a [`Trainer`](crate::train::Trainer) needs
//! to train one model on several processes, and how a global batch is shared among them.
//!
//! The trainer only sees the [`Collective`] trait, so the single-process library carries no MPI
//! dependency; the MPI implementation ([`mpi::MpiCollective`], cargo feature `mpi`) is the one
//! the `qmomentum` command uses under `mpirun`. What is reduced at every step, and why each
//! rank then takes the very same optimizer step, is written down in `doc/distributed.md`:
//!
//! - the gradients of every parameter, in **one** contiguous `f32` buffer (one allreduce, not
//!   one per tensor), each rank's share already scaled by `1/global batch`;
//! - the loss and accuracy sums, the activation statistics that feed the observers (Σ|a| and
//!   counts summed, min/max reduced with `max` of `−min` and `max`) and every batch norm's
//!   running-statistics sums (small `f64`/`f32` buffers, two more calls);
//! - the stop request (Ctrl-C / SIGTERM on any rank stops every rank after the same step).
//!
//! The NaN/inf decision needs no call of its own: a non-finite value on any rank makes the
//! reduced gradient or loss non-finite on every rank. Bop's flips, the oscillation trackers and
//! iterative freezing are computed from the reduced gradient and the replicated weights, so they
//! agree too.
//!
//! ```
//! use qmomentum::distributed::shard;
//! // A global batch of 129 on 3 ranks: 43 rows each.
//! assert_eq!((0..3).map(|r| shard(129, r, 3)).collect::<Vec<_>>(), vec![0..43, 43..86, 86..129]);
//! // An epoch's last, partial batch of 127 rows: the first ranks take the extra rows, as the
//! // single-process two-thread split gives its first half the odd row.
//! assert_eq!((0..3).map(|r| shard(127, r, 3)).collect::<Vec<_>>(), vec![0..43, 43..85, 85..127]);
//! ```

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::Result;
use std::ops::Range;

/// The collective operations of a group of processes that train one model together. Every
/// method is collective: all ranks call it, in the same order, with buffers of the same length.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place (the gradient allreduce).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the ranks, in place.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise maximum over the ranks, in place.
    fn max_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Seconds spent in the calls above since the last call of this method (the communication
    /// time of an epoch).
    fn take_seconds(&self) -> f64;
}

/// The rows `[⌈r·b/n⌉, ⌈(r+1)·b/n⌉)` of a batch of `b` rows that rank `r` of `n` computes: every
/// rank gets `b/n` rows (± 1 for an epoch's last, partial batch; an empty range when the batch
/// has fewer rows than there are ranks). With `n = 2` this is exactly the single-process
/// two-thread split, so two ranks of one thread compute what one process of two threads does.
pub fn shard(b: usize, r: usize, n: usize) -> Range<usize> {
    let at = |k: usize| (k * b).div_ceil(n.max(1));
    at(r)..at(r + 1)
}

/// A 64-bit digest of `bytes` (the first 8 bytes of their SHA-256), to check that the ranks
/// were started with the same configuration and data.
pub fn digest(bytes: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(bytes);
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// The ranks whose `values` differ from rank 0's (empty when all agree).
pub fn disagreeing(values: &[u64]) -> Vec<usize> {
    let first = values.first().copied().unwrap_or(0);
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != first)
        .map(|(r, _)| r)
        .collect()
}

/// A [`Collective`] of several in-process "ranks" (threads), for tests of the trainer's
/// distributed path without MPI: sums are formed in rank order, so results are deterministic.
#[derive(Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: std::sync::Arc<GroupShared>,
}

#[derive(Debug)]
struct GroupShared {
    size: usize,
    barrier: std::sync::Barrier,
    slots: std::sync::Mutex<Vec<Vec<f64>>>,
}

impl ThreadGroup {
    /// `size` members of one group, to be moved one per thread.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let shared = std::sync::Arc::new(GroupShared {
            size,
            barrier: std::sync::Barrier::new(size),
            slots: std::sync::Mutex::new(vec![Vec::new(); size]),
        });
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `mine`, in rank order (two barriers: all have written, all have read).
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.shared.barrier.wait();
        all
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(buf.iter().map(|&v| v as f64).collect());
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all.iter().fold(0.0f32, |s, r| s + r[i] as f32);
        }
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let all = self.exchange(buf.to_vec());
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all.iter().fold(0.0, |s, r| s + r[i]);
        }
        Ok(())
    }
    fn max_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(buf.iter().map(|&v| v as f64).collect());
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all.iter().fold(f32::NEG_INFINITY, |s, r| s.max(r[i] as f32));
        }
        Ok(())
    }
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        // Two f64 halves carry the u64 exactly.
        let all = self.exchange(vec![(value >> 32) as f64, (value & 0xFFFF_FFFF) as f64]);
        Ok(all.iter().map(|r| ((r[0] as u64) << 32) | r[1] as u64).collect())
    }
    fn take_seconds(&self) -> f64 {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order_without_overlap() {
        for b in [0usize, 1, 2, 5, 96, 127, 128, 256] {
            for n in 1..=5 {
                let parts: Vec<_> = (0..n).map(|r| shard(b, r, n)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[n - 1].end, b);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let (lo, hi) = (b / n, b.div_ceil(n));
                assert!(parts.iter().all(|p| p.len() == lo || p.len() == hi), "b {b} n {n}");
            }
        }
        // Two ranks = the trainer's two-thread split (first half ⌈b/2⌉ rows).
        assert_eq!(shard(127, 0, 2), 0..64);
    }

    #[test]
    fn thread_group_sums_in_rank_order_and_gathers() {
        let group = ThreadGroup::new(3);
        let out: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut a = [r, 1.0];
                        g.sum_f32(&mut a).unwrap();
                        let mut m = [r, -r];
                        g.max_f32(&mut m).unwrap();
                        let h = g.gather_u64(u64::MAX - g.rank() as u64).unwrap();
                        (a, m, h)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, m, h) in out {
            assert_eq!(a, [3.0, 3.0]);
            assert_eq!(m, [2.0, 0.0]);
            assert_eq!(h, vec![u64::MAX, u64::MAX - 1, u64::MAX - 2]);
            assert_eq!(disagreeing(&h), vec![1, 2]);
        }
    }
}
