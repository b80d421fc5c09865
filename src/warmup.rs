//! Warm-up tasks: the slow start-up work that must never delay serving.
//!
//! Under gunicorn, a worker that warms up (hashes a bcrypt password, connects to Redis, loads a
//! cache) before it serves is silent while it does so, and several workers warming up at once
//! fight over the CPU until the master kills them for it. In herdsman a worker serves first and
//! warms up in the background, and its state is visible in `/health` under `checks`. `/ready`
//! waits only for the tasks marked [`WarmupTask::required`]; by default none is, so a new worker
//! is ready at once.
//!
//! Where a task runs is what makes this hold even for a task written the blocking way (a
//! synchronous driver, a file or model load, `bcrypt::hash` called directly): each attempt runs
//! on a thread of its own (tokio's blocking pool), never on the worker's serving thread. A task
//! that blocks, spins or sleeps its thread leaves `/live`, the heartbeat and every route alone.
//! The task's futures still use the worker's runtime for I/O and timers, so the connections it
//! opens (a Redis pool, a database pool) outlive it and serve the worker's requests; tasks it
//! `tokio::spawn`s run on the serving thread, so blocking work belongs in the body itself.
//!
//! The timeout is enforced from the serving runtime, outside the task: at the deadline the
//! task is reported `timed_out` at once. A thread cannot be killed, so the attempt is
//! abandoned, not stopped: if it finishes later, that is logged and recorded (`ok` or
//! `failed`). A panic is a `failed` state with the panic's message. A required task that did
//! not succeed keeps `/ready` at 503 with the reason and is tried again with back-off (1 s
//! doubling up to `HERDSMAN_WARMUP_RETRY_MAX`), never two attempts of one task at once.

use crate::metrics::{WarmupMetrics, WarmupOutcome};
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::logging::panic_message;
use crate::services::Services;
use crate::warmup_status::{TaskState, WarmupStatus};

type TaskBody = Arc<dyn Fn(Services) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A named piece of start-up work with a timeout.
#[derive(Clone)]
pub struct WarmupTask {
    name: String,
    required: bool,
    timeout: Option<Duration>,
    /// Run before the body, so that workers booting together do not all hit a dependency in
    /// the same instant.
    jitter: Duration,
    body: TaskBody,
}

impl WarmupTask {
    /// A task that runs `body` with the worker's services. Its error, if any, is shown in
    /// `/health`, so it should say what failed.
    ///
    /// The body runs on a thread of its own, so it may block (a synchronous client, a file
    /// load) without delaying any request; what it `tokio::spawn`s runs on the serving thread
    /// and must not block. See the module documentation.
    pub fn new<F, Fut, E>(name: impl Into<String>, body: F) -> Self
    where
        F: Fn(Services) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let body = Arc::new(move |services: Services| {
            let fut = body(services);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) }) as Pin<Box<dyn Future<Output = _> + Send>>
        });
        WarmupTask { name: name.into(), required: false, timeout: None, jitter: Duration::ZERO, body }
    }

    /// Whether `/ready` answers 503 until this task has succeeded. A required task that fails
    /// or times out is tried again with back-off until it succeeds.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// The time this task may take; default `STARTUP_OPERATION_TIMEOUT`. Past it the task is
    /// `timed_out` and abandoned: its thread cannot be stopped, and a late finish is logged.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Waits a random time up to `max` before starting.
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = max;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How the tasks of a worker are run: their default timeout and the retry ceiling.
#[derive(Debug, Clone, Copy)]
pub struct RunPolicy {
    /// For tasks without a [`WarmupTask::timeout`] of their own.
    pub default_timeout: Duration,
    /// The longest wait between two attempts of a required task.
    pub retry_max: Duration,
}

/// The first wait before a required task is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Starts every task in the background of the current runtime (see the module
/// documentation for where each one runs). Returns at once.
pub fn spawn_all(status: &WarmupStatus, tasks: Vec<WarmupTask>, services: &Services, policy: RunPolicy) {
    for task in tasks {
        status.update(&task.name, task.required, |_| {});
        let metrics = WarmupMetrics::of(&task.name);
        tokio::spawn(run(status.clone(), task, metrics, services.clone(), policy));
    }
}

/// Runs one task to success, or to its last failure when it is not required.
async fn run(status: WarmupStatus, task: WarmupTask, metrics: WarmupMetrics, services: Services, policy: RunPolicy) {
    if !task.jitter.is_zero() {
        tokio::time::sleep(task.jitter.mul_f64(rand::random::<f64>())).await;
    }
    let timeout = task.timeout.unwrap_or(policy.default_timeout);
    let mut backoff = Backoff::new(FIRST_RETRY, policy.retry_max);
    loop {
        let state = attempt(&status, &task, metrics, &services, timeout).await;
        if matches!(state, TaskState::Ok { .. }) || !task.required {
            return;
        }
        let wait = backoff.fail();
        tracing::info!(
            "warm-up {} is required: trying again in {} ms (failure {} in a row)",
            task.name,
            wait.as_millis(),
            backoff.failures()
        );
        tokio::time::sleep(wait).await;
    }
}

/// One attempt on a thread of its own; returns the state it ended in.
async fn attempt(
    status: &WarmupStatus,
    task: &WarmupTask,
    metrics: WarmupMetrics,
    services: &Services,
    timeout: Duration,
) -> TaskState {
    let name = task.name.as_str();
    status.update(name, task.required, |entry| {
        entry.state = TaskState::Pending;
        entry.attempts += 1;
    });
    let started = Instant::now();
    let body = task.body.clone();
    let services = services.clone();
    let runtime = tokio::runtime::Handle::current();
    // `Handle::block_on` on a blocking-pool thread: the body runs there, while its I/O and
    // timers are driven by the worker's runtime, whose thread stays free to serve.
    let mut thread = tokio::task::spawn_blocking(move || runtime.block_on(body(services)));
    let state = match tokio::time::timeout(timeout, &mut thread).await {
        Ok(finished) => {
            let state = outcome(finished, started);
            match &state {
                TaskState::Ok { duration_ms } => {
                    metrics.attempt(WarmupOutcome::Ok, Duration::from_millis(*duration_ms));
                    tracing::info!("warm-up {name} done in {duration_ms} ms")
                }
                TaskState::Failed { duration_ms, reason } => {
                    metrics.attempt(WarmupOutcome::Failed, Duration::from_millis(*duration_ms));
                    tracing::warn!("warm-up {name} failed after {duration_ms} ms: {reason}")
                }
                TaskState::Pending | TaskState::TimedOut { .. } => {}
            }
            state
        }
        Err(_) => {
            let after_ms = timeout.as_millis() as u64;
            metrics.attempt(WarmupOutcome::TimedOut, timeout);
            tracing::warn!(
                "warm-up {name} timed out after {after_ms} ms; abandoned (its thread runs on, serving is not affected)"
            );
            status.update(name, task.required, |entry| entry.state = TaskState::TimedOut { after_ms });
            // Wait for the abandoned attempt, so that a late finish is told, and so that a
            // retry never runs beside it.
            let state = outcome(thread.await, started);
            match &state {
                TaskState::Ok { duration_ms } => tracing::warn!(
                    "warm-up {name} finished late, {duration_ms} ms after it started (timeout {after_ms} ms): now ok"
                ),
                TaskState::Failed { duration_ms, reason } => tracing::warn!(
                    "warm-up {name} finished late, {duration_ms} ms after it started (timeout {after_ms} ms): failed: {reason}"
                ),
                TaskState::Pending | TaskState::TimedOut { .. } => {}
            }
            state
        }
    };
    status.update(name, task.required, |entry| entry.state = state.clone());
    state
}

/// The state a finished attempt ends in: its result, or its panic.
fn outcome(finished: Result<Result<(), String>, tokio::task::JoinError>, started: Instant) -> TaskState {
    let duration_ms = started.elapsed().as_millis() as u64;
    match finished {
        Ok(Ok(())) => TaskState::Ok { duration_ms },
        Ok(Err(reason)) => TaskState::Failed { duration_ms, reason },
        Err(e) if e.is_panic() => {
            TaskState::Failed { duration_ms, reason: format!("panicked: {}", panic_message(e.into_panic().as_ref())) }
        }
        Err(e) => TaskState::Failed { duration_ms, reason: format!("did not finish: {e}") },
    }
}

/// The warm-up tasks every worker runs: bcrypt pre-warm, the first Redis connection and the
/// cache load. None is required unless `REDIS_REQUIRED` is set, and `/ready` checks that one
/// against the live connection, not against this task.
pub fn builtin(config: &crate::config::Config) -> Vec<WarmupTask> {
    let cost = config.bcrypt_cost;
    let mut tasks = vec![WarmupTask::new("bcrypt_prewarm", move |services: Services| async move {
        // One hash at the configured cost on the login thread pool: pages in the code and tells
        // the operator, through /health and a warning, whether the cost suits this CPU.
        let started = Instant::now();
        services.hasher.hash("herdsman-prewarm", cost).await?;
        let took = started.elapsed();
        if took > SLOW_HASH {
            let advice = match cfg!(debug_assertions) {
                true => {
                    "; this is a debug build, in which bcrypt is about ten times slower: measure with a release build"
                }
                false => " on this CPU; logins will be slow: lower BCRYPT_COST",
            };
            tracing::warn!("one bcrypt hash at cost {cost} takes {} ms{advice}", took.as_millis());
        }
        Ok::<(), crate::hasher::HashError>(())
    })];
    if config.redis_url.is_some() {
        // Workers booting together must not all connect in the same instant.
        tasks.push(
            WarmupTask::new("redis", |services: Services| async move {
                services.sessions.listen();
                services.cache.connect().await
            })
            .jitter(REDIS_CONNECT_JITTER),
        );
        if !config.cache_warm_keys.is_empty() {
            let keys = config.cache_warm_keys.clone();
            tasks.push(
                WarmupTask::new("cache_warmup", move |services: Services| {
                    let keys = keys.clone();
                    async move {
                        // Waits for the connection (with its own jitter) rather than racing it.
                        services.cache.connect().await?;
                        let loaded = services.cache.warm(&keys).await?;
                        tracing::info!("cache warm-up loaded {loaded} of {} keys", keys.len());
                        Ok::<(), crate::cache::CacheError>(())
                    }
                })
                .jitter(REDIS_CONNECT_JITTER),
            );
        }
    }
    tasks
}

/// A login hashing longer than this feels slow to a user and limits logins per core.
const SLOW_HASH: Duration = Duration::from_millis(250);

/// The spread of the workers' first Redis connections.
const REDIS_CONNECT_JITTER: Duration = Duration::from_millis(200);

/// Warm-up tasks that misbehave on purpose, for the integration tests; compiled only with the
/// `test-hooks` feature and added only when their variable is set.
#[cfg(feature = "test-hooks")]
pub(crate) mod test_hooks {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::WarmupTask;

    fn env_u64(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    pub(crate) fn tasks() -> Vec<WarmupTask> {
        let mut tasks = Vec::new();
        // Written the blocking way, as ported from a synchronous app: sleeps its thread.
        if let Some(ms) = env_u64("HERDSMAN_TEST_WARMUP_BLOCK_MS") {
            tasks.push(WarmupTask::new("test_blocking", move |_| async move {
                std::thread::sleep(Duration::from_millis(ms));
                Ok::<(), String>(())
            }));
        }
        if std::env::var_os("HERDSMAN_TEST_WARMUP_PANIC").is_some() {
            tasks.push(
                WarmupTask::new("test_panic", |_| async {
                    if true {
                        panic!("test hook: a warm-up panicked on purpose");
                    }
                    Ok::<(), String>(())
                })
                .required(true),
            );
        }
        // Required, fails its first N attempts, then succeeds.
        if let Some(failures) = env_u64("HERDSMAN_TEST_WARMUP_FAIL_TIMES") {
            let attempts = Arc::new(AtomicU32::new(0));
            tasks.push(
                WarmupTask::new("test_flaky", move |_| {
                    let attempt = attempts.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                    async move {
                        match attempt <= failures {
                            true => Err(format!("test hook: attempt {attempt} fails on purpose")),
                            false => Ok(()),
                        }
                    }
                })
                .required(true),
            );
        }
        // Spawns a task that blocks the serving runtime: the one mistake a warm-up's thread
        // cannot absorb, as a worker whose runtime blocks before it served anything.
        if let Some(ms) = env_u64("HERDSMAN_TEST_WARMUP_SPAWN_BLOCK_MS") {
            tasks.push(WarmupTask::new("test_spawns_blocker", move |_| async move {
                tokio::spawn(async move { std::thread::sleep(Duration::from_millis(ms)) });
                Ok::<(), String>(())
            }));
        }
        tasks
    }
}
