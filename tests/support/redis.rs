//! A throw-away Redis for integration tests, with the failure switches the
//! cache and auth tests need: stop / start (Redis refuses connections) and
//! pause / unpause (Redis hangs: the TCP port accepts bytes, nothing answers).
//!
//! Include it from a test file with
//! `#[path = "support/redis.rs"] mod redis_support;`.
//!
//! Without a Docker engine, [`TestRedis::start`] returns `None` and the test returns at once:
//! skipped with a line on stderr, or a failure when `CI` is set (tests/support/docker_engine.rs).
//!
//! The image comes from `HERDSMAN_REDIS_IMAGE` (`name:tag`, default `redis:7`).
//! When it is missing locally, `scripts/build-redis-image.sh` builds a stand-in
//! from the host's Debian `redis-server` (for machines with no registry access).
//!
//! The container's port 6379 is published on a host port chosen here, not by
//! Docker: after `docker stop` + `docker start` Docker would otherwise pick a
//! new ephemeral port and the URL handed to the code under test would go stale.
#![allow(dead_code)] // each test file uses a different subset of the helpers

use std::net::TcpListener;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

#[path = "docker_engine.rs"]
mod docker_engine;

/// A running (or deliberately stopped/paused) Redis container.
pub struct TestRedis {
    container: ContainerAsync<GenericImage>,
    /// `redis://127.0.0.1:PORT`, valid across stop/start.
    pub url: String,
    pub port: u16,
}

/// Image name and tag from `HERDSMAN_REDIS_IMAGE`, default `redis:7`.
pub fn image_name() -> (String, String) {
    let image = std::env::var("HERDSMAN_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".to_string());
    // Split on the last ':' that comes after the last '/', so a registry
    // port (`host:5000/redis`) is not mistaken for a tag.
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (image[..slash + i].to_string(), image[slash + i + 1..].to_string()),
        None => (image, "latest".to_string()),
    }
}

fn ensure_image() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-redis-image.sh");
        let status = Command::new("bash").arg(script).status().expect("run scripts/build-redis-image.sh");
        assert!(status.success(), "scripts/build-redis-image.sh failed");
    });
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

impl TestRedis {
    /// Starts Redis and waits for `Ready to accept connections`. `None` when the test is to be
    /// skipped for want of a Docker engine (outside CI; under CI that panics).
    pub async fn start() -> Option<TestRedis> {
        if !docker_engine::available() {
            return None;
        }
        ensure_image();
        let (name, tag) = image_name();
        let port = free_port();
        let container = GenericImage::new(name, tag)
            .with_exposed_port(6379.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_mapped_port(port, 6379.tcp())
            .start()
            .await
            .expect("start redis container");
        let redis = TestRedis { container, url: format!("redis://127.0.0.1:{port}"), port };
        redis.wait_ready(Duration::from_secs(10)).await;
        Some(redis)
    }

    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// `docker stop`: Redis exits, the port refuses connections. Data is lost
    /// (the image runs without persistence).
    pub async fn stop(&self) {
        self.container.stop_with_timeout(Some(1)).await.expect("stop redis container");
    }

    /// `docker start` after [`stop`](Self::stop); waits until Redis answers PING.
    pub async fn restart(&self) {
        self.container.start().await.expect("start redis container");
        self.wait_ready(Duration::from_secs(10)).await;
    }

    /// `docker pause`: the process is frozen; connections hang instead of failing.
    pub async fn pause(&self) {
        self.container.pause().await.expect("pause redis container");
    }

    pub async fn unpause(&self) {
        self.container.unpause().await.expect("unpause redis container");
        self.wait_ready(Duration::from_secs(10)).await;
    }

    /// A plain `redis` client connection, to look behind the code under test.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    async fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ping = async {
                let mut conn =
                    redis::Client::open(self.url.as_str()).ok()?.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut conn).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
                return;
            }
            assert!(Instant::now() < deadline, "redis not ready within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
