//! `HERDSMAN_MAX_WORKER_MEMORY` on the real binary: a worker that leaks (`POST /__test/leak`)
//! past the line is replaced the way `MAX_REQUESTS` replaces one, with no failed request under
//! load, a log line that gives the figure, the restart counted as `reason="memory"`, and the
//! line and each worker's own memory in `herdsman status`; and pages the workers share (`POST
//! /__test/share`) counted once, not once per worker.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{start, Herdsman, Load, Process};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The port of the master's `/metrics`, from its log line.
fn metrics_port(server: &Herdsman) -> u16 {
    let line = server.wait_for_log("Serving metrics at: http://", SECS(5));
    line.rsplit(':').next().and_then(|p| p.trim_end_matches("/metrics").parse().ok()).expect("a port")
}

/// `herdsman_worker_restarts_total{reason="REASON"}` from the master's `/metrics`.
async fn restarts(metrics_port: u16, reason: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body");
    let series = format!("herdsman_worker_restarts_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

/// The MiB figure after `uses ` in a log line.
fn figure_after(line: &str, before: &str) -> f64 {
    line.split(before)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure after {before:?} in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_worker_is_replaced_without_a_failed_request() {
    let server =
        start(&[("WEB_CONCURRENCY", "2"), ("HERDSMAN_MAX_WORKER_MEMORY", "64MiB"), ("HERDSMAN_METRICS_PORT", "0")]);
    let metrics = metrics_port(&server);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    server.wait_for_log("Workers whose own memory (PSS) passes 64.0 MiB are replaced", SECS(1));
    let before = server.worker_processes();
    let load = Load::start(server.url("/live"), 8);

    // One keep-alive connection: every leak lands on the same worker, 8 MiB at a time.
    let leaker = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
    let mut leaking_pid = None;
    let deadline = Instant::now() + SECS(20);
    while server.count_logs("over HERDSMAN_MAX_WORKER_MEMORY") == 0 {
        assert!(Instant::now() < deadline, "no replacement within 20 s; logs:\n{}", server.logs().join("\n"));
        let answer = leaker.post(server.url("/__test/leak?mb=8")).send().await.expect("leak");
        assert_eq!(answer.status(), 200);
        let text = answer.text().await.expect("leak answer");
        let pid: i32 = text.rsplit(' ').next().and_then(|p| p.parse().ok()).expect("a pid");
        assert!(leaking_pid.is_none_or(|known| known == pid), "the leaks moved to another worker: {text}");
        leaking_pid = Some(pid);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let leaking_pid = leaking_pid.expect("leaked at least once");

    let line = server.wait_for_log("over HERDSMAN_MAX_WORKER_MEMORY", SECS(1));
    assert!(line.contains(&format!("(pid:{leaking_pid}) uses ")), "the leaking worker is named: {line}");
    assert!(line.contains("of its own memory (PSS)") && line.ends_with("64.0 MiB: replacing it"), "{line}");
    let used = figure_after(&line, " uses ");
    assert!((64.0..64.0 + 4.0 * 8.0).contains(&used), "the figure is the worker's, just over the line: {line}");

    // Its successor serves before it drains; it goes, the other worker stays.
    server.wait_for_log(&format!("(pid:{leaking_pid}) retiring: draining"), SECS(10));
    let leaker_process = before.iter().find(|p| p.pid.as_raw() == leaking_pid).expect("one of the first workers");
    let gone_by = Instant::now() + SECS(10);
    while leaker_process.state().is_some() {
        assert!(Instant::now() < gone_by, "the leaking worker did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let report = load.finish().await;
    assert_eq!(report.failed, 0, "failed requests: {:?}", &report.errors[..report.errors.len().min(5)]);
    assert!(report.ok > 100, "the load ran: {report:?}");
    server.wait_for_workers(2, SECS(5));
    let survivor: Vec<&Process> = before.iter().filter(|p| p.pid.as_raw() != leaking_pid).collect();
    assert!(survivor.iter().all(|p| p.state().is_some()), "the worker that did not leak is not replaced");

    assert_eq!(restarts(metrics, "memory").await, 1.0);
    assert_eq!(restarts(metrics, "max_requests").await, 0.0);
    assert_eq!(server.count_logs("over HERDSMAN_MAX_WORKER_MEMORY"), 1, "one replacement, no storm");

    // `herdsman status` shows the line and each worker's own memory, under it now.
    let status = Command::new(env!("CARGO_BIN_EXE_herdsman"))
        .args(["status", "--json"])
        .env_clear()
        .env("PORT", server.port.to_string())
        .output()
        .expect("herdsman status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status["memory_line_bytes"], 64u64 << 20);
    for worker in status["workers"].as_array().expect("workers") {
        let own = worker["own_memory_bytes"].as_u64().expect("own memory read");
        let rss = worker["rss_bytes"].as_u64().expect("rss read");
        assert!(own > 0 && own < 64 << 20 && own <= rss, "{worker}");
    }
}

#[test]
fn check_shows_the_line_and_a_bad_one_is_refused_at_start() {
    let (status, output) = support::run_to_exit(
        &["check"],
        &[("WEB_CONCURRENCY", "8"), ("HERDSMAN_MAX_WORKER_MEMORY", "0.5GB"), ("PORT", "0")],
    );
    assert!(status.success(), "{output}");
    assert!(output.contains("HERDSMAN_MAX_WORKER_MEMORY = 500000000  (environment)"), "check lists the line: {output}");
    // A share of the memory limit (here the machine's memory, with no cgroup limit) among the
    // workers, each one's share shown.
    let (status, output) =
        support::run_to_exit(&["check"], &[("WEB_CONCURRENCY", "4"), ("HERDSMAN_MAX_WORKER_MEMORY", "50%")]);
    assert!(status.success(), "{output}");
    let line = output.lines().find(|l| l.starts_with("HERDSMAN_MAX_WORKER_MEMORY = 50% of ")).expect("the line");
    assert!(line.contains(" / 4 workers = ") && line.ends_with(" MiB each  (environment)"), "{line}");
    let (status, output) = support::run_to_exit(&[], &[("HERDSMAN_MAX_WORKER_MEMORY", "lots"), ("PORT", "0")]);
    assert_eq!(status.code(), Some(2), "{output}");
    let first = output.lines().next().unwrap_or_default();
    assert!(first.contains("invalid HERDSMAN_MAX_WORKER_MEMORY=\"lots\": expected off, a size"), "{output}");
}

/// Maps the whole of `path` (made `len` bytes of data) into this process and reads every page,
/// so that each page of it is shared with this process too; unmapped when dropped.
fn map_shared(path: &std::path::Path, len: usize) -> herdsman::shared_memory::SharedMemory {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
    file.write_all_at(&vec![0x5Au8; len], 0).unwrap();
    let memory = herdsman::shared_memory::SharedMemory::from_inherited(file.into(), len, "the shared file").unwrap();
    for offset in (0..len).step_by(4096) {
        // SAFETY: within the `len` bytes mapped; a read of plain bytes.
        std::hint::black_box(unsafe { std::ptr::read_volatile(memory.start().as_ptr().add(offset)) });
    }
    memory
}

/// A field of a process's `smaps_rollup` (`Rss`, `Pss`), in bytes.
fn rollup(pid: i32, field: &str) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/smaps_rollup: {e}"));
    let kib = rollup
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    kib.map(|kib: u64| kib << 10).unwrap_or_else(|| panic!("no {field} line"))
}

/// What a killer that reads RSS (puma_worker_killer) would replace and herdsman does not: the
/// workers and this test map the same 64 MiB, so each worker's RSS passes the 48 MiB line while
/// its PSS (a third of the 64 MiB, and its own few MiB) stays under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_the_workers_share_count_once_not_once_per_worker() {
    let server = start(&[("WEB_CONCURRENCY", "2"), ("HERDSMAN_MAX_WORKER_MEMORY", "48MiB")]);
    server.wait_for_nth_log("ready in", 2, SECS(5));
    let dir = std::path::Path::new("/dev/shm");
    let dir = if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() };
    let path = dir.join(format!("herdsman-test-shared-{}", server.pid()));
    let _removed = RemovedOnDrop(path.clone());
    // This process maps the file first: at any instant a worker's PSS holds half of it at most.
    let ours = map_shared(&path, 64 << 20);
    let before = server.worker_processes();
    let mut sharing = std::collections::BTreeSet::new();
    for _ in 0..40 {
        // A new connection each: the workers take turns.
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
        let answer = client.post(server.url("/__test/share?mb=64")).send().await.expect("share");
        assert_eq!(answer.status(), 200);
        let text = answer.text().await.expect("share answer");
        sharing.insert(text.rsplit(' ').next().and_then(|p| p.parse::<i32>().ok()).expect("a pid"));
        if sharing.len() == 2 {
            break;
        }
    }
    assert_eq!(sharing.len(), 2, "both workers mapped the file");
    // Several memory checks later (every 250 ms): RSS passes the line, PSS does not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.count_logs("over HERDSMAN_MAX_WORKER_MEMORY"), 0, "{}", server.logs().join("\n"));
    assert!(before.iter().all(|p| p.state().is_some()), "a worker was replaced:\n{}", server.logs().join("\n"));
    for &pid in &sharing {
        let (rss, pss) = (rollup(pid, "Rss"), rollup(pid, "Pss"));
        assert!(rss > 64 << 20, "RSS counts the 64 MiB in full in each worker: {rss}");
        assert!(pss < 40 << 20, "PSS counts a third of it in each: {pss}");
    }
    drop(ours);
}

/// A file removed when the test ends, passed or failed: the shared file is 64 MiB of memory.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
