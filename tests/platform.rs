//! Platform detection on the real binary: the environment a platform sets goes in, `herdsman
//! check` shows the platform and the source of every value; an explicit setting beats the fitted
//! one and is warned about once; and Cloud Run's stop contract (SIGTERM, SIGKILL 10 s later)
//! loses no in-flight request shorter than the fitted grace period.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use support::{run_to_exit, start};

/// `herdsman check`'s line for `var`.
fn check_line(output: &str, var: &str) -> String {
    let prefix = format!("{var} = ");
    output.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {var} in:\n{output}")).to_string()
}

fn check(env: &[(&str, &str)]) -> String {
    let (status, output) = run_to_exit(&["check"], env);
    assert_eq!(status.code(), Some(0), "{output}");
    output
}

#[test]
fn check_shows_cloud_run_and_the_grace_period_fitted_below_its_kill_timeout() {
    let output = check(&[("K_SERVICE", "api"), ("K_REVISION", "api-00002"), ("PORT", "8080")]);
    assert!(output.starts_with("Platform: cloudrun (service api, revision api-00002)\n"), "{output}");
    assert_eq!(
        check_line(&output, "GRACEFUL_TIMEOUT"),
        "GRACEFUL_TIMEOUT = 8.0  (platform: cloudrun SIGKILLs 10 s after SIGTERM)"
    );
    assert_eq!(check_line(&output, "PORT"), "PORT = 8080  (environment)");
    assert_eq!(check_line(&output, "HERDSMAN_KEEPALIVE_TIMEOUT"), "HERDSMAN_KEEPALIVE_TIMEOUT = 95.0  (default)");
    assert!(!output.contains("warning:"), "{output}");
}

#[test]
fn check_shows_heroku_and_its_dyno_with_the_sources_of_every_value() {
    let (status, output) = run_to_exit(&["check", "--port", "5000"], &[("DYNO", "web.1"), ("WEB_CONCURRENCY", "3")]);
    assert_eq!(status.code(), Some(0), "{output}");
    assert!(output.starts_with("Platform: heroku (dyno web.1)\n"), "{output}");
    assert_eq!(check_line(&output, "PORT"), "PORT = 5000  (flag)");
    assert_eq!(check_line(&output, "WEB_CONCURRENCY"), "WEB_CONCURRENCY = 3  (environment)");
    // Heroku waits 30 s: herdsman's 25 s default stands.
    assert_eq!(check_line(&output, "GRACEFUL_TIMEOUT"), "GRACEFUL_TIMEOUT = 25.0  (default)");
    // Every setting has a source.
    for line in output.lines().filter(|l| l.contains(" = ")) {
        assert!(line.ends_with(')'), "no source on {line:?}");
    }
}

#[test]
fn check_shows_fly_and_railway_fits_and_railways_missing_draining_time() {
    let fly = check(&[("FLY_APP_NAME", "herdsman"), ("FLY_REGION", "ams")]);
    assert!(fly.starts_with("Platform: fly (app herdsman in ams)\n"), "{fly}");
    assert!(
        check_line(&fly, "GRACEFUL_TIMEOUT")
            .starts_with("GRACEFUL_TIMEOUT = 4.0  (platform: fly by default SIGKILLs 5 s"),
        "{fly}"
    );

    let draining = check(&[("RAILWAY_PROJECT_ID", "p"), ("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "15")]);
    assert!(draining.starts_with("Platform: railway\n"), "{draining}");
    assert_eq!(
        check_line(&draining, "GRACEFUL_TIMEOUT"),
        "GRACEFUL_TIMEOUT = 12.0  (platform: RAILWAY_DEPLOYMENT_DRAINING_SECONDS 15 s after SIGTERM)"
    );
    assert!(!draining.contains("warning:"), "{draining}");

    let undrained = check(&[("RAILWAY_ENVIRONMENT_NAME", "production")]);
    assert_eq!(check_line(&undrained, "GRACEFUL_TIMEOUT"), "GRACEFUL_TIMEOUT = 25.0  (default)");
    assert!(undrained.contains("warning: RAILWAY_DEPLOYMENT_DRAINING_SECONDS is not set"), "{undrained}");
}

#[test]
fn check_without_a_platform_says_so() {
    let output = check(&[]);
    assert!(output.starts_with("Platform: none detected\n"), "{output}");
    assert_eq!(check_line(&output, "GRACEFUL_TIMEOUT"), "GRACEFUL_TIMEOUT = 25.0  (default)");
}

#[test]
fn an_explicit_grace_period_beats_the_platform_and_is_warned_about_once() {
    let output = check(&[("K_SERVICE", "api"), ("GRACEFUL_TIMEOUT", "20")]);
    assert_eq!(check_line(&output, "GRACEFUL_TIMEOUT"), "GRACEFUL_TIMEOUT = 20.0  (environment)");
    assert_eq!(output.matches("warning:").count(), 1, "{output}");

    // The running master logs the platform and the warning once, not once per worker.
    let server = start(&[("K_SERVICE", "api"), ("GRACEFUL_TIMEOUT", "20"), ("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, Duration::from_secs(10));
    assert_eq!(server.count_logs("Platform: cloudrun (service api)"), 1, "{:?}", server.logs());
    assert_eq!(server.count_logs("GRACEFUL_TIMEOUT=20 is not below the 10 s cloudrun"), 1, "{:?}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_run_stop_contract_loses_no_request_shorter_than_the_fitted_grace() {
    let mut server = start(&[("K_SERVICE", "api"), ("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, Duration::from_secs(10));
    let master = server.pid();
    let workers = server.workers();
    let client = reqwest::Client::new();
    // 5 s: well inside the fitted 8 s, and past herdsman's 1 s close of idle connections.
    let in_flight: Vec<_> =
        (0..3).map(|_| tokio::spawn(client.get(server.url("/__test/sleep?ms=5000")).send())).collect();
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Cloud Run: SIGTERM, then SIGKILL to whatever is left 10 s later.
    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    let platform = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        for pid in std::iter::once(master).chain(workers) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    });

    for request in in_flight {
        let response = request.await.unwrap().expect("an in-flight request was lost");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "slept");
    }
    let status = server.wait_exit(Duration::from_secs(15));
    let exited_after = sent_term.elapsed();
    assert_eq!(status.code(), Some(0), "killed instead of exiting on its own: {status:?}");
    assert!(exited_after < Duration::from_secs(10), "exited {exited_after:?} after SIGTERM, past the SIGKILL");
    platform.join().unwrap();
}
