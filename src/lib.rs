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
//!         tracker  cache  hasher  sessions  throttle  warmup_status
//!                                  \  |  /
//!                   config, exit, backoff, logging
//! ```
//!
//! - [`app`]: [`App`], what a user embeds (their routes and warm-up tasks) and the entry point.
//! - [`master`]: the master: [`master::Master`]'s loop, with spawning, reaping and policy in
//!   files of their own.
//! - [`worker`]: a worker process: runtime, accept loop, drain, hang diagnostics.
//! - [`contract`]: what crosses the `exec` from master to worker (fds, variables, subcommand).
//! - [`control`]: the worker → master pipe that carries readiness and heartbeats.
//! - [`balance`]: the shared table that spreads connections evenly over the workers.
//! - [`signals`]: the one table mapping signals to the master's intents.
//! - [`listener`]: binding the shared socket.
//! - [`cli`]: the command line (`serve`, `check`, `healthcheck`) and its one-line errors.
//! - [`http`]: the router, the built-in routes (health, cache, auth), the guard around every
//!   request, the one error type of every route, client addresses and per-user quotas.
//! - [`warmup`]: start-up tasks on threads of their own, timeouts enforced from outside,
//!   retries for the required ones; the built-in tasks.
//! - [`services`]: [`Services`], what routes and warm-up tasks may use.
//! - [`warmup_status`]: the warm-up states that `/ready`, `/health` and diagnostics read.
//! - [`tracker`]: the requests a worker is serving, for diagnostics, draining, `MAX_REQUESTS`.
//! - [`cache`]: Redis through a bb8 pool, a bounded in-memory cache when Redis is away, and the
//!   circuit breaker that switches between them; durable operations for users.
//! - [`hasher`]: bcrypt on a dedicated low-priority thread pool.
//! - [`sessions`]: login tokens, stored hashed in Redis, and what a check does in an outage.
//! - [`throttle`]: token buckets (in Redis, in memory during an outage) for logins.
//! - [`config`]: every setting, from flags over environment over defaults, validated.
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
pub mod services;
pub mod sessions;
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
