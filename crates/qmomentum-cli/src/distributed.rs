//! `qmomentum train --distributed`: the MPI side of data-parallel training (start, agreement
//! among ranks before any file is touched, and the end of the job). The training step itself is
//! `qmomentum::train::Trainer` with a `qmomentum::distributed::Collective`; see
//! `doc/distributed.md`.
//!
//! Errors: a failure every rank meets at the same point (bad input checked collectively, a
//! diverged loss, an agreed stop) ends every rank cleanly ([`AllRanks`]); a failure of one rank
//! alone (its disk is full, say) would leave the others waiting in the next collective call, so
//! it ends the whole job with `MPI_Abort` after printing its message ([`finish`]).

use anyhow::Result;
use qmomentum::distributed::Collective;
use std::sync::Arc;

/// An error that every rank of the job meets at the same point (printed by each, prefixed with
/// its rank; the job then ends cleanly).
#[derive(Debug)]
pub struct AllRanks(pub String);
impl std::fmt::Display for AllRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for AllRanks {}

/// Where MPI launchers announce the world size.
pub const LAUNCHER_WORLD_SIZE: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// The world size an MPI launcher announced in the environment (Open MPI, MPICH/Hydra, PMIx,
/// Slurm's srun), if any.
pub fn launcher_world_size() -> Option<usize> {
    LAUNCHER_WORLD_SIZE
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.parse().ok())
}

/// Ranks of the job on this machine (to share its cores among them).
pub fn local_ranks() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1)
}

#[cfg(feature = "mpi")]
mod imp {
    use super::*;
    use qmomentum::distributed::mpi::{MpiCollective, Reduction};
    use std::sync::Mutex;

    static WORLD: Mutex<Option<Arc<MpiCollective>>> = Mutex::new(None);

    pub fn start(rank_order: bool) -> Result<Arc<dyn Collective>> {
        let c = Arc::new(MpiCollective::init(if rank_order {
            Reduction::RankOrder
        } else {
            Reduction::Mpi
        })?);
        *WORLD.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }

    pub fn finish(error: Option<&anyhow::Error>) {
        let world = WORLD.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(w) = world else { return };
        let all = error.is_none_or(|e| {
            e.downcast_ref::<AllRanks>().is_some() || e.downcast_ref::<crate::train_cmd::Interrupted>().is_some()
        });
        if !all {
            // Only this rank failed: the others would wait for it forever.
            w.abort(1);
        }
        // The last reference: MPI_Finalize (the trainer's copy is gone with the trainer).
        drop(w);
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    use super::*;

    pub fn start(_rank_order: bool) -> Result<Arc<dyn Collective>> {
        anyhow::bail!(
            "this qmomentum was built without MPI support; build it with `cargo build --release -p qmomentum-cli --features mpi` (needs libopenmpi-dev and libclang-dev)"
        )
    }

    pub fn finish(_error: Option<&anyhow::Error>) {}
}

/// Start MPI when the run is data-parallel: `--distributed`, or a launcher that started more
/// than one process. `None` for a single-process run. (`qmomentum sweep` removes the launcher's
/// variables from its cells' environment: each cell is a single-process run.)
pub fn start(distributed: bool, rank_order: bool) -> Result<Option<Arc<dyn Collective>>> {
    let launched = launcher_world_size();
    match (distributed, launched) {
        (false, None | Some(0 | 1)) => Ok(None),
        (true, None) => anyhow::bail!(
            "--distributed needs an MPI launcher (no OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_SIZE in the environment): run `mpirun -np N qmomentum train … --distributed`"
        ),
        (_, Some(_)) => imp::start(rank_order).map(Some),
    }
}

/// End MPI: cleanly when every rank ends here the same way (`error` is `None` or an
/// [`AllRanks`]/interruption), with `MPI_Abort` of the whole job when only this rank failed.
pub fn finish(error: Option<&anyhow::Error>) {
    imp::finish(error)
}

/// Every rank says whether its part of a collective phase went well; all learn whether every
/// rank's did. A rank that failed keeps its own error; the others get an [`AllRanks`] error
/// naming the ranks that failed.
pub fn agree<T>(comm: &dyn Collective, what: &str, mine: Result<T>) -> Result<T> {
    let status = match &mine {
        Ok(_) => 0,
        Err(_) => 1,
    };
    let all = comm.gather_u64(status)?;
    let failed: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, s)| **s != 0)
        .map(|(r, _)| r.to_string())
        .collect();
    match mine {
        Err(e) => Err(AllRanks(format!("rank {} of {}: {e:#}", comm.rank(), comm.size())).into()),
        Ok(_) if !failed.is_empty() => Err(AllRanks(format!(
            "rank {} of {}: stopped before training because rank(s) {} could not {what} (their messages say why)",
            comm.rank(),
            comm.size(),
            failed.join(", ")
        ))
        .into()),
        ok => ok,
    }
}
