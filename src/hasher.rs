//! The bcrypt thread pool: password hashing off the async runtime.
//!
//! bcrypt is deliberately slow: tens to hundreds of milliseconds of pure CPU
//! per hash or verify. A worker runs a *single-threaded* Tokio runtime, so
//! hashing on it would freeze every other request of that worker, `/live`
//! included, and the master would kill a perfectly healthy process during
//! a login storm. `spawn_blocking` would not help much either: its pool is
//! large (512 threads) and unbounded, so a storm would still eat every core.
//!
//! [`Hasher`] is a small, fixed set of OS threads fed through a bounded queue:
//!
//! ```text
//!   async handler --try_send(job)--> [ bounded queue ] --> N threads (nice 10)
//!        ^                                                      |
//!        +------------------- oneshot result -------------------+
//! ```
//!
//! * N is chosen by the caller (`ceil(cores / workers)`), so all workers
//!   together use about one hashing thread per core.
//! * Each thread lowers its own scheduling priority (nice 10), so when the
//!   cores are saturated the kernel still prefers the runtime thread.
//! * When the queue is full the job is refused at once ([`HashError::Busy`])
//!   and the route answers `503` with `Retry-After`: shedding load beats
//!   queueing requests until clients time out.

use crate::metrics::{self, Event, Level};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::debug;

/// Nice value of the hashing threads (higher = lower priority).
const HASHER_NICE: libc::c_int = 10;

/// Why a hash or verify did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The queue is full: shed load (the route answers 503 + Retry-After).
    #[error("password hashing queue is full")]
    Busy,
    /// The hashing threads are gone (a job panicked or the pool shut down).
    #[error("password hasher stopped")]
    Stopped,
    #[error("bcrypt: {0}")]
    Bcrypt(#[from] bcrypt::BcryptError),
    #[error("cannot start hashing threads: {0}")]
    Spawn(#[source] std::io::Error),
}

/// bcrypt's key length: longer passwords are refused by [`Hasher::hash`], never truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool of low-priority threads running bcrypt. Cheap to clone;
/// the threads exit once every clone is dropped.
#[derive(Clone)]
pub struct Hasher {
    jobs: SyncSender<Job>,
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher").finish_non_exhaustive()
    }
}

impl Hasher {
    /// Starts `threads` hashing threads (at least one) behind a queue of
    /// `queue_capacity` waiting jobs.
    pub fn new(threads: usize, queue_capacity: usize) -> Result<Hasher, HashError> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(queue_capacity);
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("herdsman-bcrypt-{index}"))
                .spawn(move || {
                    lower_thread_priority();
                    loop {
                        // Hold the lock only while waiting for a job, not while running it.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            // A panicking job drops its reply sender (the caller
                            // sees `Stopped`); the thread itself keeps serving.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                            }
                            Err(_) => return, // every Hasher clone dropped
                        }
                    }
                })
                .map_err(HashError::Spawn)?;
        }
        Ok(Hasher { jobs })
    }

    /// Runs `work` on a hashing thread; refuses at once when the queue is full.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            // The receiver may be gone (request cancelled); nothing to do then.
            let _ = reply.send(work());
            metrics::add_level(Level::BcryptQueued, -1);
        });
        metrics::add_level(Level::BcryptQueued, 1);
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::add_level(Level::BcryptQueued, -1);
                metrics::count(Event::BcryptRefused);
                return Err(HashError::Busy);
            }
            Err(TrySendError::Disconnected(_)) => {
                metrics::add_level(Level::BcryptQueued, -1);
                return Err(HashError::Stopped);
            }
        }
        answer.await.map_err(|_| HashError::Stopped)
    }

    /// bcrypt-hashes `password`; refuses passwords over 72 bytes instead of truncating.
    ///
    /// bcrypt's key is 72 bytes; a password of exactly 72 bytes uses all of them (the crate's
    /// `non_truncating_hash` counts a terminating NUL and would refuse it), so the check is ours.
    pub async fn hash(&self, password: &str, cost: u32) -> Result<String, HashError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(HashError::Bcrypt(bcrypt::BcryptError::Truncation(password.len())));
        }
        let password = password.to_owned();
        Ok(self.run(move || bcrypt::hash(password, cost)).await??)
    }

    /// Checks `password` against a bcrypt `hash`. A password over 72 bytes never matches (no
    /// hash was made from one), but costs the same bcrypt work, so timing does not tell.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, HashError> {
        let fits = password.len() <= MAX_PASSWORD_BYTES;
        let password = password.as_bytes()[..password.len().min(MAX_PASSWORD_BYTES)].to_vec();
        let hash = hash.to_owned();
        Ok(self.run(move || bcrypt::verify(password, &hash)).await?? && fits)
    }

    /// The cost a bcrypt hash was made with (`$2b$10$...` is 10), if it is one.
    pub fn cost_of(hash: &str) -> Option<u32> {
        hash.split('$').nth(2)?.parse().ok()
    }
}

/// Gives the calling thread nice 10 so the runtime thread wins the CPU.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid() has no preconditions and returns the calling
        // thread's id. On Linux, setpriority(PRIO_PROCESS, tid, ..) changes
        // the nice value of that one thread only (Linux threads are
        // schedulable entities of their own), so no other thread of the
        // process, and in particular not the Tokio runtime thread, is
        // affected. Both calls only read their integer arguments.
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, HASHER_NICE)
        };
        if result != 0 {
            // E.g. already nicer than 10 without CAP_SYS_NICE; harmless.
            debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower hashing thread priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn hash_and_verify_round_trip() {
        let hasher = Hasher::new(1, 4).expect("hasher");
        let hash = hasher.hash("correct horse", 4).await.expect("hash");
        assert!(hasher.verify("correct horse", &hash).await.expect("verify"));
        assert!(!hasher.verify("wrong horse!", &hash).await.expect("verify"));
    }

    #[tokio::test]
    async fn the_longest_password_hashes_and_verifies_and_nothing_is_truncated() {
        let hasher = Hasher::new(1, 4).expect("hasher");
        let longest = "p".repeat(MAX_PASSWORD_BYTES);
        let hash = hasher.hash(&longest, 4).await.expect("72 bytes hash");
        assert!(hasher.verify(&longest, &hash).await.expect("verify"));
        // One byte more is refused to hash, and never matches: not silently cut to 72.
        let longer = format!("{longest}x");
        assert!(matches!(hasher.hash(&longer, 4).await, Err(HashError::Bcrypt(_))));
        assert!(!hasher.verify(&longer, &hash).await.expect("verify"));
        // The 71st and 72nd bytes count.
        let mut other = longest.clone();
        other.replace_range(71..72, "q");
        assert!(!hasher.verify(&other, &hash).await.expect("verify"));
        assert_eq!(Hasher::cost_of(&hash), Some(4));
    }

    #[tokio::test]
    async fn hashing_threads_run_at_nice_10() {
        let hasher = Hasher::new(1, 1).expect("hasher");
        // SAFETY: gettid and getpriority only read their integer arguments.
        let nice = hasher
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) })
            .await
            .expect("job");
        assert!(nice >= HASHER_NICE, "nice {nice}");
        // The calling (runtime) thread is untouched.
        // SAFETY: as above.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        assert!(own < HASHER_NICE, "runtime thread nice {own}");
    }

    #[tokio::test]
    async fn a_panicking_job_does_not_kill_the_pool() {
        let hasher = Hasher::new(1, 4).expect("hasher");
        let result = hasher.run(|| -> u32 { panic!("job panicked on purpose") }).await;
        assert!(matches!(result, Err(HashError::Stopped)));
        let hash = hasher.hash("still works", 4).await.expect("hash");
        assert!(hasher.verify("still works", &hash).await.expect("verify"));
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once() {
        let hasher = Hasher::new(1, 1).expect("hasher");
        let (release, wait) = std::sync::mpsc::channel::<()>();
        // One job occupies the thread, one fills the queue.
        let busy = tokio::spawn({
            let hasher = hasher.clone();
            async move { hasher.run(move || wait.recv().is_ok()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let hasher = hasher.clone();
            async move { hasher.run(|| ()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert!(matches!(hasher.hash("password1", 4).await, Err(HashError::Busy)));
        assert!(started.elapsed() < Duration::from_millis(20));
        release.send(()).expect("release");
        assert!(busy.await.expect("join").expect("job"));
        queued.await.expect("join").expect("job");
    }

    #[tokio::test]
    async fn runtime_stays_responsive_while_hashing_saturates() {
        let hasher = Hasher::new(2, 64).expect("hasher");
        let storm: Vec<_> = (0..16)
            .map(|_| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash("password123", 8).await })
            })
            .collect();
        // The (single-threaded) test runtime keeps ticking on time.
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let tick = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
            worst = worst.max(tick.elapsed());
        }
        eprintln!("worst 5 ms tick during the hashing storm: {worst:?}");
        assert!(worst < Duration::from_millis(100), "worst tick {worst:?}");
        for job in storm {
            job.await.expect("join").expect("hash");
        }
    }
}
