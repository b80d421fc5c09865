//! herdsman: a container-first prefork runtime for axum web services on PaaS.
//!
//! A master process binds `$PORT` at once and supervises `WEB_CONCURRENCY` worker processes
//! that serve on the shared socket, the way gunicorn does, minus the ways gunicorn hurts:
//! workers serve from their first millisecond and warm up in the background, hangs are found by
//! a heartbeat from inside each worker's runtime and explained when aborted, failures are
//! retried with back-off, and a dead Redis never takes requests down with it.
//!
//! # Layout
//!
//! Read it top-down; every arrow points down, and no module calls one above it.
//!
//! ```text
//!                         app (App::run: what the process is)
//!                /            |             \
//!         master            worker            cli
//!    (spawn, reap,      (runtime, accept,   (flags, check,
//!     policy)            drain, heartbeat)   healthcheck)
//!        |    \          /   |      \
//!        |  contract ----'    http    warmup
//!        |  control/balance    |   \    |
//!     signals, listener        |   services
//!                              |  /   |    \
//!   shutdown, tracker  cache  hasher  sessions  throttle  warmup_status
//!                                  \  |  /
//!                   metrics, config, exit, backoff, logging
//!                               |
//!                            platform
//! ```
//!
//! - [`app`]: [`App`], what a user embeds (their routes and warm-up tasks) and the entry point.
//! - [`master`]: the master: [`master::Master`]'s loop, with spawning, reaping and policy in
//!   files of their own.
//! - [`worker`]: a worker process: runtime, accept loop, drain, hang diagnostics.
//! - [`contract`]: what crosses the `exec` from master to worker (fds, variables, subcommand).
//! - [`control`]: the worker → master pipe that carries readiness and heartbeats.
//! - [`balance`]: the shared table that spreads connections evenly over the workers.
//! - [`shared_memory`]: the memfd mappings the master shares with its workers (balance, metrics).
//! - [`signals`]: the one table mapping signals to the master's intents.
//! - [`listener`]: binding the shared socket.
//! - [`cli`]: the command line (`serve`, `check`, `healthcheck`, `status`, `reload`, `scale`)
//!   and its one-line errors.
//! - [`operator`]: the master's control socket: its protocol, its address and the client that
//!   `herdsman status`, `reload` and `scale` use.
//! - [`http`]: the router, the built-in routes (health, cache, auth), the guard around every
//!   request, the one error type of every route, client addresses and per-user quotas.
//! - [`warmup`]: start-up tasks on threads of their own, timeouts enforced from outside,
//!   retries for the required ones; the built-in tasks.
//! - [`services`]: [`Services`], what routes and warm-up tasks may use.
//! - [`shutdown`]: [`shutdown::Shutdown`], how WebSockets and event streams learn of the drain
//!   and how the drain waits for them.
//! - [`warmup_status`]: the warm-up states that `/ready`, `/health` and diagnostics read.
//! - [`tracker`]: the requests a worker is serving, for diagnostics, draining, `MAX_REQUESTS`.
//! - [`metrics`]: Prometheus metrics: counts in a table in shared memory that every worker
//!   writes and the master folds and serves; what survives a worker's SIGKILL and why.
//! - [`cache`]: Redis through a bb8 pool, a bounded in-memory cache when Redis is away, and the
//!   circuit breaker that switches between them; durable operations for users.
//! - [`hasher`]: bcrypt on a dedicated low-priority thread pool.
//! - [`sessions`]: login tokens, stored hashed in Redis, and what a check does in an outage.
//! - [`throttle`]: token buckets (in Redis, in memory during an outage) for logins.
//! - [`config`]: every setting, from flags over environment over the platform's fitted defaults
//!   over herdsman's defaults, validated, with the source of each value.
//! - [`platform`]: the platform told from its variables (Heroku, Render, Railway, Fly, Cloud Run,
//!   Kubernetes) and the defaults fitted to it (grace period, workers from cgroup limits).
//! - [`exit`]: the process's exit statuses. [`backoff`]: the back-off behind every retry.
//!   [`logging`]: one line per event on stderr, text or JSON, with pid and role.

pub mod app;
pub mod backoff;
pub mod balance;
pub mod cache;
pub mod cli;
pub mod config;
pub mod contract;
pub mod control;
pub mod exit;
pub mod hasher;
pub mod http;
pub mod listener;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod operator;
pub mod platform;
pub mod revocations;
pub mod services;
pub mod sessions;
pub mod shared_memory;
pub mod shutdown;
pub mod signals;
pub mod throttle;
pub mod tracker;
pub mod warmup;
pub mod warmup_status;
pub mod worker;

pub use app::App;
pub use config::Config;
pub use services::Services;
pub use warmup::WarmupTask;
pub use warmup_status::{TaskState, WarmupStatus};
