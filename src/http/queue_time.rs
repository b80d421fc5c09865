//! Request queue time: how long a request waited between the platform's router and a worker,
//! the signal PaaS autoscalers (Judoscale, Rails Autoscale, Heroku's own) scale on. Long queue
//! times with idle CPUs mean too few workers; with busy CPUs, too few instances.
//!
//! The router stamps the request with `X-Request-Start`: Heroku as milliseconds since the epoch
//! (`1717171717123`), nginx as `t=` and seconds with a fraction (`t=1717171717.123`), others in
//! microseconds or nanoseconds. The unit is told by the size of the number (seconds since 1970
//! have 10 digits today, milliseconds 13, microseconds 16, nanoseconds 19), as New Relic and
//! Judoscale read it. The queue time is our clock now minus that stamp, taken when the worker
//! starts on the request, so nothing the worker did is in it.
//!
//! Two clocks are compared, so the result is clamped: a stamp from the future (the router's clock
//! ahead of ours) is a queue time of 0, and a stamp more than [`MAX_PLAUSIBLE`] in the past is not
//! a queue time at all (a wrong clock, a replayed or forged header) and is ignored, so that one
//! bad header cannot move a histogram's tail. A client can send the header itself; callers read it
//! only when a proxy is trusted to set it (`HERDSMAN_TRUSTED_PROXIES` ≥ 1).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName};

/// The header routers set.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-start");

/// A queue longer than this is not believed. Routers give up far sooner (Heroku at 30 s).
pub const MAX_PLAUSIBLE: Duration = Duration::from_secs(300);

/// The queue time of a request with these headers, received at `now`; `None` without a usable
/// `X-Request-Start`.
pub fn of(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let stamp = parse_stamp(headers.get(&HEADER)?.to_str().ok()?)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?;
    match now.checked_sub(stamp) {
        None => Some(Duration::ZERO),
        Some(waited) if waited <= MAX_PLAUSIBLE => Some(waited),
        Some(_) => None,
    }
}

/// The instant in a header value, as time since the epoch: `t=` optional, seconds (with or
/// without a fraction), milliseconds, microseconds or nanoseconds.
pub fn parse_stamp(value: &str) -> Option<Duration> {
    let number = value.trim();
    let number = number.strip_prefix("t=").unwrap_or(number);
    if number.is_empty() || number.len() > 32 {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    // The unit by magnitude; the fraction only counts for seconds (nginx's `$msec`).
    let stamp = match whole {
        0..=99_999_999_999 => {
            let nanos = format!("{fraction:0<9}").get(..9)?.parse::<u32>().ok()?;
            Duration::new(whole, nanos)
        }
        100_000_000_000..=99_999_999_999_999 => Duration::from_millis(whole),
        100_000_000_000_000..=99_999_999_999_999_999 => Duration::from_micros(whole),
        _ => Duration::from_nanos(whole),
    };
    Some(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW_MS: u64 = 1_780_000_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(NOW_MS)
    }

    fn queue(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(&HEADER, HeaderValue::from_str(value).expect("a header value"));
        of(&headers, now())
    }

    #[test]
    fn every_router_format_reads_the_same_instant() {
        let ms = NOW_MS - 42;
        for value in [
            format!("{ms}"),
            format!("t={ms}"),
            format!("t={}.{:03}", ms / 1000, ms % 1000),
            format!("{}.{:03}", ms / 1000, ms % 1000),
            format!("t={}", ms * 1000),
            format!("{}", ms * 1_000_000),
        ] {
            assert_eq!(queue(&value), Some(Duration::from_millis(42)), "{value}");
        }
    }

    #[test]
    fn skew_is_clamped_and_implausible_stamps_are_ignored() {
        assert_eq!(queue(&format!("{}", NOW_MS + 5_000)), Some(Duration::ZERO), "a router clock ahead of ours");
        assert_eq!(queue(&format!("{}", NOW_MS - 301_000)), None, "five minutes and more is not a queue");
        assert_eq!(queue(&format!("{}", NOW_MS - 300_000)), Some(MAX_PLAUSIBLE));
    }

    #[test]
    fn garbage_is_no_queue_time() {
        let too_long = "9".repeat(40);
        for value in ["", "t=", "abc", "-5", "1e12", "t=1.2.3", "12 34", "0x1f", too_long.as_str()] {
            assert_eq!(queue(value), None, "{value:?}");
        }
        assert_eq!(of(&HeaderMap::new(), now()), None, "no header");
    }

    proptest::proptest! {
        #[test]
        fn any_header_value_gives_a_bounded_answer_or_none(value in "\\PC{0,40}") {
            if let Ok(header) = HeaderValue::from_str(&value) {
                let mut headers = HeaderMap::new();
                headers.insert(&HEADER, header);
                if let Some(waited) = of(&headers, now()) {
                    proptest::prop_assert!(waited <= MAX_PLAUSIBLE);
                }
            }
        }
    }
}
