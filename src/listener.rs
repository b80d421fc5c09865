//! The listening socket: bound once by the master, shared by every worker.
//!
//! The master binds before it does anything else, so a platform's port probe succeeds at once
//! and connections that arrive while workers boot wait in the kernel's accept queue instead of
//! being refused. Each worker inherits the socket (see [`crate::contract`]) and accepts on it; the kernel hands each new connection to one of the workers waiting in `accept`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues while every worker is busy or still booting.
const BACKLOG: i32 = 2048;

/// Binds `addr`. An unspecified IPv6 address is bound dual-stack (IPv4 too); on hosts without
/// IPv6 it falls back to `0.0.0.0` with a warning instead of failing the deploy.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind_exact(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && is_ipv6_unavailable(&e) => {
            tracing::warn!("IPv6 is not available here ({e}); listening on 0.0.0.0 (IPv4 only)");
            bind_exact(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        result => result,
    }
}

fn is_ipv6_unavailable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

fn bind_exact(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // A restarted master must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
