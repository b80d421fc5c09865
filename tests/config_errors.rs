//! Bad configuration ends the real binary before it binds anything: status 2, one line on
//! stderr naming the variable or flag, the value and what is accepted. Never a panic.

mod support;

use support::run_to_exit;

fn assert_rejected(args: &[&str], env: &[(&str, &str)], culprit: &str, value: &str) {
    let (status, output) = run_to_exit(args, env);
    assert_eq!(status.code(), Some(2), "{args:?} {env:?} -> {output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line for {args:?} {env:?}: {output}");
    let line = lines[0];
    assert!(line.contains(culprit) && line.contains(value), "{line} should name {culprit} and {value}");
    assert!(!line.contains("panicked") && !line.contains("Listening"), "{line}");
}

#[test]
fn bad_environment_values_exit_2_with_one_line() {
    let cases = [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WEB_CONCURRENCY", "0"),
        ("WEB_CONCURRENCY", "-1"),
        ("WEB_CONCURRENCY", "abc"),
        ("WEB_CONCURRENCY", "100000"),
        ("GUNICORN_TIMEOUT", "-5"),
        ("GRACEFUL_TIMEOUT", "soon"),
        ("MAX_REQUESTS", "-3"),
        ("LOG_FORMAT", "yaml"),
        ("HERDSMAN_HOST", "not-an-ip"),
        ("HERDSMAN_SESSION_RECHECK", "301"),
        ("HERDSMAN_SESSION_OUTAGE_TRUST", "-2"),
    ];
    for (var, value) in cases {
        assert_rejected(&[], &[(var, value)], var, value);
        let (_, output) = run_to_exit(&[], &[(var, value)]);
        assert!(output.contains("expected"), "says what is accepted: {output}");
    }
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    assert_rejected(&["--port", "abc"], &[], "--port", "abc");
    assert_rejected(&["--workers", "0"], &[("WEB_CONCURRENCY", "2")], "--workers", "0");
    assert_rejected(&["--bogus-flag"], &[], "--bogus-flag", "--bogus-flag");
    assert_rejected(&["check", "--timeout", "-5"], &[], "--timeout", "-5");
}

#[test]
fn check_prints_the_resolved_configuration_with_secrets_redacted() {
    let (status, output) =
        run_to_exit(&["check", "--workers", "3"], &[("PORT", "9999"), ("REDIS_URL", "redis://:hunter2@cache:6379/0")]);
    assert!(status.success(), "{output}");
    assert!(output.contains("PORT = 9999"), "{output}");
    assert!(output.contains("WEB_CONCURRENCY = 3"), "{output}");
    assert!(output.contains("REDIS_URL = redis://***@cache:6379/0"), "{output}");
    assert!(!output.contains("hunter2"), "{output}");
}

#[test]
fn help_names_every_variable_and_exits_0() {
    let (status, output) = run_to_exit(&["--help"], &[]);
    assert!(status.success());
    let output = output.split_whitespace().collect::<Vec<_>>().join(" ");
    for var in ["PORT", "WEB_CONCURRENCY", "GUNICORN_TIMEOUT", "GRACEFUL_TIMEOUT", "MAX_REQUESTS_JITTER", "REDIS_URL"] {
        assert!(output.contains(&format!("env: {var}")), "--help lacks {var}");
    }
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    // Bind and release a port so that nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (status, _) = run_to_exit(&["healthcheck"], &[("PORT", &port)]);
    assert_eq!(status.code(), Some(1));
}
