//! The seed of herdsman: an app whose warm-ups block, written the way the Python service that
//! started it all wrote them. Run with `REDIS_URL=redis://… cargo run --release --example seed`.
//!
//! Under gunicorn, that service's workers hashed three bcrypt passwords at cost 12, connected to
//! Redis synchronously with no timeout and loaded a cache for 5 s, all in the lifespan start-up
//! before serving. A worker that blocks like that sends gunicorn no heartbeat, so the master
//! kills it ("WORKER TIMEOUT", "Worker … was sent SIGKILL!"), starts another that blocks the same
//! way, and the service never serves: a crash loop. Each warm-up below makes the same mistake
//! on purpose: blocking calls straight in the async body, never `spawn_blocking`, no timeout on
//! the socket. `bench/run.py seed` runs this example next to the same warm-ups in FastAPI under
//! gunicorn (`bench/peer`, `PEER_BLOCKING_WARMUP=1`) with `REDIS_URL` pointing at a Redis that
//! accepts connections and never answers, and counts what serves, what fails and what is killed.
//!
//! The names differ from the built-in warm-ups (`bcrypt_prewarm`, `redis`, `cache_warmup`),
//! which still run next to these: `/health` shows both under `checks`.

use std::time::Duration;

use herdsman::{App, Services, WarmupTask};

/// The cost the seed's service used: about a quarter of a second per hash on a server core.
const BCRYPT_COST: u32 = 12;
/// How long the seed's cache load took.
const CACHE_LOAD: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    App::new()
        .warmup(WarmupTask::new("bcrypt_prewarm_blocking", |_services| async {
            // CPU-bound work called directly in the async body: it holds the thread that runs it.
            for _ in 0..3 {
                bcrypt::hash("seed-prewarm", BCRYPT_COST)?;
            }
            Ok::<(), bcrypt::BcryptError>(())
        }))
        .warmup(WarmupTask::new("redis_connect_blocking", |services: Services| async move {
            let Some(url) = services.config.redis_url.clone() else {
                return Ok(());
            };
            // The synchronous client, no connect or read timeout: against a Redis that accepts
            // and never answers, this waits for ever.
            let mut connection = redis::Client::open(url)?.get_connection()?;
            redis::cmd("PING").query::<String>(&mut connection)?;
            Ok::<(), redis::RedisError>(())
        }))
        .warmup(
            WarmupTask::new("cache_load_blocking", |_services| async {
                // A slow load as a blocking sleep: the thread does nothing else for 5 s.
                std::thread::sleep(CACHE_LOAD);
                Ok::<(), std::convert::Infallible>(())
            })
            // Longer than the load itself (the default is STARTUP_OPERATION_TIMEOUT): a load
            // that is slow but finishes is reported `ok`.
            .timeout(CACHE_LOAD * 2),
        )
        .run()
}
