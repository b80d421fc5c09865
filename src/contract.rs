//! The master↔worker contract: everything a worker inherits from its master, in one place.
//!
//! The master starts each worker by re-executing its own binary as `herdsman __worker`
//! ([`WORKER_SUBCOMMAND`]). Re-executing rather than forking means the master never forks with
//! a runtime's threads and locks in flight, and a worker starts from a clean process image.
//! What crosses the `exec`:
//!
//! | what                                   | where                  | read by                    |
//! |----------------------------------------|------------------------|----------------------------|
//! | the listening socket                   | fd [`LISTEN_FD`] (3)   | the accept loop            |
//! | the write end of the control pipe      | fd [`CONTROL_FD`] (4)  | [`crate::control`] messages |
//! | the connection-balancing table (memfd) | fd [`SLOTS_FD`] (5)    | [`crate::balance`]         |
//! | the metrics table (memfd)              | fd [`METRICS_FD`] (6)  | [`crate::metrics`]         |
//! | the worker's slot in both tables       | `HERDSMAN_WORKER_SLOT` | [`crate::balance`], [`crate::metrics`] |
//! | the resolved configuration, as JSON    | `HERDSMAN_WORKER_CONFIG` | the whole worker         |
//!
//! The master lays them out in one place ([`prepare_worker`]); the worker takes them in one
//! place ([`take_inherited`]), first thing, before its runtime exists, so that an inherited
//! descriptor can never be confused with one the runtime opened. Taking them checks that each
//! descriptor is what it should be, sets close-on-exec on it (a subprocess the app starts
//! inherits none of them) and removes the variables from the environment.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::stat::{fstat, SFlag};
use socket2::Socket;

use crate::config::Config;

/// The hidden subcommand that makes the binary a worker.
pub const WORKER_SUBCOMMAND: &str = "__worker";
/// The descriptor number under which a worker finds the listening socket.
pub const LISTEN_FD: RawFd = 3;
/// The descriptor number under which a worker finds the write end of its control pipe.
pub const CONTROL_FD: RawFd = 4;
/// The descriptor number under which a worker finds the balancing table, when it has a slot.
pub const SLOTS_FD: RawFd = 5;
/// The descriptor number under which a worker finds the metrics table, when it has a slot.
pub const METRICS_FD: RawFd = 6;
/// The variable that holds the worker's resolved configuration, as JSON.
pub const CONFIG_ENV: &str = "HERDSMAN_WORKER_CONFIG";
/// The variable that tells a worker which slot of the balancing table is its own.
pub const SLOT_ENV: &str = "HERDSMAN_WORKER_SLOT";

/// Why a process started as `herdsman __worker` cannot be a worker.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("`herdsman {WORKER_SUBCOMMAND}` is started by the herdsman master only ({CONFIG_ENV}: {0})")]
    NoConfig(String),
    #[error("fd {fd} is not {expected}: {why}")]
    WrongFd { fd: RawFd, expected: &'static str, why: String },
}

/// What a worker inherited from its master.
#[derive(Debug)]
pub struct Inherited {
    pub config: Config,
    /// Non-blocking, ready for tokio.
    pub listener: TcpListener,
    /// The write end of the control pipe.
    pub control: OwnedFd,
    /// The balancing table and this worker's slot in it, when the master gave one.
    pub slots: Option<(OwnedFd, usize)>,
    /// The metrics table and this worker's slot in it, when the master gave one.
    pub metrics: Option<(OwnedFd, usize)>,
}

/// Takes what the master handed over. A balancing or metrics table that is missing or wrong
/// only costs balancing or metrics (logged at debug); anything else wrong is an error.
///
/// # Safety
/// Call once, at the very start of a process started as `herdsman __worker`, before anything
/// else opens a descriptor: the fds of the contract are then the master's, owned by nothing
/// else in this process. (When [`CONFIG_ENV`] is absent, nothing is taken.)
pub unsafe fn take_inherited() -> Result<Inherited, ContractError> {
    let json = std::env::var(CONFIG_ENV).map_err(|e| ContractError::NoConfig(e.to_string()))?;
    let config = serde_json::from_str::<Config>(&json).map_err(|e| ContractError::NoConfig(e.to_string()))?;
    let slot = std::env::var(SLOT_ENV).ok().and_then(|v| v.parse::<usize>().ok());
    // Subprocesses the app starts must not think they are herdsman workers.
    std::env::remove_var(CONFIG_ENV);
    std::env::remove_var(SLOT_ENV);

    // SAFETY (all three): the caller guarantees the master's fds are owned by nothing else.
    let listener = take_fd(LISTEN_FD, "a listening TCP socket", |fd| {
        let socket = Socket::from(fd);
        match socket.is_listener() {
            Ok(true) => socket.set_nonblocking(true).map(|()| socket).map_err(|e| e.to_string()),
            Ok(false) => Err("a socket that does not listen".into()),
            Err(e) => Err(e.to_string()),
        }
    })?;
    let control = take_fd(CONTROL_FD, "the write end of a pipe", |fd| {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL).map_err(|e| e.to_string())?);
        match file_type(&fd)? == SFlag::S_IFIFO && flags.contains(OFlag::O_WRONLY) {
            true => Ok(fd),
            false => Err("another kind of file".into()),
        }
    })?;
    let slots = slot.and_then(|index| take_table(SLOTS_FD, "the balancing table").map(|fd| (fd, index)));
    let metrics = slot.and_then(|index| take_table(METRICS_FD, "the metrics table").map(|fd| (fd, index)));
    Ok(Inherited { config, listener: listener.into(), control, slots, metrics })
}

/// Takes an optional shared table (a memfd) at `fd`; a missing one is logged at debug.
///
/// # Safety
/// As [`take_fd`].
unsafe fn take_table(fd: RawFd, what: &'static str) -> Option<OwnedFd> {
    // SAFETY: as the caller guarantees.
    let taken = unsafe {
        take_fd(fd, what, |fd| match file_type(&fd)? == SFlag::S_IFREG {
            true => Ok(fd),
            false => Err("not a memory file".into()),
        })
    };
    taken.map_err(|e| tracing::debug!("without {what}: {e}")).ok()
}

/// The kind of file `fd` is (`S_IFIFO`, `S_IFREG`, …).
fn file_type(fd: &OwnedFd) -> Result<SFlag, String> {
    let stat = fstat(fd).map_err(|e| e.to_string())?;
    Ok(SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT)
}

/// Owns `fd`, sets close-on-exec on it and checks it with `check`.
///
/// # Safety
/// `fd` must be open and owned by nothing else in this process, or closed.
unsafe fn take_fd<T>(
    fd: RawFd,
    expected: &'static str,
    check: impl FnOnce(OwnedFd) -> Result<T, String>,
) -> Result<T, ContractError> {
    let wrong = |why: String| ContractError::WrongFd { fd, expected, why };
    // Before owning it: a closed fd must not become an OwnedFd.
    // SAFETY: F_GETFD only reads the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(wrong(format!("not open ({})", std::io::Error::last_os_error())));
    }
    // SAFETY: open (checked above) and, as the caller guarantees, owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| wrong(e.to_string()))?;
    check(owned).map_err(wrong)
}

/// What the master hands one worker; the descriptors are the master's (close-on-exec, above
/// the numbers of the contract, see [`move_above_contract_fds`]).
pub(crate) struct Handoff<'a> {
    pub listener: &'a OwnedFd,
    pub control: &'a OwnedFd,
    /// The balancing table and the slot this worker gets.
    pub slots: Option<(&'a OwnedFd, usize)>,
    /// The metrics table, handed with the same slot.
    pub metrics: Option<&'a OwnedFd>,
    pub config_json: &'a str,
}

/// Makes `command` start a worker with `handoff`: the subcommand, the variables, and the
/// descriptors put in place between fork and exec.
pub(crate) fn prepare_worker(command: &mut Command, handoff: &Handoff<'_>) {
    command.arg(WORKER_SUBCOMMAND).env(CONFIG_ENV, handoff.config_json);
    if let Some((_, slot)) = handoff.slots {
        command.env(SLOT_ENV, slot.to_string());
    }
    let listen_fd = handoff.listener.as_raw_fd();
    let control_fd = handoff.control.as_raw_fd();
    let slots_fd = handoff.slots.map(|(fd, _)| fd.as_raw_fd());
    let metrics_fd = handoff.metrics.filter(|_| handoff.slots.is_some()).map(|fd| fd.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (dup2, prctl). Every source is above the contract's numbers
    // (see move_above_contract_fds), so no dup2 clobbers another source; dup2 clears
    // close-on-exec on the copies, which are all the worker inherits.
    unsafe {
        command.pre_exec(move || {
            // No allocation here: a fixed array, the optional tables last.
            let moves = [
                (Some(listen_fd), LISTEN_FD),
                (Some(control_fd), CONTROL_FD),
                (slots_fd, SLOTS_FD),
                (metrics_fd, METRICS_FD),
            ];
            for (from, to) in moves {
                let Some(from) = from else { continue };
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // If the master dies without a word, its workers drain instead of serving on.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Duplicates `fd` to a number above the contract's (close-on-exec) and closes the original,
/// so that putting one descriptor in place in a child can never overwrite another.
pub(crate) fn move_above_contract_fds(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let high = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: fcntl just returned this new descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}
