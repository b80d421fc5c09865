//! A TCP proxy in front of a Redis that can delay its replies (a slow Redis), pause the link (a
//! hang: nothing moves either way) and cut it (every connection closed, new ones refused). Its
//! own file so that a test can have it beside either Redis of the support (`redis_server.rs`
//! re-exports it; tests/sessions_redis.rs includes it next to `redis.rs`, each of which brings
//! its own `docker_engine`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on 127.0.0.1 in front of `upstream`. It holds every chunk of the server's replies
/// for [`SlowProxy::set_delay`] before passing it on (requests pass at once; replies are delayed,
/// not serialised: a pipeline of many replies still takes one delay); [`SlowProxy::pause`]
/// stops every byte either way until [`SlowProxy::resume`], and [`SlowProxy::cut`] closes every
/// connection and refuses new ones until [`SlowProxy::heal`]. [`SlowProxy::set_upstream`] moves
/// it to another server, as an endpoint follows a failover: new connections go there, open ones
/// stay where they are.
pub struct SlowProxy {
    pub url: String,
    link: Arc<Link>,
    task: tokio::task::JoinHandle<()>,
}

/// What the proxy does to the bytes it carries, shared by its connections.
struct Link {
    /// The port new connections are made to.
    upstream: AtomicU16,
    delay_us: AtomicU64,
    /// While `true` nothing is forwarded; what arrives waits in the proxy and flows on resume,
    /// as bytes in flight on a stalled network would.
    paused: watch::Sender<bool>,
    /// Bumped by every cut: each connection open at the time is closed.
    cuts: watch::Sender<u64>,
    refusing: AtomicBool,
}

impl SlowProxy {
    pub async fn start(upstream: u16) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("redis://{}", listener.local_addr().expect("proxy addr"));
        let link = Arc::new(Link {
            upstream: AtomicU16::new(upstream),
            delay_us: AtomicU64::new(0),
            paused: watch::Sender::new(false),
            cuts: watch::Sender::new(0),
            refusing: AtomicBool::new(false),
        });
        let shared = link.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cuts = shared.cuts.subscribe();
                if shared.refusing.load(Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let link = shared.clone();
                tokio::spawn(async move {
                    let upstream = link.upstream.load(Ordering::Relaxed);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let requests = forward(client_read, server_write, &link, false);
                    let replies = forward(server_read, client_write, &link, true);
                    // A cut drops both directions, which closes both sockets.
                    tokio::select! {
                        _ = async { tokio::join!(requests, replies) } => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        SlowProxy { url, link, task }
    }

    /// New connections go to `port` from now on; open ones are left as they are.
    pub fn set_upstream(&self, port: u16) {
        self.link.upstream.store(port, Ordering::Relaxed);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.link.delay_us.store(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Nothing moves either way (connections stay open, new ones are accepted and wait).
    pub fn pause(&self) {
        self.link.paused.send_replace(true);
    }

    /// What waited flows on, in order.
    pub fn resume(&self) {
        self.link.paused.send_replace(false);
    }

    /// Every connection closed, new ones refused (accepted and closed at once).
    pub fn cut(&self) {
        self.link.refusing.store(true, Ordering::Relaxed);
        self.link.cuts.send_modify(|n| *n += 1);
    }

    /// Back to normal: not paused, not cut, no delay.
    pub fn heal(&self) {
        self.link.refusing.store(false, Ordering::Relaxed);
        self.set_delay(Duration::ZERO);
        self.resume();
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while the link is not paused, each chunk leaving the proxy's delay
/// after it arrived when `delayed`; the end of `from` is passed on as the end of `to`.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: &Link, delayed: bool) {
    let (chunks, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let mut paused = link.paused.subscribe();
    let read = async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let delay =
                if delayed { Duration::from_micros(link.delay_us.load(Ordering::Relaxed)) } else { Duration::ZERO };
            if chunks.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if paused.wait_for(|paused| !paused).await.is_err() || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}
