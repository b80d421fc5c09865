//! The master's loop as a library call, in this test's own process: its listener handed in,
//! driven by intents sent on a channel instead of signals, its phase watched. The workers are
//! the real `herdsman` binary. (Alone in its file: the master reaps every child of its process.)

use std::time::Duration;

use herdsman::config::{Config, Flags};
use herdsman::exit::Exit;
use herdsman::master::{Master, Phase};
use herdsman::signals::Intent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

async fn live(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test(flavor = "current_thread")]
async fn the_master_runs_in_process_driven_by_intents_and_shows_its_phases() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let env = [("WEB_CONCURRENCY", "1"), ("BCRYPT_COST", "4"), ("GRACEFUL_TIMEOUT", "5")];
    let config = Config::resolve(&Flags::default(), env.map(|(k, v)| (k.to_string(), v.to_string())))
        .expect("a valid configuration");
    let master = Master::new(config, listener).expect("master").worker_program(env!("CARGO_BIN_EXE_herdsman"));
    let mut phases = master.phases();
    let (intents, intents_rx) = mpsc::channel(4);

    let drive = async move {
        assert_eq!(*phases.borrow(), Phase::Starting);
        tokio::time::timeout(Duration::from_secs(10), phases.wait_for(|p| *p == Phase::Running))
            .await
            .expect("a worker became ready within 10 s")
            .expect("the master is running");
        let answer = live(port).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        intents.send((Intent::GracefulStop, "test")).await.expect("the master listens");
        phases.wait_for(|p| matches!(p, Phase::Stopping { fast: false, .. })).await.expect("stopping");
    };
    let (exit, ()) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(master.run(intents_rx), drive) })
            .await
            .expect("the master stopped within 20 s");
    assert_eq!(exit, Exit::Clean);
    // Its workers are gone: nothing answers any more.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err());
}
