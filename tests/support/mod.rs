//! Test support: the real `herdsman` binary as a child process on 127.0.0.1, its log lines,
//! real signals, and a small load generator that records every request's outcome.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running herdsman master, killed (with its workers) when dropped.
pub struct Herdsman {
    child: Option<Child>,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Starts `herdsman` with these variables on an ephemeral port of 127.0.0.1 and waits until it
/// logs `Listening at`.
pub fn start(env: &[(&str, &str)]) -> Herdsman {
    start_with_args(&[], env)
}

/// The `HERDSMAN_METRICS_TOKEN` of [`start_with_health`]: it opens `/health`'s details.
pub const HEALTH_TOKEN: &str = "health-details-token-for-tests";

/// [`start`] with [`HEALTH_TOKEN`] as the metrics token, for tests that read `/health`'s details
/// (an anonymous caller gets only `{"status":"ok"}`).
pub fn start_with_health(env: &[(&str, &str)]) -> Herdsman {
    let mut env = env.to_vec();
    env.push(("HERDSMAN_METRICS_TOKEN", HEALTH_TOKEN));
    start(&env)
}

/// `/health`'s details from a server of [`start_with_health`], on `client`'s connection.
pub async fn health_details(client: &reqwest::Client, server: &Herdsman) -> serde_json::Value {
    let health = client.get(server.url("/health")).bearer_auth(HEALTH_TOKEN).send().await.expect("GET /health");
    health.json().await.expect("JSON /health")
}

pub fn start_with_args(args: &[&str], env: &[(&str, &str)]) -> Herdsman {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herdsman"));
    command
        .args(args)
        .env_clear()
        .env("PORT", "0")
        .env("HERDSMAN_HOST", "127.0.0.1")
        .env("WEB_CONCURRENCY", "2")
        .env("BCRYPT_COST", "4")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn herdsman");
    let stderr = child.stderr.take().expect("stderr piped");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("HERDSMAN_TEST_ECHO").is_some() {
                eprintln!("{line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    let mut server = Herdsman { child: Some(child), port: 0, logs };
    let line = server.wait_for_log("Listening at: http://", Duration::from_secs(10));
    let port = line
        .split("Listening at: http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("port in the Listening line");
    server.port = port;
    server
}

impl Herdsman {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a log line containing `needle`, returns it; panics with the logs on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_nth_log(needle, 1, timeout)
    }

    pub fn wait_for_nth_log(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<String> = self.logs().into_iter().filter(|l| l.contains(needle)).collect();
            if matching.len() >= n {
                return matching[n - 1].clone();
            }
            if Instant::now() > deadline {
                panic!("no {n}th log line containing {needle:?} within {timeout:?}; logs:\n{}", self.logs().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the master");
    }

    /// The master's live worker processes.
    pub fn workers(&self) -> Vec<Pid> {
        children_of(self.pid())
    }

    /// The master's live workers, recorded so that a test can later tell whether they are gone.
    pub fn worker_processes(&self) -> Vec<Process> {
        self.workers().into_iter().map(Process::record).collect()
    }

    /// Waits until the master has exactly `n` workers whose boot was logged as ready.
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.workers().len() != n {
            if Instant::now() > deadline {
                panic!("expected {n} workers, have {:?}; logs:\n{}", self.workers(), self.logs().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the master to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("herdsman did not exit within {timeout:?}; logs:\n{}", self.logs().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Herdsman {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let workers = children_of(Pid::from_raw(child.id() as i32));
            let _ = child.kill();
            let _ = child.wait();
            for pid in workers {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// The live (non-zombie) processes whose parent is `parent`.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    children_with_state(parent).into_iter().filter(|(_, state)| state != "Z").map(|(pid, _)| pid).collect()
}

/// Every process whose parent is `parent`, zombies included, with its state letter from /proc.
pub fn children_with_state(parent: Pid) -> Vec<(Pid, String)> {
    let mut children = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return children };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Some(fields) = stat_fields(Pid::from_raw(pid)) else { continue };
        // fields[0] = state, fields[1] = ppid.
        if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent.as_raw()) {
            children.push((Pid::from_raw(pid), fields[0].clone()));
        }
    }
    children
}

/// The fields of /proc/PID/stat after the command name (which is in parentheses and may contain
/// spaces): `[0]` is field 3 of proc(5), the state; `[1]` the ppid; `[19]` field 22, the start
/// time. `None` when there is no such process.
fn stat_fields(pid: Pid) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// One process, told apart from a later process that reuses its pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: Pid,
    /// Field 22 of /proc/PID/stat: clock ticks after boot at which it started.
    started: u64,
}

impl Process {
    /// Records a running process; panics when there is none with this pid.
    pub fn record(pid: Pid) -> Process {
        let started = stat_fields(pid).and_then(|f| start_time(&f)).unwrap_or_else(|| panic!("no process {pid}"));
        Process { pid, started }
    }

    /// Its state letter from /proc (`Z` for a zombie nobody reaped yet), or `None` once it is
    /// gone: reaped, its pid free or taken by another process.
    pub fn state(&self) -> Option<char> {
        let fields = stat_fields(self.pid)?;
        if start_time(&fields)? != self.started {
            return None;
        }
        fields[0].chars().next()
    }
}

fn start_time(stat_fields: &[String]) -> Option<u64> {
    stat_fields.get(19)?.parse().ok()
}

/// Runs `herdsman` to completion with these arguments and variables; returns status and stderr.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_herdsman"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run herdsman");
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    (output.status, text)
}

/// The outcome of a load run.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    /// 404 answers: a cache miss is an answer, not a failure; tests decide what they allow.
    pub not_found: u64,
    /// 401 answers, and when the first came: a session can end during a load (a Redis that
    /// restarts empty forgets it); tests decide when that is allowed.
    pub unauthorized: u64,
    pub first_unauthorized_at: Option<Instant>,
    /// Transport errors and every other non-2xx status.
    pub failed: u64,
    pub errors: Vec<String>,
    pub max_latency: Duration,
}

/// `concurrency` tasks sending GET `path` over keep-alive connections until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<LoadReport>>,
    pub sent: Arc<AtomicU64>,
}

impl Load {
    pub fn start(url: String, concurrency: usize) -> Load {
        Load::start_with(reqwest::Client::builder(), url, concurrency)
    }

    /// Like [`Load::start`], every request with `Authorization: Bearer {token}`.
    pub fn start_authorized(url: String, concurrency: usize, token: &str) -> Load {
        Load::start_with(reqwest::Client::builder().default_headers(bearer(token)), url, concurrency)
    }

    fn start_with(client: reqwest::ClientBuilder, url: String, concurrency: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let client = client.timeout(Duration::from_secs(10)).build().expect("client");
        let load_started = Instant::now();
        let handles = (0..concurrency)
            .map(|_| {
                let (stop, sent, client, url) = (stop.clone(), sent.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let outcome = client.get(&url).send().await;
                        report.max_latency = report.max_latency.max(started.elapsed());
                        sent.fetch_add(1, Ordering::Relaxed);
                        match outcome {
                            Ok(r) if r.status().is_success() => match r.bytes().await {
                                Ok(_) => report.ok += 1,
                                Err(e) => {
                                    report.failed += 1;
                                    report.errors.push(format!("body: {e:?}"));
                                }
                            },
                            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => report.not_found += 1,
                            Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                                report.unauthorized += 1;
                                report.first_unauthorized_at.get_or_insert(started);
                            }
                            Ok(r) => {
                                report.failed += 1;
                                report.errors.push(format!("status {} at {:?}", r.status(), load_started.elapsed()));
                            }
                            Err(e) => {
                                report.failed += 1;
                                report.errors.push(format!("{e:?} at {:?}", load_started.elapsed()));
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, handles, sent }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for handle in self.handles {
            let r = handle.await.expect("load task");
            total.ok += r.ok;
            total.failed += r.failed;
            total.not_found += r.not_found;
            total.unauthorized += r.unauthorized;
            total.first_unauthorized_at = match (total.first_unauthorized_at, r.first_unauthorized_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            total.errors.extend(r.errors);
            total.max_latency = total.max_latency.max(r.max_latency);
        }
        total
    }
}

/// Registers `username` (password `password-{username}`) and logs in; returns the session
/// token, for `Authorization: Bearer`. Needs a server with a `REDIS_URL`.
pub async fn register_and_login(client: &reqwest::Client, server: &Herdsman, username: &str) -> String {
    let credentials = serde_json::json!({ "username": username, "password": format!("password-{username}") });
    let registered = client.post(server.url("/auth/register")).json(&credentials).send().await.expect("register");
    assert!(matches!(registered.status().as_u16(), 201 | 409), "register {username}: {}", registered.status());
    let login = client.post(server.url("/auth/login")).json(&credentials).send().await.expect("login");
    assert_eq!(login.status(), 200, "login {username}");
    let body: serde_json::Value = login.json().await.expect("login body");
    body["token"].as_str().expect("a token").to_string()
}

fn bearer(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is ASCII");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    headers
}

/// A client that sends `Authorization: Bearer {token}` with every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    reqwest::Client::builder().default_headers(bearer(token)).build().expect("client")
}

/// An HTTP/2 client's connection preface with prior knowledge, and an empty SETTINGS frame.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// One HTTP/2 frame's type, flags and payload, `None` at the end of the connection.
pub fn read_h2_frame(stream: &mut std::net::TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).ok()?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).ok()?;
    Some((head[3], head[4], payload))
}
