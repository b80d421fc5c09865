//! herdsman: a container-first prefork runtime for axum web services on PaaS.
//!
//! A master process binds `$PORT` at once and supervises `WEB_CONCURRENCY` worker processes
//! that serve on the shared socket, the way gunicorn does, minus the ways gunicorn hurts:
//! workers serve from their first millisecond and warm up in the background, hangs are found by
//! a heartbeat from inside each worker's runtime and explained when aborted, failures are
//! retried with back-off, and a dead Redis never takes requests down with it.
//!
//! # Layout
//! - [`app`]: [`App`], what a user embeds: their routes and warm-up tasks, our process model.
//! - [`cli`]: the command line (`serve`, `check`, `healthcheck`) and its one-line errors.
//! - [`config`]: every setting, from flags over environment over defaults, validated.
//! - [`supervisor`]: the master: spawn, watch, replace, reap, stop.
//! - [`signals`]: the one table mapping signals to the master's intents.
//! - [`listener`]: binding the shared socket, and taking it over in a worker.
//! - [`control`]: the worker → master pipe that carries readiness and heartbeats.
//! - [`balance`]: the shared table that spreads connections evenly over the workers.
//! - [`worker`]: a worker process: runtime, accept loop, drain, hang diagnostics.
//! - [`http`]: the router, built-in routes and the guard around every request.
//! - [`warmup`]: start-up tasks on threads of their own, with timeouts enforced from outside and
//!   retries for the required ones, shown in `/health`.
//! - [`backoff`]: the exponential back-off with jitter behind every retry.
//! - [`cache`]: Redis through a bb8 pool, a bounded in-memory cache when Redis is away, and the
//!   circuit breaker that switches between them.
//! - [`auth`]: users in Redis, bcrypt on a dedicated low-priority thread pool.
//! - [`logging`]: one line per event on stderr, text or JSON, with pid and role.

pub mod app;
pub mod auth;
pub mod backoff;
pub mod balance;
pub mod cache;
pub mod cli;
pub mod config;
pub mod control;
pub mod http;
pub mod listener;
pub mod logging;
pub mod signals;
pub mod supervisor;
pub mod warmup;
pub mod worker;

pub use app::{App, Services};
pub use config::Config;
pub use warmup::{TaskState, WarmupTask};

pub(crate) use warmup::builtin as builtin_warmups;
