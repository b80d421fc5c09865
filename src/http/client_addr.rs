//! The client's address: the TCP peer, or, behind a configured number of trusted proxies, the
//! address the outermost trusted proxy saw, from `X-Forwarded-For`.
//!
//! Every platform router (Heroku, Render, Railway, Fly, Cloud Run) appends the address it was
//! connected from to `X-Forwarded-For` and connects to us itself, so the peer is the router and
//! the header's right-most entry is the one address no client could have written. A client can
//! put anything to the left of it. So with `HERDSMAN_TRUSTED_PROXIES=N` the client is the N-th
//! entry from the right, and with `N = 0` (the default) the header is never read: a client
//! talking to us directly could otherwise claim any address and dodge every per-address limit.
//!
//! A header that cannot be trusted (missing, not ASCII, an entry that is not an IP address, or
//! fewer entries than trusted hops) falls back to the peer address: per-address limits then
//! count the proxy, which is strict but never lets a forged header through.
//!
//! Used by the login throttle; kept free of any route so access logs can use it too.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

/// The header proxies append the address they were connected from to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The TCP peer of a request, put in its extensions by the [`super::Guard`]. Extracted as the
/// unspecified address `::` where there is none (a router called without a socket, in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<PeerAddr>().copied().unwrap_or(PeerAddr(IpAddr::V6(Ipv6Addr::UNSPECIFIED))))
    }
}

/// The client's address as far as it can be trusted; see the module doc.
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted_proxies: usize) -> IpAddr {
    if trusted_proxies == 0 {
        return peer;
    }
    forwarded_client(headers, trusted_proxies).unwrap_or(peer)
}

/// The `hops`-th address from the right of all `X-Forwarded-For` lines (proxies may add a line
/// of their own instead of extending the last one), or `None` when the header cannot be used.
fn forwarded_client(headers: &HeaderMap, hops: usize) -> Option<IpAddr> {
    let mut entries = Vec::new();
    for line in headers.get_all(FORWARDED_FOR) {
        entries.extend(line.to_str().ok()?.split(',').map(str::trim));
    }
    let index = entries.len().checked_sub(hops)?;
    parse_entry(entries[index])
}

/// An IPv4 or IPv6 address, also in the `[v6]:port` and `v4:port` shapes some proxies write.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _port)| ip.parse().ok());
    }
    entry
        .rsplit_once(':')
        .and_then(|(ip, port)| port.parse::<u16>().ok().and(ip.parse::<std::net::Ipv4Addr>().ok()))
        .map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(FORWARDED_FOR, HeaderValue::from_str(line).expect("header"));
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn without_trusted_proxies_the_header_is_never_read() {
        assert_eq!(client_addr(PEER, &headers(&["203.0.113.9"]), 0), PEER);
    }

    #[test]
    fn with_n_hops_the_nth_address_from_the_right_is_the_client() {
        let forged_then_real = headers(&["6.6.6.6, 203.0.113.9"]);
        assert_eq!(client_addr(PEER, &forged_then_real, 1), ip("203.0.113.9"));
        assert_eq!(client_addr(PEER, &headers(&["6.6.6.6, 203.0.113.9, 10.1.1.1"]), 2), ip("203.0.113.9"));
        // Several header lines count as one list, in order.
        assert_eq!(client_addr(PEER, &headers(&["6.6.6.6", "203.0.113.9"]), 1), ip("203.0.113.9"));
        assert_eq!(client_addr(PEER, &headers(&["[2001:db8::1]:443"]), 1), ip("2001:db8::1"));
        assert_eq!(client_addr(PEER, &headers(&["203.0.113.9:5000"]), 1), ip("203.0.113.9"));
        assert_eq!(client_addr(PEER, &headers(&["2001:db8::2"]), 1), ip("2001:db8::2"));
    }

    #[test]
    fn an_unusable_header_falls_back_to_the_peer() {
        assert_eq!(client_addr(PEER, &HeaderMap::new(), 1), PEER);
        assert_eq!(client_addr(PEER, &headers(&["203.0.113.9"]), 2), PEER, "fewer entries than hops");
        assert_eq!(client_addr(PEER, &headers(&["1.2.3.4, not-an-ip"]), 1), PEER);
        assert_eq!(client_addr(PEER, &headers(&[""]), 1), PEER);
        let mut opaque = HeaderMap::new();
        opaque.insert(FORWARDED_FOR, HeaderValue::from_bytes(b"\xff1.2.3.4").expect("header"));
        assert_eq!(client_addr(PEER, &opaque, 1), PEER);
    }
}
