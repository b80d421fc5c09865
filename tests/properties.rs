//! Property tests: short runs of what the fuzz targets (fuzz/) check at length, with the same
//! oracles (tests/oracles): redaction never shows the password, configuration never panics and
//! its errors are one line naming their source, the cache agrees with a map with deadlines.

mod oracles;

use std::sync::OnceLock;

use proptest::prelude::*;

use oracles::{CacheOp, Ttl};

fn settings() -> &'static [(String, &'static str)] {
    static SETTINGS: OnceLock<Vec<(String, &'static str)>> = OnceLock::new();
    SETTINGS.get_or_init(oracles::settings)
}

/// Text with the characters that matter in URLs and numbers well represented.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[#/?@%:.a-zA-Z0-9\\[\\] -]{0,12}", "(%[0-9a-fA-F]{2}|[@#/?:])*[a-z0-9]{0,6}", any::<String>(),]
}

/// A value a setting could plausibly be given, or not.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "-?[0-9]{1,6}(\\.[0-9]{0,4})?",
        "(true|false|yes|no|on|off|text|json|info|debug|NaN|inf|1e3|::|127.0.0.1|\\[::1\\])",
        "redis(s)?://[a-z:@#/?%0-9]{0,16}",
        "[a-z=,\\[\\]{}\"._ -]{0,16}",
        any::<String>(),
    ]
}

fn variable() -> impl Strategy<Value = String> {
    let known: Vec<&'static str> = settings().iter().map(|(_, var)| *var).collect();
    prop_oneof![
        3 => proptest::sample::select(known.clone()).prop_map(String::from),
        1 => proptest::sample::select(known).prop_map(|var| var.to_ascii_lowercase()),
        1 => "[A-Za-z_]{1,12}",
    ]
}

fn cache_op() -> impl Strategy<Value = CacheOp> {
    let ttl = prop_oneof![Just(Ttl::Forever), any::<u8>().prop_map(|ms| Ttl::Millis(ms % 4)), Just(Ttl::Hour)];
    prop_oneof![
        3 => (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..8), ttl)
            .prop_map(|(key, value, ttl)| CacheOp::Set { key, value, ttl }),
        3 => any::<u8>().prop_map(|key| CacheOp::Get { key }),
        1 => any::<u8>().prop_map(|key| CacheOp::Delete { key }),
        1 => any::<u16>().prop_map(|micros| CacheOp::Sleep { micros }),
    ]
}

/// Cases the fuzz targets found, kept so that they are checked on every run.
#[test]
fn redaction_cases_the_fuzzer_found() {
    // The marker `***` and the host `2` (after the URL's last `@`) spell the password `**@2`:
    // no leak, and the oracle once said there was one (fuzz target `redact`, 2026-11-28).
    assert_eq!(oracles::check_redaction("rediss", "", "**@2", "*@2\u{8}"), Ok(()));
    // A "password" with `/` in it ends the URL's authority there, so it is no password; the
    // URLs do not parse, and their errors show them redacted, `redis://***@\u{2}#:` and
    // `rediss://***@n\u{f}`, which spell these two (fuzz target `redact`, 2026-11-28).
    assert_eq!(oracles::check_redaction("redis", "\0\n:\u{b}\0A\0@@@@@@", "dis://***@\u{2}", "\u{2}#:"), Ok(()));
    assert_eq!(oracles::check_redaction("rediss", "", "rediss://***", "@n\u{f}\n"), Ok(()));
    // Passwords with `@` in them, or a user with `:`, are hidden all the same.
    for (user, password, rest) in [("u", "hunter2", "host:6379"), ("", "p@ss@word", "h"), ("a:b", "s3cr3t", "@x")] {
        assert_eq!(oracles::check_redaction("redis", user, password, rest), Ok(()));
        assert!(!herdsman::config::redact_url(&format!("redis://{user}:{password}@{rest}")).contains(password));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn redaction_never_shows_the_password(
        scheme in prop_oneof![Just("redis".to_string()), Just("rediss".to_string()), "[a-z+]{0,6}"],
        user in text(),
        password in text(),
        rest in text(),
    ) {
        oracles::check_redaction(&scheme, &user, &password, &rest).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn configuration_never_panics_and_errors_are_one_line(
        flags in proptest::collection::vec((any::<usize>(), value()), 0..4),
        env in proptest::collection::vec((variable(), value()), 0..8),
    ) {
        oracles::check_config(settings(), &flags, &env).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_cache_agrees_with_a_map_with_deadlines(
        capacity in prop_oneof![Just(10_000u64), 1u64..6],
        ops in proptest::collection::vec(cache_op(), 0..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(oracles::check_cache_model(capacity, &ops)).map_err(TestCaseError::fail)?;
    }
}
