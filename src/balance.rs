//! Spreading connections evenly over the workers that share one socket.
//!
//! All workers accept on the same listening socket, and the kernel gives each new connection to
//! whichever worker calls `accept` first. When connections arrive in a burst — a load balancer
//! or a benchmark opening its keep-alive pool — the first worker to wake up can take nearly all of
//! them, and with keep-alive that imbalance lasts as long as the connections do: one worker
//! saturates a core while the others idle.
//!
//! So the workers publish how many connections each holds, in a small table of [`Slot`]s in
//! memory shared through a `memfd` (the master creates it and hands it to each worker, with the
//! worker's slot number, see [`crate::contract`]). Before accepting, a
//! worker holding more than its fair share (the average over live workers, plus one) waits a
//! moment, so that a less busy worker takes the connection instead. The wait is bounded
//! ([`MAX_DEFERRALS`]) so that no connection is ever left waiting on a worker that cannot accept.
//!
//! A worker counts as live while it keeps stamping its slot from its heartbeat task (see
//! [`crate::control`]): a hung or draining worker stops, and its idle share no longer holds the
//! others back. Nothing here is needed for correctness: without the table (no memfd support, no
//! free slot) every worker simply accepts as before.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::time::TimeValLike;
use nix::time::{clock_gettime, ClockId};

use crate::shared_memory::SharedMemory;

/// Slots in the table: room for the largest `WEB_CONCURRENCY` twice over, since old and new
/// workers overlap during a rolling restart.
pub const SLOT_COUNT: usize = 2 * crate::config::MAX_WORKERS;

/// A worker whose stamp is older than this is left out of the fair share.
const STALE_AFTER_MS: u64 = 2_000;

/// How many times in a row a worker over its share waits before it accepts anyway.
pub const MAX_DEFERRALS: u32 = 3;

/// How long one wait lasts.
pub const DEFERRAL: Duration = Duration::from_millis(1);

/// One worker's entry, on its own cache line so that workers do not slow each other down.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Slot {
    /// Connections the worker holds open.
    connections: AtomicU32,
    /// `CLOCK_MONOTONIC` milliseconds of its last heartbeat; 0 when not accepting.
    stamped_at_ms: AtomicU64,
}

/// The shared table, mapped into this process.
pub struct SlotTable {
    memory: SharedMemory,
}

impl SlotTable {
    /// Creates a zeroed table (the master does this once).
    pub fn create() -> std::io::Result<SlotTable> {
        Ok(SlotTable { memory: SharedMemory::create(c"herdsman-slots", Self::bytes())? })
    }

    /// Maps the table a worker inherited from its master.
    pub fn from_inherited(fd: OwnedFd) -> std::io::Result<SlotTable> {
        Ok(SlotTable { memory: SharedMemory::from_inherited(fd, Self::bytes(), "the table")? })
    }

    fn bytes() -> usize {
        SLOT_COUNT * std::mem::size_of::<Slot>()
    }

    /// The memfd, for the master to hand to workers.
    pub fn fd(&self) -> &OwnedFd {
        self.memory.fd()
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping holds SLOT_COUNT slots (page-aligned, so aligned for them), lives
        // as long as `self`, and every access to a slot goes through atomics, valid for any bit
        // pattern (all zero on a fresh memfd).
        unsafe { std::slice::from_raw_parts(self.memory.start().cast::<Slot>().as_ptr(), SLOT_COUNT) }
    }

    /// Forgets whatever a worker left in slot `index` (the master, when it reaps the worker).
    pub fn clear(&self, index: usize) {
        if let Some(slot) = self.slots().get(index) {
            slot.connections.store(0, Ordering::Relaxed);
            slot.stamped_at_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Marks slot `index` as live now (a worker, from its heartbeat task).
    fn stamp(&self, index: usize) {
        if let Some(slot) = self.slots().get(index) {
            slot.stamped_at_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Marks slot `index` as no longer accepting (a worker, when it starts to drain).
    fn withdraw(&self, index: usize) {
        if let Some(slot) = self.slots().get(index) {
            slot.stamped_at_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one more open connection for slot `index`, until the guard is dropped.
    fn open_connection(self: &std::sync::Arc<Self>, index: usize) -> OpenConnection {
        if let Some(slot) = self.slots().get(index) {
            slot.connections.fetch_add(1, Ordering::Relaxed);
        }
        OpenConnection { table: self.clone(), index }
    }

    /// Whether slot `index` holds more than the average of the live slots, plus one.
    fn over_fair_share(&self, index: usize) -> bool {
        let now = now_ms();
        let (mut total, mut live) = (0u64, 0u64);
        for slot in self.slots() {
            let stamped = slot.stamped_at_ms.load(Ordering::Relaxed);
            if stamped != 0 && now.saturating_sub(stamped) < STALE_AFTER_MS {
                total += u64::from(slot.connections.load(Ordering::Relaxed));
                live += 1;
            }
        }
        let mine = self.slots().get(index).map_or(0, |s| u64::from(s.connections.load(Ordering::Relaxed)));
        // mine > total / live + 1, without the rounding of an integer division.
        live > 1 && mine * live > total + live
    }
}

/// One open connection in a worker's count; dropping it closes the count.
pub struct OpenConnection {
    table: std::sync::Arc<SlotTable>,
    index: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(slot) = self.table.slots().get(self.index) {
            slot.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A worker's own slot in the table.
pub struct WorkerSlot {
    table: std::sync::Arc<SlotTable>,
    index: usize,
    /// Set when the worker drains: its heartbeat goes on, its share does not.
    withdrawn: std::sync::atomic::AtomicBool,
}

impl WorkerSlot {
    /// Slot `index` of the table a worker inherited.
    pub fn from_inherited(fd: OwnedFd, index: usize) -> std::io::Result<WorkerSlot> {
        if index >= SLOT_COUNT {
            return Err(std::io::Error::other(format!("slot {index} is out of the table")));
        }
        let table = SlotTable::from_inherited(fd)?;
        Ok(WorkerSlot { table: std::sync::Arc::new(table), index, withdrawn: Default::default() })
    }

    /// Marks this worker live (from the heartbeat task, inside the runtime).
    pub fn stamp(&self) {
        if !self.withdrawn.load(Ordering::Relaxed) {
            self.table.stamp(self.index);
        }
    }

    /// Leaves the fair share for good: this worker accepts no more connections.
    pub fn withdraw(&self) {
        self.withdrawn.store(true, Ordering::Relaxed);
        self.table.withdraw(self.index);
    }

    pub fn open_connection(&self) -> OpenConnection {
        self.table.open_connection(self.index)
    }

    /// Waits (briefly, at most [`MAX_DEFERRALS`] × [`DEFERRAL`]) while this worker holds more
    /// than its share, so that a less busy worker accepts the next connection.
    pub async fn wait_for_fair_share(&self) {
        for _ in 0..MAX_DEFERRALS {
            if !self.table.over_fair_share(self.index) {
                return;
            }
            tokio::time::sleep(DEFERRAL).await;
        }
    }
}

/// Milliseconds of `CLOCK_MONOTONIC`, which every process on the machine shares.
fn now_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.num_milliseconds().max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_worker_over_its_share_defers_to_the_others() {
        let table = Arc::new(SlotTable::create().unwrap());
        table.stamp(0);
        table.stamp(1);
        let held: Vec<_> = (0..3).map(|_| table.open_connection(0)).collect();
        // 3 against 0: worker 0 holds more than (3 / 2) + 1.
        assert!(table.over_fair_share(0));
        assert!(!table.over_fair_share(1));
        let other: Vec<_> = (0..2).map(|_| table.open_connection(1)).collect();
        assert!(!table.over_fair_share(0), "3 against 2 is fair enough");
        drop(other);
        drop(held);
        assert!(!table.over_fair_share(0));
    }

    #[test]
    fn a_lone_or_silent_peer_does_not_hold_a_worker_back() {
        let table = Arc::new(SlotTable::create().unwrap());
        table.stamp(0);
        let _held: Vec<_> = (0..10).map(|_| table.open_connection(0)).collect();
        assert!(!table.over_fair_share(0), "alone: everything is its share");
        table.stamp(1);
        assert!(table.over_fair_share(0));
        table.withdraw(1);
        assert!(!table.over_fair_share(0), "a draining peer takes no connections");
        table.stamp(1);
        table.clear(1);
        assert!(!table.over_fair_share(0), "a reaped peer is forgotten");
    }
}
