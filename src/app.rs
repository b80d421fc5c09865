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
use crate::services::Services;
use crate::warmup::WarmupTask;
use crate::{logging, master, worker};

type RouteFactory = Arc<dyn Fn(&Services) -> Router + Send + Sync>;

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
            let routes = self.routes.clone();
            let user_routes = move |services: &Services| routes.as_ref().map_or_else(Router::new, |f| f(services));
            return worker::run(user_routes, self.warmups);
        }
        let config = match Config::from_process(&cli.flags) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("herdsman: {e}");
                return Exit::BadUsage;
            }
        };
        match command {
            Command::Check => {
                print!("{}", cli::check(&config));
                Exit::Clean
            }
            Command::Healthcheck => match cli::healthcheck(&config) {
                Ok(()) => Exit::Clean,
                Err(why) => {
                    eprintln!("herdsman: healthcheck failed: {why}");
                    Exit::Failure
                }
            },
            Command::Serve | Command::Worker => {
                logging::init(config.log_format, &config.log_level, "master");
                if config.redis_tls_insecure && config.redis_url.as_deref().is_some_and(|u| u.starts_with("rediss://"))
                {
                    tracing::warn!("REDIS_TLS_INSECURE=true: the Redis server's TLS certificate is not verified");
                }
                master::run(config)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_inside_a_runtime_is_refused_with_a_clear_status() {
        // What an embedder gets who writes `#[tokio::main] async fn main`.
        assert_eq!(App::new().run_as_process(), Exit::BadUsage);
    }
}
