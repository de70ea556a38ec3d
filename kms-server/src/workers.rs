//! The data plane's worker threads: a few threads (by default one per CPU core, at most one per
//! HSM session) that run the service work of data-plane calls, fed by one bounded queue.
//!
//! Why not tokio's blocking pool: it starts a thread for every call that finds none idle and
//! wakes one for every call, so under load each call costs a thread wake-up and a park, and
//! the work is spread over dozens of threads. Here a worker that finishes a call takes the next
//! one from the queue without sleeping; a sleeping worker is woken only when one is needed.
//! Measured on the project's 2-core machine: 13% more calls per second on the mixed load with 16
//! in flight, 15–25% with 64 (ARCHITECTURE.md, "Where the time of one request goes").
//!
//! The HSM deadline still holds: the caller waits at most `hsm.deadline_ms` for its answer
//! (`api::Shared::call`). A call whose caller stopped waiting before a worker took it is
//! skipped ([`Claim`]), so a hung HSM leaves no backlog of stale work behind it; a full queue is
//! refused at once ([`Busy`]) rather than queued without bound. Admin-plane calls (key generation,
//! backups: milliseconds to minutes) stay on tokio's blocking pool, so they never hold up the
//! data plane, nor it them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Calls waiting for a worker; past this a call is refused with [`Busy`]. At ~15 µs of HSM
/// work a call, a full queue is ~60 ms of work for one worker.
const QUEUE: usize = 4096;

type Job = Box<dyn FnOnce() + Send>;

/// Every worker is busy and the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The workers. Dropping the last clone lets the threads finish the queue and exit.
#[derive(Debug, Clone)]
pub struct Workers {
    handle: Arc<Handle>,
}

/// Closes the queue when the last `Workers` clone goes (the threads hold only `Shared`).
#[derive(Debug)]
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers parked on `ready`: a call wakes one only if there is one (a futex wake is a
    /// system call, and under load every worker is busy).
    sleeping: usize,
    closed: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("jobs", &self.jobs.len()).field("sleeping", &self.sleeping).field("closed", &self.closed).finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under this lock is a single push, pop or counter change: a panic cannot
        // leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Workers {
    /// Starts `threads` workers (at least one), named `data-worker-N`.
    pub fn start(threads: usize) -> std::io::Result<Workers> {
        let shared = Arc::new(Shared::default());
        for n in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new().name(format!("data-worker-{n}")).spawn(move || work(&shared))?;
        }
        Ok(Workers { handle: Arc::new(Handle(shared)) })
    }

    /// Queues `job`, or refuses it at once if the queue is full.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Busy> {
        let mut state = self.handle.0.lock();
        if state.jobs.len() >= QUEUE {
            return Err(Busy);
        }
        state.jobs.push_back(Box::new(job));
        let wake = state.sleeping > 0;
        drop(state);
        if wake {
            self.handle.0.ready.notify_one();
        }
        Ok(())
    }
}

/// Who answers for a call once it is queued: its worker, which finishes it and records its
/// outcome, or its caller, which stopped waiting (the deadline passed) and records that. Exactly
/// one of them does, whichever comes first.
#[derive(Debug, Clone, Default)]
pub struct Claim(Arc<AtomicU8>);

const WAITING: u8 = 0;
const FINISHED: u8 = 1;
const GAVE_UP: u8 = 2;

impl Claim {
    /// Whether the caller still waits: a worker skips a call nobody waits for, so a hung HSM
    /// leaves no backlog of stale work behind it.
    pub fn waited_for(&self) -> bool {
        self.0.load(Ordering::Acquire) == WAITING
    }

    /// The worker, its work done: `true` if it answers for the call, `false` if the caller gave
    /// up first.
    pub fn finish(&self) -> bool {
        self.0.compare_exchange(WAITING, FINISHED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The caller, at its deadline: `true` if it answers for the call, `false` if the worker
    /// finished first (its answer is on the way).
    pub fn give_up(&self) -> bool {
        self.0.compare_exchange(WAITING, GAVE_UP, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

fn work(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            // A panic in a call is a bug; its caller gets INTERNAL (the result channel is
            // dropped) and the worker goes on.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("a data-plane call panicked");
            }
            state = shared.lock();
        } else if state.closed {
            return;
        } else {
            state.sleeping += 1;
            state = shared.ready.wait(state).unwrap_or_else(|p| p.into_inner());
            state.sleeping -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs `f` on a worker; its result arrives on the returned channel.
    fn run<T: Send + 'static>(workers: &Workers, f: impl FnOnce() -> T + Send + 'static) -> Result<mpsc::Receiver<T>, Busy> {
        let (tx, rx) = mpsc::channel();
        workers.spawn(move || drop(tx.send(f())))?;
        Ok(rx)
    }

    #[test]
    fn every_call_runs_and_answers() {
        let workers = Workers::start(2).expect("workers");
        let answers: Vec<_> = (0..100).map(|i| run(&workers, move || i * 2).expect("queued")).collect();
        for (i, rx) in answers.into_iter().enumerate() {
            assert_eq!(rx.recv().expect("answered"), i * 2);
        }
    }

    #[test]
    fn a_call_whose_caller_gave_up_is_skipped_and_a_full_queue_is_refused() {
        let workers = Workers::start(1).expect("workers");
        // Hold the only worker until released.
        let (release, held) = mpsc::channel::<()>();
        let busy = run(&workers, move || held.recv().is_ok()).expect("queued");
        while !workers.handle.0.lock().jobs.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let ran = Arc::new(AtomicUsize::new(0));
        let mut kept = Vec::new();
        for i in 0..QUEUE {
            let (ran, claim) = (ran.clone(), Claim::default());
            let worker = claim.clone();
            let rx = run(&workers, move || worker.waited_for() && worker.finish() && ran.fetch_add(1, Ordering::SeqCst) < QUEUE)
                .expect("room in the queue");
            // Every other caller gives up before a worker takes its call.
            if i % 2 == 0 {
                kept.push(rx);
            } else {
                assert!(claim.give_up(), "the caller gives up first");
            }
        }
        assert_eq!(run(&workers, || ()).err(), Some(Busy), "the queue is full");
        release.send(()).expect("the held call is waiting");
        assert!(busy.recv().expect("answered"));
        for rx in kept {
            assert!(rx.recv().expect("answered"), "the worker answers for a call still waited for");
        }
        assert_eq!(ran.load(Ordering::SeqCst), QUEUE / 2, "calls nobody waits for are never run");
    }

    #[test]
    fn exactly_one_side_answers_for_a_call() {
        let claim = Claim::default();
        assert!(claim.finish(), "the worker finished first");
        assert!(!claim.give_up(), "so the caller waits for its answer");
        let claim = Claim::default();
        assert!(claim.give_up(), "the caller gave up first");
        assert!(!claim.waited_for() && !claim.finish(), "so the worker drops its outcome");
    }

    #[test]
    fn a_panicking_call_fails_alone() {
        let workers = Workers::start(1).expect("workers");
        let failed = run(&workers, || -> u32 { panic!("a bug") }).expect("queued");
        assert!(failed.recv().is_err(), "its caller sees the call dropped");
        assert_eq!(run(&workers, || 7).expect("queued").recv().expect("the worker survived"), 7);
    }
}
