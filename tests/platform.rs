//! Platform detection on the real binary: the environment a platform sets goes in, `herdsman
//! check` shows the platform and the source of every value; an explicit setting beats the fitted
//! one and is warned about once; and each platform's stop contract (SIGTERM, then SIGKILL: Cloud
//! Run 10 s later, Heroku, Render and Kubernetes 30 s, Fly 5 s, Railway its draining seconds)
//! run end to end: no
//! in-flight request shorter than the grace period is lost, a longer one is cut at the grace
//! period, and the master exits 0 before the kill.

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

/// What a platform does when it stops an instance: the environment it runs herdsman with, the
/// grace period herdsman fits to it, and how long after SIGTERM it SIGKILLs what is left.
struct StopContract {
    env: &'static [(&'static str, &'static str)],
    /// The `GRACEFUL_TIMEOUT` in force on this platform (fitted or herdsman's default).
    grace: Duration,
    kill_after: Duration,
    /// How long the in-flight requests that must all be answered take: shorter than `grace`.
    in_flight: Duration,
}

/// Runs a platform's stop against the real binary: three requests of `in_flight` and one longer
/// than the platform waits are running when SIGTERM comes, and a stand-in for the platform
/// SIGKILLs the master and its workers `kill_after` later if they are still there. The three are
/// answered 200, the long one is cut at the grace period (not by the SIGKILL), and the master
/// exits 0 before the kill. The stand-in stops waiting once the master is gone, so a run takes
/// about `grace`, not `kill_after`.
async fn platform_stop_loses_no_request_shorter_than_the_grace(platform: StopContract) {
    let StopContract { env, grace, kill_after, in_flight } = platform;
    assert!(in_flight < grace && grace < kill_after, "not a stop contract: {in_flight:?}, {grace:?}, {kill_after:?}");
    let mut server = start(&[env, &[("WEB_CONCURRENCY", "2")]].concat());
    server.wait_for_nth_log("ready in", 2, Duration::from_secs(10));
    // The running master has the grace period `check` shows for this platform.
    assert_eq!(server.count_logs(&format!("graceful timeout {}s", grace.as_secs_f64())), 1, "{:?}", server.logs());
    let master = server.pid();
    let workers = server.workers();
    let client = reqwest::Client::new();
    let request = |length: Duration| {
        let sent = client.get(server.url(&format!("/__test/sleep?ms={}", length.as_millis()))).send();
        tokio::spawn(async move {
            let outcome = match sent.await {
                Ok(response) => Ok((response.status(), response.text().await)),
                Err(error) => Err(error),
            };
            (outcome, Instant::now())
        })
    };
    let answered: Vec<_> = (0..3).map(|_| request(in_flight)).collect();
    let cut = request(kill_after + Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(400)).await;

    let sent_term = Instant::now();
    server.signal(Signal::SIGTERM);
    let (master_exited, platform_waits) = std::sync::mpsc::channel::<()>();
    let platform = std::thread::spawn(move || {
        if platform_waits.recv_timeout(kill_after.saturating_sub(sent_term.elapsed())).is_err() {
            for pid in std::iter::once(master).chain(workers) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    });

    for request in answered {
        let (outcome, _) = request.await.expect("request task");
        let (status, body) = outcome.expect("an in-flight request shorter than the grace period was lost");
        assert_eq!(status, 200);
        assert_eq!(body.expect("its body").as_str(), "slept");
    }
    let (outcome, cut_at) = cut.await.expect("request task");
    let cut_after = cut_at.duration_since(sent_term);
    match outcome {
        Ok((status, Err(_))) if status == 200 => {} // headers came, the body was cut
        Ok((status, body)) => panic!("the request longer than the grace period was answered {status}: {body:?}"),
        Err(_) => {}
    }
    assert!(
        cut_after >= grace && cut_after < kill_after,
        "the long request was cut {cut_after:?} after SIGTERM: not at the {grace:?} grace period, before the {kill_after:?} kill"
    );
    let status = server.wait_exit(kill_after + Duration::from_secs(5));
    let exited_after = sent_term.elapsed();
    let _ = master_exited.send(());
    platform.join().expect("the platform's thread");
    assert_eq!(status.code(), Some(0), "killed instead of exiting on its own: {status:?}");
    assert!(exited_after < kill_after, "exited {exited_after:?} after SIGTERM, past the {kill_after:?} SIGKILL");
}

/// Cloud Run: SIGKILL 10 s after SIGTERM, fixed; herdsman fits 8 s.
const CLOUD_RUN: StopContract = StopContract {
    env: &[("K_SERVICE", "api")],
    grace: Duration::from_secs(8),
    kill_after: Duration::from_secs(10),
    in_flight: Duration::from_secs(7),
};

/// Heroku: SIGKILL 30 s after SIGTERM, fixed; herdsman's 25 s default stands. The longest runs
/// here (25 s): a request longer than the grace period has to run into it.
const HEROKU: StopContract = StopContract {
    env: &[("DYNO", "web.1")],
    grace: Duration::from_secs(25),
    kill_after: Duration::from_secs(30),
    in_flight: Duration::from_secs(24),
};

/// Render: SIGKILL `maxShutdownDelaySeconds` after SIGTERM, 30 s unless render.yaml raises it
/// (Render does not tell the service); herdsman's 25 s default stands.
const RENDER: StopContract = StopContract { env: &[("RENDER", "true"), ("RENDER_SERVICE_NAME", "api")], ..HEROKU };

/// Kubernetes: SIGKILL `terminationGracePeriodSeconds` after SIGTERM, 30 s unless the pod raises
/// it (the pod is not told); herdsman's 25 s default stands.
const KUBERNETES: StopContract =
    StopContract { env: &[("KUBERNETES_SERVICE_HOST", "10.0.0.1"), ("HOSTNAME", "web-7d")], ..HEROKU };

/// Fly: SIGKILL 5 s after SIGTERM unless fly.toml raises `kill_timeout`; herdsman fits 4 s.
const FLY: StopContract = StopContract {
    env: &[("FLY_APP_NAME", "herdsman"), ("FLY_REGION", "ams")],
    grace: Duration::from_secs(4),
    kill_after: Duration::from_secs(5),
    in_flight: Duration::from_secs(3),
};

/// Railway: SIGKILL `RAILWAY_DEPLOYMENT_DRAINING_SECONDS` after SIGTERM (5 s, the shortest a
/// service that drains would set); herdsman fits 80 % of it.
const RAILWAY: StopContract = StopContract {
    env: &[("RAILWAY_PROJECT_ID", "p"), ("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "5")],
    grace: Duration::from_secs(4),
    kill_after: Duration::from_secs(5),
    in_flight: Duration::from_secs(3),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_run_stop_contract() {
    platform_stop_loses_no_request_shorter_than_the_grace(CLOUD_RUN).await;
}

/// The three platforms that wait 30 s, run side by side so that they take one 25 s grace period
/// of the suite's time, not three: each on its own thread and runtime, with its own server and
/// port (the helper blocks while it waits for the master, so they cannot share a task).
#[test]
fn heroku_render_and_kubernetes_stop_contracts() {
    let runs: Vec<_> = [("heroku", HEROKU), ("render", RENDER), ("kubernetes", KUBERNETES)]
        .into_iter()
        .map(|(name, contract)| {
            let run = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
                runtime.expect("a runtime").block_on(platform_stop_loses_no_request_shorter_than_the_grace(contract));
            });
            (name, run)
        })
        .collect();
    let failed: Vec<_> = runs.into_iter().filter_map(|(name, run)| run.join().is_err().then_some(name)).collect();
    assert!(failed.is_empty(), "stop contract failed on {failed:?} (its panic is printed above)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fly_stop_contract() {
    platform_stop_loses_no_request_shorter_than_the_grace(FLY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn railway_stop_contract() {
    platform_stop_loses_no_request_shorter_than_the_grace(RAILWAY).await;
}
