//! [`App`]: what a user embeds — their routes and warm-up tasks — and the entry point that
//! becomes the process it was started as. The top of the crate: it calls the master, the
//! worker and the command line; nothing calls it.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! // A synchronous main: herdsman starts its own runtimes.
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

use axum::Router;

use crate::cli::{self, Command};
use crate::config::Config;
use crate::exit::Exit;
use crate::operator::Request;
use crate::services::Services;
use crate::warmup::WarmupTask;
use crate::{http, logging, master, worker};

type RouteFactory = Arc<dyn Fn(&Services) -> Router + Send + Sync>;

/// A herdsman application: the health routes plus the user's, run by the master/worker model.
#[derive(Clone, Default)]
pub struct App {
    routes: Option<RouteFactory>,
    warmups: Vec<WarmupTask>,
    cache_api: bool,
    auth_api: bool,
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

    /// Serves the cache over HTTP (`/cache/{key}`, see [`crate::http::cache_api`]). Off by
    /// default: an app serves `/live`, `/ready`, `/health` and only the routes it asks for. The
    /// cache itself is always there for the app's handlers (`services.cache`).
    pub fn with_cache_api(mut self) -> Self {
        self.cache_api = true;
        self
    }

    /// Serves `/auth/register` and `/auth/login` (see [`crate::http::auth_api`]). Off by
    /// default, like [`App::with_cache_api`].
    pub fn with_auth_api(mut self) -> Self {
        self.auth_api = true;
        self
    }

    /// What a worker serves besides the health routes: the user's routes and the opted-in APIs.
    fn worker_routes(&self, services: &Services) -> Router {
        let mut router = self.routes.as_ref().map_or_else(Router::new, |factory| factory(services));
        if self.cache_api {
            router = router.merge(http::cache_routes(services));
        }
        if self.auth_api {
            router = router.merge(http::auth_routes(services));
        }
        router
    }

    /// Runs as the process this was started as and returns its exit status (see
    /// [`crate::exit`]).
    ///
    /// `run` owns the process: it reads the arguments and the environment, execs workers,
    /// installs signal handlers and starts its own single-threaded runtime. Call it from a
    /// plain synchronous `fn main`, not from `#[tokio::main]` (a runtime in the master before
    /// it starts workers is exactly what herdsman avoids; it is refused with a clear message).
    pub fn run(self) -> ExitCode {
        self.run_as_process().into()
    }

    fn run_as_process(self) -> Exit {
        if tokio::runtime::Handle::try_current().is_ok() {
            eprintln!(
                "herdsman: App::run was called inside a tokio runtime; call it from a synchronous `fn main` (without #[tokio::main]): herdsman starts its own runtimes"
            );
            return Exit::BadUsage;
        }
        let cli = match cli::parse_args(std::env::args_os()) {
            Ok(cli) => cli,
            Err(cli::ArgsOutcome::Print(text)) => {
                print!("{text}");
                return Exit::Clean;
            }
            Err(cli::ArgsOutcome::Invalid(line)) => {
                eprint!("{line}");
                return Exit::BadUsage;
            }
        };
        let command = cli.command.unwrap_or(Command::Serve);
        // A worker takes its configuration from its master, never from the environment.
        if let Command::Worker = command {
            let warmups = self.warmups.clone();
            return worker::run(|services: &Services| self.worker_routes(services), warmups);
        }
        let resolution = match Config::from_process(&cli.flags) {
            Ok(resolution) => resolution,
            Err(e) => {
                eprintln!("herdsman: {e}");
                return Exit::BadUsage;
            }
        };
        let config = &resolution.config;
        match command {
            Command::Check => {
                print!("{}", cli::check(&resolution));
                Exit::Clean
            }
            Command::Healthcheck => match cli::healthcheck(config) {
                Ok(()) => Exit::Clean,
                Err(why) => {
                    eprintln!("herdsman: healthcheck failed: {why}");
                    Exit::Failure
                }
            },
            Command::Status { json } => operate(config, &Request::Status, json),
            Command::Reload => operate(config, &Request::Reload, false),
            Command::Scale { count } => match crate::operator::parse_worker_count(&count) {
                Ok(workers) => operate(config, &Request::Scale { workers }, false),
                Err(e) => {
                    eprintln!("herdsman: {e}");
                    Exit::BadUsage
                }
            },
            Command::Serve | Command::Worker => {
                logging::init(config.log_format, &config.log_level, "master");
                if let Some(platform) = &resolution.platform {
                    tracing::info!("Platform: {platform}");
                }
                // Once, here: workers take the resolved configuration and never resolve again.
                for warning in &resolution.warnings {
                    tracing::warn!("{warning}");
                }
                let url = config.redis_url.as_deref().unwrap_or_default();
                if url.starts_with("rediss://") && config.redis_tls_insecure {
                    tracing::warn!("REDIS_TLS_INSECURE=true: the Redis server's TLS certificate is not verified");
                } else if url.starts_with("rediss://") && url.ends_with("#insecure") {
                    tracing::warn!("REDIS_URL ends in #insecure: the Redis server's TLS certificate is not verified");
                }
                master::run(resolution.config)
            }
        }
    }
}

/// Runs an operator command against the master and prints its answer.
fn operate(config: &Config, request: &Request, json: bool) -> Exit {
    match cli::operate(config, request, json) {
        Ok(text) => {
            print!("{text}");
            Exit::Clean
        }
        Err(e) => {
            eprintln!("herdsman: {e}");
            Exit::Failure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Services {
        use crate::cache::{Cache, CacheConfig};
        Services::assemble(
            Arc::new(Config::default()),
            Cache::new(CacheConfig::default()).expect("a memory cache"),
            crate::hasher::Hasher::new(1, 4).expect("a hasher"),
            crate::tracker::RequestTracker::new(None, || {}),
        )
    }

    async fn status(router: Router, method: &str, path: &str) -> u16 {
        use tower::ServiceExt;
        let request = axum::http::Request::builder().method(method).uri(path).body(axum::body::Body::from("{}"));
        let request = request.expect("a valid request");
        router.oneshot(request).await.map_or(0, |response| response.status().as_u16())
    }

    #[tokio::test]
    async fn an_embedded_app_serves_only_the_apis_it_asks_for() {
        let services = services();
        let plain = App::new().worker_routes(&services);
        assert_eq!(status(plain.clone(), "PUT", "/cache/k").await, 404);
        assert_eq!(status(plain, "POST", "/auth/login").await, 404);
        let full = App::new().with_cache_api().with_auth_api().worker_routes(&services);
        // No REDIS_URL: no sessions, so the cache route asks for one.
        assert_eq!(status(full.clone(), "PUT", "/cache/k").await, 401);
        // No REDIS_URL: the user store is absent, but the route is there.
        assert_ne!(status(full, "POST", "/auth/login").await, 404);
    }

    #[tokio::test]
    async fn run_inside_a_runtime_is_refused_with_a_clear_status() {
        // What an embedder gets who writes `#[tokio::main] async fn main`.
        assert_eq!(App::new().run_as_process(), Exit::BadUsage);
    }
}
