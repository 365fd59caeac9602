//! A fork-join thread pool whose workers spin between jobs, for the hundreds of short parallel regions of a
//! forward pass.
//!
//! A decode step runs ~120 parallel regions of tens of microseconds each. A general-purpose pool that parks idle
//! threads on a futex pays a wake-up per region, which measured here (a 2-vCPU VM) as more system time than
//! compute and left the second core idle. Like ggml's thread pool, workers here spin on an epoch counter for a
//! short while after each job (`SPIN_LIMIT`) and only then sleep on a condvar, so back-to-back regions cost an
//! atomic increment. Tasks are claimed from a shared counter, so uneven tasks balance themselves; the caller
//! works too and returns only when every task is done, which is what makes lending the closure to the workers
//! sound.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Wait iterations before an idle worker sleeps: the first `SPIN_BEFORE_YIELD` are `spin_loop` hints (tens of
/// microseconds in all), the rest yield the core (a few milliseconds in all on an idle machine).
const SPIN_LIMIT: u32 = 20_000;

/// Pure spinning lasts this many iterations (tens of microseconds, longer than the serial work between regions);
/// after that a spinner yields its core on every iteration, so that pools oversubscribing the machine (several
/// engines in one test process, a busy host) still make progress instead of burning each other's time slices.
const SPIN_BEFORE_YIELD: u32 = 2_000;

/// A buffer that a parallel region's tasks write in disjoint parts (each task its own rows or columns), handed to
/// them by copy. Every use is `unsafe`: its caller promises that the part lies within the buffer, that no other
/// task touches it while in use, and that the buffer outlives the region.
pub struct Disjoint<T>(*mut T);

impl<T> Clone for Disjoint<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Disjoint<T> {}
// SAFETY: tasks reach the buffer only through the unsafe methods below, whose callers promise disjoint parts.
unsafe impl<T> Send for Disjoint<T> {}
unsafe impl<T> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The address of element `i`.
    ///
    /// # Safety
    /// `i` is at most the buffer's length.
    pub unsafe fn at(self, i: usize) -> *mut T {
        // SAFETY: as the caller guarantees.
        unsafe { self.0.add(i) }
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// The range lies within the buffer, and nothing else reads or writes it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: as the caller guarantees.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[inline]
fn backoff(spins: u32) {
    if spins < SPIN_BEFORE_YIELD {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicU64,
    /// The current job; written only by the caller while no worker reads it (between jobs).
    job: UnsafeCell<Option<Job>>,
    n_tasks: AtomicUsize,
    next_task: AtomicUsize,
    /// Workers that have not yet finished the current job.
    busy: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the single caller of `run` only while `busy == 0` and read by workers only between
// observing a new epoch and decrementing `busy`; the pointee is `Sync` and outlives that window (`run` waits).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers: one job at a time.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpinPool({} threads)", self.threads())
    }
}

impl SpinPool {
    /// A pool of `threads` in total (the caller counts as one, so `threads - 1` workers are started).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tandem-cpu-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i` in `0..n_tasks`, spread over the pool; returns when all calls have returned.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n_tasks <= 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _one_job = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erasing the lifetime is sound because this function does not return before every worker has
        // decremented `busy`, after which no worker touches the job again.
        let job: Job = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        };
        // SAFETY: no worker reads `job` while busy == 0 (the previous run waited for that).
        unsafe { *s.job.get() = Some(job) };
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.next_task.store(0, Ordering::Relaxed);
        s.busy.store(self.workers.len(), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        claim_tasks(s, f);
        let mut spins = 0u32;
        while s.busy.load(Ordering::Acquire) > 0 {
            backoff(spins);
            spins = spins.saturating_add(1);
        }
    }
}

fn claim_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0;
        let epoch = loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen || s.shutdown.load(Ordering::Relaxed) {
                break e;
            }
            spins += 1;
            if spins < SPIN_LIMIT {
                backoff(spins);
                continue;
            }
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        seen = epoch;
        // SAFETY: a new epoch means the caller published a job and waits for us (busy > 0).
        if let Some(job) = unsafe { *s.job.get() } {
            // SAFETY: the job outlives this use (see `run`).
            claim_tasks(s, unsafe { &*job });
        }
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once_across_many_jobs() {
        let pool = SpinPool::new(3);
        for n in [0usize, 1, 2, 7, 100] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = SpinPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.run(4, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
