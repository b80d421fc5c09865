//! The master: binds the port, starts workers, watches them, replaces them, stops them.
//!
//! The master runs a single-threaded tokio runtime and never forks it: each worker is a fresh
//! `exec` of this same binary (see [`crate::contract`]). Everything the master does happens in
//! one loop ([`Master::run`]) that reacts to three things:
//! - an [`Intent`]: from a signal (see [`crate::signals`]), or from whoever drives the loop;
//! - a [`Message`] from a worker's control pipe (ready, heartbeat, served, recycle me);
//! - a tick every [`TICK`], on which it reaps exited children and calls [`Master::step`],
//!   which compares what is with what should be.
//!
//! By concern: [`spawn`] starts a worker, [`reap`] collects exited ones and says why they
//! ended, [`policy`] decides what to start, retire and abort. The master's [`Phase`] is logged
//! at each change and can be watched ([`Master::phases`]).
//!
//! Replacing a worker (SIGHUP, `MAX_REQUESTS`, [`memory`] over `HERDSMAN_MAX_WORKER_MEMORY`) is "start the new one, wait until it serves, then
//! drain the old one", so capacity never dips and no request is dropped.
//!
//! The master is often PID 1 in a container: it reaps every child, not only its workers
//! (children of workers re-parented to it are reaped quietly).

mod memory;
mod operator;
mod policy;
mod reap;
mod spawn;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::balance::SlotTable;
use crate::config::Config;
use crate::contract::move_above_contract_fds;
use crate::control::Message;
use crate::exit::Exit;
use crate::listener;
use crate::metrics::{self, MetricsTable, RestartReason};
use crate::signals::{Intent, Signals};

/// How often the master looks at its workers.
const TICK: Duration = Duration::from_millis(100);
/// A new worker is started only when no other is booting, or this long after the last one:
/// workers never boot all in the same instant.
const BOOT_STAGGER: Duration = Duration::from_millis(200);
/// How long an aborted worker gets to print its diagnostics before SIGKILL. Its side thread
/// needs milliseconds; the bound is what a hung worker may add to `GUNICORN_TIMEOUT` before it
/// is gone: detection (one [`TICK`]) + this + the tick that sends SIGKILL stays within 0.5 s.
const ABORT_GRACE: Duration = Duration::from_millis(250);
/// What a draining worker gets past `GRACEFUL_TIMEOUT` before SIGKILL: its own drain deadline
/// is the same, and it needs a moment to exit after it.
const DRAIN_MARGIN: Duration = Duration::from_secs(2);
/// A worker that served this long resets the failure back-off.
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// The wait after the second failure in a row; it doubles with each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to start a failing worker.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long workers get to exit after SIGQUIT before SIGKILL.
const FAST_STOP_GRACE: Duration = Duration::from_secs(1);

/// What the master is doing, logged at each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No worker has been ready yet.
    Starting,
    Running,
    /// Stopping every worker; exits when none is left or at the deadline.
    Stopping {
        fast: bool,
        deadline: Instant,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping { fast: false, .. } => "stopping (graceful)",
            Phase::Stopping { fast: true, .. } => "stopping (fast)",
        }
    }
}

/// Where a worker is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Booting or serving: neither told to stop nor aborted.
    InService,
    /// Sent SIGTERM (or SIGQUIT); SIGKILL at the deadline.
    Draining { deadline: Instant },
    /// Sent SIGABRT for silence; SIGKILL at the deadline.
    Aborting { deadline: Instant },
    /// Sent SIGKILL.
    Killed,
}

#[derive(Debug)]
struct WorkerState {
    /// 1, 2, 3… in order of start, for logs.
    serial: u64,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    last_heartbeat: Instant,
    stage: Stage,
    /// Marked for replacement (SIGHUP or `MAX_REQUESTS`), and why: drained once a successor
    /// is ready.
    replace: Option<RestartReason>,
    /// Why it was told to drain, for the restart count; none when the master is stopping.
    retired_for: Option<RestartReason>,
    /// Its entry in the connection-balancing table, if it got one.
    slot: Option<usize>,
    /// It answered a request (it said so with [`Message::Served`]).
    served: bool,
    /// The master aborted it for silence.
    aborted: bool,
    /// Whether its own memory was over the memory line when it said it was ready, before it
    /// served anything; none without a line.
    started_over_line: Option<bool>,
}

impl WorkerState {
    fn in_service(&self) -> bool {
        self.stage == Stage::InService
    }

    /// Whether this worker ever did its job: it answered a request, or its runtime kept beating
    /// for a whole `GUNICORN_TIMEOUT` after it said it was ready (no traffic is no failure).
    /// A worker that is ready and then blocks at once is not useful: its boot failed.
    fn useful(&self, timeout: Duration) -> bool {
        self.served || self.ready_at.is_some_and(|ready| self.last_heartbeat >= ready + timeout)
    }
}

/// The master's state.
pub struct Master {
    config: Arc<Config>,
    config_json: String,
    /// The binary each worker runs.
    worker_program: PathBuf,
    /// The master's copy of the socket, at a high fd number; dropped when stopping.
    listener: Option<OwnedFd>,
    /// The connection-balancing table and its memfd at a high fd number, if the kernel has memfd.
    slots: Option<(SlotTable, OwnedFd)>,
    /// The metrics table and its memfd at a high fd number, if the kernel has memfd.
    metrics: Option<(Arc<MetricsTable>, OwnedFd)>,
    workers: BTreeMap<Pid, WorkerState>,
    target: usize,
    phase: Phase,
    phase_tx: watch::Sender<Phase>,
    next_serial: u64,
    /// Failures since the last stable worker; reset by a worker that served [`STABLE_AFTER`].
    backoff: Backoff,
    /// Boots that failed while no worker has ever been useful.
    failed_boots: u32,
    last_failure: Option<String>,
    /// Whether any worker was ever useful (see [`WorkerState::useful`]): until then, failed
    /// boots count towards `HERDSMAN_BOOT_ATTEMPTS`.
    ever_useful: bool,
    next_spawn_at: Instant,
    messages_tx: mpsc::UnboundedSender<(Pid, Message)>,
    messages_rx: mpsc::UnboundedReceiver<(Pid, Message)>,
    /// The port bound (the one picked, with `PORT=0`): it names the control socket.
    port: u16,
    operator_tx: mpsc::Sender<operator::OperatorCall>,
    operator_rx: mpsc::Receiver<operator::OperatorCall>,
    /// When the workers' memory is read next (see [`memory`]).
    next_memory_check: Instant,
    /// Whether the log said that the memory line is below a fresh worker's memory.
    memory_line_too_low_told: bool,
}

/// Binds the socket and runs the master, driven by signals, until it stops.
pub fn run(config: Config) -> Exit {
    become_subreaper();
    let listener = match listener::bind(config.bind_addr()) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.bind_addr());
            return Exit::Failure;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the master's runtime: {e}");
            return Exit::Failure;
        }
    };
    runtime.block_on(async move {
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return Exit::Failure;
            }
        };
        match Master::new(config, listener) {
            Ok(master) => master.run(signals.into_intents()).await,
            Err(e) => {
                tracing::error!("cannot start the master: {e}");
                Exit::Failure
            }
        }
    })
}

/// An intent and the name of what sent it (a signal's name), for the log.
pub type NamedIntent = (Intent, &'static str);

impl Master {
    /// A master for `listener`; it starts workers once [`Master::run`] runs. Must be created
    /// inside a tokio runtime (current-thread: the master never runs a multi-threaded one).
    pub fn new(config: Config, listener: TcpListener) -> std::io::Result<Master> {
        let local = listener.local_addr()?;
        tracing::info!("Starting herdsman {}", env!("CARGO_PKG_VERSION"));
        tracing::info!("Listening at: http://{local} ({})", std::process::id());
        tracing::info!(
            "Using {} workers, timeout {}s, graceful timeout {}s",
            config.workers,
            config.timeout.as_secs_f64(),
            config.graceful_timeout.as_secs_f64()
        );
        if cfg!(panic = "abort") {
            // The crate embedding herdsman chose it in its release profile; nothing else says so.
            tracing::warn!(
                "built with panic = \"abort\": a handler that panics kills its worker and every request on it, \
                 instead of answering 500 (set panic = \"unwind\" in the [profile] that builds this binary)"
            );
        }
        let listener = move_above_contract_fds(OwnedFd::from(listener))?;
        let slots = match SlotTable::create().and_then(|table| {
            let fd = move_above_contract_fds(table.fd().try_clone()?)?;
            Ok((table, fd))
        }) {
            Ok(slots) => Some(slots),
            Err(e) => {
                tracing::warn!("workers will accept without connection balancing: {e}");
                None
            }
        };
        let metrics = match MetricsTable::create().and_then(|table| {
            let fd = move_above_contract_fds(table.fd().try_clone()?)?;
            Ok((Arc::new(table), fd))
        }) {
            Ok(metrics) => Some(metrics),
            Err(e) => {
                tracing::warn!("workers will not be counted in the metrics: {e}");
                None
            }
        };
        let config_json = serde_json::to_string(&config).map_err(std::io::Error::other)?;
        let (messages_tx, messages_rx) = mpsc::unbounded_channel();
        let (operator_tx, operator_rx) = mpsc::channel(16);
        let (phase_tx, _) = watch::channel(Phase::Starting);
        let now = Instant::now();
        Ok(Master {
            target: config.workers,
            config: Arc::new(config),
            config_json,
            worker_program: std::env::current_exe()?,
            listener: Some(listener),
            slots,
            metrics,
            workers: BTreeMap::new(),
            phase: Phase::Starting,
            phase_tx,
            next_serial: 1,
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF).free_retries(1),
            failed_boots: 0,
            last_failure: None,
            ever_useful: false,
            next_spawn_at: now,
            messages_tx,
            messages_rx,
            port: local.port(),
            operator_tx,
            operator_rx,
            next_memory_check: now,
            memory_line_too_low_told: false,
        })
    }

    /// The binary started as each worker; default this one. (A test runs the master in its
    /// own process with the real `herdsman` binary as workers.)
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Master {
        self.worker_program = path.into();
        self
    }

    /// The master's phase, now and at each change.
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// Runs the master until it stops; returns the process exit status. `intents` is what it
    /// is asked to do (the signals, in the binary); a closed channel just asks nothing more.
    pub async fn run(mut self, mut intents: mpsc::Receiver<NamedIntent>) -> Exit {
        if let Err(e) = self.serve_metrics() {
            tracing::error!("cannot serve metrics on port {}: {e}", self.config.metrics_port.unwrap_or_default());
            return Exit::Failure;
        }
        self.serve_operator();
        self.announce_memory_line();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                Some((intent, name)) = intents.recv() => self.on_intent(intent, name),
                Some((pid, message)) = self.messages_rx.recv() => self.on_message(pid, message),
                Some((request, answer)) = self.operator_rx.recv() => {
                    let reply = self.on_operator(request);
                    let _ = answer.send(reply);
                }
                _ = ticker.tick() => {}
            }
            self.reap();
            if let Some(exit) = self.step(Instant::now()) {
                return exit;
            }
        }
    }

    /// Starts the `/metrics` server when `HERDSMAN_METRICS_PORT` is set.
    fn serve_metrics(&self) -> std::io::Result<()> {
        let (Some(port), Some((table, _))) = (self.config.metrics_port, &self.metrics) else { return Ok(()) };
        let listener = metrics::server::bind(std::net::SocketAddr::new(self.config.host, port))?;
        tracing::info!("Serving metrics at: http://{}/metrics", listener.local_addr()?);
        metrics::server::spawn(listener, table.clone())
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase != phase {
            tracing::info!("master phase: {} -> {}", self.phase.name(), phase.name());
            self.phase = phase;
            self.phase_tx.send_replace(phase);
        }
    }

    fn on_intent(&mut self, intent: Intent, name: &str) {
        if intent != Intent::ReapChildren {
            tracing::info!("Handling signal: {name}");
        }
        let now = Instant::now();
        match (intent, self.phase) {
            (Intent::ReapChildren, _) => {} // reaped after every event
            (Intent::GracefulStop, Phase::Stopping { fast: false, .. }) | (Intent::FastStop, _) => self.stop(now, true),
            (Intent::GracefulStop, Phase::Stopping { fast: true, .. }) => {}
            (Intent::GracefulStop, _) => self.stop(now, false),
            (_, Phase::Stopping { .. }) => tracing::info!("ignoring {name} while stopping"),
            (Intent::RollingRestart, _) => {
                let mut marked = 0;
                for worker in self.workers.values_mut().filter(|w| w.in_service()) {
                    worker.replace = Some(RestartReason::Reload);
                    marked += 1;
                }
                tracing::info!("rolling restart: replacing {marked} workers one at a time");
            }
            (Intent::AddWorker, _) => {
                self.target = (self.target + 1).min(crate::config::MAX_WORKERS);
                tracing::info!("worker count raised to {}", self.target);
            }
            (Intent::RemoveWorker, _) => {
                self.target = self.target.saturating_sub(1).max(1);
                tracing::info!("worker count lowered to {}", self.target);
            }
        }
    }

    fn stop(&mut self, now: Instant, fast: bool) {
        let (grace, signal) =
            if fast { (FAST_STOP_GRACE, Signal::SIGQUIT) } else { (self.config.graceful_timeout, Signal::SIGTERM) };
        tracing::info!(
            "Shutting down: {} stop, {} workers, deadline {}s",
            if fast { "fast" } else { "graceful" },
            self.workers.len(),
            grace.as_secs_f64()
        );
        let deadline = now + grace;
        self.set_phase(Phase::Stopping { fast, deadline });
        // Workers hold their own copies of the socket; once they close theirs it is gone.
        self.listener = None;
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            if let Some(worker) = self.workers.get_mut(&pid) {
                if matches!(worker.stage, Stage::InService | Stage::Draining { .. }) {
                    worker.stage = Stage::Draining { deadline };
                    send(pid, signal);
                }
            }
        }
    }

    fn on_message(&mut self, pid: Pid, message: Message) {
        let now = Instant::now();
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        worker.last_heartbeat = now;
        match message {
            Message::Heartbeat => {}
            Message::Served => worker.served = true,
            Message::Ready => {
                if worker.ready_at.is_none() {
                    worker.ready_at = Some(now);
                    tracing::info!(
                        "Worker {} (pid:{pid}) ready in {} ms",
                        worker.serial,
                        (now - worker.spawned_at).as_millis()
                    );
                    if self.phase == Phase::Starting {
                        self.set_phase(Phase::Running);
                    }
                    self.note_memory_at_ready(pid);
                }
            }
            Message::Recycle => {
                if worker.in_service() && worker.replace.is_none() {
                    tracing::info!(
                        "Worker {} (pid:{pid}) reached MAX_REQUESTS; starting its replacement",
                        worker.serial
                    );
                    worker.replace = Some(RestartReason::MaxRequests);
                }
            }
        }
    }

    fn kill_remaining(&mut self, why: &str) {
        for (&pid, worker) in self.workers.iter_mut() {
            if worker.stage != Stage::Killed {
                tracing::warn!("Worker {} (pid:{pid}) {why}; sending SIGKILL", worker.serial);
                worker.stage = Stage::Killed;
                send(pid, Signal::SIGKILL);
            }
        }
    }
}

/// Makes orphaned descendants (a worker's subprocess whose worker died) children of the master,
/// as they would be of PID 1 in a container, so the master reaps them the same way everywhere.
fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::debug!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
    }
}

pub(super) fn send(pid: Pid, signal: Signal) {
    if let Err(e) = kill(pid, signal) {
        // ESRCH: it exited already and will be reaped.
        if e != Errno::ESRCH {
            tracing::warn!("cannot send {signal} to pid {pid}: {e}");
        }
    }
}
