//! Spawning: a worker is this same binary re-executed with the contract's descriptors and
//! variables (see [`crate::contract`]), and a task that forwards its control-pipe messages to
//! the master's loop.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::{Master, Stage, WorkerState};
use crate::balance;
use crate::contract::{self, Handoff};
use crate::control::Message;

impl Master {
    pub(super) fn spawn_worker(&mut self, now: Instant) -> std::io::Result<Pid> {
        let Some(listener) = self.listener.as_ref() else {
            return Err(std::io::Error::other("the listening socket is closed"));
        };
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let write_end = contract::move_above_contract_fds(write_end)?;
        let serial = self.next_serial;
        let slot = self.slots.as_ref().and_then(|(_, fd)| Some((fd, self.free_slot()?)));

        let mut command = Command::new(&self.worker_program);
        command.stdin(Stdio::null());
        contract::prepare_worker(
            &mut command,
            &Handoff {
                listener,
                control: &write_end,
                slots: slot,
                metrics: self.metrics.as_ref().map(|(_, fd)| fd),
                config_json: &self.config_json,
            },
        );
        let slot = slot.map(|(_, index)| index);
        let child = command.spawn()?;
        if let (Some((table, _)), Some(slot)) = (&self.metrics, slot) {
            table.claim(slot);
        }
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
                stage: Stage::InService,
                replace: None,
                retired_for: None,
                slot,
                served: false,
                aborted: false,
                started_over_line: None,
            },
        );
        self.listen_to(pid, read_end)?;
        Ok(pid)
    }

    /// The lowest slot no live worker holds.
    pub(super) fn free_slot(&self) -> Option<usize> {
        let taken: std::collections::HashSet<usize> = self.workers.values().filter_map(|w| w.slot).collect();
        (0..balance::SLOT_COUNT).find(|slot| !taken.contains(slot))
    }

    /// Forwards a worker's pipe messages to the main loop until the worker closes it.
    pub(super) fn listen_to(&self, pid: Pid, read_end: OwnedFd) -> std::io::Result<()> {
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
}
