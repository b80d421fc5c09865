//! Policy: what the master does about what it sees, decided on every tick by [`Master::step`]
//! comparing what is with what should be: abort silent workers, kill those past their
//! deadline, mark one over the memory line (see [`super::memory`]), retire surplus or replaced
//! ones once their successors serve, start missing ones one at a time and after the back-off.

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{send, Master, Phase, Stage, ABORT_GRACE, BOOT_STAGGER, DRAIN_MARGIN, STABLE_AFTER};
use crate::exit::Exit;
use crate::metrics::RestartReason;

impl Master {
    /// Brings the workers closer to what they should be. Returns the exit status when the
    /// master is done.
    pub(super) fn step(&mut self, now: Instant) -> Option<Exit> {
        self.publish_metrics(now);
        if let Phase::Stopping { deadline, .. } = self.phase {
            if self.workers.is_empty() {
                tracing::info!("Shutting down: Master (all workers stopped)");
                return Some(Exit::Clean);
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
            return Some(Exit::NoWorkerBooted);
        }
        self.enforce_deadlines(now);
        self.check_memory(now);
        self.retire_surplus(now);
        self.spawn_missing(now);
        None
    }

    /// What the master alone knows, for every reader of the metrics table.
    fn publish_metrics(&self, now: Instant) {
        let Some((table, _)) = &self.metrics else { return };
        let serving = self.workers.values().filter(|w| w.in_service() && w.ready_at.is_some());
        let (count, oldest) = serving.fold((0, std::time::Duration::ZERO), |(count, oldest), w| {
            (count + 1, oldest.max(now.saturating_duration_since(w.last_heartbeat)))
        });
        table.publish_workers(count, oldest.as_millis() as u64);
    }

    fn enforce_deadlines(&mut self, now: Instant) {
        if self.workers.values().any(|w| w.ready_at.is_some_and(|at| now - at >= STABLE_AFTER) && w.in_service()) {
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
            match worker.stage {
                Stage::InService => {
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
                        worker.aborted = true;
                        // The replacement starts on this same step (spawn_missing): the worker
                        // is out of service from now on.
                        match process_state(pid) {
                            Some(state @ ('T' | 't' | 'D')) => {
                                tracing::error!(
                                    "Worker {} (pid:{pid}) is {} (state {state}): it cannot run its diagnostics; sending SIGKILL",
                                    worker.serial,
                                    if state == 'D' { "in uninterruptible sleep" } else { "stopped" }
                                );
                                worker.stage = Stage::Killed;
                                send(pid, Signal::SIGKILL);
                            }
                            _ => {
                                worker.stage = Stage::Aborting { deadline: now + ABORT_GRACE };
                                send(pid, Signal::SIGABRT);
                            }
                        }
                    }
                }
                Stage::Draining { deadline } | Stage::Aborting { deadline } if now >= deadline => {
                    tracing::warn!("Worker {} (pid:{pid}) did not exit in time; sending SIGKILL", worker.serial);
                    worker.stage = Stage::Killed;
                    send(pid, Signal::SIGKILL);
                }
                _ => {}
            }
        }
    }

    /// Drains workers marked for replacement once enough fresh ones serve, and extra workers
    /// after SIGTTOU.
    fn retire_surplus(&mut self, now: Instant) {
        let fresh_ready =
            self.workers.values().filter(|w| w.in_service() && w.replace.is_none() && w.ready_at.is_some()).count();
        let marked: Vec<Pid> =
            self.workers.iter().filter(|(_, w)| w.in_service() && w.replace.is_some()).map(|(pid, _)| *pid).collect();
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
                .filter(|(_, w)| w.in_service() && w.replace.is_none())
                .map(|(pid, w)| (w.serial, *pid))
                .collect();
            fresh.sort_by_key(|(serial, _)| std::cmp::Reverse(*serial));
            to_retire.extend(fresh.into_iter().take(fresh_ready - self.target).map(|(_, pid)| pid));
        }
        for pid in to_retire {
            if let Some(worker) = self.workers.get_mut(&pid) {
                tracing::info!("Worker {} (pid:{pid}) retiring: draining", worker.serial);
                worker.retired_for = Some(worker.replace.unwrap_or(RestartReason::Scale));
                worker.stage = Stage::Draining { deadline: now + self.config.graceful_timeout + DRAIN_MARGIN };
                send(pid, Signal::SIGTERM);
            }
        }
    }

    /// Starts one missing worker, if none is booting (or the booting one is taking a while)
    /// and the back-off allows it.
    fn spawn_missing(&mut self, now: Instant) {
        let fresh = self.workers.values().filter(|w| w.in_service() && w.replace.is_none()).count();
        if fresh >= self.target || now < self.next_spawn_at {
            return;
        }
        let booting_recently =
            self.workers.values().any(|w| w.in_service() && w.ready_at.is_none() && now - w.spawned_at < BOOT_STAGGER);
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
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `D`, `T`, `t`, `Z`…), if it can be read.
/// The command name before it is in parentheses and may hold anything, so the letter is the
/// first field after the last `)`.
fn process_state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}
