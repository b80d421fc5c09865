//! [`Shutdown`]: how long-lived connections (WebSockets, server-sent events) learn that their
//! worker is draining, and how the drain waits for them.
//!
//! hyper's graceful shutdown knows a connection only while hyper serves it: a WebSocket leaves
//! hyper at its `101 Switching Protocols`, and an event stream is one response that never ends
//! by itself. hyper can tell neither to go, and would not wait for the WebSocket. So the handler
//! that serves one holds a [`LongLived`] for as long as it runs and watches
//! [`Shutdown::draining`]: when the drain starts (SIGTERM, or SIGHUP's rolling restart for the
//! old workers) it says goodbye — close code 1001 "going away", or the end of the event stream —
//! and drops its guard; the client reconnects, to a worker that is not draining. The drain waits
//! for every guard within `GRACEFUL_TIMEOUT`; then the worker exits and cuts what is left.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// A worker's drain, as its handlers see it. Cheap to clone; in [`crate::Services`].
#[derive(Clone, Default)]
pub struct Shutdown {
    started: CancellationToken,
    long_lived: TaskTracker,
}

/// One long-lived connection the drain waits for; dropping it says the connection is over.
#[must_use = "the drain waits only while the guard is held"]
pub struct LongLived {
    _token: TaskTrackerToken,
}

impl Shutdown {
    /// Resolves when the worker starts draining (at once if it already has). Owns what it
    /// needs, so it can move into a spawned task or a stream.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.started.clone().cancelled_owned()
    }

    pub fn is_draining(&self) -> bool {
        self.started.is_cancelled()
    }

    /// Counts a long-lived connection until the guard is dropped.
    pub fn hold(&self) -> LongLived {
        LongLived { _token: self.long_lived.token() }
    }

    /// Tells every long-lived connection to go.
    pub(crate) fn begin(&self) {
        self.started.cancel();
        self.long_lived.close();
    }

    /// Long-lived connections still open.
    pub(crate) fn open(&self) -> usize {
        self.long_lived.len()
    }

    /// Resolves when every [`LongLived`] is dropped, once [`Self::begin`] has run.
    pub(crate) async fn all_closed(&self) {
        self.long_lived.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_drain_tells_holders_and_waits_for_their_guards() {
        let shutdown = Shutdown::default();
        let guard = shutdown.hold();
        let told = tokio::spawn(shutdown.draining());
        assert!(!shutdown.is_draining());
        shutdown.begin();
        told.await.expect("the draining future resolves");
        assert_eq!(shutdown.open(), 1);
        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.all_closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a guard is still held");
        drop(guard);
        waiting.await.expect("the drain sees the last guard go");
        assert_eq!(shutdown.open(), 0);
    }
}
