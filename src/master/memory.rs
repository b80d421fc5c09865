//! Memory recycling: a worker whose own memory passes `HERDSMAN_MAX_WORKER_MEMORY` is replaced
//! the way `MAX_REQUESTS` replaces one (its successor serves first, then it drains), one worker
//! at a time.
//!
//! "Own memory" is the worker's proportional set size (PSS, `Pss:` of
//! `/proc/PID/smaps_rollup`): its private pages plus its share of the pages it shares (the
//! binary's text, libraries) divided by the number of processes mapping them. Summed over the
//! workers it is what they cost the container, so a line of "80 % of the limit divided among
//! the workers" keeps their total under 80 % of the limit; RSS would count every shared page
//! once per worker (puma_worker_killer's double count). Private RSS (`Private_Clean` +
//! `Private_Dirty`) would leave the shared pages out altogether, and with them the sum.
//!
//! Where `smaps_rollup` cannot be read (Linux before 4.14), the anonymous resident memory from
//! `/proc/PID/statm` (resident minus file-backed and shared pages) stands in: a worker is
//! exec'd, not forked from a preloaded master, so its anonymous pages are its own.
//!
//! `smaps_rollup` walks the worker's mappings under its memory-map lock, so it is read every
//! [`MEMORY_CHECK_EVERY`] rather than on each 100 ms tick (BENCHMARKS.md has its cost).

use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use super::{Master, Stage};
use crate::metrics::RestartReason;

/// How often each serving worker's memory is read. A worker leaking 20 MiB/s passes its line by
/// at most 10 MiB before the master sees it.
pub(super) const MEMORY_CHECK_EVERY: Duration = Duration::from_millis(500);

/// What a worker's own memory was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// `Pss` of `/proc/PID/smaps_rollup`.
    Pss,
    /// Resident minus shared pages of `/proc/PID/statm`, where `smaps_rollup` is unreadable.
    AnonymousRss,
}

impl Measure {
    pub fn name(self) -> &'static str {
        match self {
            Measure::Pss => "PSS",
            Measure::AnonymousRss => "anonymous RSS",
        }
    }
}

/// A worker's own memory in bytes, and how it was read; `None` when the process is gone.
pub fn own_memory(pid: i32) -> Option<(u64, Measure)> {
    let proc = std::path::Path::new("/proc").join(pid.to_string());
    if let Some(pss) = std::fs::read_to_string(proc.join("smaps_rollup")).ok().as_deref().and_then(pss_bytes) {
        return Some((pss, Measure::Pss));
    }
    let statm = std::fs::read_to_string(proc.join("statm")).ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some((anonymous_pages(&statm)? * page as u64, Measure::AnonymousRss))
}

/// The `Pss:` line of `smaps_rollup`, in bytes (the file gives kB).
fn pss_bytes(smaps_rollup: &str) -> Option<u64> {
    let kib = smaps_rollup.lines().find_map(|line| line.strip_prefix("Pss:"))?.split_whitespace().next()?;
    kib.parse::<u64>().ok().map(|kib| kib << 10)
}

/// Resident minus shared (file-backed and shmem) pages of `statm`: size, resident, shared, ...
fn anonymous_pages(statm: &str) -> Option<u64> {
    let mut fields = statm.split_whitespace().skip(1).map(|field| field.parse::<u64>().ok());
    let (resident, shared) = (fields.next()??, fields.next()??);
    Some(resident.saturating_sub(shared))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

impl Master {
    /// Logs the line once at start, with what it is made of.
    pub(super) fn announce_memory_line(&self) {
        let Some(line) = self.config.max_worker_memory else { return };
        tracing::info!(
            "Workers whose own memory (PSS) passes {:.1} MiB are replaced (HERDSMAN_MAX_WORKER_MEMORY={}{})",
            mib(line.per_worker(self.target)),
            String::from(line),
            match line {
                crate::config::MemoryLine::Share { .. } => format!(" among {} workers", self.target),
                crate::config::MemoryLine::Bytes(_) => String::new(),
            }
        );
    }

    /// Every [`MEMORY_CHECK_EVERY`], reads each serving worker's own memory and marks the one
    /// furthest over the line for replacement, unless a worker is already being replaced for
    /// its memory (marked, or draining): one at a time, never a burst of new workers.
    pub(super) fn check_memory(&mut self, now: Instant) {
        let Some(line) = self.config.max_worker_memory else { return };
        if now < self.next_memory_check {
            return;
        }
        self.next_memory_check = now + MEMORY_CHECK_EVERY;
        let limit = line.per_worker(self.target);
        let busy = self.workers.values().any(|w| {
            (w.in_service() && w.replace.is_some())
                || (matches!(w.stage, Stage::Draining { .. }) && w.retired_for == Some(RestartReason::Memory))
        });
        let mut worst: Option<(Pid, u64, Measure)> = None;
        for (&pid, worker) in self.workers.iter_mut() {
            if !worker.in_service() || worker.ready_at.is_none() || worker.replace.is_some() {
                continue;
            }
            let first_reading = worker.memory_at_start.is_none();
            if busy && !first_reading {
                continue;
            }
            let Some((bytes, measure)) = own_memory(pid.as_raw()) else { continue };
            if first_reading {
                worker.memory_at_start = Some(bytes);
                if bytes > limit && !self.memory_line_too_low_told {
                    self.memory_line_too_low_told = true;
                    tracing::warn!(
                        "Worker {} (pid:{pid}) uses {:.1} MiB of its own memory ({}) as soon as it is ready, over HERDSMAN_MAX_WORKER_MEMORY {:.1} MiB: the line is too low; workers that start over it are not replaced",
                        worker.serial,
                        mib(bytes),
                        measure.name(),
                        mib(limit)
                    );
                }
            }
            // A worker that started over the line would only be replaced by another one.
            let started_over = worker.memory_at_start.is_some_and(|start| start > limit);
            if bytes > limit && !started_over && worst.is_none_or(|(_, most, _)| bytes > most) {
                worst = Some((pid, bytes, measure));
            }
        }
        let Some((pid, bytes, measure)) = worst.filter(|_| !busy) else { return };
        if let Some(worker) = self.workers.get_mut(&pid) {
            tracing::warn!(
                "Worker {} (pid:{pid}) uses {:.1} MiB of its own memory ({}), over HERDSMAN_MAX_WORKER_MEMORY {:.1} MiB: replacing it",
                worker.serial,
                mib(bytes),
                measure.name(),
                mib(limit)
            );
            worker.replace = Some(RestartReason::Memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup_and_anonymous_rss_from_statm() {
        let rollup = "55d0-7ffc ---p 00000000 00:00 0  [rollup]\nRss:  1692 kB\nPss:  274 kB\nPss_Dirty: 108 kB\n";
        assert_eq!(pss_bytes(rollup), Some(274 << 10));
        assert_eq!(pss_bytes("Rss: 12 kB\n"), None);
        assert_eq!(anonymous_pages("765 410 382 5 0 123 0\n"), Some(28));
        assert_eq!(anonymous_pages("765"), None);
    }

    #[test]
    fn this_process_has_own_memory() {
        let (bytes, measure) = own_memory(std::process::id() as i32).unwrap();
        assert!(bytes > 0);
        assert!(matches!(measure, Measure::Pss | Measure::AnonymousRss));
        assert_eq!(own_memory(i32::MAX), None);
    }
}
