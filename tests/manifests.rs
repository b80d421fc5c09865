//! Every deployment manifest, parsed and checked twice: against the keys its platform documents
//! (a list per section, so a typo such as `healthCheckpath` fails here instead of being silently
//! ignored by the platform), and against herdsman's contract: health checks hit routes that exist
//! and answer 200, ports agree with the image's `PORT`, and every platform waits longer between
//! SIGTERM and SIGKILL than herdsman's default `GRACEFUL_TIMEOUT` (read from
//! `herdsman::Config::default()`, never copied).
//!
//! The key lists come from each platform's reference (Railway config as code, Render Blueprint
//! spec, fly.toml reference, Heroku app.json / heroku.yml, Compose specification, Kubernetes API,
//! Cloud Run's YAML reference for Knative Services).
//! No platform schema is vendored: Railway's and Render's published JSON schemas could not be
//! fetched from here in a current, licensed form, and Kubernetes' OpenAPI is too large. A key the
//! platforms add later is one line in a list below.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Heroku sends SIGKILL 30 s after SIGTERM; it cannot be changed (Heroku dyno shutdown docs).
const HEROKU_KILL_AFTER: Duration = Duration::from_secs(30);
/// Render accepts `maxShutdownDelaySeconds` from 1 to 300.
const RENDER_MAX_SHUTDOWN_DELAY: f64 = 300.0;
/// fly.toml's `kill_timeout` is at most 300 s.
const FLY_MAX_KILL_TIMEOUT: f64 = 300.0;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn toml_file(path: &str) -> Value {
    toml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not valid TOML: {e}"))
}

fn yaml_file(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

fn json_file(path: &str) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"))
}

/// herdsman's default drain time: what every platform's SIGKILL delay must exceed.
fn grace() -> f64 {
    herdsman::Config::default().graceful_timeout.as_secs_f64()
}

/// The drain time herdsman resolves to on a platform: the variables the platform sets, plus the
/// manifest's own environment, with the defaults fitted to that platform (no cgroup limits).
fn grace_on(env: &[(String, String)]) -> f64 {
    let host = || herdsman::platform::Host { visible_cpus: 1, limits: herdsman::platform::Limits::default() };
    let resolution = herdsman::Config::resolve_on(&herdsman::config::Flags::default(), env.to_vec(), host)
        .unwrap_or_else(|e| panic!("{env:?} does not resolve: {e}"));
    assert!(resolution.platform.is_some(), "{env:?} names no platform");
    resolution.config.graceful_timeout.as_secs_f64()
}

/// Asserts `value` is a map whose keys are all in `known`; `what` names it in the failure.
#[track_caller]
fn known_keys<'a>(value: &'a Value, what: &str, known: &[&str]) -> &'a serde_json::Map<String, Value> {
    let map = value.as_object().unwrap_or_else(|| panic!("{what} must be a map, is {value}"));
    let unknown: Vec<&String> = map.keys().filter(|k| !known.contains(&k.as_str())).collect();
    assert!(unknown.is_empty(), "{what}: unknown keys {unknown:?}; documented keys: {known:?}");
    map
}

#[track_caller]
fn str_at<'a>(value: &'a Value, pointer: &str, what: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("{what}: {pointer} must be a string"))
}

#[track_caller]
fn num_at(value: &Value, pointer: &str, what: &str) -> f64 {
    value.pointer(pointer).and_then(Value::as_f64).unwrap_or_else(|| panic!("{what}: {pointer} must be a number"))
}

/// A Go-style duration as fly.toml writes them (`"5s"`, `"1m0s"`, `"500ms"`) or a number of
/// seconds.
fn duration_secs(value: &Value) -> f64 {
    if let Some(n) = value.as_f64() {
        return n;
    }
    let text = value.as_str().unwrap_or_else(|| panic!("duration must be a number or a string, is {value}"));
    let mut total = 0.0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&next) = chars.peek() {
            if next.is_ascii_alphabetic() {
                unit.push(next);
                chars.next();
            } else {
                break;
            }
        }
        let n: f64 = number.parse().unwrap_or_else(|_| panic!("bad duration {text:?}"));
        number.clear();
        total += n * match unit.as_str() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => panic!("bad duration unit {other:?} in {text:?}"),
        };
    }
    assert!(number.is_empty(), "duration {text:?} lacks a unit");
    total
}

/// The routes a platform may use as a health check. `all_health_paths_answer_200` proves each one
/// answers on the real binary.
const HEALTH_ROUTES: &[&str] = &["/live", "/ready"];

#[track_caller]
fn assert_health_path(path: &str, what: &str) {
    assert!(HEALTH_ROUTES.contains(&path), "{what}: health check path {path:?} is not one of {HEALTH_ROUTES:?}");
}

/// The Dockerfile's instructions of the `base` stage that every final stage inherits.
struct Image {
    port: u16,
    exposed: u16,
    user: (u32, u32),
}

fn image() -> Image {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .skip_while(|l| *l != "FROM scratch AS base")
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "))
        .collect();
    let value_of = |instruction: &str| -> &str {
        let found: Vec<&str> =
            lines.iter().filter_map(|l| l.strip_prefix(instruction)).filter(|rest| rest.starts_with(' ')).collect();
        assert_eq!(found.len(), 1, "Dockerfile must have exactly one {instruction}, has {found:?}");
        found[0].trim()
    };
    let port = value_of("ENV").strip_prefix("PORT=").expect("ENV PORT=…").parse().expect("numeric PORT");
    let exposed = value_of("EXPOSE").parse().expect("numeric EXPOSE");
    let (uid, gid) = value_of("USER").split_once(':').expect("USER uid:gid");
    Image { port, exposed, user: (uid.parse().expect("numeric uid"), gid.parse().expect("numeric gid")) }
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerfile_final_stages_run_herdsman_as_pid_1_non_root_on_scratch() {
    let dockerfile = read("Dockerfile");
    let instructions: Vec<&str> =
        dockerfile.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let has = |line: &str| instructions.contains(&line);

    assert!(has("FROM scratch AS base"), "the base stage is scratch");
    assert!(has("FROM base AS runtime-from-host"), "the host-binary stage inherits base");
    assert!(has("FROM base AS runtime"), "the final stage inherits base");
    let froms: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.last().map(|s| **s),
        Some("FROM base AS runtime"),
        "runtime is the last stage (plain docker build)"
    );
    // The legacy builder resolves stages in order up to --target: the host stage must come
    // before the first stage that needs a registry.
    let host = instructions.iter().position(|l| *l == "FROM base AS runtime-from-host").unwrap();
    let rust = instructions.iter().position(|l| l.starts_with("FROM rust:")).expect("a rust build stage");
    assert!(host < rust, "runtime-from-host must precede the rust build stage");
    assert!(dockerfile.contains("+crt-static"), "the build stage links statically");
    assert!(!instructions.iter().any(|l| l.starts_with("RUN --mount")), "the legacy builder cannot parse RUN --mount");

    assert!(has(r#"ENTRYPOINT ["/herdsman"]"#), "herdsman is the entrypoint, hence PID 1");
    assert!(!instructions.iter().any(|l| l.starts_with("CMD ")), "no CMD: arguments go to herdsman");
    assert!(has("STOPSIGNAL SIGTERM"));
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("HEALTHCHECK ") && l.ends_with(r#"CMD ["/herdsman", "healthcheck"]"#)),
        "HEALTHCHECK runs `herdsman healthcheck`"
    );

    let image = image();
    assert_eq!(image.port, herdsman::Config::default().port, "ENV PORT is herdsman's default port");
    assert_eq!(image.exposed, image.port, "EXPOSE matches PORT");
    assert_ne!(image.user.0, 0, "non-root uid");
    assert_ne!(image.user.1, 0, "non-root gid");
    let passwd = read("deploy/docker/rootfs/etc/passwd");
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(&image.user.0.to_string())
            && l.split(':').nth(3) == Some(&image.user.1.to_string())),
        "/etc/passwd has a line for uid {}:{}",
        image.user.0,
        image.user.1
    );
    let group = read("deploy/docker/rootfs/etc/group");
    assert!(group.lines().any(|l| l.split(':').nth(2) == Some(&image.user.1.to_string())), "/etc/group has gid");
    assert!(read("deploy/docker/rootfs/etc/nsswitch.conf").lines().any(|l| l.trim() == "hosts: files dns"));
}

#[test]
fn dockerignore_keeps_build_output_out_but_the_host_binary_in() {
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    for needed in ["target*/", ".git"] {
        assert!(patterns.contains(&needed), ".dockerignore lacks {needed}");
    }
    for kept in ["deploy", "deploy/docker", "deploy/docker/host", "src", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !patterns.iter().any(|p| p.trim_end_matches('/') == kept || *p == "*"),
            ".dockerignore must not exclude {kept}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Heroku: Procfile, app.json, heroku.yml
// ---------------------------------------------------------------------------------------------

#[test]
fn procfile_starts_the_binary_the_rust_buildpack_builds() {
    let cargo = toml_file("Cargo.toml");
    let bin = str_at(&cargo, "/bin/0/name", "Cargo.toml");
    let procfile = read("Procfile");
    let entries: Vec<(&str, &str)> = procfile
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| l.split_once(':').map(|(k, v)| (k.trim(), v.trim())).expect("Procfile lines are `type: command`"))
        .collect();
    let web: Vec<&str> = entries.iter().filter(|(k, _)| *k == "web").map(|(_, v)| *v).collect();
    assert_eq!(web.len(), 1, "exactly one web process: {entries:?}");
    let mut words = web[0].split_whitespace();
    // The Rust buildpack runs `cargo build --release` and leaves the binary in target/release.
    assert_eq!(words.next(), Some(format!("./target/release/{bin}").as_str()));
    // Heroku sets PORT; herdsman reads it. A hard-coded port would break routing.
    let rest: Vec<&str> = words.collect();
    assert!(!rest.iter().any(|w| w.starts_with("--port")), "the Procfile must not pass --port: {rest:?}");
}

const APP_JSON_KEYS: &[&str] = &[
    "name",
    "description",
    "keywords",
    "website",
    "repository",
    "logo",
    "success_url",
    "scripts",
    "env",
    "formation",
    "image",
    "addons",
    "buildpacks",
    "environments",
    "stack",
];
const HEROKU_YML_KEYS: &[&str] = &["setup", "build", "release", "run"];

#[test]
fn app_json_and_heroku_yml_build_the_dockerfile_with_redis_wired_in() {
    let app = json_file("app.json");
    let top = known_keys(&app, "app.json", APP_JSON_KEYS);
    assert_eq!(top["stack"], "container", "app.json deploys with heroku.yml on the container stack");
    let env = app["env"].as_object().expect("app.json env is a map");
    assert!(!env.contains_key("PORT"), "Heroku sets PORT; app.json must not");
    for (name, var) in env {
        known_keys(var, &format!("app.json env.{name}"), &["description", "value", "required", "generator"]);
    }
    if let Some(value) = env.get("GRACEFUL_TIMEOUT").and_then(|v| v["value"].as_str()) {
        let secs: f64 = value.parse().expect("GRACEFUL_TIMEOUT is a number");
        assert!(secs < HEROKU_KILL_AFTER.as_secs_f64(), "GRACEFUL_TIMEOUT {secs} must be below Heroku's 30 s");
    }
    assert!(grace() < HEROKU_KILL_AFTER.as_secs_f64(), "default GRACEFUL_TIMEOUT must be below Heroku's 30 s");
    for (process, formation) in app["formation"].as_object().expect("formation map") {
        known_keys(formation, &format!("app.json formation.{process}"), &["quantity", "size"]);
    }
    let app_addons = heroku_redis_addons(&app["addons"], "app.json");

    let yml = yaml_file("heroku.yml");
    known_keys(&yml, "heroku.yml", HEROKU_YML_KEYS);
    known_keys(&yml["setup"], "heroku.yml setup", &["addons", "config"]);
    known_keys(&yml["build"], "heroku.yml build", &["docker", "config"]);
    let dockerfile = str_at(&yml, "/build/docker/web", "heroku.yml");
    assert!(root().join(dockerfile).is_file(), "heroku.yml builds {dockerfile}, which must exist");
    if let Some(run) = yml.get("run") {
        // Without `run`, Heroku runs the image's ENTRYPOINT: herdsman as PID 1. A `run.web`
        // would wrap it in a shell.
        panic!("heroku.yml must not override the entrypoint with run: {run}");
    }
    let yml_addons = heroku_redis_addons(&yml["setup"]["addons"], "heroku.yml");
    assert_eq!(app_addons, yml_addons, "app.json and heroku.yml provision the same Redis");
}

/// The Heroku Redis add-ons of an `addons` list; each must be attached `as: REDIS` so that
/// Heroku sets `REDIS_URL`, the variable herdsman reads.
fn heroku_redis_addons(addons: &Value, what: &str) -> BTreeSet<String> {
    let mut plans = BTreeSet::new();
    for addon in addons.as_array().unwrap_or_else(|| panic!("{what} addons must be a list")) {
        known_keys(addon, &format!("{what} addon"), &["plan", "as", "options"]);
        let plan = str_at(addon, "/plan", what);
        if plan.starts_with("heroku-redis") {
            assert_eq!(addon["as"], "REDIS", "{what}: {plan} must be attached as REDIS so that REDIS_URL is set");
            plans.insert(plan.to_string());
        }
    }
    assert!(!plans.is_empty(), "{what} provisions Heroku Redis");
    plans
}

// ---------------------------------------------------------------------------------------------
// Railway
// ---------------------------------------------------------------------------------------------

const RAILWAY_KEYS: &[&str] = &["$schema", "build", "deploy", "environments"];
const RAILWAY_BUILD_KEYS: &[&str] = &[
    "builder",
    "watchPatterns",
    "buildCommand",
    "dockerfilePath",
    "railpackVersion",
    "nixpacksConfigPath",
    "nixpacksPlan",
    "nixpacksVersion",
];
const RAILWAY_DEPLOY_KEYS: &[&str] = &[
    "startCommand",
    "preDeployCommand",
    "numReplicas",
    "multiRegionConfig",
    "healthcheckPath",
    "healthcheckTimeout",
    "restartPolicyType",
    "restartPolicyMaxRetries",
    "cronSchedule",
    "sleepApplication",
    "overlapSeconds",
    "drainingSeconds",
    "region",
    "limitOverride",
    "requiredMountPath",
    "runtime",
];

#[test]
fn railway_builds_the_dockerfile_checks_ready_and_drains_longer_than_herdsman() {
    let railway = toml_file("railway.toml");
    known_keys(&railway, "railway.toml", RAILWAY_KEYS);
    known_keys(&railway["build"], "railway.toml [build]", RAILWAY_BUILD_KEYS);
    let deploy = known_keys(&railway["deploy"], "railway.toml [deploy]", RAILWAY_DEPLOY_KEYS);

    assert_eq!(str_at(&railway, "/build/builder", "railway.toml"), "DOCKERFILE");
    let dockerfile = str_at(&railway, "/build/dockerfilePath", "railway.toml");
    assert!(root().join(dockerfile).is_file(), "railway.toml builds {dockerfile}, which must exist");
    assert!(!deploy.contains_key("startCommand"), "the image's ENTRYPOINT runs herdsman as PID 1");

    let path = str_at(&railway, "/deploy/healthcheckPath", "railway.toml");
    assert_eq!(path, "/ready", "Railway's deploy health check waits for readiness");
    assert_health_path(path, "railway.toml");
    let policy = str_at(&railway, "/deploy/restartPolicyType", "railway.toml");
    assert!(["ON_FAILURE", "ALWAYS"].contains(&policy), "restart policy {policy:?} must restart a crashed herdsman");
    // Railway's default SIGKILLs right after SIGTERM: the draining time is what lets herdsman finish.
    let draining = num_at(&railway, "/deploy/drainingSeconds", "railway.toml");
    assert!(draining > grace(), "drainingSeconds {draining} must exceed GRACEFUL_TIMEOUT {}", grace());
    if let Some(overlap) = deploy.get("overlapSeconds") {
        assert!(overlap.as_f64().is_some_and(|o| o >= 0.0), "overlapSeconds must be a number ≥ 0");
    }
}

// ---------------------------------------------------------------------------------------------
// Render
// ---------------------------------------------------------------------------------------------

const RENDER_KEYS: &[&str] = &["services", "databases", "envVarGroups", "projects", "ungrouped", "previews", "version"];
const RENDER_WEB_KEYS: &[&str] = &[
    "type",
    "name",
    "runtime",
    "repo",
    "branch",
    "region",
    "plan",
    "rootDir",
    "dockerfilePath",
    "dockerContext",
    "dockerCommand",
    "registryCredential",
    "image",
    "numInstances",
    "scaling",
    "healthCheckPath",
    "maxShutdownDelaySeconds",
    "preDeployCommand",
    "autoDeploy",
    "autoDeployTrigger",
    "buildFilter",
    "domains",
    "envVars",
    "disk",
    "previews",
    "pullRequestPreviewsEnabled",
];
const RENDER_KEYVALUE_KEYS: &[&str] = &["type", "name", "plan", "region", "ipAllowList", "maxmemoryPolicy", "previews"];
const RENDER_ENV_KEYS: &[&str] = &["key", "value", "generateValue", "sync", "fromDatabase", "fromService", "fromGroup"];

#[test]
fn render_runs_the_dockerfile_with_key_value_wired_in_through_redis_url() {
    let render = yaml_file("render.yaml");
    known_keys(&render, "render.yaml", RENDER_KEYS);
    let services = render["services"].as_array().expect("render.yaml services is a list");
    let keyvalues: Vec<&Value> = services.iter().filter(|s| s["type"] == "keyvalue").collect();
    for kv in &keyvalues {
        known_keys(kv, "render.yaml keyvalue service", RENDER_KEYVALUE_KEYS);
        assert!(kv.get("ipAllowList").is_some_and(Value::is_array), "ipAllowList is required for Key Value");
    }
    let webs: Vec<&Value> = services.iter().filter(|s| s["type"] == "web").collect();
    assert_eq!(webs.len(), 1, "one web service");
    let web = webs[0];
    known_keys(web, "render.yaml web service", RENDER_WEB_KEYS);
    assert_eq!(web["runtime"], "docker");
    let dockerfile = str_at(web, "/dockerfilePath", "render.yaml");
    assert!(root().join(dockerfile).is_file(), "render.yaml builds {dockerfile}, which must exist");
    assert!(web.get("dockerCommand").is_none(), "the image's ENTRYPOINT runs herdsman as PID 1");
    assert_health_path(str_at(web, "/healthCheckPath", "render.yaml"), "render.yaml");
    let delay = num_at(web, "/maxShutdownDelaySeconds", "render.yaml");
    assert!(delay > grace(), "maxShutdownDelaySeconds {delay} must exceed GRACEFUL_TIMEOUT {}", grace());
    assert!(delay <= RENDER_MAX_SHUTDOWN_DELAY, "Render accepts at most 300");

    let env = web["envVars"].as_array().expect("envVars list");
    for var in env {
        known_keys(var, "render.yaml envVars entry", RENDER_ENV_KEYS);
        assert_ne!(var["key"], "PORT", "Render sets PORT; render.yaml must not");
    }
    let redis = env.iter().find(|v| v["key"] == "REDIS_URL").expect("REDIS_URL in the web service's envVars");
    let from = known_keys(&redis["fromService"], "REDIS_URL fromService", &["type", "name", "property", "envVarKey"]);
    assert_eq!(from["type"], "keyvalue");
    assert_eq!(from["property"], "connectionString");
    assert!(
        keyvalues.iter().any(|kv| kv["name"] == from["name"]),
        "REDIS_URL comes from {}, which must be a keyvalue service of this Blueprint",
        from["name"]
    );
}

// ---------------------------------------------------------------------------------------------
// Fly.io
// ---------------------------------------------------------------------------------------------

const FLY_KEYS: &[&str] = &[
    "app",
    "primary_region",
    "kill_signal",
    "kill_timeout",
    "swap_size_mb",
    "console_command",
    "build",
    "deploy",
    "env",
    "http_service",
    "services",
    "checks",
    "mounts",
    "processes",
    "vm",
    "metrics",
    "statics",
    "files",
    "experimental",
    "restart",
];
const FLY_HTTP_SERVICE_KEYS: &[&str] = &[
    "internal_port",
    "force_https",
    "auto_stop_machines",
    "auto_start_machines",
    "min_machines_running",
    "processes",
    "concurrency",
    "checks",
    "http_options",
    "tls_options",
];
const FLY_CHECK_KEYS: &[&str] = &[
    "grace_period",
    "interval",
    "method",
    "timeout",
    "path",
    "protocol",
    "tls_skip_verify",
    "tls_server_name",
    "headers",
];

#[test]
fn fly_checks_a_health_route_on_the_image_port_and_waits_longer_than_herdsman_drains() {
    let fly = toml_file("fly.toml");
    known_keys(&fly, "fly.toml", FLY_KEYS);
    known_keys(&fly["build"], "fly.toml [build]", &["dockerfile", "image", "ignorefile", "build-target", "args"]);
    let http = known_keys(&fly["http_service"], "fly.toml [http_service]", FLY_HTTP_SERVICE_KEYS);
    known_keys(&http["concurrency"], "fly.toml [http_service.concurrency]", &["type", "soft_limit", "hard_limit"]);
    for vm in fly["vm"].as_array().expect("[[vm]] list") {
        known_keys(vm, "fly.toml [[vm]]", &["size", "memory", "cpus", "cpu_kind", "gpus", "gpu_kind", "processes"]);
    }

    let signal = str_at(&fly, "/kill_signal", "fly.toml");
    assert!(["SIGTERM", "SIGINT"].contains(&signal), "kill_signal {signal} must be one herdsman drains on");
    let kill_timeout = duration_secs(&fly["kill_timeout"]);
    assert!(kill_timeout <= FLY_MAX_KILL_TIMEOUT, "Fly accepts at most 300 s");
    // herdsman cannot read kill_timeout at run time: on Fly it fits its drain to the 5 s default,
    // so a raised kill_timeout is used only if [env] raises GRACEFUL_TIMEOUT with it.
    let mut env = vec![("FLY_APP_NAME".to_string(), "herdsman".to_string())];
    if let Some(vars) = fly.get("env").and_then(Value::as_object) {
        env.extend(vars.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))));
    }
    let grace = grace_on(&env);
    assert!(kill_timeout > grace, "kill_timeout {kill_timeout} must exceed GRACEFUL_TIMEOUT {grace} on Fly");
    assert!(
        kill_timeout - grace <= 10.0,
        "kill_timeout {kill_timeout} is raised but herdsman drains only {grace} s: set GRACEFUL_TIMEOUT in [env]"
    );

    // Fly sets no PORT: the image's ENV PORT is what herdsman binds, so they must agree.
    let image = image();
    let internal = num_at(&fly, "/http_service/internal_port", "fly.toml");
    assert_eq!(internal, f64::from(image.port), "internal_port must be the image's PORT");
    if let Some(port) = fly.pointer("/env/PORT") {
        assert_eq!(port.as_str(), Some(internal.to_string().as_str()), "[env] PORT must equal internal_port");
    }
    let checks = fly["http_service"]["checks"].as_array().expect("[[http_service.checks]]");
    assert!(!checks.is_empty(), "at least one HTTP check");
    for check in checks {
        known_keys(check, "fly.toml [[http_service.checks]]", FLY_CHECK_KEYS);
        assert_health_path(str_at(check, "/path", "fly.toml check"), "fly.toml");
        let timeout = duration_secs(&check["timeout"]);
        let interval = duration_secs(&check["interval"]);
        assert!(timeout < interval, "check timeout {timeout} must be shorter than its interval {interval}");
        duration_secs(&check["grace_period"]);
    }
}

#[test]
fn fly_scrapes_the_metrics_port_herdsman_is_told_to_serve() {
    let fly = toml_file("fly.toml");
    known_keys(&fly["metrics"], "fly.toml [metrics]", &["port", "path", "processes", "https"]);
    let port = num_at(&fly, "/metrics/port", "fly.toml [metrics]");
    let served = str_at(&fly, "/env/HERDSMAN_METRICS_PORT", "fly.toml [env]");
    assert_eq!(served, port.to_string(), "[metrics] port must be HERDSMAN_METRICS_PORT");
    assert_eq!(str_at(&fly, "/metrics/path", "fly.toml [metrics]"), "/metrics");
    assert_ne!(port, num_at(&fly, "/http_service/internal_port", "fly.toml"), "metrics have a port of their own");
}

// ---------------------------------------------------------------------------------------------
// docker compose
// ---------------------------------------------------------------------------------------------

const COMPOSE_KEYS: &[&str] = &["name", "services", "networks", "volumes", "configs", "secrets", "include"];
const COMPOSE_SERVICE_KEYS: &[&str] = &[
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "depends_on",
    "healthcheck",
    "stop_signal",
    "stop_grace_period",
    "read_only",
    "restart",
    "networks",
    "volumes",
    "user",
    "init",
    "mem_limit",
    "cpus",
    "deploy",
    "tmpfs",
    "container_name",
    "labels",
];

#[test]
fn compose_runs_herdsman_with_redis_reached_by_service_name() {
    let compose = yaml_file("docker-compose.yml");
    known_keys(&compose, "docker-compose.yml", COMPOSE_KEYS);
    let services = compose["services"].as_object().expect("services map");
    for (name, service) in services {
        known_keys(service, &format!("docker-compose.yml services.{name}"), COMPOSE_SERVICE_KEYS);
    }
    let app = &services["herdsman"];
    assert_eq!(app["build"], ".", "herdsman is built from the root Dockerfile");
    let env = app["environment"].as_object().expect("environment as a map");

    let url = env["REDIS_URL"].as_str().expect("REDIS_URL");
    let host = url.strip_prefix("redis://").and_then(|rest| rest.split([':', '/']).next()).expect("redis://host…");
    let redis = services.get(host).unwrap_or_else(|| panic!("REDIS_URL names {host:?}, which is not a service"));
    assert!(str_at(redis, "/image", "redis service").starts_with("redis:"), "{host} runs Redis");
    let depends: Vec<&str> =
        app["depends_on"].as_array().expect("depends_on list").iter().filter_map(Value::as_str).collect();
    assert!(depends.contains(&host), "herdsman depends_on {host}");

    let port: u16 = env["PORT"].as_str().expect("PORT as a string").parse().expect("numeric PORT");
    let published = app["ports"].as_array().expect("ports list");
    assert!(
        published.iter().filter_map(Value::as_str).any(|p| p.rsplit(':').next() == Some(&port.to_string())),
        "a published port maps to the container's PORT {port}: {published:?}"
    );
    let signal = str_at(app, "/stop_signal", "compose");
    assert!(["SIGTERM", "SIGINT"].contains(&signal));
    let stop = duration_secs(&app["stop_grace_period"]);
    assert!(stop > grace(), "stop_grace_period {stop} must exceed GRACEFUL_TIMEOUT {}", grace());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

const K8S_OBJECT_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const K8S_METADATA_KEYS: &[&str] = &["name", "namespace", "labels", "annotations"];
const K8S_DEPLOYMENT_SPEC_KEYS: &[&str] = &[
    "replicas",
    "selector",
    "template",
    "strategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "progressDeadlineSeconds",
    "paused",
];
const K8S_POD_SPEC_KEYS: &[&str] = &[
    "containers",
    "initContainers",
    "securityContext",
    "terminationGracePeriodSeconds",
    "serviceAccountName",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "volumes",
    "affinity",
    "topologySpreadConstraints",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
    "imagePullSecrets",
    "dnsPolicy",
    "restartPolicy",
];
const K8S_POD_SECURITY_KEYS: &[&str] =
    &["runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile", "supplementalGroups", "sysctls"];
const K8S_CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",
    "resources",
    "startupProbe",
    "livenessProbe",
    "readinessProbe",
    "lifecycle",
    "securityContext",
    "volumeMounts",
    "workingDir",
];
const K8S_CONTAINER_SECURITY_KEYS: &[&str] = &[
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "privileged",
    "seccompProfile",
];
const K8S_PROBE_KEYS: &[&str] = &[
    "httpGet",
    "tcpSocket",
    "exec",
    "grpc",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
    "terminationGracePeriodSeconds",
];
const K8S_HTTP_GET_KEYS: &[&str] = &["path", "port", "host", "scheme", "httpHeaders"];

/// The container port a probe's or Service's `port` refers to, by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    let ports = container["ports"].as_array().expect("container ports");
    let found = ports.iter().find(|p| match port {
        Value::String(name) => p["name"] == *name,
        Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
        _ => false,
    });
    let found = found.unwrap_or_else(|| panic!("port {port} is not a container port: {ports:?}"));
    found["containerPort"].as_u64().expect("containerPort") as u16
}

#[test]
fn kubernetes_scrape_annotations_point_at_the_metrics_port_herdsman_serves() {
    let deployment = yaml_file("deploy/kubernetes/deployment.yaml");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let port = str_at(annotations, "/prometheus.io~1port", "pod annotations");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_array().expect("env");
    let served = env.iter().find(|v| v["name"] == "HERDSMAN_METRICS_PORT").expect("HERDSMAN_METRICS_PORT in env");
    assert_eq!(served["value"], port, "the annotation's port must be HERDSMAN_METRICS_PORT");
    let number: u16 = port.parse().expect("a port number");
    assert_eq!(container_port(container, &Value::from(number)), number, "declared as a container port");
    assert_ne!(container_port(container, &Value::from("http")), number, "metrics have a port of their own");
}

#[test]
fn kubernetes_probes_hit_routes_that_exist_and_grace_covers_prestop_plus_drain() {
    let deployment = yaml_file("deploy/kubernetes/deployment.yaml");
    known_keys(&deployment, "Deployment", K8S_OBJECT_KEYS);
    known_keys(&deployment["metadata"], "Deployment metadata", K8S_METADATA_KEYS);
    assert_eq!(deployment["apiVersion"], "apps/v1");
    assert_eq!(deployment["kind"], "Deployment");
    let spec = &deployment["spec"];
    known_keys(spec, "Deployment spec", K8S_DEPLOYMENT_SPEC_KEYS);
    known_keys(&spec["template"], "pod template", &["metadata", "spec"]);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels, "the selector matches the pod labels");
    let pod = &spec["template"]["spec"];
    known_keys(pod, "pod spec", K8S_POD_SPEC_KEYS);

    let image = image();
    let pod_security = known_keys(&pod["securityContext"], "pod securityContext", K8S_POD_SECURITY_KEYS);
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["runAsUser"], image.user.0, "runAsUser is the image's USER");
    assert_eq!(pod_security["runAsGroup"], image.user.1, "runAsGroup is the image's group");

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    known_keys(container, "container", K8S_CONTAINER_KEYS);
    let security = known_keys(&container["securityContext"], "container securityContext", K8S_CONTAINER_SECURITY_KEYS);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    known_keys(&container["resources"], "resources", &["requests", "limits"]);
    for kind in ["requests", "limits"] {
        known_keys(&container["resources"][kind], kind, &["cpu", "memory", "ephemeral-storage"]);
        assert!(container["resources"][kind]["memory"].is_string(), "resources.{kind}.memory is set");
        assert!(container["resources"][kind]["cpu"].is_string(), "resources.{kind}.cpu is set");
    }

    // Kubernetes sets no PORT: the container's PORT must equal the port the probes and the
    // Service use.
    let env = container["env"].as_array().expect("env list");
    let port_var = env.iter().find(|e| e["name"] == "PORT").expect("PORT in env");
    let port: u16 = str_at(port_var, "/value", "PORT").parse().expect("numeric PORT");
    assert_eq!(port, image.port, "the container's PORT is the image's");

    for (probe, route) in [("livenessProbe", "/live"), ("readinessProbe", "/ready"), ("startupProbe", "/live")] {
        let p = &container[probe];
        known_keys(p, probe, K8S_PROBE_KEYS);
        known_keys(&p["httpGet"], &format!("{probe}.httpGet"), K8S_HTTP_GET_KEYS);
        assert_eq!(str_at(p, "/httpGet/path", probe), route, "{probe} checks {route}");
        assert_eq!(container_port(container, &p["httpGet"]["port"]), port, "{probe} targets PORT");
    }

    // preStop sleep, then SIGTERM, then up to GRACEFUL_TIMEOUT of drain: all inside the grace.
    known_keys(&container["lifecycle"], "lifecycle", &["preStop", "postStart"]);
    known_keys(&container["lifecycle"]["preStop"], "preStop", &["sleep", "httpGet", "exec", "tcpSocket"]);
    assert!(container["lifecycle"]["preStop"].get("exec").is_none(), "the scratch image has no shell to exec");
    let pre_stop = num_at(container, "/lifecycle/preStop/sleep/seconds", "preStop sleep");
    let termination = num_at(pod, "/terminationGracePeriodSeconds", "pod spec");
    assert!(
        termination > pre_stop + grace(),
        "terminationGracePeriodSeconds {termination} must exceed preStop {pre_stop} + GRACEFUL_TIMEOUT {}",
        grace()
    );

    let service = yaml_file("deploy/kubernetes/service.yaml");
    known_keys(&service, "Service", K8S_OBJECT_KEYS);
    assert_eq!(service["apiVersion"], "v1");
    assert_eq!(service["kind"], "Service");
    known_keys(&service["spec"], "Service spec", &["type", "selector", "ports", "sessionAffinity"]);
    assert_eq!(&service["spec"]["selector"], labels, "the Service selects the Deployment's pods");
    for p in service["spec"]["ports"].as_array().expect("Service ports") {
        known_keys(p, "Service port", &["name", "port", "targetPort", "protocol", "nodePort", "appProtocol"]);
        assert_eq!(container_port(container, &p["targetPort"]), port, "the Service targets PORT");
    }

    let hpa = yaml_file("deploy/kubernetes/hpa.yaml");
    known_keys(&hpa, "HorizontalPodAutoscaler", K8S_OBJECT_KEYS);
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["kind"], "HorizontalPodAutoscaler");
    known_keys(&hpa["spec"], "HPA spec", &["scaleTargetRef", "minReplicas", "maxReplicas", "metrics", "behavior"]);
    let target = known_keys(&hpa["spec"]["scaleTargetRef"], "scaleTargetRef", &["apiVersion", "kind", "name"]);
    assert_eq!(target["kind"], "Deployment");
    assert_eq!(target["apiVersion"], "apps/v1");
    assert_eq!(target["name"], deployment["metadata"]["name"], "the HPA scales this Deployment");
    let (min, max) = (num_at(&hpa, "/spec/minReplicas", "HPA"), num_at(&hpa, "/spec/maxReplicas", "HPA"));
    assert!(1.0 <= min && min <= max, "1 ≤ minReplicas {min} ≤ maxReplicas {max}");
    for metric in hpa["spec"]["metrics"].as_array().expect("HPA metrics") {
        known_keys(metric, "HPA metric", &["type", "resource", "pods", "object", "external", "containerResource"]);
        if metric["type"] == "Resource" {
            let cpu = &metric["resource"];
            known_keys(cpu, "HPA resource metric", &["name", "target"]);
            known_keys(&cpu["target"], "HPA target", &["type", "averageUtilization", "averageValue", "value"]);
            // Utilization is relative to requests: there must be one.
            let name = str_at(cpu, "/name", "HPA metric");
            assert!(container["resources"]["requests"].get(name).is_some(), "HPA on {name} needs a {name} request");
        }
    }

    let kustomization = yaml_file("deploy/kubernetes/kustomization.yaml");
    known_keys(&kustomization, "kustomization.yaml", &["apiVersion", "kind", "resources", "images", "namespace"]);
    let listed: BTreeSet<&str> =
        kustomization["resources"].as_array().expect("resources").iter().filter_map(Value::as_str).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk.iter().map(String::as_str).collect(), "kustomization lists every manifest");
}

// ---------------------------------------------------------------------------------------------
// Cloud Run
// ---------------------------------------------------------------------------------------------

/// Cloud Run sends SIGKILL 10 s after SIGTERM; it cannot be changed (container runtime contract).
const CLOUD_RUN_KILL_AFTER: f64 = 10.0;
/// Cloud Run's request timeout is 1 to 3600 s.
const CLOUD_RUN_MAX_TIMEOUT: f64 = 3600.0;

const CLOUD_RUN_TEMPLATE_SPEC_KEYS: &[&str] = &[
    "containerConcurrency",
    "timeoutSeconds",
    "serviceAccountName",
    "containers",
    "volumes",
    "nodeSelector",
    "runtimeClassName",
];
const CLOUD_RUN_CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "volumeMounts",
    "workingDir",
    "startupProbe",
    "livenessProbe",
    "readinessProbe",
    "dependsOn",
];
const CLOUD_RUN_PROBE_KEYS: &[&str] = &[
    "httpGet",
    "tcpSocket",
    "grpc",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "successThreshold",
];

#[test]
fn cloud_run_probes_live_and_ready_on_port_8080_and_herdsman_drains_before_the_sigkill() {
    let service = yaml_file("deploy/cloudrun/service.yaml");
    known_keys(&service, "Cloud Run Service", &["apiVersion", "kind", "metadata", "spec"]);
    assert_eq!(service["apiVersion"], "serving.knative.dev/v1");
    assert_eq!(service["kind"], "Service");
    known_keys(&service["metadata"], "Service metadata", &["name", "namespace", "labels", "annotations"]);
    known_keys(&service["spec"], "Service spec", &["template", "traffic"]);
    let template = &service["spec"]["template"];
    known_keys(template, "template", &["metadata", "spec"]);
    let spec = known_keys(&template["spec"], "template spec", CLOUD_RUN_TEMPLATE_SPEC_KEYS);
    let timeout = num_at(&template["spec"], "/timeoutSeconds", "template spec");
    assert!((1.0..=CLOUD_RUN_MAX_TIMEOUT).contains(&timeout), "timeoutSeconds {timeout}");
    let request_timeout = herdsman::Config::default().request_timeout.as_secs_f64();
    assert!(timeout > request_timeout, "herdsman's 503 at {request_timeout} s must come before Cloud Run's 504");
    assert!(spec["containerConcurrency"].as_u64().is_some_and(|c| (1..=1000).contains(&c)), "containerConcurrency");

    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one ingress container");
    let container = &containers[0];
    known_keys(container, "container", CLOUD_RUN_CONTAINER_KEYS);
    let ports = container["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    known_keys(&ports[0], "container port", &["name", "containerPort"]);
    assert_eq!(ports[0]["name"], "http1", "herdsman speaks HTTP/1");
    let image = image();
    assert_eq!(num_at(&ports[0], "/containerPort", "port"), f64::from(image.port), "containerPort is the image's PORT");
    // Cloud Run sets PORT from containerPort and refuses a deployment that sets it.
    let env = container["env"].as_array().map(Vec::as_slice).unwrap_or_default();
    assert!(env.iter().all(|e| e["name"] != "PORT"), "PORT is reserved on Cloud Run");

    for (probe, route) in [("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let p = &container[probe];
        known_keys(p, probe, CLOUD_RUN_PROBE_KEYS);
        known_keys(&p["httpGet"], &format!("{probe}.httpGet"), &["path", "port", "httpHeaders"]);
        assert_eq!(str_at(p, "/httpGet/path", probe), route, "{probe} checks {route}");
        assert_eq!(num_at(p, "/httpGet/port", probe), f64::from(image.port), "{probe} targets PORT");
        let period = num_at(p, "/periodSeconds", probe);
        assert!(num_at(p, "/timeoutSeconds", probe) <= period, "{probe} timeout within its period");
    }
    if container.get("readinessProbe").is_some() {
        let stage = service.pointer("/metadata/annotations/run.googleapis.com~1launch-stage").and_then(Value::as_str);
        assert_eq!(stage, Some("BETA"), "readiness probes are a Preview feature: they need launch-stage BETA");
    }

    // On Cloud Run herdsman fits its drain below the fixed 10 s; the manifest must not undo it.
    let mut vars = vec![("K_SERVICE".to_string(), "herdsman".to_string())];
    vars.extend(env.iter().filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string()))));
    let grace = grace_on(&vars);
    assert!(grace < CLOUD_RUN_KILL_AFTER, "GRACEFUL_TIMEOUT {grace} must be below Cloud Run's 10 s");
}

// ---------------------------------------------------------------------------------------------
// Every health path any manifest names answers 200 on the real binary.
// ---------------------------------------------------------------------------------------------

fn all_health_paths() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    paths.insert(str_at(&toml_file("railway.toml"), "/deploy/healthcheckPath", "railway").to_string());
    for service in yaml_file("render.yaml")["services"].as_array().unwrap() {
        if let Some(p) = service["healthCheckPath"].as_str() {
            paths.insert(p.to_string());
        }
    }
    for check in toml_file("fly.toml")["http_service"]["checks"].as_array().unwrap() {
        paths.insert(str_at(check, "/path", "fly").to_string());
    }
    let deployment = yaml_file("deploy/kubernetes/deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        paths.insert(str_at(&container[probe], "/httpGet/path", probe).to_string());
    }
    let cloud_run = yaml_file("deploy/cloudrun/service.yaml");
    let container = &cloud_run["spec"]["template"]["spec"]["containers"][0];
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        paths.insert(str_at(&container[probe], "/httpGet/path", probe).to_string());
    }
    // `herdsman healthcheck` (the Dockerfile HEALTHCHECK) GETs /live.
    paths.insert("/live".to_string());
    paths
}

#[tokio::test]
async fn all_health_paths_answer_200() {
    let paths = all_health_paths();
    assert!(paths.len() >= 2, "{paths:?}");
    let server = support::start(&[]);
    for path in &paths {
        let response = reqwest::get(server.url(path)).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(response.status(), 200, "GET {path}");
    }
}

#[test]
fn durations_parse_like_fly_and_compose_write_them() {
    assert_eq!(duration_secs(&Value::from(30)), 30.0);
    assert_eq!(duration_secs(&Value::from("30s")), 30.0);
    assert_eq!(duration_secs(&Value::from("1m0s")), 60.0);
    assert_eq!(duration_secs(&Value::from("1m30s")), 90.0);
    assert_eq!(duration_secs(&Value::from("500ms")), 0.5);
}

#[test]
fn key_lists_catch_typos() {
    let typo: Value = toml::from_str("[deploy]\nhealthCheckPath = \"/ready\"\n").unwrap();
    let caught = std::panic::catch_unwind(|| known_keys(&typo["deploy"], "deploy", RAILWAY_DEPLOY_KEYS).len());
    assert!(caught.is_err(), "healthCheckPath (Render's spelling) is not a Railway key");
}
