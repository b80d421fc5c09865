//! The master's side of the control socket (see [`crate::operator`]): a task accepts
//! connections, refuses peers of another user, reads one bounded request line and hands it to
//! the master's loop, which alone owns the workers' state and answers it
//! ([`Master::on_operator`]).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Master, Stage, WorkerState};
use crate::operator::{self, Reply, Request, SocketName, StatusReport, WorkerReport, MAX_REQUEST_BYTES};
use crate::signals::Intent;

/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more are closed at once. Any local user can connect to an
/// abstract socket (the uid is checked after the request line), so this bounds what they hold.
const MAX_CONNECTIONS: usize = 8;

/// A request on its way to the master's loop, with where to send the answer.
pub(super) type OperatorCall = (Request, oneshot::Sender<Reply>);

impl Master {
    /// Binds the control socket and serves it; a socket that cannot be bound only costs the
    /// commands (logged), never the service.
    pub(super) fn serve_operator(&self) {
        let name = SocketName::for_master(&self.config, self.port);
        match bind(&name) {
            Ok(listener) => {
                tracing::info!("Control socket: {name} (herdsman status | reload | scale N)");
                tokio::spawn(accept(listener, self.operator_tx.clone()));
            }
            Err(e) => tracing::warn!(
                "no control socket at {name}: {e}; herdsman status/reload/scale will not reach this master"
            ),
        }
    }

    /// Carries out one operator request.
    pub(super) fn on_operator(&mut self, request: Request) -> Reply {
        if let super::Phase::Stopping { .. } = self.phase {
            if request != Request::Status {
                return Reply::Refused(format!("the master is {}", self.phase.name()));
            }
        }
        match request {
            Request::Status => Reply::Status(self.status(Instant::now())),
            Request::Reload => {
                self.on_intent(Intent::RollingRestart, "control socket: reload");
                let replacing = self.workers.values().filter(|w| w.replace.is_some()).count();
                Reply::Done(format!("rolling restart of {replacing} workers started"))
            }
            Request::Scale { workers } => match operator::parse_worker_count(&workers.to_string()) {
                Ok(target) => {
                    let before = self.target;
                    self.target = target;
                    tracing::info!("worker count set to {target} (was {before}) from the control socket");
                    Reply::Done(format!("worker count {before} -> {target}"))
                }
                Err(e) => Reply::Refused(e),
            },
        }
    }

    fn status(&self, now: Instant) -> StatusReport {
        let workers = self
            .workers
            .iter()
            .map(|(pid, w)| {
                let counts = self.metrics.as_ref().zip(w.slot).map(|((table, _), slot)| table.slot_counts(slot));
                WorkerReport {
                    serial: w.serial,
                    pid: pid.as_raw(),
                    state: state_name(w).into(),
                    age_seconds: now.saturating_duration_since(w.spawned_at).as_secs_f64(),
                    requests_served: counts.map(|(served, _)| served),
                    in_flight: counts.map(|(_, in_flight)| in_flight),
                    heartbeat_age_seconds: now.saturating_duration_since(w.last_heartbeat).as_secs_f64(),
                    rss_bytes: super::memory::resident_bytes(pid.as_raw()),
                    own_memory_bytes: super::memory::own_memory(pid.as_raw()).map(|(bytes, _)| bytes),
                    breaker_open: self
                        .metrics
                        .as_ref()
                        .zip(w.slot)
                        .map(|((table, _), slot)| table.slot_level(slot, crate::metrics::Level::BreakerOpen) > 0),
                }
            })
            .collect();
        StatusReport {
            master_pid: std::process::id(),
            phase: self.phase.name().into(),
            target_workers: self.target,
            workers,
            memory_line_bytes: self.config.max_worker_memory.map(|line| line.per_worker(self.target)),
        }
    }
}

fn state_name(worker: &WorkerState) -> &'static str {
    match worker.stage {
        Stage::InService if worker.ready_at.is_none() => "booting",
        Stage::InService if worker.replace.is_some() => "replacing",
        Stage::InService => "serving",
        Stage::Draining { .. } => "draining",
        Stage::Aborting { .. } => "aborting",
        Stage::Killed => "killed",
    }
}

fn bind(name: &SocketName) -> std::io::Result<UnixListener> {
    if let SocketName::Path(path) = name {
        // A socket file left by a master that died is removed; a live master's is not.
        if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind_addr(&name.address()?)?;
    if let SocketName::Path(path) = name {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

async fn accept(listener: UnixListener, calls: mpsc::Sender<OperatorCall>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let calls = calls.clone();
                tokio::spawn(async move {
                    serve(stream, calls).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection: one request, one answer. The request is read before the peer is checked,
/// so that a refused client gets its answer rather than a broken pipe.
async fn serve(mut stream: UnixStream, calls: mpsc::Sender<OperatorCall>) {
    let request = read_request(&mut stream).await;
    let reply = match (stream.peer_cred(), request) {
        (Ok(peer), _) if peer.uid() != 0 && peer.uid() != nix::unistd::geteuid().as_raw() => {
            tracing::warn!("control socket: refused a client of uid {} (pid {:?})", peer.uid(), peer.pid());
            Reply::Refused(format!("uid {} may not control this master (only its own user or root)", peer.uid()))
        }
        (Err(e), _) => Reply::Refused(format!("cannot tell who is asking: {e}")),
        (Ok(_), Err(refusal)) => refusal,
        (Ok(_), Ok(request)) => ask_the_master(request, calls).await,
    };
    let mut line = serde_json::to_string(&reply).unwrap_or_default();
    line.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(line.as_bytes())).await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, Reply> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_BYTES);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line).map_err(|e| Reply::Refused(format!("not a request: {e}"))),
        Ok(Err(e)) => Err(Reply::Refused(format!("cannot read the request: {e}"))),
        Err(_) => Err(Reply::Refused("no request line within 2 s".into())),
    }
}

async fn ask_the_master(request: Request, calls: mpsc::Sender<OperatorCall>) -> Reply {
    let (answer_tx, answer_rx) = oneshot::channel();
    if calls.send((request, answer_tx)).await.is_err() {
        return Reply::Refused("the master is exiting".into());
    }
    answer_rx.await.unwrap_or_else(|_| Reply::Refused("the master is exiting".into()))
}
