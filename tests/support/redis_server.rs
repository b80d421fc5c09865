//! The host's `redis-server` as a child process, for the states a container cannot easily be
//! put in from a test (a replica, a dataset still loading, a frozen process), and a TCP proxy
//! that delays every reply (a slow Redis).
//!
//! Include it with `#[path = "support/redis_server.rs"] mod redis_server;`. Without
//! `redis-server` on the PATH, [`LocalRedis::start`] returns `None` after printing `SKIPPED`
//! (a failure when `CI` is set, see `docker_engine::skip`).
#![allow(dead_code)] // each test file uses a different subset of the helpers

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "docker_engine.rs"]
pub mod docker_engine;
#[path = "slow_proxy.rs"]
mod slow_proxy;
#[allow(unused_imports)] // not every file that includes this one slows Redis down
pub use slow_proxy::SlowProxy;

/// A `redis-server` on 127.0.0.1 with its own data directory, killed when dropped.
pub struct LocalRedis {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    pub dir: PathBuf,
    /// TLS only (`--port 0 --tls-port`): [`LocalRedis::start_tls`].
    tls: bool,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

impl LocalRedis {
    /// Starts `redis-server` with `extra` arguments (no persistence unless they ask for it).
    pub fn start(test: &str, extra: &[&str]) -> Option<LocalRedis> {
        let mut redis = Self::launch(test, false, extra)?;
        if let Err(exited) = redis.wait_listening() {
            panic!("{exited}");
        }
        Some(redis)
    }

    /// Starts `redis-server` serving TLS only, with this certificate and key, clients not
    /// asked for certificates; `url` is `rediss://127.0.0.1:PORT`. A server that exits at once
    /// (a build without TLS) skips the test like a missing `redis-server`.
    pub fn start_tls(test: &str, cert: &Path, key: &Path) -> Option<LocalRedis> {
        let (cert, key) = (cert.to_str().expect("UTF-8 cert path"), key.to_str().expect("UTF-8 key path"));
        let extra = ["--tls-auth-clients", "no", "--tls-cert-file", cert, "--tls-key-file", key];
        let mut redis = Self::launch(test, true, &extra)?;
        redis.url = format!("rediss://127.0.0.1:{}", redis.port);
        match redis.wait_listening() {
            Ok(()) => Some(redis),
            Err(exited) => {
                docker_engine::skip(test, "redis-server built with TLS (Debian's is)", &exited);
                None
            }
        }
    }

    fn launch(test: &str, tls: bool, extra: &[&str]) -> Option<LocalRedis> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            docker_engine::skip(test, "redis-server (apt-get install redis-server)", "not on the PATH");
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herdsman-redis-server-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        let port = free_port();
        let mut redis = LocalRedis {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            tls,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.spawn(&[]);
        Some(redis)
    }

    fn spawn(&mut self, more: &[&str]) {
        let port = self.port.to_string();
        let ports: &[&str] = if self.tls { &["--port", "0", "--tls-port", &port] } else { &["--port", &port] };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .args(more)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
    }

    /// Waits until the port accepts connections (it may still answer LOADING); `Err` says how
    /// the server exited if it did first.
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("redis-server exited before listening ({status})"));
                }
            }
            assert!(Instant::now() < deadline, "redis-server not listening within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `SHUTDOWN NOSAVE` is not needed: the data this test saved is in `dir`. Kills the
    /// process and starts it again on the same port with `more` arguments.
    pub fn restart_with(&mut self, more: &[&str]) {
        self.kill();
        self.spawn(more);
        if let Err(exited) = self.wait_listening() {
            panic!("{exited}");
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGSTOP: the process is frozen, its port still accepts connections; nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// A plain client connection, to put the server into a state or look behind the cache.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server")
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server would not die of SIGKILL any later, but make sure.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
