//! [`Collective`] over MPI (rsmpi, Open MPI): the transport HPC and Horovod training use.
//!
//! Built with the cargo feature `mpi` (needs `libopenmpi-dev` and `libclang-dev`). Two ways to
//! sum a gradient:
//! - [`Reduction::Mpi`]: `MPI_Allreduce`, the library's choice of algorithm (fast; for a given
//!   world size and message size Open MPI's choice is fixed, but the standard does not promise
//!   an order);
//! - [`Reduction::RankOrder`]: gather every rank's buffer on rank 0, add them in rank order and
//!   broadcast the sum, so runs with the same world size are bit-identical whatever the MPI
//!   library or the network does. Costs about `(N−1)×` the bytes on rank 0; measured in
//!   `doc/distributed.md`.

use super::Collective;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::sync::Mutex;
use std::time::Instant;

/// How sums are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// `MPI_Allreduce`.
    Mpi,
    /// Gather on rank 0, add in rank order, broadcast.
    RankOrder,
}

/// The world communicator of an MPI job.
pub struct MpiCollective {
    // Dropped last (fields drop in order): finalizes MPI after the communicator is gone.
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    reduction: Reduction,
    scratch: Mutex<Scratch>,
    _universe: mpi::environment::Universe,
}

#[derive(Debug, Default)]
struct Scratch {
    f32s: Vec<f32>,
    f64s: Vec<f64>,
    seconds: f64,
}

// SAFETY: the communicator is a handle MPI lets any thread use once MPI is initialised with at
// least `Threading::Serialized`, which `MpiCollective::init` requires. Every MPI call made
// through `&self` (the collectives, `barrier`, `abort`) holds the `scratch` mutex, so no two
// threads call MPI at once; rank and size are cached at init and read without MPI.
// Finalization (the drop of `_universe`) happens where the last `Arc` is dropped: the
// `qmomentum` command keeps one in `main`'s thread, which also initialised MPI, and drops it
// last.
unsafe impl Send for MpiCollective {}
// SAFETY: as above — all MPI calls through `&self` are serialised by the `scratch` mutex.
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("reduction", &self.reduction)
            .finish()
    }
}

impl MpiCollective {
    /// Initialise MPI (once per process). Fails with a clear message when MPI was already
    /// initialised or the library cannot give serialised thread support.
    pub fn init(reduction: Reduction) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Distributed("MPI is already initialised in this process".into()))?;
        if threading < mpi::Threading::Serialized {
            return Err(Error::Distributed(format!(
                "the MPI library gives thread support {threading:?}; training needs Serialized"
            )));
        }
        let world = universe.world();
        Ok(MpiCollective {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            reduction,
            scratch: Mutex::new(Scratch::default()),
            _universe: universe,
        })
    }

    /// How sums are formed.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// Form sums another way from now on (every rank must make the same change at the same
    /// point).
    pub fn set_reduction(&mut self, reduction: Reduction) {
        self.reduction = reduction;
    }

    /// End the whole job now (every rank), with `code`: for a failure on one rank that the others
    /// cannot know of (they would wait in the next collective forever).
    pub fn abort(&self, code: i32) -> ! {
        let _g = self.lock();
        self.world.abort(code)
    }

    /// Wait until every rank is here.
    pub fn barrier(&self) {
        let _g = self.lock();
        self.world.barrier();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sum `buf` over the ranks with the chosen [`Reduction`] (`T` is f32 or f64).
    fn sum<T>(&self, buf: &mut [T], scratch: &mut Vec<T>)
    where
        T: Equivalence + Copy + Default + std::ops::Add<Output = T>,
    {
        match self.reduction {
            Reduction::Mpi => {
                scratch.clear();
                scratch.extend_from_slice(buf);
                self.world.all_reduce_into(&scratch[..], buf, SystemOperation::sum());
            }
            Reduction::RankOrder => {
                let n = self.size;
                let root = self.world.process_at_rank(0);
                if self.rank == 0 {
                    scratch.resize(buf.len() * n, T::default());
                    root.gather_into_root(&buf[..], &mut scratch[..]);
                    let len = buf.len();
                    for (i, v) in buf.iter_mut().enumerate() {
                        let mut s = scratch[i];
                        for r in 1..n {
                            s = s + scratch[r * len + i];
                        }
                        *v = s;
                    }
                } else {
                    root.gather_into(&buf[..]);
                }
                root.broadcast_into(buf);
            }
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mut g = self.lock();
        let t = Instant::now();
        let mut s = std::mem::take(&mut g.f32s);
        self.sum(buf, &mut s);
        g.f32s = s;
        g.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let mut g = self.lock();
        let t = Instant::now();
        let mut s = std::mem::take(&mut g.f64s);
        self.sum(buf, &mut s);
        g.f64s = s;
        g.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
    fn max_f32(&self, buf: &mut [f32]) -> Result<()> {
        let mut g = self.lock();
        let t = Instant::now();
        // Max is exact in any order: MPI's allreduce whatever the reduction mode.
        g.f32s.clear();
        g.f32s.extend_from_slice(buf);
        self.world.all_reduce_into(&g.f32s[..], buf, SystemOperation::max());
        g.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let _g = self.lock();
        let mut all = vec![0u64; self.size()];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
    fn take_seconds(&self) -> f64 {
        std::mem::take(&mut self.lock().seconds)
    }
}
