//! A small fixed-size thread pool for fork-join kernels.
//!
//! The calling thread is worker 0. `run` publishes a borrowed closure, wakes the workers,
//! runs its own share and returns once every call has finished, so the closure may borrow
//! the caller's stack. Idle workers spin for a short, bounded time (a decode step issues
//! hundreds of back-to-back matmuls, and waking a parked thread costs several µs), then park.
//!
//! Each worker index must be *claimed* (a compare-and-swap on its slot) before the closure is
//! called for it. When the caller has finished its own call it claims every index no worker
//! has started yet and runs those calls itself. So a worker that is descheduled (another
//! process on the core) or still waking up never holds the caller back: the caller only waits
//! for calls that are actually running. Kernels that hand out work dynamically (see
//! `matmul`) then degrade gracefully to fewer threads instead of stalling.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker (or a waiting caller) spins before parking.
const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// A job as the workers see it: the caller's closure with its lifetime erased.
type JobRef = *const (dyn Fn(usize, usize) + Sync + 'static);

struct Shared {
    n_threads: usize,
    spin: Duration,
    /// Incremented once per job; workers wait for it to change.
    epoch: AtomicU64,
    /// Per worker index (slot 0 unused): the last epoch claimed for it, by it or by the caller.
    claimed: Vec<AtomicU64>,
    /// Calls of the current job finished by workers.
    done: AtomicUsize,
    shutdown: AtomicBool,
    /// Written by the caller before `epoch` is bumped; read by a worker only after it claimed
    /// the current epoch.
    job: UnsafeCell<Option<JobRef>>,
    /// The thread that called `run` (unparked by the last worker to finish).
    caller: UnsafeCell<Option<Thread>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` and `caller` are written only by the thread holding `ThreadPool::run_lock`,
// before the epoch bump, when every slot is claimed for the previous epoch and every worker
// call of it has finished; a worker reads them only between a successful claim of the current
// epoch and its increment of `done`, which the caller waits for.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

/// Fixed-size pool; the calling thread participates as worker 0.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(Thread, JoinHandle<()>)>,
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads())
            .finish()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` (at least 1, counting the caller). If the OS refuses to spawn a
    /// thread, the pool runs everything on the caller; [`ThreadPool::n_threads`] tells.
    pub fn new(n_threads: usize) -> ThreadPool {
        ThreadPool::with_spin(n_threads, DEFAULT_SPIN)
    }

    /// Like [`ThreadPool::new`] with a custom spin time before idle threads park.
    pub fn with_spin(n_threads: usize, spin: Duration) -> ThreadPool {
        let wanted = n_threads.max(1);
        let mut workers = Vec::with_capacity(wanted - 1);
        let mut shared = Arc::new(Shared::new(wanted, spin));
        for index in 1..wanted {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("kernels-{index}"))
                .spawn(move || worker_loop(&s, index));
            match spawned {
                Ok(handle) => workers.push((handle.thread().clone(), handle)),
                Err(_) => break,
            }
        }
        if workers.len() + 1 != wanted {
            // The workers already started believe in `wanted` threads: stop them and fall
            // back to running everything on the caller.
            shutdown(&shared, &mut workers);
            shared = Arc::new(Shared::new(1, spin));
        }
        ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    /// Threads taking part in `run`, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` exactly once for every `thread_index < n_threads`
    /// and returns when all calls have returned. Index 0 runs on the calling thread; the
    /// others run on the workers, or on the caller for workers that had not started when the
    /// caller finished its own call. A panic in any call is re-raised here after all calls are
    /// done. Called from inside a running job (or while another thread is running a job on
    /// this pool), it runs all indices on the calling thread instead of waiting.
    pub fn run<F>(&self, f: F)
    where
        F: Fn(usize, usize) + Sync,
    {
        let n = self.n_threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        let guard = match self.run_lock.try_lock() {
            Ok(g) => g,
            // Only `run`'s own bookkeeping runs under the lock, so poisoning carries no state.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                for i in 0..n {
                    f(i, n);
                }
                return;
            }
        };
        let sh = &*self.shared;
        let job: &(dyn Fn(usize, usize) + Sync) = &f;
        // SAFETY: erasing the lifetime is sound because this function does not return (or
        // unwind) before every call a worker claimed has finished (counted in `done`), and the
        // unclaimed indices are claimed below by this thread, so no worker starts `job` later.
        let job: JobRef = unsafe { std::mem::transmute(job) };
        // SAFETY: no worker holds a claim (see `Shared`'s Sync impl) and we hold `run_lock`.
        unsafe {
            *sh.job.get() = Some(job);
            if (*sh.caller.get()).as_ref().map(Thread::id) != Some(thread::current().id()) {
                *sh.caller.get() = Some(thread::current());
            }
        }
        sh.done.store(0, Ordering::Relaxed);
        let prev = sh.epoch.load(Ordering::Relaxed);
        let epoch = prev + 1;
        sh.epoch.store(epoch, Ordering::Release);
        for (t, _) in &self.workers {
            // Cheap when the worker is spinning: it only sets its park token.
            t.unpark();
        }
        let mut first_panic = panic::catch_unwind(AssertUnwindSafe(|| f(0, n))).err();
        // Take over the indices no worker has claimed yet.
        let mut claimed_by_workers = 0;
        for i in 1..n {
            let r =
                sh.claimed[i].compare_exchange(prev, epoch, Ordering::AcqRel, Ordering::Acquire);
            if r.is_ok() {
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| f(i, n))) {
                    first_panic.get_or_insert(p);
                }
            } else {
                claimed_by_workers += 1;
            }
        }
        wait(
            sh.spin,
            false,
            || sh.done.load(Ordering::Acquire) == claimed_by_workers,
            || thread::park_timeout(Duration::from_millis(1)),
        );
        drop(guard);
        let theirs = sh.panic.lock().map(|mut p| p.take()).unwrap_or(None);
        if let Some(p) = first_panic.or(theirs) {
            panic::resume_unwind(p);
        }
    }
}

impl Shared {
    fn new(n_threads: usize, spin: Duration) -> Shared {
        Shared {
            n_threads,
            spin,
            epoch: AtomicU64::new(0),
            claimed: (0..n_threads).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            caller: UnsafeCell::new(None),
            panic: Mutex::new(None),
        }
    }
}

/// Spins until `done()`, then after `spin` calls `park` between checks. An idle worker also
/// yields now and then, so that another thread sharing its core can run (the caller takes over
/// the calls of workers that are not running); the caller never yields, as under contention a
/// yield can cost it a whole time slice.
fn wait(spin: Duration, polite: bool, done: impl Fn() -> bool, park: impl Fn()) {
    let start = Instant::now();
    let mut i = 0u32;
    while !done() {
        i = i.wrapping_add(1);
        if !i.is_multiple_of(256) {
            std::hint::spin_loop();
        } else if start.elapsed() >= spin {
            park();
        } else if polite {
            thread::yield_now();
        }
    }
}

fn worker_loop(sh: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        wait(
            sh.spin,
            true,
            || sh.epoch.load(Ordering::Acquire) != seen,
            thread::park,
        );
        // A stale unpark token only costs one more trip round `wait`.
        seen = sh.epoch.load(Ordering::Acquire);
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Every epoch's slot is claimed (by us or by the caller) before the next epoch is
        // published, so the slot holds `seen - 1` unless the caller took this job over.
        let won = sh.claimed[index]
            .compare_exchange(seen - 1, seen, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if won {
            // SAFETY: we claimed the current epoch, so the caller wrote `job`/`caller` for it
            // (before the Release store of `epoch` we observed) and will not return or write
            // them again before we increment `done`.
            let (job, caller) = unsafe { (*sh.job.get(), (*sh.caller.get()).clone()) };
            if let Some(job) = job {
                // SAFETY: see `ThreadPool::run`: the closure outlives this call.
                let job = unsafe { &*job };
                if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| job(index, sh.n_threads)))
                    && let Ok(mut slot) = sh.panic.lock()
                {
                    slot.get_or_insert(p);
                }
            }
            sh.done.fetch_add(1, Ordering::AcqRel);
            // Cheap unless the caller has parked.
            if let Some(c) = caller {
                c.unpark();
            }
        }
        // Otherwise the caller ran our index itself; nothing of that job is touched.
    }
}

fn shutdown(sh: &Shared, workers: &mut Vec<(Thread, JoinHandle<()>)>) {
    sh.shutdown.store(true, Ordering::Release);
    sh.epoch.fetch_add(1, Ordering::Release);
    for (t, _) in workers.iter() {
        t.unpark();
    }
    for (_, h) in workers.drain(..) {
        let _ = h.join();
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        shutdown(&self.shared, &mut self.workers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// One run on `pool` that counts each index it gives out in `counter`.
    fn count_indices(pool: &ThreadPool, counter: &AtomicU64) {
        pool.run(|_, _| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
    }

    #[test]
    fn every_index_runs_exactly_once() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n);
            assert_eq!(pool.n_threads(), n);
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            pool.run(|i, nt| {
                assert_eq!(nt, n);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn borrows_stack_data_and_writes_disjoint_parts() {
        let pool = ThreadPool::new(3);
        let input: Vec<u64> = (0..1000).collect();
        let parts: Vec<Mutex<u64>> = (0..3).map(|_| Mutex::new(0)).collect();
        pool.run(|i, n| {
            let chunk = input.len().div_ceil(n);
            let s: u64 = input.iter().skip(i * chunk).take(chunk).sum();
            *parts[i].lock().unwrap() = s;
        });
        let total: u64 = parts.iter().map(|p| *p.lock().unwrap()).sum();
        assert_eq!(total, 999 * 1000 / 2);
    }

    #[test]
    fn many_consecutive_runs() {
        let pool = ThreadPool::new(3);
        let counter = AtomicU64::new(0);
        for round in 0..20_000u64 {
            pool.run(|i, _| {
                counter.fetch_add(i as u64 + 1, Ordering::Relaxed);
            });
            assert_eq!(counter.load(Ordering::Relaxed), (round + 1) * 6);
        }
    }

    #[test]
    fn claims_race_between_caller_and_workers() {
        // The caller's own call is instant, so it often takes over indices whose worker has
        // not started yet; every index must still run exactly once per job.
        let pool = ThreadPool::with_spin(3, Duration::from_micros(5));
        let hits: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let rounds = 20_000u64;
        for r in 0..rounds {
            if r % 1000 == 0 {
                thread::sleep(Duration::from_micros(200));
            }
            pool.run(|i, _| {
                if i != 0 {
                    for k in 0..(r % 7) * 50 {
                        std::hint::black_box(k);
                    }
                }
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), rounds);
        }
    }

    #[test]
    fn runs_after_workers_parked() {
        let pool = ThreadPool::with_spin(2, Duration::from_micros(1));
        let counter = AtomicU64::new(0);
        for _ in 0..5 {
            thread::sleep(Duration::from_millis(3));
            count_indices(&pool, &counter);
        }
        assert_eq!(counter.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn nested_run_does_not_deadlock() {
        let pool = ThreadPool::new(2);
        let counter = AtomicU64::new(0);
        pool.run(|_, _| count_indices(&pool, &counter));
        // Each of the 2 outer calls runs the 2 inner indices serially.
        assert_eq!(counter.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn worker_panic_is_propagated_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let counter = AtomicU64::new(0);
        count_indices(&pool, &counter);
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn shared_across_threads() {
        let pool = Arc::new(ThreadPool::new(2));
        let counter = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (p, c) = (Arc::clone(&pool), Arc::clone(&counter));
                thread::spawn(move || {
                    for _ in 0..200 {
                        count_indices(&p, &c);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 3 * 200 * 2);
    }
}
