//! `redact_url` and everything that shows a `REDIS_URL` (the `check` listing, config errors, the
//! cache's errors and `Debug`) on `scheme://user:password@rest` from arbitrary parts: the
//! password never shows unless it is trivial.
#![no_main]

#[path = "../../tests/oracles/mod.rs"]
mod oracles;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Scheme {
    Redis,
    Rediss,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    scheme: Scheme,
    user: String,
    password: String,
    rest: String,
}

fuzz_target!(|input: Input| {
    let scheme = match &input.scheme {
        Scheme::Redis => "redis",
        Scheme::Rediss => "rediss",
        Scheme::Other(scheme) => scheme,
    };
    if let Err(leak) = oracles::check_redaction(scheme, &input.user, &input.password, &input.rest) {
        panic!("{leak}");
    }
});
