//! Memory shared by the master and its workers: a `memfd` the master creates and hands to each
//! worker it starts (see [`crate::contract`]), mapped read-write by every process. The
//! connection-balancing table ([`crate::balance`]) and the metrics table ([`crate::metrics`])
//! live in one each; what is inside, and that every access goes through atomics, is theirs.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// A shared mapping of a whole memfd.
pub struct SharedMemory {
    start: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory, valid in every thread; what is stored in it, and how it
// is accessed (atomics only), is the business of the table that owns it.
unsafe impl Send for SharedMemory {}
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates `len` zeroed bytes (the master). Pages are allocated only when written.
    pub fn create(name: &CStr, len: usize) -> std::io::Result<SharedMemory> {
        let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, i64::try_from(len).map_err(std::io::Error::other)?)?;
        Self::map(fd, len)
    }

    /// Maps what a worker inherited, which must be exactly `len` bytes (`what` names it in the
    /// error).
    pub fn from_inherited(fd: OwnedFd, len: usize, what: &str) -> std::io::Result<SharedMemory> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if usize::try_from(size).ok() != Some(len) {
            return Err(std::io::Error::other(format!("{what} has {size} bytes, not {len}")));
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> std::io::Result<SharedMemory> {
        let length = std::num::NonZeroUsize::new(len).ok_or(std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a memfd of exactly `len` bytes; nothing else in this
        // process aliases it.
        let start = unsafe {
            mmap(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd.as_fd(), 0)?
        };
        Ok(SharedMemory { start: start.cast(), len, fd })
    }

    /// The memfd, for the master to hand to workers.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The first byte; the mapping is page-aligned and lives as long as `self`.
    pub fn start(&self) -> NonNull<u8> {
        self.start
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; references into it borrow `self`.
        let _ = unsafe { munmap(self.start.cast(), self.len) };
    }
}
