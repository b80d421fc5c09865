//! Reaping: collecting every exited child, saying why it ended (a crash, a timeout abort, the
//! OOM killer's SIGKILL) and what that means for the next start (back-off, failed boots).

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{Master, Phase, Stage, WorkerState};
use crate::metrics::RestartReason;

impl Master {
    /// Collects every exited child. herdsman may be PID 1, so children it never started
    /// (orphans re-parented to it) are reaped too, quietly.
    pub(super) fn reap(&mut self) {
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
        if let Some((table, _)) = &self.metrics {
            if let Some(slot) = worker.slot {
                table.retire(slot);
            }
            if let Some(reason) = restart_reason(&worker, signal, stopping) {
                table.count_restart(reason);
            }
        }
        let expected = !worker.in_service() || stopping;
        match (worker.stage, signal) {
            (Stage::Aborting { .. }, _) => {
                tracing::warn!("Worker {} (pid:{pid}) {how} after its timeout abort", worker.serial)
            }
            (Stage::Killed, _) => tracing::warn!("Worker {} (pid:{pid}) {how}", worker.serial),
            (Stage::InService, Some(Signal::SIGKILL)) => {
                tracing::error!("Worker {} (pid:{pid}) was sent SIGKILL! Perhaps out of memory?", worker.serial)
            }
            _ if expected && (clean || signal.is_some()) => {
                tracing::info!("Worker {} (pid:{pid}) {how}", worker.serial)
            }
            _ => tracing::error!("Worker {} (pid:{pid}) {how}", worker.serial),
        }
        let failed = match worker.stage {
            Stage::Draining { .. } => false,
            Stage::Aborting { .. } | Stage::Killed => true,
            Stage::InService => !stopping,
        };
        if !failed {
            return;
        }
        // An unplanned death, a hang or a failed boot: the replacement waits out a back-off.
        // A boot failed when the worker never became ready, or when it was ready but never
        // useful and then hung or crashed (a killer from outside, such as the OOM killer, is
        // not the worker's failure).
        let hung_or_crashed = worker.aborted || (worker.in_service() && signal.is_none());
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
}

/// Why a worker that ended counts as a restart, or `None` when the master is stopping (a
/// shutdown replaces nobody).
fn restart_reason(worker: &WorkerState, signal: Option<Signal>, stopping: bool) -> Option<RestartReason> {
    let timed_out = || match worker.ready_at {
        None => RestartReason::BootTimeout,
        Some(_) => RestartReason::Timeout,
    };
    match worker.stage {
        _ if worker.aborted => Some(timed_out()),
        _ if stopping => None,
        Stage::InService if signal == Some(Signal::SIGKILL) => Some(RestartReason::Killed),
        Stage::InService => Some(RestartReason::Crash),
        Stage::Draining { .. } | Stage::Killed => worker.retired_for,
        Stage::Aborting { .. } => Some(timed_out()),
    }
}
