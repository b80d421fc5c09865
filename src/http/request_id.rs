//! Request IDs: one per request, in the access log line, in the response's `X-Request-ID` and in
//! a hung worker's diagnostics, so that a line in the platform's router log, the app's log and a
//! client's bug report can be matched.
//!
//! A router in front (Heroku's sets `X-Request-ID` on every request) or a client may send one.
//! It is kept only when it is sane, as Rails does: 1 to [`MAX_LEN`] characters from a small set
//! (letters, digits and `-_.:@+=/`), so that a client cannot put newlines, control characters,
//! quotes or a megabyte into our log lines. Anything else is replaced by a fresh ID ([`generate`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// The header read and answered.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest ID kept; Heroku's are UUIDs (36), Rails keeps up to 255.
pub const MAX_LEN: usize = 200;

/// The request's ID: the incoming `X-Request-ID` when sane, else a new random one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    headers.get(&HEADER).filter(|value| is_sane(value.as_bytes())).cloned().unwrap_or_else(generate)
}

/// Whether an incoming ID may be logged and echoed as it is.
pub fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:@+=/".contains(b))
}

/// A fresh ID: 32 hex digits, 64 random bits drawn once per worker process and a counter. Unique
/// across workers and restarts without a random draw or a `format!` per request (together they
/// cost `/live` about 16 % more instructions); an ID names a request, it is not a secret.
pub fn generate() -> HeaderValue {
    static WORKER: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let worker = *WORKER.get_or_init(rand::random::<u64>);
    let mut id = [0u8; 32];
    write_hex(worker, &mut id[..16]);
    write_hex(NEXT.fetch_add(1, Ordering::Relaxed), &mut id[16..]);
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// `value` as 16 lower-case hex digits into `out`.
fn write_hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, digit) in out.iter_mut().take(16).enumerate() {
        *digit = DIGITS[((value >> (60 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&HEADER, HeaderValue::from_bytes(value).expect("a header value"));
        headers
    }

    #[test]
    fn a_sane_incoming_id_is_kept() {
        for id in ["f5b3a1c2-1a2b-4c3d-8e9f-0123456789ab", "abc", "a.b:c@d+e=f/g_h-i"] {
            assert_eq!(of(&with(id.as_bytes())), id);
        }
    }

    #[test]
    fn an_insane_incoming_id_is_replaced_by_a_fresh_one() {
        let long = "a".repeat(MAX_LEN + 1);
        for id in [b"has space".as_slice(), b"quote\"", b"tab\there", long.as_bytes(), "é".as_bytes(), b"{json}"] {
            let got = of(&with(id));
            assert_ne!(got.as_bytes(), id);
            assert_eq!(got.len(), 32, "{got:?}");
            assert!(is_sane(got.as_bytes()));
        }
    }

    #[test]
    fn a_missing_id_is_generated_and_ids_differ() {
        let (a, b) = (of(&HeaderMap::new()), of(&HeaderMap::new()));
        assert!(is_sane(a.as_bytes()) && is_sane(b.as_bytes()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_longest_sane_id_is_kept() {
        let id = "z".repeat(MAX_LEN);
        assert_eq!(of(&with(id.as_bytes())), id.as_str());
    }
}
