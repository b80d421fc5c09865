//! Warm-up tasks: the slow start-up work that must never delay serving.
//!
//! Under gunicorn, a worker that warms up (hashes a bcrypt password, connects to Redis, loads a
//! cache) before it serves is silent while it does so, and several workers warming up at once
//! fight over the CPU until the master kills them for it. In herdsman a worker serves first and
//! warms up in the background: each [`WarmupTask`] runs as its own task with its own timeout, and
//! its state is visible in `/health` under `checks`. `/ready` waits only for the tasks marked
//! [`WarmupTask::required`]; by default none is, so a new worker is ready at once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::app::Services;

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

    /// Whether `/ready` answers 503 until this task has succeeded.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// The time this task may take; default `STARTUP_OPERATION_TIMEOUT`.
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

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Ok { duration_ms: u64 },
    Failed { duration_ms: u64, reason: String },
    TimedOut { after_ms: u64 },
}

#[derive(Debug, Clone, Serialize)]
struct Entry {
    #[serde(flatten)]
    state: TaskState,
    required: bool,
}

/// The states of a worker's warm-up tasks, shared with the health routes.
#[derive(Clone, Default)]
pub struct Warmup {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
}

impl Warmup {
    /// Starts every task in the background on the current runtime. Returns at once.
    pub fn spawn_all(&self, tasks: Vec<WarmupTask>, services: &Services, default_timeout: Duration) {
        for task in tasks {
            self.set(&task.name, TaskState::Pending, task.required);
            let registry = self.clone();
            let services = services.clone();
            tokio::spawn(async move {
                if !task.jitter.is_zero() {
                    tokio::time::sleep(task.jitter.mul_f64(rand::random::<f64>())).await;
                }
                let timeout = task.timeout.unwrap_or(default_timeout);
                let started = Instant::now();
                let outcome = tokio::time::timeout(timeout, (task.body)(services)).await;
                let duration_ms = started.elapsed().as_millis() as u64;
                let state = match outcome {
                    Ok(Ok(())) => {
                        tracing::info!("warm-up {} done in {duration_ms} ms", task.name);
                        TaskState::Ok { duration_ms }
                    }
                    Ok(Err(reason)) => {
                        tracing::warn!("warm-up {} failed after {duration_ms} ms: {reason}", task.name);
                        TaskState::Failed { duration_ms, reason }
                    }
                    Err(_) => {
                        let after_ms = timeout.as_millis() as u64;
                        tracing::warn!("warm-up {} timed out after {after_ms} ms", task.name);
                        TaskState::TimedOut { after_ms }
                    }
                };
                registry.set(&task.name, state, task.required);
            });
        }
    }

    fn set(&self, name: &str, state: TaskState, required: bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(name.to_string(), Entry { state, required });
    }

    /// The state of one task, if it exists.
    pub fn state(&self, name: &str) -> Option<TaskState> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(name).map(|e| e.state.clone())
    }

    /// Every task's state, as shown under `checks` in `/health`.
    pub fn snapshot(&self) -> serde_json::Map<String, serde_json::Value> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().map(|(name, entry)| (name.clone(), serde_json::to_value(entry).unwrap_or_default())).collect()
    }

    /// The tasks still running, if any, for the diagnostics of an aborted worker.
    pub fn pending(&self) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let pending: Vec<&str> =
            entries.iter().filter(|(_, e)| e.state == TaskState::Pending).map(|(name, _)| name.as_str()).collect();
        (!pending.is_empty()).then(|| pending.join(", "))
    }

    /// Why this worker is not ready yet: the required tasks that have not succeeded.
    pub fn not_ready_reason(&self) -> Option<String> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let waiting: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.required && !matches!(e.state, TaskState::Ok { .. }))
            .map(|(name, e)| format!("{name} ({})", state_word(&e.state)))
            .collect();
        (!waiting.is_empty()).then(|| format!("waiting for required warm-up: {}", waiting.join(", ")))
    }
}

fn state_word(state: &TaskState) -> &'static str {
    match state {
        TaskState::Pending => "pending",
        TaskState::Ok { .. } => "ok",
        TaskState::Failed { .. } => "failed",
        TaskState::TimedOut { .. } => "timed out",
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
            tracing::warn!(
                "one bcrypt hash at cost {cost} takes {} ms on this CPU; logins will be slow: lower BCRYPT_COST",
                took.as_millis()
            );
        }
        Ok::<(), crate::auth::HashError>(())
    })];
    if config.redis_url.is_some() {
        // Workers booting together must not all connect in the same instant.
        tasks.push(
            WarmupTask::new("redis", |services: Services| async move { services.cache.connect().await })
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
