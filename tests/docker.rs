//! The container image on the real Docker engine: built from the Dockerfile's `runtime-from-host`
//! stage (the same `base` stage as the published image, with a static binary built on this host,
//! because the `rust` build image cannot be pulled here), then run like a small PaaS plan
//! (`PORT`, `WEB_CONCURRENCY=2`, 256 MB, 1 CPU, read-only root filesystem).
//!
//! Two images: the release binary's, which is what the Dockerfile ships (size, metadata, PID 1,
//! Redis by name), and one whose binary has the `test-hooks` routes, for the stop test's slow
//! requests. The binaries come from `HERDSMAN_RELEASE_BIN` and `HERDSMAN_STATIC_BIN`
//! (scripts/test.sh builds both with `+crt-static`), or are built here the same way. Redis comes from
//! `HERDSMAN_REDIS_IMAGE` (default `redis:7`; scripts/build-redis-image.sh builds a stand-in
//! when it cannot be pulled).
//!
//! Without a Docker engine each test is skipped with a line on stderr, or fails when `CI` is set
//! (tests/support/docker_engine.rs). Every container and network is named uniquely and removed by
//! a guard, whatever the outcome.

#[path = "support/docker_engine.rs"]
mod docker_engine;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The bound on the release image (what the Dockerfile ships): under 8 MB, a budget that leaves
/// users' builds alone (no pins or features traded for bytes). The test-hooks image is not held
/// to it: its routes and the WebSocket code they turn on add about 0.2 MB.
const MAX_IMAGE_BYTES: u64 = 8_000_000;
/// The tags the two images get; rebuilt by every run, the previous image removed.
const RELEASE_IMAGE: &str = "herdsman-test:docker-rs-release";
const TEST_IMAGE: &str = "herdsman-test:docker-rs";

// ---------------------------------------------------------------------------------------------
// docker CLI helpers and guards
// ---------------------------------------------------------------------------------------------

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("run the docker CLI")
}

/// Runs `docker args…`, panics with its stderr on failure, returns trimmed stdout.
#[track_caller]
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A container removed (`docker rm -f`) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    /// `127.0.0.1:PORT` published for the container's port 8080.
    fn published(&self) -> String {
        let mapping = docker_ok(&["port", &self.name, "8080/tcp"]);
        mapping.lines().find(|l| l.starts_with("127.0.0.1:")).expect("a 127.0.0.1 mapping").to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A user-defined bridge network removed when dropped (after the containers on it: declare it
/// first, so it drops last).
struct Network {
    name: String,
}

impl Network {
    fn create() -> Network {
        let name = unique("herdsman-test-net");
        docker_ok(&["network", "create", &name]);
        Network { name }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Which static herdsman an image carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// What the Dockerfile ships: no features. Its image is the one held to 8 MB.
    Release,
    /// With the `test-hooks` routes (`/__test/sleep`...), for tests that need them.
    TestHooks,
}

impl Build {
    /// The variable naming a prebuilt binary (scripts/test.sh builds and sets both).
    fn variable(self) -> &'static str {
        match self {
            Build::Release => "HERDSMAN_RELEASE_BIN",
            Build::TestHooks => "HERDSMAN_STATIC_BIN",
        }
    }

    fn features(self) -> &'static [&'static str] {
        match self {
            Build::Release => &[],
            Build::TestHooks => &["--features", "test-hooks"],
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Build::Release => RELEASE_IMAGE,
            Build::TestHooks => TEST_IMAGE,
        }
    }
}

/// The static herdsman for `build`: its variable's file, or built here like scripts/test.sh
/// does, in a separate target dir (RUSTFLAGS would invalidate the shared one), then copied out
/// of cargo's output path, which the other build overwrites.
fn static_binary(build: Build) -> PathBuf {
    if let Some(path) = std::env::var_os(build.variable()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{}={} is not a file", build.variable(), path.display());
        return path;
    }
    // The two builds in one test binary run one after the other: cargo locks the target dir.
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(format!("{}-static", PathBuf::from(dir).display())),
        None => repo().join("target-static"),
    };
    let target = "x86_64-unknown-linux-gnu";
    eprintln!("building the static herdsman in {} (set {} to skip)", target_dir.display(), build.variable());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(repo())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--release", "--locked", "--bin", "herdsman", "--target", target])
        .args(build.features())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "static build failed");
    let copy = target_dir.join(format!("herdsman-{}", unique("build")));
    std::fs::copy(target_dir.join(target).join("release/herdsman"), &copy).expect("copy the static binary");
    copy
}

/// Builds `build`'s image once per test binary: stages the binary (the image has nothing else
/// of its own: no CA bundle) in deploy/docker/host/<unique>/ (inside the build context,
/// gitignored), builds `--target runtime-from-host`, removes the staging directory and the
/// previous image of that tag.
fn image(build: Build) -> &'static str {
    static RELEASE: OnceLock<String> = OnceLock::new();
    static TEST_HOOKS: OnceLock<String> = OnceLock::new();
    let once = match build {
        Build::Release => &RELEASE,
        Build::TestHooks => &TEST_HOOKS,
    };
    once.get_or_init(|| {
        let binary = static_binary(build);
        let stage_rel = format!("deploy/docker/host/{}", unique("stage"));
        let stage = TempDir(repo().join(&stage_rel));
        std::fs::create_dir_all(&stage.0).expect("create the staging dir");
        std::fs::copy(&binary, stage.0.join("herdsman")).expect("stage the binary");

        let tag = build.tag();
        let previous = docker(&["image", "inspect", "-f", "{{.Id}}", tag]);
        let started = Instant::now();
        docker_ok(&[
            "build",
            "--quiet",
            "--target",
            "runtime-from-host",
            "--build-arg",
            &format!("HOST_ROOTFS={stage_rel}"),
            "--tag",
            tag,
            repo().to_str().expect("utf-8 path"),
        ]);
        eprintln!("built {tag} in {:?}", started.elapsed());
        if previous.status.success() {
            let old = String::from_utf8_lossy(&previous.stdout).trim().to_string();
            if old != docker_ok(&["image", "inspect", "-f", "{{.Id}}", tag]) {
                let _ = docker(&["image", "rm", &old]); // fails harmlessly while a container uses it
            }
        }
        tag.to_string()
    })
}

/// Runs `build`'s image detached like a small PaaS plan; `extra` goes before the image name.
fn run_herdsman(build: Build, extra: &[&str]) -> Container {
    let name = unique("herdsman-test");
    let mut args = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--env",
        "PORT=8080",
        "--env",
        "WEB_CONCURRENCY=2",
        "--env",
        "BCRYPT_COST=4",
        "--env",
        HEALTH_TOKEN_ENV,
        "--memory",
        "256m",
        "--cpus",
        "1",
        "--read-only",
        "--publish",
        "127.0.0.1::8080",
        "--health-interval",
        "1s",
        "--health-start-period",
        "1s",
        "--stop-timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    args.push(image(build));
    docker_ok(&args);
    Container { name }
}

async fn wait_live(container: &Container, client: &reqwest::Client) -> String {
    let base = format!("http://{}", container.published());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = client.get(format!("{base}/live")).send().await {
            if r.status() == 200 {
                return base;
            }
        }
        assert!(Instant::now() < deadline, "/live never answered 200; logs:\n{}", container.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

/// The metrics token every container gets, so that `/health` shows its details to [`health`].
const HEALTH_TOKEN_ENV: &str = "HERDSMAN_METRICS_TOKEN=health-details-token-for-tests";

async fn health(client: &reqwest::Client, base: &str) -> Value {
    let token = HEALTH_TOKEN_ENV.split_once('=').map_or("", |(_, token)| token);
    let r = client.get(format!("{base}/health")).bearer_auth(token).send().await.expect("GET /health");
    assert_eq!(r.status(), 200);
    r.json().await.expect("JSON health")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn image_is_small_from_scratch_and_configured_for_paas() {
    if !docker_engine::available() {
        return;
    }
    let image = image(Build::Release);
    let inspect: Value = serde_json::from_str(&docker_ok(&["image", "inspect", image])).expect("inspect JSON");
    let inspect = &inspect[0];
    let size = inspect["Size"].as_u64().expect("Size");
    eprintln!("image size: {size} bytes ({:.2} MB)", size as f64 / 1e6);
    assert!(size <= MAX_IMAGE_BYTES, "image is {size} bytes, target ≤ {MAX_IMAGE_BYTES}");
    let config = &inspect["Config"];
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/herdsman"]));
    assert!(config["Cmd"].is_null(), "no CMD: {}", config["Cmd"]);
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert!(config["ExposedPorts"].get("8080/tcp").is_some());
    assert!(config["Env"].as_array().unwrap().iter().any(|e| e == "PORT=8080"));
    assert_eq!(config["Healthcheck"]["Test"], serde_json::json!(["CMD", "/herdsman", "healthcheck"]));
    // scratch: one layer per COPY, no base-image layers.
    let layers = inspect["RootFS"]["Layers"].as_array().expect("layers").len();
    assert!(layers <= 3, "{layers} layers: the image should be scratch plus our COPYs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_as_non_root_pid_1_with_two_workers_and_reports_healthy() {
    if !docker_engine::available() {
        return;
    }
    let container = run_herdsman(Build::Release, &[]);
    let client = client();
    let base = wait_live(&container, &client).await;

    let h = health(&client, &base).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["checks"]["redis"]["status"], "disabled", "{h}");

    // PID 1 of the container is herdsman's master, as uid/gid 10001 (there is no `docker exec`
    // on scratch: read /proc from the host).
    let pid: i32 = container.inspect("{{.State.Pid}}").parse().expect("State.Pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let ids = |field: &str| -> Vec<String> {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in status"));
        line.split_whitespace().skip(1).map(str::to_string).collect()
    };
    assert_eq!(ids("Uid:"), vec!["10001"; 4], "{status}");
    assert_eq!(ids("Gid:"), vec!["10001"; 4], "{status}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "herdsman", "PID 1 is herdsman itself, not a shell");
    let workers = support::children_of(nix::unistd::Pid::from_raw(pid));
    assert_eq!(workers.len(), 2, "WEB_CONCURRENCY=2 → two workers; logs:\n{}", container.logs());
    for worker in workers {
        let s = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
        assert!(s.lines().any(|l| l.split_whitespace().eq(["Uid:", "10001", "10001", "10001", "10001"])));
    }

    // The image's HEALTHCHECK (`herdsman healthcheck`) reports healthy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = container.inspect("{{.State.Health.Status}}");
        if state == "healthy" {
            break;
        }
        assert_ne!(state, "unhealthy", "health log: {}", container.inspect("{{json .State.Health.Log}}"));
        assert!(Instant::now() < deadline, "never healthy: {}", container.inspect("{{json .State.Health}}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_completes_in_flight_requests_and_exits_0_well_inside_the_grace_period() {
    if !docker_engine::available() {
        return;
    }
    let container = run_herdsman(Build::TestHooks, &[]);
    let client = client();
    let base = wait_live(&container, &client).await;

    let probe = client.get(format!("{base}/__test/sleep?ms=1")).send().await.expect("GET /__test/sleep");
    assert_ne!(probe.status(), 404, "the static binary lacks the test-hooks feature (HERDSMAN_STATIC_BIN?)");

    // Slow requests in flight on both workers when the stop comes.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/__test/sleep?ms=3000"));
            tokio::spawn(async move {
                let r = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
                let status = r.status();
                let body = r.text().await.map_err(|e| format!("{e:?}"))?;
                Ok::<_, String>((status, body))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let name = container.name.clone();
    let stopping = Instant::now();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "--time", "30", &name]));
    let stop = stop.await.expect("docker stop task");
    let stopped_after = stopping.elapsed();
    assert!(stop.status.success(), "docker stop: {}", String::from_utf8_lossy(&stop.stderr));

    for request in slow {
        let (status, body) = request.await.expect("request task").expect("the in-flight request completed");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, "slept");
    }
    let grace = herdsman::Config::default().graceful_timeout;
    assert!(
        stopped_after < grace / 2,
        "docker stop took {stopped_after:?}; the in-flight requests needed ~2.5 s, the grace is {grace:?}"
    );
    assert_eq!(container.inspect("{{.State.ExitCode}}"), "0", "logs:\n{}", container.logs());
    assert_eq!(container.inspect("{{.State.OOMKilled}}"), "false");
    let logs = container.logs();
    assert!(!logs.contains("SIGKILL"), "nothing was killed:\n{logs}");
}

/// Image name for Redis, built locally by scripts/build-redis-image.sh when it is missing.
fn redis_image() -> String {
    let image = std::env::var("HERDSMAN_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".to_string());
    if !docker(&["image", "inspect", &image]).status.success() {
        let script = repo().join("scripts/build-redis-image.sh");
        let status = Command::new("bash").arg(&script).env("HERDSMAN_REDIS_IMAGE", &image).status();
        assert!(status.is_ok_and(|s| s.success()), "{} failed to provide {image}", script.display());
    }
    image
}

fn start_redis(network: &Network) -> Container {
    let name = unique("redis");
    docker_ok(&["run", "--detach", "--name", &name, "--network", &network.name, &redis_image()]);
    let redis = Container { name };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !redis.logs().contains("Ready to accept connections") {
        assert!(Instant::now() < deadline, "redis never became ready:\n{}", redis.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    redis
}

/// A client that opens a new connection per request, so that requests reach every worker (a
/// kept-alive connection stays with one).
fn unpooled_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().expect("client")
}

/// Waits until `workers` distinct worker pids have last reported `checks.redis.status == status`
/// (each worker has its own connection and breaker); returns the last answer.
async fn wait_for_redis_status(base: &str, status: &str, workers: usize, herdsman: &Container) -> Value {
    let client = unpooled_client();
    let mut latest = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(&client, base).await;
        latest.insert(h["pid"].clone(), h["checks"]["redis"]["status"].clone());
        if latest.values().filter(|s| *s == status).count() >= workers {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "checks.redis.status never {status} on {workers} workers: {latest:?}\nlogs:\n{}",
            herdsman.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct CacheLoad {
    ok: AtomicU64,
    misses: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaches_redis_by_container_name_and_falls_back_without_a_failed_request_when_it_dies() {
    if !docker_engine::available() {
        return;
    }
    let network = Network::create();
    let redis = start_redis(&network);
    // A host name, not an IP: resolved inside the scratch image by the static glibc.
    let url = format!("redis://{}:6379", redis.name);
    let herdsman = run_herdsman(Build::Release, &["--network", &network.name, "--env", &format!("REDIS_URL={url}")]);
    let client = client();
    let base = wait_live(&herdsman, &client).await;

    let h = wait_for_redis_status(&base, "up", 2, &herdsman).await;
    assert_eq!(h["status"], "ok", "{h}");
    let fresh = unpooled_client();
    // The cache API needs a session, and the session needs Redis.
    let credentials = serde_json::json!({ "username": "docker", "password": "password-docker" });
    let registered = fresh.post(format!("{base}/auth/register")).json(&credentials).send().await.unwrap();
    assert_eq!(registered.status(), 201);
    let login = fresh.post(format!("{base}/auth/login")).json(&credentials).send().await.unwrap();
    assert_eq!(login.status(), 200);
    let token: serde_json::Value = login.json().await.unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().expect("a token"));
    let put = fresh.put(format!("{base}/cache/shared")).header("authorization", &bearer).body("from-redis");
    let put = put.send().await.unwrap();
    assert_eq!(put.status(), 204);
    // Every worker reads what one wrote: the cache is Redis, not a worker's memory.
    for _ in 0..10 {
        // Fresh connections reach every worker, and each verifies (and remembers) the session.
        let r = fresh.get(format!("{base}/cache/shared")).header("authorization", &bearer).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache-tier"], "redis");
        assert_eq!(r.text().await.unwrap(), "from-redis");
    }

    // Concurrent cache traffic while Redis dies: every request gets an answer (204 for PUT,
    // 200 or 404 for GET: a miss in a worker's memory tier is an answer, not a failure).
    let load = Arc::new(CacheLoad::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let (client, base, load, stop) = (client.clone(), base.clone(), load.clone(), stop.clone());
            let bearer = bearer.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("{base}/cache/load-{task}-{}", n % 16);
                    match client.put(&key).header("authorization", &bearer).body(format!("v{n}")).send().await {
                        Ok(r) if r.status() == 204 => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => load.failures.lock().unwrap().push(format!("PUT {}", r.status())),
                        Err(e) => load.failures.lock().unwrap().push(format!("PUT {e:?}")),
                    }
                    match client.get(&key).header("authorization", &bearer).send().await {
                        Ok(r) if r.status() == 200 => {
                            load.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) if r.status() == 404 => {
                            load.misses.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => load.failures.lock().unwrap().push(format!("GET {}", r.status())),
                        Err(e) => load.failures.lock().unwrap().push(format!("GET {e:?}")),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = load.ok.load(Ordering::Relaxed);
    assert!(before_kill > 0, "the load runs");

    docker_ok(&["kill", &redis.name]);
    let h = wait_for_redis_status(&base, "fallback", 1, &herdsman).await;
    assert_eq!(h["status"], "degraded", "{h}");
    let at_fallback = load.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    let after = load.ok.load(Ordering::Relaxed);
    let failures = load.failures.lock().unwrap().clone();
    eprintln!(
        "cache load: {before_kill} ok before the kill, {at_fallback} at fallback, {after} in all, {} misses",
        load.misses.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\nlogs:\n{}",
        failures.len(),
        &failures[..failures.len().min(20)],
        herdsman.logs()
    );
    assert!(after > at_fallback, "requests kept succeeding after the fallback");

    // The cache still answers from memory.
    let put = client.put(format!("{base}/cache/after")).header("authorization", &bearer).body("memory");
    let put = put.send().await.unwrap();
    assert_eq!(put.status(), 204);
}
