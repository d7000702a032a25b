//! A small persistent thread pool for splitting one batch over the cores.
//!
//! Why not `std::thread::scope` per call: starting a thread and waking an idle vCPU cost
//! 40–55 µs per call on the 2-vCPU machines this is benchmarked on, as much as a whole
//! 1000-row batch of the binary MLP takes on one core, so two threads were *slower* than one
//! up to a few thousand rows. Why not rayon: a call from outside rayon's pool is injected into
//! it and the calling thread sleeps, so both halves pay a wake-up, and the runtime is meant to
//! stay free of heavy dependencies. Like OpenMP and onnxruntime's pool, the workers here spin
//! for a short while ([`SPIN`]) after a job before parking on a condition variable, so the
//! next call of a loop of calls starts at once, and an idle process uses no CPU.
//!
//! One job runs at a time; the caller always takes part, and a caller that finds the pool busy
//! (another thread's job) simply runs its job alone. The pool is the process's one pool for
//! splitting work over the cores: the integer engine's row chunks and the trainer's two halves
//! of a batch ([`join`]) both run on it, so a training step pays no futex wake-up either. Jobs borrow the caller's stack: [`run`]
//! returns only once no worker can touch the job any more (see the invariant on `Slot::job`).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
pub const SPIN: Duration = Duration::from_micros(200);

/// A job with its lifetime erased; only dereferenced while [`run`] is still on the stack.
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn() + Sync + 'static));

// SAFETY: the pointee is `Sync` and outlives every use (see `Slot::job`).
unsafe impl Send for JobPtr {}

struct Slot {
    /// Incremented for every job published.
    epoch: u64,
    /// The current job. Invariant: a worker only copies it out while holding the lock and
    /// increments `active` in the same critical section; `run` clears it under the lock and
    /// then waits for `active` to reach 0, so no worker holds it after `run` returns.
    job: Option<JobPtr>,
    /// Workers that may still join the current job.
    seats: usize,
    /// Workers parked on the condition variable.
    parked: usize,
}

struct Pool {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// Mirror of `Slot::epoch` for spinning without the lock.
    epoch: AtomicU64,
    /// Workers running the current job.
    active: AtomicUsize,
    /// A worker's share of the current job panicked.
    panicked: AtomicBool,
    /// Held by the caller whose job is running.
    busy: Mutex<()>,
    workers: usize,
}

/// The process-wide pool: one worker per available core but the caller's.
fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            slot: Mutex::new(Slot {
                epoch: 0,
                job: None,
                seats: 0,
                parked: 0,
            }),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: Mutex::new(()),
            workers: cores - 1,
        }));
        let mut started = 0;
        for i in 0..pool.workers {
            let spawned = std::thread::Builder::new()
                .name(format!("qmomentum-runtime-{i}"))
                .spawn(move || worker(pool));
            if spawned.is_ok() {
                started += 1;
            }
        }
        // Threads that could not start never take a seat; `threads()` reports what exists.
        STARTED.store(started, Ordering::Relaxed);
        pool
    })
}

static STARTED: AtomicUsize = AtomicUsize::new(0);

/// Threads a job can run on: the caller plus the pool's workers.
pub fn threads() -> usize {
    pool();
    STARTED.load(Ordering::Relaxed) + 1
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // No code panics while holding this lock, but do not let poisoning stop the pool.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(pool: &'static Pool) {
    let mut seen = 0u64;
    loop {
        // Wait for a new job: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        while pool.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut slot = lock(&pool.slot);
                slot.parked += 1;
                while slot.epoch == seen {
                    slot = pool.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                slot.parked -= 1;
                break;
            }
        }
        let job = {
            let mut slot = lock(&pool.slot);
            seen = slot.epoch;
            match slot.job {
                Some(job) if slot.seats > 0 => {
                    slot.seats -= 1;
                    pool.active.fetch_add(1, Ordering::Relaxed);
                    Some(job)
                }
                _ => None,
            }
        };
        if let Some(job) = job {
            // SAFETY: `run` keeps the job alive until `active` is back to 0 (`Slot::job`).
            let f = unsafe { &*job.0 };
            if catch_unwind(AssertUnwindSafe(|| in_job(f))).is_err() {
                pool.panicked.store(true, Ordering::Relaxed);
            }
            pool.active.fetch_sub(1, Ordering::Release);
        }
    }
}

thread_local! {
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with [`inside_job`] true on this thread (restored after, also on unwinding).
fn in_job(f: &(dyn Fn() + Sync)) {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_JOB.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_JOB.with(|c| c.replace(true)));
    f();
}

/// Whether this thread is running a share of a pool job (its other cores are busy: code that
/// would split its own work further should not).
pub fn inside_job() -> bool {
    IN_JOB.with(|c| c.get())
}

/// `(a(), b())`, run on two cores when the pool has a free worker (the caller runs whichever
/// it takes first, a worker the other; alone, the caller runs both, `a` first). Like
/// `rayon::join`, but on this pool's spinning workers: the trainer calls it at every step, and a
/// worker woken from sleep costs tens of microseconds. A panic of the caller's share is resumed
/// here; a panic of the worker's share is printed by that thread and raised here as a new panic
/// naming `pool::join`.
pub fn join<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    use std::sync::Mutex as M;
    let fa = M::new(Some(a));
    let fb = M::new(Some(b));
    let ra: M<Option<A>> = M::new(None);
    let rb: M<Option<B>> = M::new(None);
    let next = AtomicUsize::new(0);
    fn take<T>(m: &std::sync::Mutex<Option<T>>) -> Option<T> {
        m.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    let job = || loop {
        match next.fetch_add(1, Ordering::Relaxed) {
            0 => {
                if let Some(f) = take(&fa) {
                    let r = f();
                    *ra.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            }
            1 => {
                if let Some(f) = take(&fb) {
                    let r = f();
                    *rb.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            }
            _ => break,
        }
    };
    let ok = run(2, &job);
    match (take(&ra), take(&rb)) {
        (Some(x), Some(y)) if ok => (x, y),
        _ => panic!("a share of a pool::join panicked on a worker thread"),
    }
}

/// Runs `job` on the calling thread and on up to `threads − 1` pool workers at once, and
/// returns when every call of it has returned. `job` must share its work out itself (the
/// engine hands out row chunks from an atomic counter), so it is correct whatever number of
/// workers join. Returns `false` if a worker's call panicked (the caller's own panic is
/// resumed).
pub fn run(threads: usize, job: &(dyn Fn() + Sync)) -> bool {
    if threads <= 1 {
        in_job(job);
        return true;
    }
    let pool = pool();
    let _busy = match pool.busy.try_lock() {
        Ok(guard) => guard,
        // A caller's own share panicked last time (the panic went on to that caller); the pool
        // itself is in order, since `run` waited for the workers before unwinding.
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        // Another thread's batch holds the workers: run this one alone.
        Err(TryLockError::WouldBlock) => {
            in_job(job);
            return true;
        }
    };
    // SAFETY: only the lifetime is erased; see `Slot::job` for why it is never outlived.
    let ptr = JobPtr(unsafe {
        std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(job)
    });
    pool.panicked.store(false, Ordering::Relaxed);
    {
        let mut slot = lock(&pool.slot);
        slot.epoch += 1;
        slot.job = Some(ptr);
        slot.seats = threads - 1;
        pool.epoch.store(slot.epoch, Ordering::Release);
        if slot.parked > 0 {
            pool.wake.notify_all();
        }
    }
    let mine = catch_unwind(AssertUnwindSafe(|| in_job(job)));
    lock(&pool.slot).job = None;
    let start = Instant::now();
    let mut spins = 0u32;
    while pool.active.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && start.elapsed() > SPIN {
            std::thread::yield_now();
        }
    }
    if let Err(p) = mine {
        resume_unwind(p);
    }
    !pool.panicked.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn join_returns_both_results_in_order_and_marks_its_shares() {
        for i in 0..200u64 {
            let (a, b) = join(|| (i * 2, inside_job()), || (i * 3, inside_job()));
            assert_eq!((a.0, b.0), (i * 2, i * 3));
            assert!(a.1 && b.1, "both shares run as pool shares");
        }
        assert!(!inside_job(), "the flag is reset after the job");
        // Borrowed, mutable state on both sides (the trainer's two replicas).
        let (mut x, mut y) = (vec![1u32; 1000], vec![2u32; 1000]);
        join(
            || x.iter_mut().for_each(|v| *v += 1),
            || y.iter_mut().for_each(|v| *v *= 3),
        );
        assert!(x.iter().all(|&v| v == 2) && y.iter().all(|&v| v == 6));
    }

    #[test]
    fn a_panic_in_a_join_share_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| join(|| 1, || -> u32 { panic!("share b") }));
        assert!(r.is_err());
        assert!(!inside_job());
        // The pool still works afterwards.
        assert_eq!(join(|| 5, || 6), (5, 6));
    }

    #[test]
    fn every_piece_runs_exactly_once_and_the_caller_takes_part() {
        for threads in [1, 2, 4] {
            for round in 0..200 {
                let next = AtomicUsize::new(0);
                let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
                let me = std::thread::current().id();
                let caller_ran = AtomicBool::new(false);
                let ok = run(threads, &|| {
                    if std::thread::current().id() == me {
                        caller_ran.store(true, Ordering::Relaxed);
                    }
                    while let Some(h) = hits.get(next.fetch_add(1, Ordering::Relaxed)) {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(ok);
                assert!(caller_ran.load(Ordering::Relaxed), "threads {threads} round {round}");
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_workers_panic_is_reported_and_the_pool_keeps_working() {
        if threads() < 2 {
            return;
        }
        let me = std::thread::current().id();
        // Other tests share the pool; while one of them holds it, `run` works alone and no
        // worker panics, so try until a worker has joined.
        let reported = (0..200).any(|_| {
            !run(2, &|| {
                if std::thread::current().id() != me {
                    panic!("worker panics on purpose");
                }
                // Give the worker time to join.
                std::thread::sleep(Duration::from_millis(2));
            })
        });
        assert!(reported, "a worker's panic was never reported");
        let count = AtomicUsize::new(0);
        assert!(run(2, &|| {
            count.fetch_add(1, Ordering::Relaxed);
        }));
        assert!(count.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_callers_panic_reaches_the_caller_and_the_pool_still_uses_its_workers() {
        if threads() < 2 {
            return;
        }
        let me = std::thread::current().id();
        let r = catch_unwind(|| {
            run(2, &|| {
                if std::thread::current().id() == me {
                    panic!("caller panics on purpose");
                }
            })
        });
        assert!(r.is_err());
        // Afterwards a job still reaches a worker thread (the busy lock is not left unusable).
        let mut helped = false;
        for _ in 0..200 {
            let other = AtomicBool::new(false);
            run(2, &|| {
                if std::thread::current().id() != me {
                    other.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            });
            if other.load(Ordering::Relaxed) {
                helped = true;
                break;
            }
        }
        assert!(helped, "no worker joined after a caller's panic");
    }

    #[test]
    fn concurrent_callers_each_get_their_whole_job_done() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        let next = AtomicUsize::new(0);
                        run(2, &|| {
                            while next.fetch_add(1, Ordering::Relaxed) < 10 {
                                total.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 10);
    }
}
