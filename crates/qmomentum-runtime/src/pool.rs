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
    ON_WORKER.with(|c| c.set(true));
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
    /// Set on the pool's worker threads ([`Balance`] learns only from joins whose caller ran
    /// the first share and a worker the second).
    static ON_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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

/// Where a recurring two-share [`join`] over `n` items splits them, moved toward equal times.
///
/// The two halves of an element-wise pass do not cost the same on the two cores when the data
/// they write was last read by the other core: the trainer's momentum update of the first
/// dense kernel measured 12.5 µs on the calling core and 36–42 µs on the worker for equal
/// halves, because the calling core's forward product read the whole kernel, so every line of
/// the worker's half must first be taken from that core's cache (`doc/performance.md`, "Balanced
/// splits"). `Balance` measures both shares of each [`Balance::join`] and moves the caller's
/// fraction a fifth of the way toward the split at which the measured per-item costs give
/// equal times. Only where the work is split changes, never what is computed: an element-wise
/// pass gives the same bits at any split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Balance {
    /// The caller's fraction of the items, in [0.05, 0.95].
    caller: f64,
}

impl Default for Balance {
    fn default() -> Self {
        Balance { caller: 0.5 }
    }
}

impl Balance {
    /// The caller's current fraction of the items.
    pub fn fraction(&self) -> f64 {
        self.caller
    }

    /// Where to split `n` items: the caller's fraction rounded to a multiple of `align` (a
    /// cache line of values), within `1..n` when `n ≥ 2·align`.
    pub fn split(&self, n: usize, align: usize) -> usize {
        let align = align.max(1);
        let at = ((n as f64 * self.caller) as usize).next_multiple_of(align);
        if n >= 2 * align {
            at.clamp(align, (n - 1) / align * align)
        } else {
            at.min(n)
        }
    }

    /// [`join`] of the shares of `n` items split at `at` (`a` the first `at` items, `b` the
    /// rest), each share timed; the split then moves toward equal times (see [`Balance`]).
    pub fn join<A: Send, B: Send>(
        &mut self,
        at: usize,
        n: usize,
        a: impl FnOnce() -> A + Send,
        b: impl FnOnce() -> B + Send,
    ) -> (A, B) {
        let on_worker = || ON_WORKER.with(|c| c.get());
        let ((x, ta, wa), (y, tb, wb)) = join(
            || {
                let t = Instant::now();
                let r = a();
                (r, t.elapsed().as_secs_f64(), on_worker())
            },
            || {
                let t = Instant::now();
                let r = b();
                (r, t.elapsed().as_secs_f64(), on_worker())
            },
        );
        if !wa && wb {
            self.learn(at, n, ta, tb);
        }
        (x, y)
    }

    /// Move toward the split that equalises the shares' times, from one join's times `ta`
    /// (caller, `at` items) and `tb` (worker, `n − at` items).
    fn learn(&mut self, at: usize, n: usize, ta: f64, tb: f64) {
        if at == 0 || at >= n || !(ta > 0.0 && tb > 0.0) {
            return;
        }
        let fa = at as f64 / n as f64;
        // Time per unit fraction on each side; equal times at x·ca = (1 − x)·cb.
        let (ca, cb) = (ta / fa, tb / (1.0 - fa));
        let target = cb / (ca + cb);
        self.caller = (self.caller + 0.2 * (target - self.caller)).clamp(0.05, 0.95);
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

    /// The split follows measured costs: a worker share that costs three times the caller's per
    /// item moves the caller's fraction to 3/4 (x·1 = (1 − x)·3); splits stay aligned and inside.
    #[test]
    fn balance_moves_toward_equal_times_and_splits_aligned() {
        let mut b = Balance::default();
        assert_eq!(b.split(1000, 16), 496 + 16);
        for _ in 0..60 {
            let n = 100_000;
            let at = b.split(n, 16);
            let fa = at as f64 / n as f64;
            b.learn(at, n, fa * 1.0, (1.0 - fa) * 3.0);
        }
        assert!((b.fraction() - 0.75).abs() < 0.01, "{}", b.fraction());
        // Bounds: never an empty share of a splittable tensor, never beyond the clamp.
        for _ in 0..60 {
            b.learn(b.split(1000, 16), 1000, 1e-9, 1.0);
        }
        assert!(b.fraction() <= 0.95);
        let at = b.split(1000, 16);
        assert!(at % 16 == 0 && at < 1000 && at > 0, "{at}");
        assert_eq!(
            b.split(8, 16),
            8,
            "a tensor too small to split goes to the caller whole"
        );
        // Degenerate times teach nothing.
        let before = b;
        b.learn(500, 1000, 0.0, 1.0);
        b.learn(0, 1000, 1.0, 1.0);
        assert_eq!(b, before);
    }

    /// `Balance::join` is `join`: both results, in order.
    #[test]
    fn balance_join_returns_both_results() {
        let mut b = Balance::default();
        let mut v = vec![1u32; 100];
        let at = b.split(v.len(), 16);
        let (x, y) = v.split_at_mut(at);
        let (sx, sy) = b.join(at, 100, || x.iter().sum::<u32>(), || y.iter().sum::<u32>());
        assert_eq!((sx, sy), (at as u32, 100 - at as u32));
    }

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
