//! The master: binds the port, starts workers, watches them, replaces them, stops them.
//!
//! The master runs a single-threaded tokio runtime and never forks it: each worker is a fresh
//! `exec` of this same binary (see [`crate::worker`] for why). Everything the master does
//! happens in one loop that reacts to three things:
//! - a signal, mapped to an [`Intent`] (see [`crate::signals`]);
//! - a [`Message`] from a worker's control pipe (ready, heartbeat, recycle me);
//! - a tick every [`TICK`], on which it reaps exited children and calls [`Supervisor::step`],
//!   which compares what is with what should be: it aborts silent workers, retires surplus
//!   ones, and starts missing ones, one at a time and with back-off after failures.
//!
//! Replacing a worker (SIGHUP, `MAX_REQUESTS`) is "start the new one, wait until it serves, then
//! drain the old one", so capacity never dips and no request is dropped.
//!
//! The master is often PID 1 in a container: it reaps every child, not only its workers
//! (children of workers re-parented to it are reaped quietly).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::balance::{self, SlotTable, SLOTS_FD};
use crate::config::Config;
use crate::control::{Message, CONTROL_FD};
use crate::listener::{self, LISTEN_FD};
use crate::signals::{Intent, Signals};
use crate::worker;

/// How often the master looks at its workers.
const TICK: Duration = Duration::from_millis(100);
/// A new worker is started only when no other is booting, or this long after the last one:
/// workers never boot all in the same instant.
const BOOT_STAGGER: Duration = Duration::from_millis(200);
/// How long an aborted worker gets to print its diagnostics before SIGKILL.
const ABORT_GRACE: Duration = Duration::from_secs(2);
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

/// Where a worker is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retirement {
    /// Serving, or booting.
    Active,
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
    retirement: Retirement,
    /// Marked for replacement (SIGHUP or `MAX_REQUESTS`): drained once a successor is ready.
    replace: bool,
    /// Its entry in the connection-balancing table, if it got one.
    slot: Option<usize>,
    /// It answered a request (it said so with [`Message::Served`]).
    served: bool,
    /// The master aborted it for silence.
    aborted: bool,
}

impl WorkerState {
    fn is_active(&self) -> bool {
        self.retirement == Retirement::Active
    }

    /// Whether this worker ever did its job: it answered a request, or its runtime kept beating
    /// for a whole `GUNICORN_TIMEOUT` after it said it was ready (no traffic is no failure).
    /// A worker that is ready and then blocks at once is not useful: its boot failed.
    fn useful(&self, timeout: Duration) -> bool {
        self.served || self.ready_at.is_some_and(|ready| self.last_heartbeat >= ready + timeout)
    }
}

/// The master's state.
pub struct Supervisor {
    config: Arc<Config>,
    config_json: String,
    /// The master's copy of the socket, at a high fd number; dropped when stopping.
    listener: Option<OwnedFd>,
    /// The connection-balancing table and its memfd at a high fd number, if the kernel has memfd.
    slots: Option<(SlotTable, OwnedFd)>,
    workers: BTreeMap<Pid, WorkerState>,
    target: usize,
    phase: Phase,
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
}

/// Binds the socket and runs the master until it stops. Returns the process exit status.
pub fn run(config: Config) -> ExitCode {
    become_subreaper();
    let listener = match listener::bind(config.bind_addr()) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.bind_addr());
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the master's runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match Supervisor::new(config, listener) {
            Ok(supervisor) => supervisor.run().await,
            Err(e) => {
                tracing::error!("cannot start the master: {e}");
                ExitCode::from(1)
            }
        }
    })
}

impl Supervisor {
    fn new(config: Config, listener: TcpListener) -> std::io::Result<Supervisor> {
        let local = listener.local_addr()?;
        tracing::info!("Starting herdsman {}", env!("CARGO_PKG_VERSION"));
        tracing::info!("Listening at: http://{local} ({})", std::process::id());
        tracing::info!(
            "Using {} workers, timeout {}s, graceful timeout {}s",
            config.workers,
            config.timeout.as_secs_f64(),
            config.graceful_timeout.as_secs_f64()
        );
        // Move the socket above the fds a worker expects, so that placing it on fd 3 in the
        // child can never overwrite the pipe (or the other way round).
        let listener = move_above_reserved_fds(OwnedFd::from(listener))?;
        let slots = match SlotTable::create().and_then(|table| {
            let fd = move_above_reserved_fds(table.fd().try_clone()?)?;
            Ok((table, fd))
        }) {
            Ok(slots) => Some(slots),
            Err(e) => {
                tracing::warn!("workers will accept without connection balancing: {e}");
                None
            }
        };
        let config_json = serde_json::to_string(&config).map_err(std::io::Error::other)?;
        let (messages_tx, messages_rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        Ok(Supervisor {
            target: config.workers,
            config: Arc::new(config),
            config_json,
            listener: Some(listener),
            slots,
            workers: BTreeMap::new(),
            phase: Phase::Starting,
            next_serial: 1,
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF).free_retries(1),
            failed_boots: 0,
            last_failure: None,
            ever_useful: false,
            next_spawn_at: now,
            messages_tx,
            messages_rx,
        })
    }

    async fn run(mut self) -> ExitCode {
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                (intent, name) = signals.recv() => self.on_intent(intent, name),
                Some((pid, message)) = self.messages_rx.recv() => self.on_message(pid, message),
                _ = ticker.tick() => {}
            }
            self.reap();
            if let Some(exit) = self.step(Instant::now()) {
                return exit;
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase != phase {
            tracing::debug!("master phase: {:?} -> {:?}", self.phase, phase);
            self.phase = phase;
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
                for worker in self.workers.values_mut().filter(|w| w.is_active()) {
                    worker.replace = true;
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
                if matches!(worker.retirement, Retirement::Active | Retirement::Draining { .. }) {
                    worker.retirement = Retirement::Draining { deadline };
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
                }
            }
            Message::Recycle => {
                if worker.is_active() && !worker.replace {
                    tracing::info!(
                        "Worker {} (pid:{pid}) reached MAX_REQUESTS; starting its replacement",
                        worker.serial
                    );
                    worker.replace = true;
                }
            }
        }
    }

    /// Collects every exited child. herdsman may be PID 1, so children it never started
    /// (orphans re-parented to it) are reaped too, quietly.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(pid, format!("exited with code {code}"), code == 0, None)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    self.on_exit(pid, format!("was killed by {signal}"), false, Some(signal))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: String, clean: bool, signal: Option<Signal>) {
        let Some(worker) = self.workers.remove(&pid) else {
            tracing::debug!("reaped process {pid} ({how}), not a worker");
            return;
        };
        if let (Some((table, _)), Some(slot)) = (&self.slots, worker.slot) {
            table.clear(slot);
        }
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let expected = !worker.is_active() || stopping;
        match (worker.retirement, signal) {
            (Retirement::Aborting { .. }, _) => {
                tracing::warn!("Worker {} (pid:{pid}) {how} after its timeout abort", worker.serial)
            }
            (Retirement::Killed, _) => tracing::warn!("Worker {} (pid:{pid}) {how}", worker.serial),
            (Retirement::Active, Some(Signal::SIGKILL)) => {
                tracing::error!("Worker {} (pid:{pid}) was sent SIGKILL! Perhaps out of memory?", worker.serial)
            }
            _ if expected && (clean || signal.is_some()) => {
                tracing::info!("Worker {} (pid:{pid}) {how}", worker.serial)
            }
            _ => tracing::error!("Worker {} (pid:{pid}) {how}", worker.serial),
        }
        let failed = match worker.retirement {
            Retirement::Draining { .. } => false,
            Retirement::Aborting { .. } | Retirement::Killed => true,
            Retirement::Active => !stopping,
        };
        if !failed {
            return;
        }
        // An unplanned death, a hang or a failed boot: the replacement waits out a back-off.
        // A boot failed when the worker never became ready, or when it was ready but never
        // useful and then hung or crashed (a killer from outside, such as the OOM killer, is
        // not the worker's failure).
        let hung_or_crashed = worker.aborted || (worker.is_active() && signal.is_none());
        let boot_failed = worker.ready_at.is_none() || (hung_or_crashed && !worker.useful(self.config.timeout));
        self.last_failure = Some(match worker.ready_at {
            Some(_) if boot_failed && worker.aborted => format!(
                "worker {} {how}; its runtime stopped beating before it served a request: blocked during start-up",
                worker.serial
            ),
            _ => format!("worker {} {how}", worker.serial),
        });
        if boot_failed {
            self.failed_boots += 1;
        }
        let wait = self.backoff.fail();
        self.next_spawn_at = self.next_spawn_at.max(Instant::now() + wait);
        if !wait.is_zero() {
            tracing::info!(
                "next worker start in {} ms (failure {} in a row)",
                wait.as_millis(),
                self.backoff.failures()
            );
        }
    }

    /// Brings the workers closer to what they should be. Returns the exit status when the
    /// master is done.
    fn step(&mut self, now: Instant) -> Option<ExitCode> {
        if let Phase::Stopping { deadline, .. } = self.phase {
            if self.workers.is_empty() {
                tracing::info!("Shutting down: Master (all workers stopped)");
                return Some(ExitCode::SUCCESS);
            }
            if now >= deadline {
                self.kill_remaining("did not stop before the deadline");
            }
            return None;
        }
        if !self.ever_useful && self.failed_boots >= self.config.boot_attempts {
            let last = self.last_failure.clone().unwrap_or_default();
            tracing::error!(
                "no worker became ready and useful after {} attempts (last: {last}); exiting with status 3 so that the platform reports a failed deploy",
                self.failed_boots
            );
            self.kill_remaining("the master gives up");
            return Some(ExitCode::from(3));
        }
        self.enforce_deadlines(now);
        self.retire_surplus(now);
        self.spawn_missing(now);
        None
    }

    fn enforce_deadlines(&mut self, now: Instant) {
        if self.workers.values().any(|w| w.ready_at.is_some_and(|at| now - at >= STABLE_AFTER) && w.is_active()) {
            self.backoff.reset();
        }
        if !self.ever_useful && self.workers.values().any(|w| w.useful(self.config.timeout)) {
            tracing::info!(
                "a worker served (or kept beating for GUNICORN_TIMEOUT): the boot-attempt limit no longer applies"
            );
            self.ever_useful = true;
            self.failed_boots = 0;
        }
        for (&pid, worker) in self.workers.iter_mut() {
            match worker.retirement {
                Retirement::Active => {
                    let silent_for = now - worker.last_heartbeat;
                    let timed_out = match worker.ready_at {
                        None => now - worker.spawned_at >= self.config.boot_timeout,
                        Some(_) => silent_for >= self.config.timeout,
                    };
                    if timed_out {
                        if worker.ready_at.is_none() {
                            tracing::error!(
                                "WORKER BOOT TIMEOUT (pid:{pid}): not serving after {}s",
                                self.config.boot_timeout.as_secs_f64()
                            );
                        } else {
                            tracing::error!("WORKER TIMEOUT (pid:{pid}): silent for {:.1}s", silent_for.as_secs_f64());
                        }
                        worker.retirement = Retirement::Aborting { deadline: now + ABORT_GRACE };
                        worker.aborted = true;
                        send(pid, Signal::SIGABRT);
                    }
                }
                Retirement::Draining { deadline } | Retirement::Aborting { deadline } if now >= deadline => {
                    tracing::warn!("Worker {} (pid:{pid}) did not exit in time; sending SIGKILL", worker.serial);
                    worker.retirement = Retirement::Killed;
                    send(pid, Signal::SIGKILL);
                }
                _ => {}
            }
        }
    }

    /// Drains workers marked for replacement once enough fresh ones serve, and extra workers
    /// after SIGTTOU.
    fn retire_surplus(&mut self, now: Instant) {
        let fresh_ready = self.workers.values().filter(|w| w.is_active() && !w.replace && w.ready_at.is_some()).count();
        let marked: Vec<Pid> =
            self.workers.iter().filter(|(_, w)| w.is_active() && w.replace).map(|(pid, _)| *pid).collect();
        let mut surplus = (fresh_ready + marked.len()).saturating_sub(self.target);
        // Oldest marked first: pids are not ordered by age, serials are.
        let mut marked = marked;
        marked.sort_by_key(|pid| self.workers.get(pid).map(|w| w.serial));
        let mut to_retire: Vec<Pid> = marked.into_iter().take(surplus).collect();
        surplus -= to_retire.len();
        if surplus > 0 && fresh_ready > self.target {
            // SIGTTOU: the newest fresh workers go first, the long-lived ones stay.
            let mut fresh: Vec<(u64, Pid)> = self
                .workers
                .iter()
                .filter(|(_, w)| w.is_active() && !w.replace)
                .map(|(pid, w)| (w.serial, *pid))
                .collect();
            fresh.sort_by_key(|(serial, _)| std::cmp::Reverse(*serial));
            to_retire.extend(fresh.into_iter().take(fresh_ready - self.target).map(|(_, pid)| pid));
        }
        for pid in to_retire {
            if let Some(worker) = self.workers.get_mut(&pid) {
                tracing::info!("Worker {} (pid:{pid}) retiring: draining", worker.serial);
                worker.retirement = Retirement::Draining { deadline: now + self.config.graceful_timeout + ABORT_GRACE };
                send(pid, Signal::SIGTERM);
            }
        }
    }

    /// Starts one missing worker, if none is booting (or the booting one is taking a while)
    /// and the back-off allows it.
    fn spawn_missing(&mut self, now: Instant) {
        let fresh = self.workers.values().filter(|w| w.is_active() && !w.replace).count();
        if fresh >= self.target || now < self.next_spawn_at {
            return;
        }
        let booting_recently =
            self.workers.values().any(|w| w.is_active() && w.ready_at.is_none() && now - w.spawned_at < BOOT_STAGGER);
        if booting_recently {
            return;
        }
        match self.spawn_worker(now) {
            Ok(pid) => tracing::info!("Booting worker with pid: {pid}"),
            Err(e) => {
                tracing::error!("cannot start a worker: {e}");
                self.failed_boots += 1;
                self.last_failure = Some(format!("spawn failed: {e}"));
                self.next_spawn_at = now + self.backoff.fail();
            }
        }
    }

    fn spawn_worker(&mut self, now: Instant) -> std::io::Result<Pid> {
        let Some(listener) = self.listener.as_ref() else {
            return Err(std::io::Error::other("the listening socket is closed"));
        };
        let listen_fd = listener.as_raw_fd();
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let write_end = move_above_reserved_fds(write_end)?;
        let write_fd = write_end.as_raw_fd();
        let exe = std::env::current_exe()?;
        let serial = self.next_serial;
        let slots_fd = self.slots.as_ref().map(|(_, fd)| fd.as_raw_fd());
        let slot = slots_fd.and_then(|_| self.free_slot());

        let mut command = Command::new(exe);
        command
            .arg("__worker")
            .env(worker::CONFIG_ENV, &self.config_json)
            .env("HERDSMAN_WORKER_SERIAL", serial.to_string())
            .stdin(Stdio::null());
        if let Some(slot) = slot {
            command.env(balance::SLOT_ENV, slot.to_string());
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (dup2, prctl, getppid). Both sources are above the
        // reserved fds (see move_above_reserved_fds), so neither dup2 clobbers the other;
        // dup2 clears close-on-exec on the copies, which are all the worker inherits.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(listen_fd, LISTEN_FD) < 0 || libc::dup2(write_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(slots_fd) = slots_fd {
                    if libc::dup2(slots_fd, SLOTS_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // If the master dies without a word, its workers drain instead of serving on.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop(write_end);
        let pid = Pid::from_raw(child.id() as i32);
        // The master reaps with waitpid(-1); std's handle is not needed (dropping it neither
        // waits nor kills).
        drop(child);

        self.next_serial += 1;
        self.workers.insert(
            pid,
            WorkerState {
                serial,
                spawned_at: now,
                ready_at: None,
                last_heartbeat: now,
                retirement: Retirement::Active,
                replace: false,
                slot,
                served: false,
                aborted: false,
            },
        );
        self.listen_to(pid, read_end)?;
        Ok(pid)
    }

    /// The lowest slot no live worker holds.
    fn free_slot(&self) -> Option<usize> {
        let taken: std::collections::HashSet<usize> = self.workers.values().filter_map(|w| w.slot).collect();
        (0..balance::SLOT_COUNT).find(|slot| !taken.contains(slot))
    }

    /// Forwards a worker's pipe messages to the main loop until the worker closes it.
    fn listen_to(&self, pid: Pid, read_end: OwnedFd) -> std::io::Result<()> {
        let mut receiver = pipe::Receiver::from_owned_fd(read_end)?;
        let messages = self.messages_tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = receiver.read(&mut buf).await {
                for message in buf[..n].iter().filter_map(|b| Message::from_byte(*b)) {
                    if messages.send((pid, message)).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    fn kill_remaining(&mut self, why: &str) {
        for (&pid, worker) in self.workers.iter_mut() {
            if worker.retirement != Retirement::Killed {
                tracing::warn!("Worker {} (pid:{pid}) {why}; sending SIGKILL", worker.serial);
                worker.retirement = Retirement::Killed;
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

fn send(pid: Pid, signal: Signal) {
    if let Err(e) = kill(pid, signal) {
        // ESRCH: it exited already and will be reaped.
        if e != Errno::ESRCH {
            tracing::warn!("cannot send {signal} to pid {pid}: {e}");
        }
    }
}

/// Duplicates `fd` to a number above 9 (close-on-exec) and closes the original.
fn move_above_reserved_fds(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let high = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: fcntl just returned this new descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}
