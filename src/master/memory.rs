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
//! Reading `smaps_rollup` walks the worker's page tables: its cost grows with the worker's
//! resident memory (BENCHMARKS.md has the figures), too much to pay for every worker every few
//! hundred milliseconds. PSS is never above RSS, which `/proc/PID/statm` gives for a few
//! microseconds whatever the size: a worker whose RSS is under the line is under it, and only
//! one whose RSS passes the line has its PSS read, every [`MEMORY_CHECK_EVERY`].

use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use super::Master;
use crate::metrics::RestartReason;

/// How often each serving worker's memory is read. A worker leaking 40 MiB/s passes its line by
/// at most 10 MiB before the master sees it.
pub(super) const MEMORY_CHECK_EVERY: Duration = Duration::from_millis(250);

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
    let (resident, shared) = statm_bytes(pid)?;
    Some((resident.saturating_sub(shared), Measure::AnonymousRss))
}

/// A process's resident memory (RSS), from `/proc/PID/statm`: a few microseconds whatever its
/// size, so it is read first and bounds the PSS from above. `None` when the process is gone.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    statm_bytes(pid).map(|(resident, _)| resident)
}

/// Resident and shared (file-backed and shmem) memory of `/proc/PID/statm`, in bytes.
fn statm_bytes(pid: i32) -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string(std::path::Path::new("/proc").join(pid.to_string()).join("statm")).ok()?;
    let (resident, shared) = statm_pages(&statm)?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()?? as u64;
    Some((resident * page, shared * page))
}

/// The `Pss:` line of `smaps_rollup`, in bytes (the file gives kB).
fn pss_bytes(smaps_rollup: &str) -> Option<u64> {
    let kib = smaps_rollup.lines().find_map(|line| line.strip_prefix("Pss:"))?.split_whitespace().next()?;
    kib.parse::<u64>().ok().map(|kib| kib << 10)
}

/// The resident and shared pages of `statm`: size, resident, shared, ...
fn statm_pages(statm: &str) -> Option<(u64, u64)> {
    let mut fields = statm.split_whitespace().skip(1).map(|field| field.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
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

    /// Reads a worker's memory as it says it is ready, before it serves: one over the line
    /// then is never replaced for it (its successor would start over it too), and the log says
    /// the line is too low.
    pub(super) fn note_memory_at_ready(&mut self, pid: Pid) {
        let Some(line) = self.config.max_worker_memory else { return };
        let limit = line.per_worker(self.target);
        let over = own_memory(pid.as_raw()).filter(|(own, _)| *own > limit);
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        worker.started_over_line = Some(over.is_some());
        if let Some((bytes, measure)) = over.filter(|_| !self.memory_line_too_low_told) {
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

    /// Every [`MEMORY_CHECK_EVERY`], reads each serving worker's memory and marks the one
    /// furthest over the line for replacement, unless a worker marked for replacement still
    /// waits for its successor: one new worker at a time, never a burst. A worker draining
    /// does not hold the next one back: it takes no new requests, so it no longer grows, while
    /// the others take its share of them and grow faster.
    pub(super) fn check_memory(&mut self, now: Instant) {
        let Some(line) = self.config.max_worker_memory else { return };
        if now < self.next_memory_check {
            return;
        }
        self.next_memory_check = now + MEMORY_CHECK_EVERY;
        if self.workers.values().any(|w| w.in_service() && w.replace.is_some()) {
            return;
        }
        let limit = line.per_worker(self.target);
        let candidates = self.workers.iter().filter(|(_, w)| {
            w.in_service() && w.ready_at.is_some() && w.replace.is_none() && w.started_over_line != Some(true)
        });
        // RSS bounds PSS from above: only a worker whose RSS passes the line costs a walk.
        let worst = candidates
            .filter(|(pid, _)| resident_bytes(pid.as_raw()).is_some_and(|rss| rss > limit))
            .filter_map(|(&pid, _)| Some((pid, own_memory(pid.as_raw())?)))
            .filter(|(_, (own, _))| *own > limit)
            .max_by_key(|(_, (own, _))| *own);
        let Some((pid, (bytes, measure))) = worst else { return };
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
        assert_eq!(statm_pages("765 410 382 5 0 123 0\n"), Some((410, 382)));
        assert_eq!(statm_pages("765"), None);
    }

    #[test]
    fn this_process_has_own_memory() {
        let (bytes, measure) = own_memory(std::process::id() as i32).unwrap();
        assert!(bytes > 0);
        assert!(matches!(measure, Measure::Pss | Measure::AnonymousRss));
        assert_eq!(own_memory(i32::MAX), None);
    }
}
