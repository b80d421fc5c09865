//! Reads a cache value as herdsman stores it in Redis: `"\0hs1"`, a 16-digit stamp, `v` (a
//! value) or `x` (a tombstone), then the value (src/cache/stamped.rs). Kept apart from the
//! library's own decoder so that a test notices when the stored format changes.

/// The value in a raw `GET` of a cache key: `None` when the key is absent or a tombstone.
pub fn stored_value(raw: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let raw = raw?;
    match raw.strip_prefix(b"\0hs1") {
        Some(rest) if rest.len() > 16 && rest[..16].iter().all(u8::is_ascii_digit) => match rest[16] {
            b'v' => Some(rest[17..].to_vec()),
            b'x' => None,
            kind => panic!("unknown kind {kind:?} in a stored cache value"),
        },
        _ => panic!("a cache value without its stamp: {:?}", String::from_utf8_lossy(&raw)),
    }
}
