//! Whether a test that needs a Docker engine (Redis through testcontainers, the image in
//! tests/docker.rs) may run: one policy for all of them, the same as scripts/test.sh's, and
//! [`skip`] for tests that lack something else (tests/redis_tls.rs: a TLS redis-server, openssl).
//!
//! With an engine, the test runs. Without one it is skipped, with a `SKIPPED` line written
//! straight to stderr (libtest does not capture it), unless `CI` is set: CI must run every test,
//! so there a missing engine fails the test with the reason.
//!
//! Included with `#[path]` by tests/docker.rs and by tests/support/redis.rs (not by
//! tests/support/mod.rs: redis_e2e.rs includes both, and would have it twice).
#![allow(dead_code)]

use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;

/// `CI` as CI services set it: set to anything but "", "false" or "0" (in any case).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| !matches!(ci.trim().to_ascii_lowercase().as_str(), "" | "false" | "0"))
}

/// Why no Docker engine answers, or `None` when one does. Asked once per test binary.
fn missing_engine() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`docker info` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Some(format!("cannot run `docker`: {e}")),
    })
    .as_deref()
}

/// `true` when a Docker engine answers. Without one: under CI, panics with the reason; elsewhere
/// writes `SKIPPED <test>: …` to stderr and returns `false`, and the test returns at once.
pub fn available() -> bool {
    let Some(why) = missing_engine() else { return true };
    // libtest names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    skip(&test, "a Docker engine", why);
    false
}

/// The policy for any test that lacks what it `needs` (for the reason `why`): under CI, panics;
/// elsewhere writes `SKIPPED <test>: …` to stderr, and the caller returns at once.
pub fn skip(test: &str, needs: &str, why: &str) {
    assert!(!in_ci(), "{test} needs {needs} and CI is set: {why}");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs {needs} (a failure when CI is set): {why}");
}
