//! `rediss://` for real: the host's `redis-server` with `--tls-port`, certificates made by
//! `openssl` at test time in a temporary directory.
//!
//! - a server certificate from the CA in `REDIS_CA_CERT` is trusted: the cache uses Redis;
//! - one from another CA, or from the right CA for another name, is refused: the cache stays in
//!   memory, `/health` says why, requests are still answered;
//! - `REDIS_TLS_INSECURE=true` accepts the untrusted one;
//! - a missing or unparsable `REDIS_CA_CERT` is a one-line configuration error, status 2.
//!
//! Without `redis-server` (with TLS) or `openssl` the Redis tests print `SKIPPED` and pass,
//! unless `CI` is set: there they fail, so a CI machine cannot silently test nothing.

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herdsman::cache::{Cache, CacheConfig, RedisStatus, Tier};
use redis_server::{docker_engine, LocalRedis};
use serde_json::Value;

/// TLS handshakes on a busy 2-core machine: generous, the breaker is not under test here.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// `None` after writing why the test is skipped; panics instead when `CI` is set.
fn unavailable<T>(test: &str, why: &str) -> Option<T> {
    docker_engine::skip(test, "redis-server with TLS and openssl (scripts/test.sh installs them)", why);
    None
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herdsman-redis-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Certificates made with the `openssl` command in a temporary directory.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new(test: &str) -> Option<Pki> {
        match Command::new("openssl").arg("version").output() {
            Ok(out) if out.status.success() => Some(Pki { dir: TempDir::new() }),
            Ok(out) => {
                unavailable(test, &format!("`openssl version` failed: {}", String::from_utf8_lossy(&out.stderr)))
            }
            Err(e) => unavailable(test, &format!("cannot run `openssl`: {e}")),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Runs `openssl` in the directory with these whitespace-separated arguments.
    fn openssl(&self, args: &str) {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&self.dir.0)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A self-signed CA: `{name}.crt` and `{name}.key`.
    fn ca(&self, name: &str) -> PathBuf {
        self.openssl(&format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN=herdsman-test-{name} -keyout {name}.key -out {name}.crt"
        ));
        self.path(&format!("{name}.crt"))
    }

    /// A server certificate for `sans` (`DNS:localhost,IP:127.0.0.1`) signed by the CA `ca`:
    /// `{name}.crt` and `{name}.key`.
    fn server(&self, name: &str, ca: &str, sans: &str) -> (PathBuf, PathBuf) {
        let extensions = format!(
            "subjectAltName={sans}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        );
        std::fs::write(self.path(&format!("{name}.ext")), extensions).expect("write extensions");
        self.openssl(&format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=redis \
             -keyout {name}.key -out {name}.csr"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -days 2 \
             -extfile {name}.ext -out {name}.crt"
        ));
        (self.path(&format!("{name}.crt")), self.path(&format!("{name}.key")))
    }
}

/// A CA `trusted`, a CA `rogue`, and one Redis per server certificate asked for.
struct Setup {
    pki: Pki,
    ca: PathBuf,
}

impl Setup {
    fn new(test: &str) -> Option<Setup> {
        let pki = Pki::new(test)?;
        let ca = pki.ca("trusted");
        pki.ca("rogue");
        Some(Setup { pki, ca })
    }

    /// The CAs, and a Redis whose certificate for `sans` is signed by the CA `signer`.
    fn with_redis(test: &str, signer: &str, sans: &str) -> Option<(Setup, LocalRedis)> {
        let setup = Setup::new(test)?;
        let name = format!("server-{signer}-{}", sans.replace([':', ',', '.'], "_"));
        let (cert, key) = setup.pki.server(&name, signer, sans);
        let redis = LocalRedis::start_tls(test, &cert, &key)?;
        Some((setup, redis))
    }

    /// The trusted CA's path as a variable's value.
    fn ca_value(&self) -> &str {
        self.ca.to_str().expect("UTF-8 temp path")
    }
}

/// The server's URL by `host`: the certificate checks differ by name and by address.
fn tls_url(redis: &LocalRedis, host: &str) -> String {
    format!("rediss://{host}:{}", redis.port)
}

/// The names the good certificates are for.
const LOCAL: &str = "DNS:localhost,IP:127.0.0.1";

fn cache(url: String, ca_cert: Option<&Path>, tls_insecure: bool) -> Cache {
    Cache::new(CacheConfig {
        redis_url: Some(url),
        ca_cert: ca_cert.map(Path::to_path_buf),
        tls_insecure,
        operation_timeout: OP_TIMEOUT,
        ..CacheConfig::default()
    })
    .expect("cache config")
}

async fn health(server: &support::Herdsman) -> Value {
    support::health_details(&reqwest::Client::new(), server).await
}

/// Polls `/health` until `checks.redis.status` is `status`; returns that `checks.redis`.
async fn wait_for_redis_status(server: &support::Herdsman, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = health(server).await;
        if h["checks"]["redis"]["status"] == status {
            return h["checks"]["redis"].clone();
        }
        assert!(Instant::now() < deadline, "checks.redis never {status}: {h}\nlogs:\n{}", server.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs in, then PUT and GET through the HTTP API; returns the tier each answer names.
async fn put_then_get(server: &support::Herdsman, key: &str) -> (String, String) {
    let client = reqwest::Client::new();
    let token = support::register_and_login(&client, server, "tls-user").await;
    let client = support::client_with_token(&token);
    let url = server.url(&format!("/cache/{key}"));
    let put = client.put(&url).body("tls-value").send().await.expect("PUT");
    assert!(put.status().is_success(), "PUT {}", put.status());
    let put_tier = put.headers()["x-cache-tier"].to_str().unwrap().to_string();
    let got = client.get(&url).send().await.expect("GET");
    assert_eq!(got.status(), 200);
    let get_tier = got.headers()["x-cache-tier"].to_str().unwrap().to_string();
    assert_eq!(got.text().await.expect("body"), "tls-value");
    (put_tier, get_tier)
}

fn start_herdsman(redis: &LocalRedis, extra: &[(&str, &str)]) -> support::Herdsman {
    let url = tls_url(redis, "localhost");
    let mut env = vec![("REDIS_URL", url.as_str()), ("WEB_CONCURRENCY", "1"), ("HERDSMAN_REDIS_TIMEOUT", "2")];
    env.extend_from_slice(extra);
    support::start_with_health(&env)
}

#[tokio::test]
async fn a_server_signed_by_the_configured_ca_is_used() {
    let Some((setup, redis)) = Setup::with_redis("a_server_signed_by_the_configured_ca_is_used", "trusted", LOCAL)
    else {
        return;
    };
    let ca = setup.ca_value();

    let server = start_herdsman(&redis, &[("REDIS_CA_CERT", ca)]);
    wait_for_redis_status(&server, "up").await;
    assert_eq!(put_then_get(&server, "tls-ok").await, ("redis".to_string(), "redis".to_string()));
    // The revocation channel's own connection trusts the same CA.
    server.wait_for_log("session revocations: subscribed", Duration::from_secs(10));
    assert_eq!(health(&server).await["checks"]["revocations"]["status"], "live");

    // The library alone, by name and by address (the certificate names both).
    for host in ["localhost", "127.0.0.1"] {
        let cache = cache(tls_url(&redis, host), Some(&setup.ca), false);
        cache.connect().await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(cache.status(), RedisStatus::Up);
        let tier = cache.set_with_tier("lib", Bytes::from_static(b"v"), None).await.expect("set");
        assert_eq!(tier, Tier::Redis);
    }
}

#[tokio::test]
async fn an_untrusted_server_is_refused_and_the_cache_stays_in_memory() {
    let Some((setup, redis)) =
        Setup::with_redis("an_untrusted_server_is_refused_and_the_cache_stays_in_memory", "rogue", LOCAL)
    else {
        return;
    };
    let ca = setup.ca_value();

    let server = start_herdsman(&redis, &[("REDIS_CA_CERT", ca)]);
    let check = wait_for_redis_status(&server, "fallback").await;
    let reason = check["reason"].as_str().expect("a reason").to_string();
    assert!(reason.contains("certificate"), "the reason names the certificate: {reason}");
    assert_eq!(health(&server).await["status"], "degraded");
    assert_eq!(health(&server).await["checks"]["revocations"]["status"], "down", "nor the revocation channel");
    // Users live in Redis only: with it unreachable, logging in is a 503 to retry, not a 401.
    let credentials = serde_json::json!({ "username": "tls-user", "password": "password-tls-user" });
    let login = reqwest::Client::new().post(server.url("/auth/login")).json(&credentials).send().await.expect("login");
    assert_eq!(login.status(), 503);
    assert!(login.headers().get("retry-after").is_some());
    // Still refused later: the probe keeps failing the same way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let check = wait_for_redis_status(&server, "fallback").await;
    assert!(check["reason"].as_str().unwrap().contains("certificate"), "{check}");

    // Without REDIS_CA_CERT the built-in web roots do not know this CA either.
    let cache = cache(tls_url(&redis, "localhost"), None, false);
    let err = cache.connect().await.expect_err("refused by the web roots");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(matches!(cache.status(), RedisStatus::Fallback { .. }));
}

#[tokio::test]
async fn the_right_ca_for_another_name_is_refused() {
    let test = "the_right_ca_for_another_name_is_refused";
    let Some((setup, redis)) = Setup::with_redis(test, "trusted", "DNS:elsewhere.example") else { return };

    for host in ["localhost", "127.0.0.1"] {
        let cache = cache(tls_url(&redis, host), Some(&setup.ca), false);
        let err = cache.connect().await.expect_err("name mismatch");
        assert!(err.to_string().contains("certificate"), "{host}: {err}");
        match cache.status() {
            RedisStatus::Fallback { reason, .. } => assert!(reason.contains("certificate"), "{reason}"),
            other => panic!("{host}: {other:?}"),
        }
        // Reads and writes are answered from memory meanwhile.
        let tier = cache.set_with_tier("k", Bytes::from_static(b"v"), None).await.expect("set");
        assert_eq!(tier, Tier::Memory);
        assert_eq!(cache.get_with_tier("k").await.expect("get"), (Some(Bytes::from_static(b"v")), Tier::Memory));
    }
}

#[tokio::test]
async fn tls_insecure_accepts_the_untrusted_server() {
    let Some((setup, redis)) = Setup::with_redis("tls_insecure_accepts_the_untrusted_server", "rogue", LOCAL) else {
        return;
    };
    let ca = setup.ca_value();

    // REDIS_TLS_INSECURE wins over REDIS_CA_CERT, and is enough alone.
    for extra in [vec![("REDIS_TLS_INSECURE", "true"), ("REDIS_CA_CERT", ca)], vec![("REDIS_TLS_INSECURE", "true")]] {
        let server = start_herdsman(&redis, &extra);
        wait_for_redis_status(&server, "up").await;
        assert_eq!(put_then_get(&server, "tls-insecure").await, ("redis".to_string(), "redis".to_string()));
        assert_eq!(server.count_logs("not verified"), 1, "warned once: {:?}", server.logs());
    }
}

fn assert_config_error(value: &str, needle: &str) {
    let (status, output) = support::run_to_exit(&["check"], &[("REDIS_CA_CERT", value)]);
    assert_eq!(status.code(), Some(2), "{value}: {output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {output}");
    assert!(lines[0].contains("REDIS_CA_CERT") && lines[0].contains(value), "{output}");
    assert!(lines[0].contains(needle), "{output} should say {needle:?}");
}

#[test]
fn a_missing_or_unparsable_ca_file_is_a_configuration_error() {
    let dir = TempDir::new();
    assert_config_error(dir.0.join("absent.pem").to_str().unwrap(), "No such file");

    let not_pem = dir.0.join("not-pem.txt");
    std::fs::write(&not_pem, "hello\n").unwrap();
    assert_config_error(not_pem.to_str().unwrap(), "no CERTIFICATE");

    let broken = dir.0.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        .unwrap();
    assert_config_error(broken.to_str().unwrap(), "not a usable certificate");

    // A flag is named as a flag, and a good file is accepted and shown.
    let (status, output) = support::run_to_exit(&["check", "--redis-ca-cert", not_pem.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("--redis-ca-cert"), "{output}");
}

#[test]
fn check_shows_a_good_ca_file() {
    let test = "check_shows_a_good_ca_file";
    let Some(pki) = Pki::new(test) else { return };
    let ca = pki.ca("trusted");
    let (status, output) = support::run_to_exit(&["check"], &[("REDIS_CA_CERT", ca.to_str().unwrap())]);
    assert!(status.success(), "{output}");
    assert!(output.contains(&format!("REDIS_CA_CERT = {}", ca.display())), "{output}");

    // A system CA bundle, as a user may add one to the image (herdsman's has none), is valid.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    if Path::new(bundle).exists() {
        let (status, output) = support::run_to_exit(&["check"], &[("REDIS_CA_CERT", bundle)]);
        assert!(status.success(), "{output}");
    }
}
