//! `herdsman status`, `reload` and `scale N` against the real master, through its control socket.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{children_of, start, Herdsman};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Runs `herdsman ARGS` as an operator would, aimed at `server`'s port.
fn herdsman(server: &Herdsman, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herdsman"))
        .args(args)
        .env_clear()
        .env("PORT", server.port.to_string())
        .output()
        .expect("run herdsman")
}

fn status_json(server: &Herdsman) -> serde_json::Value {
    let output = herdsman(server, &["status", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn pids(status: &serde_json::Value) -> Vec<i32> {
    let mut pids: Vec<i32> =
        status["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect();
    pids.sort();
    pids
}

fn wait_for_serving(server: &Herdsman, n: usize, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_json(server);
        let workers = status["workers"].as_array().unwrap();
        if workers.len() == n && workers.iter().all(|w| w["state"] == "serving") {
            return status;
        }
        assert!(Instant::now() < deadline, "not {n} serving workers within {timeout:?}: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_json_matches_the_real_children() {
    let server = start(&[("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    for _ in 0..3 {
        reqwest_free_get(server.port, "/live");
    }
    let status = wait_for_serving(&server, 2, SECS(5));
    assert_eq!(status["master_pid"].as_i64().unwrap() as i32, server.pid().as_raw());
    assert_eq!(status["phase"], "running");
    assert_eq!(status["target_workers"], 2);
    let mut children: Vec<i32> = children_of(server.pid()).iter().map(|p| p.as_raw()).collect();
    children.sort();
    assert_eq!(pids(&status), children, "the pids are the master's children, from /proc");
    let workers = status["workers"].as_array().unwrap();
    let served: u64 = workers.iter().map(|w| w["requests_served"].as_u64().unwrap()).sum();
    assert_eq!(served, 3);
    for worker in workers {
        let pid = worker["pid"].as_i64().unwrap();
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
        let rss_pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        let rss = worker["rss_bytes"].as_u64().unwrap();
        assert!(rss > 1 << 20 && rss.abs_diff(rss_pages * 4096) < 16 << 20, "{worker} vs {rss_pages} pages");
        assert!(worker["heartbeat_age_seconds"].as_f64().unwrap() < 30.0);
        assert_eq!(worker["in_flight"], 0);
        // What anonymous /health callers are no longer told: no Redis here, so never open.
        assert_eq!(worker["breaker_open"], false);
    }
    // And for people: one line per worker, under a header.
    let text = String::from_utf8(herdsman(&server, &["status"]).stdout).unwrap();
    assert!(text.starts_with(&format!("master pid {}, running, 2 workers (target 2)", server.pid())), "{text}");
    for pid in children {
        assert!(text.lines().any(|l| l.split_whitespace().nth(1) == Some(&pid.to_string())), "{text}");
    }
}

/// A GET over a fresh connection, answered 200.
fn reqwest_free_get(port: u16, path: &str) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn scale_changes_the_worker_count_both_ways_and_status_shows_it() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", SECS(5));
    let output = herdsman(&server, &["scale", "3"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "worker count 1 -> 3");
    server.wait_for_workers(3, SECS(10));
    let status = wait_for_serving(&server, 3, SECS(10));
    assert_eq!(status["target_workers"], 3);

    assert!(herdsman(&server, &["scale", "1"]).status.success());
    server.wait_for_workers(1, SECS(10));
    let status = wait_for_serving(&server, 1, SECS(10));
    assert_eq!(status["target_workers"], 1);
    assert_eq!(server.count_logs("retiring: draining"), 2, "the extra workers drained, not killed");
    assert_eq!(server.count_logs("exited with code 0"), 2);
}

#[test]
fn reload_replaces_every_worker() {
    let server = start(&[("WEB_CONCURRENCY", "2")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    let before = pids(&wait_for_serving(&server, 2, SECS(5)));
    let output = herdsman(&server, &["reload"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    server.wait_for_nth_log("ready in", 4, SECS(10));
    let deadline = Instant::now() + SECS(10);
    loop {
        let after = pids(&wait_for_serving(&server, 2, SECS(10)));
        if after.iter().all(|pid| !before.contains(pid)) {
            break;
        }
        assert!(Instant::now() < deadline, "{before:?} -> {after:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_bad_command_or_count_is_one_clear_line_and_status_2() {
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", SECS(5));
    for (args, expected) in [
        (vec!["scale", "0"], "herdsman: invalid N=\"0\": expected an integer from 1 to 512"),
        (vec!["scale", "513"], "herdsman: invalid N=\"513\": expected an integer from 1 to 512"),
        (vec!["scale", "many"], "herdsman: invalid N=\"many\": expected an integer from 1 to 512"),
        (vec!["scale"], "<N>"),
        (vec!["restart-everything"], "unrecognized subcommand 'restart-everything'"),
    ] {
        let output = herdsman(&server, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(server.workers().len(), 1, "nothing reached the master");
    // No master on that port: status 1 and a line that says what to check.
    let output =
        Command::new(env!("CARGO_BIN_EXE_herdsman")).args(["status"]).env_clear().env("PORT", "1").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no herdsman master answers on @herdsman-1"));
}

#[test]
fn another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run the client as another user");
        return;
    }
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", SECS(5));
    use std::os::unix::process::CommandExt;
    let output = Command::new(env!("CARGO_BIN_EXE_herdsman"))
        .args(["scale", "2"])
        .env_clear()
        .env("PORT", server.port.to_string())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run herdsman as nobody");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the master refused: uid 65534 may not control this master"), "{stderr}");
    server.wait_for_log("control socket: refused a client of uid 65534", SECS(2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.workers().len(), 1, "the count did not change");
}

#[test]
fn a_socket_path_works_too() {
    let dir = std::env::temp_dir().join(format!("herdsman-operator-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.sock");
    let path = path.to_str().unwrap();
    let server = start(&[("WEB_CONCURRENCY", "1"), ("HERDSMAN_CONTROL_SOCKET", path)]);
    server.wait_for_log("ready in", SECS(5));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
    let output = herdsman(&server, &["status", "--socket", path]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("1 workers (target 1)"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_on_the_control_socket_gets_a_refusal_and_hurts_nothing() {
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    let server = start(&[("WEB_CONCURRENCY", "1")]);
    server.wait_for_log("ready in", SECS(5));
    let address = std::os::unix::net::SocketAddr::from_abstract_name(format!("herdsman-{}", server.port)).unwrap();
    let ask = |bytes: &[u8]| {
        let mut stream = std::os::unix::net::UnixStream::connect_addr(&address).unwrap();
        stream.set_read_timeout(Some(SECS(5))).unwrap();
        let _ = stream.write_all(bytes);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    assert!(ask(b"{\"command\":\"shutdown\"}\n").contains("not a request"));
    assert!(ask(&[0xff; 4096]).contains("refused"), "an over-long line is cut at 1 KiB and refused");
    // Silent clients hold a connection for 2 s at most, and a few of them do not lock others out.
    let silent: Vec<_> = (0..4).map(|_| std::os::unix::net::UnixStream::connect_addr(&address).unwrap()).collect();
    assert_eq!(status_json(&server)["workers"].as_array().unwrap().len(), 1);
    drop(silent);
    assert_eq!(server.workers().len(), 1);
}
