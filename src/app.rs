//! [`App`]: what a user embeds. Their routes and warm-up tasks, herdsman's process model.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! fn main() -> std::process::ExitCode {
//!     herdsman::App::new()
//!         .routes(|_services| Router::new().route("/", get(|| async { "hello" })))
//!         .run()
//! }
//! ```
//!
//! [`App::run`] reads the command line and the environment, then becomes whichever process it
//! was started as: the master (which re-executes this same binary for each worker), a worker,
//! or one of the `check` / `healthcheck` commands.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;

use crate::auth::Hasher;
use crate::cache::Cache;
use crate::cli::{self, Command};
use crate::config::Config;
use crate::http::RequestTracker;
use crate::warmup::{Warmup, WarmupTask};
use crate::{logging, supervisor, worker};

type RouteFactory = Arc<dyn Fn(&Services) -> Router + Send + Sync>;

/// What a worker's routes and warm-up tasks can use. Cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub config: Arc<Config>,
    /// The worker's warm-up tasks and their states.
    pub warmup: Warmup,
    /// Redis when it answers, memory when it does not.
    pub cache: Cache,
    /// bcrypt off the async runtime, on low-priority threads.
    pub hasher: Hasher,
    /// When this worker started, for `uptime_s`.
    pub started: Instant,
    pub(crate) tracker: RequestTracker,
}

impl Services {
    /// Whether this worker is shutting down and should get no new traffic.
    pub fn draining(&self) -> bool {
        self.tracker.is_draining()
    }
}

/// A herdsman application: built-in routes plus the user's, run by the master/worker model.
#[derive(Clone, Default)]
pub struct App {
    routes: Option<RouteFactory>,
    warmups: Vec<WarmupTask>,
}

impl App {
    pub fn new() -> Self {
        App::default()
    }

    /// Adds the user's routes. The factory runs once in each worker, after the worker's
    /// services exist, so handlers can capture them.
    pub fn routes(mut self, factory: impl Fn(&Services) -> Router + Send + Sync + 'static) -> Self {
        self.routes = Some(Arc::new(factory));
        self
    }

    /// Adds a warm-up task, run in the background of every worker next to the built-in ones.
    pub fn warmup(mut self, task: WarmupTask) -> Self {
        self.warmups.push(task);
        self
    }

    pub(crate) fn user_routes(&self, services: &Services) -> Router {
        self.routes.as_ref().map_or_else(Router::new, |factory| factory(services))
    }

    pub(crate) fn user_warmups(&self) -> Vec<WarmupTask> {
        self.warmups.clone()
    }

    /// Runs as the process this was started as, and returns its exit status:
    /// 0 after a clean stop, 1 for a failed healthcheck or a runtime error, 2 for bad
    /// configuration or arguments, 3 when no worker could ever boot.
    pub fn run(self) -> ExitCode {
        let cli = match cli::parse_args(std::env::args_os()) {
            Ok(cli) => cli,
            Err((message, status)) => {
                eprint!("{message}");
                return ExitCode::from(status);
            }
        };
        let command = cli.command.unwrap_or(Command::Serve);
        // A worker takes its configuration from its master, never from the environment.
        let config = match command {
            Command::Worker => return worker::run(&self),
            _ => match Config::from_process(&cli.flags) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("herdsman: {e}");
                    return ExitCode::from(2);
                }
            },
        };
        // A REDIS_URL the cache cannot use is a configuration error too: say so before binding.
        if let Err(e) = Cache::new(crate::cache::CacheConfig::from_config(&config)) {
            eprintln!("herdsman: {e}");
            return ExitCode::from(2);
        }
        match command {
            Command::Check => {
                print!("{}", cli::check(&config));
                ExitCode::SUCCESS
            }
            Command::Healthcheck => ExitCode::from(if cli::healthcheck(&config) { 0 } else { 1 }),
            Command::Serve | Command::Worker => {
                logging::init(config.log_format, &config.log_level, "master");
                if config.redis_tls_insecure && config.redis_url.as_deref().is_some_and(|u| u.starts_with("rediss://"))
                {
                    tracing::warn!("REDIS_TLS_INSECURE=true: the Redis server's TLS certificate is not verified");
                }
                supervisor::run(config)
            }
        }
    }
}
