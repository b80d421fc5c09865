//! Signals to the master, mapped once onto what the operator means by them.
//!
//! | signal       | intent                       | who sends it                              |
//! |--------------|------------------------------|-------------------------------------------|
//! | `SIGTERM`    | [`Intent::GracefulStop`]     | Heroku, Render, Railway, Docker, Kubernetes |
//! | `SIGINT`     | [`Intent::GracefulStop`]     | Fly.io, Ctrl-C                            |
//! | `SIGQUIT`    | [`Intent::FastStop`]         | an operator who cannot wait               |
//! | `SIGHUP`     | [`Intent::RollingRestart`]   | a deploy of a new binary in place         |
//! | `SIGTTIN`    | [`Intent::AddWorker`]        | an operator scaling up                    |
//! | `SIGTTOU`    | [`Intent::RemoveWorker`]     | an operator scaling down                  |
//! | `SIGCHLD`    | [`Intent::ReapChildren`]     | the kernel, when any child exits          |
//!
//! A second `SIGTERM`/`SIGINT` while the master drains is taken as a fast stop (Ctrl-C twice).
//! Installing handlers also matters when herdsman is PID 1 in a container: the kernel drops
//! signals that PID 1 has no handler for, so without them `docker stop` would wait for SIGKILL.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What the master is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    GracefulStop,
    FastStop,
    RollingRestart,
    AddWorker,
    RemoveWorker,
    ReapChildren,
}

/// The master's signal handlers, installed once, read as a stream of intents.
pub struct Signals {
    streams: Vec<(Signal, Intent, &'static str)>,
}

impl Signals {
    /// Installs the handlers. Must run inside the master's tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        let table = [
            (SignalKind::terminate(), Intent::GracefulStop, "SIGTERM"),
            (SignalKind::interrupt(), Intent::GracefulStop, "SIGINT"),
            (SignalKind::quit(), Intent::FastStop, "SIGQUIT"),
            (SignalKind::hangup(), Intent::RollingRestart, "SIGHUP"),
            (SignalKind::from_raw(libc::SIGTTIN), Intent::AddWorker, "SIGTTIN"),
            (SignalKind::from_raw(libc::SIGTTOU), Intent::RemoveWorker, "SIGTTOU"),
            (SignalKind::child(), Intent::ReapChildren, "SIGCHLD"),
        ];
        let mut streams = Vec::with_capacity(table.len());
        for (kind, intent, name) in table {
            streams.push((signal(kind)?, intent, name));
        }
        Ok(Signals { streams })
    }

    /// Forwards every signal, as its intent and name, to the channel returned (the master's
    /// loop reads it), from a task on the current runtime.
    pub fn into_intents(mut self) -> tokio::sync::mpsc::Receiver<(Intent, &'static str)> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let intent = self.recv().await;
                if tx.send(intent).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Waits for the next signal and returns its intent and name.
    pub async fn recv(&mut self) -> (Intent, &'static str) {
        std::future::poll_fn(|cx| {
            for (stream, intent, name) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready((*intent, *name));
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
