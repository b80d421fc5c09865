//! The host's `redis-server` as a child process, for the states a container cannot easily be
//! put in from a test (a replica, a dataset still loading, a frozen process), and a TCP proxy
//! that delays every reply (a slow Redis).
//!
//! Include it with `#[path = "support/redis_server.rs"] mod redis_server;`. Without
//! `redis-server` on the PATH, [`LocalRedis::start`] returns `None` after printing `SKIPPED`
//! (a failure when `CI` is set, see `docker_engine::skip`).
#![allow(dead_code)] // each test file uses a different subset of the helpers

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "docker_engine.rs"]
mod docker_engine;
#[path = "slow_proxy.rs"]
mod slow_proxy;
pub use slow_proxy::SlowProxy;

/// A `redis-server` on 127.0.0.1 with its own data directory, killed when dropped.
pub struct LocalRedis {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    pub dir: PathBuf,
    extra: Vec<String>,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

impl LocalRedis {
    /// Starts `redis-server` with `extra` arguments (no persistence unless they ask for it).
    pub fn start(test: &str, extra: &[&str]) -> Option<LocalRedis> {
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
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.spawn(&[]);
        redis.wait_listening();
        Some(redis)
    }

    fn spawn(&mut self, more: &[&str]) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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

    /// Waits until the port accepts connections (it may still answer LOADING).
    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server not listening within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SHUTDOWN NOSAVE` is not needed: the data this test saved is in `dir`. Kills the
    /// process and starts it again on the same port with `more` arguments.
    pub fn restart_with(&mut self, more: &[&str]) {
        self.kill();
        self.spawn(more);
        self.wait_listening();
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
