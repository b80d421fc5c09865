//! The platform herdsman runs on, told from the variables each one sets, and the defaults fitted
//! to it.
//!
//! The same defaults cannot suit every platform: Cloud Run SIGKILLs 10 s after SIGTERM, Fly 5 s
//! unless `kill_timeout` is raised, Heroku and Render 30 s; a Heroku dyno shows 8 CPUs whatever
//! it pays for. This module owns those facts (with their sources in README.md's platform table)
//! and turns them into [`Fit`]s: raw values for settings, each with the reason shown by
//! `herdsman check`. [`crate::config`] applies a fit only where neither a flag nor a variable
//! gives the setting: an explicit setting always wins, and [`Detected::warnings`] says when one
//! works against the platform.
//!
//! Adding a fitted setting is one row of [`FITS`].

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Memory one worker is assumed to need when workers are fitted to a memory limit: its in-memory
/// cache (`HERDSMAN_CACHE_MAX_BYTES`, 64 MiB by default) and as much again for writes waiting
/// to be replayed to Redis, plus headroom for the runtime, the hashing threads and the
/// connections. A Heroku standard-1X dyno (512 MB) gets 2 workers, a standard-2X (1 GB) 4.
pub const MEMORY_PER_WORKER: u64 = 256 << 20;

/// Share of the platform's SIGTERM-to-SIGKILL time given to in-flight requests; the rest is for
/// the master to reap its workers and exit on its own. Cloud Run's 10 s gives 8 s, Fly's 5 s 4 s.
const GRACE_SHARE: f64 = 0.8;

/// The kill timeout herdsman's own default `GRACEFUL_TIMEOUT` (25 s) is made for: Heroku's,
/// Render's and Kubernetes' 30 s. Only platforms that wait less get a fitted grace period.
const DEFAULT_GRACE_FITS_KILL_AFTER: Duration = Duration::from_secs(30);

/// The platforms herdsman recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Heroku,
    Render,
    Railway,
    Fly,
    CloudRun,
    Kubernetes,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Heroku => "heroku",
            Kind::Render => "render",
            Kind::Railway => "railway",
            Kind::Fly => "fly",
            Kind::CloudRun => "cloudrun",
            Kind::Kubernetes => "kubernetes",
        }
    }
}

/// How long a platform waits between SIGTERM and SIGKILL, and whether the app can know it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillTimeout {
    pub after: Duration,
    /// The platform's default, which a manifest may have changed where herdsman cannot see it
    /// (fly.toml's `kill_timeout`, render.yaml's `maxShutdownDelaySeconds`, a pod's
    /// `terminationGracePeriodSeconds`); `false` when it is fixed or read from the environment.
    pub configurable: bool,
}

/// CPU and memory limits of this process's control group; `None` where there is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// CPUs the quota pays for (`cpu.max` 150000/100000 is 1.5).
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// Reads cgroup v2 (`cpu.max`, `memory.max` under `root`), falling back to cgroup v1
    /// (`cpu/cpu.cfs_quota_us`, `memory/memory.limit_in_bytes`). Unreadable means unlimited.
    pub fn read(root: &Path) -> Limits {
        let read = |file: &str| std::fs::read_to_string(root.join(file)).ok();
        let cpus = match read("cpu.max") {
            Some(v2) => parse_cpu_max(&v2),
            None => {
                let quota = read("cpu/cpu.cfs_quota_us").and_then(|q| q.trim().parse::<i64>().ok());
                let period = read("cpu/cpu.cfs_period_us").and_then(|p| p.trim().parse::<i64>().ok());
                match (quota, period) {
                    (Some(quota), Some(period)) if quota > 0 && period > 0 => Some(quota as f64 / period as f64),
                    _ => None,
                }
            }
        };
        let memory = read("memory.max").or_else(|| read("memory/memory.limit_in_bytes"));
        // cgroup v1 writes "no limit" as a number near 2^63.
        let memory_bytes = memory.and_then(|m| m.trim().parse::<u64>().ok()).filter(|&bytes| bytes < 1 << 60);
        Limits { cpus, memory_bytes }
    }
}

/// `cpu.max` is `QUOTA PERIOD` or `max PERIOD`.
fn parse_cpu_max(line: &str) -> Option<f64> {
    let mut fields = line.split_whitespace();
    let quota = fields.next()?.parse::<f64>().ok()?;
    let period = fields.next().and_then(|p| p.parse::<f64>().ok()).unwrap_or(100_000.0);
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// What the machine shows this process, besides the environment.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// The CPUs the process sees (`std::thread::available_parallelism`).
    pub visible_cpus: usize,
    pub limits: Limits,
}

impl Host {
    /// This process's host: its CPUs and the limits of its own cgroup.
    pub fn this_process() -> Host {
        Host {
            visible_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            limits: Limits::read(Path::new("/sys/fs/cgroup")),
        }
    }
}

/// A default fitted to the platform: the raw value, parsed like any other, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub value: String,
    pub why: String,
}

/// One fitted setting: its variable and how its value follows from the platform.
struct FitRow {
    variable: &'static str,
    fit: fn(&Detected, &Host) -> Option<Fit>,
}

/// Every setting herdsman fits to a platform.
const FITS: &[FitRow] = &[
    FitRow { variable: "GRACEFUL_TIMEOUT", fit: grace_below_kill_timeout },
    FitRow { variable: "WEB_CONCURRENCY", fit: workers_within_limits },
    FitRow { variable: "HERDSMAN_TRUSTED_PROXIES", fit: one_router_hop },
    FitRow { variable: "HERDSMAN_MAX_WORKER_MEMORY", fit: memory_line_below_limit },
];

/// Share of a known memory limit the workers' own memory may reach in all before one is
/// replaced: the rest is the master's, the kernel's (page cache, sockets) and what a worker
/// grows between two readings.
const WORKER_MEMORY_SHARE: &str = "80%";

/// The platform found in the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub kind: Kind,
    /// What identifies this instance on it (`dyno web.1`, `service api`), for the start line.
    pub detail: Option<String>,
    /// `None` where the platform SIGKILLs at a time it does not tell (Railway without
    /// `RAILWAY_DEPLOYMENT_DRAINING_SECONDS`).
    pub kill_timeout: Option<KillTimeout>,
}

impl fmt::Display for Detected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{} ({detail})", self.kind.name()),
            None => f.write_str(self.kind.name()),
        }
    }
}

/// Finds the platform from the environment, whose names are lower-cased (as `envy` leaves them).
/// The first match wins, most specific first: Cloud Run before Kubernetes (Knative sets both).
pub fn detect(env: &HashMap<String, String>) -> Option<Detected> {
    let get = |name: &str| env.get(&name.to_ascii_lowercase()).map(|v| v.trim().to_string());
    let fixed = |secs| Some(KillTimeout { after: Duration::from_secs(secs), configurable: false });
    let default = |secs| Some(KillTimeout { after: Duration::from_secs(secs), configurable: true });
    let (kind, detail, kill_timeout) = if let Some(dyno) = get("DYNO") {
        (Kind::Heroku, Some(format!("dyno {dyno}")), fixed(30))
    } else if get("RENDER").is_some() {
        (Kind::Render, get("RENDER_SERVICE_NAME").map(|s| format!("service {s}")), default(30))
    } else if env.keys().any(|name| name.starts_with("railway_")) {
        let draining = get("RAILWAY_DEPLOYMENT_DRAINING_SECONDS").and_then(|s| s.parse::<f64>().ok());
        let kill = draining.and_then(|s| Duration::try_from_secs_f64(s).ok()).filter(|d| !d.is_zero());
        let detail = get("RAILWAY_SERVICE_NAME").map(|s| format!("service {s}"));
        (Kind::Railway, detail, kill.map(|after| KillTimeout { after, configurable: false }))
    } else if let Some(app) = get("FLY_APP_NAME") {
        let region = get("FLY_REGION").map(|r| format!(" in {r}")).unwrap_or_default();
        (Kind::Fly, Some(format!("app {app}{region}")), default(5))
    } else if let Some(service) = get("K_SERVICE") {
        let revision = get("K_REVISION").map(|r| format!(", revision {r}")).unwrap_or_default();
        (Kind::CloudRun, Some(format!("service {service}{revision}")), fixed(10))
    } else if get("KUBERNETES_SERVICE_HOST").is_some() {
        (Kind::Kubernetes, get("HOSTNAME").map(|pod| format!("pod {pod}")), default(30))
    } else {
        return None;
    };
    Some(Detected { kind, detail, kill_timeout })
}

impl Detected {
    /// The fitted defaults, by variable.
    pub fn fits(&self, host: &Host) -> HashMap<&'static str, Fit> {
        FITS.iter().filter_map(|row| Some((row.variable, (row.fit)(self, host)?))).collect()
    }

    /// What to warn about once at start, given the grace period in force and whether it was
    /// set explicitly (a fitted or default one never exceeds the kill timeout).
    pub fn warnings(&self, grace: Duration, grace_is_explicit: bool) -> Vec<String> {
        let mut warnings = Vec::new();
        match self.kill_timeout {
            None if self.kind == Kind::Railway => warnings.push(
                "RAILWAY_DEPLOYMENT_DRAINING_SECONDS is not set: unless the service's draining time is set \
                 elsewhere (railway.toml drainingSeconds, the dashboard), Railway SIGKILLs an old deployment \
                 about 3 s after SIGTERM and its longer in-flight requests are lost"
                    .to_string(),
            ),
            Some(kill) if grace_is_explicit && grace >= kill.after => {
                let whose = if kill.configurable { "by default " } else { "" };
                let unless = match self.kind {
                    Kind::Fly => " (ignore this if fly.toml raises kill_timeout above it)",
                    Kind::Render => " (ignore this if maxShutdownDelaySeconds is raised above it)",
                    Kind::Kubernetes => " (ignore this if terminationGracePeriodSeconds is raised above it)",
                    _ => "",
                };
                warnings.push(format!(
                    "GRACEFUL_TIMEOUT={} is not below the {} s {} {whose}waits between SIGTERM and SIGKILL: \
                     requests still running then are killed{unless}",
                    grace.as_secs_f64(),
                    kill.after.as_secs_f64(),
                    self.kind.name()
                ));
            }
            _ => {}
        }
        warnings
    }
}

/// In-flight requests get [`GRACE_SHARE`] of a kill timeout shorter than the one herdsman's
/// default is made for (Cloud Run, Fly, a Railway draining time under 30 s).
fn grace_below_kill_timeout(platform: &Detected, _: &Host) -> Option<Fit> {
    let kill = platform.kill_timeout.filter(|kill| kill.after < DEFAULT_GRACE_FITS_KILL_AFTER)?;
    let grace = kill.after.mul_f64(GRACE_SHARE);
    let whose = if kill.configurable { "by default " } else { "" };
    let why = match platform.kind {
        Kind::Railway => "RAILWAY_DEPLOYMENT_DRAINING_SECONDS".to_string(),
        kind => format!("{} {whose}SIGKILLs", kind.name()),
    };
    Some(Fit {
        value: format!("{}", grace.as_secs_f64()),
        why: format!("{why} {} s after SIGTERM", kill.after.as_secs_f64()),
    })
}

/// Behind the platforms' HTTP routers, the client address is the last one `X-Forwarded-For`
/// holds. One hop is the safe side where a platform's docs leave the count open: too few hops
/// makes clients share the router's address (their login buckets too), too many would let a
/// client choose its own address. Kubernetes is left alone: its ingress is the user's choice.
fn one_router_hop(platform: &Detected, _: &Host) -> Option<Fit> {
    matches!(platform.kind, Kind::Heroku | Kind::Render | Kind::Railway | Kind::Fly | Kind::CloudRun).then(|| Fit {
        value: "1".into(),
        why: format!("{}'s router appends the client's address to X-Forwarded-For", platform.kind.name()),
    })
}

/// Where the platform puts the container under a memory limit, a leaking worker is replaced
/// before the limit's OOM killer (Heroku's R14/R15) takes one with its requests.
fn memory_line_below_limit(platform: &Detected, host: &Host) -> Option<Fit> {
    let limit = host.limits.memory_bytes?;
    Some(Fit {
        value: WORKER_MEMORY_SHARE.into(),
        why: format!(
            "{} memory limit {} MiB: workers are replaced before its OOM killer takes one",
            platform.kind.name(),
            limit >> 20
        ),
    })
}

/// One worker per CPU the quota pays for, and no more than the memory limit holds at
/// [`MEMORY_PER_WORKER`]; fitted only when that is fewer than the CPUs the process sees.
fn workers_within_limits(_: &Detected, host: &Host) -> Option<Fit> {
    let by_cpu = host.limits.cpus.map(|cpus| (cpus.ceil() as usize).max(1));
    let by_memory = host.limits.memory_bytes.map(|bytes| ((bytes / MEMORY_PER_WORKER) as usize).max(1));
    let workers = [by_cpu, by_memory].into_iter().flatten().min()?;
    if workers >= host.visible_cpus {
        return None;
    }
    let mut reasons = Vec::new();
    if let Some(cpus) = host.limits.cpus {
        reasons.push(format!("CPU quota {cpus}"));
    }
    if let Some(bytes) = host.limits.memory_bytes {
        reasons.push(format!("memory limit {} MiB at {} MiB per worker", bytes >> 20, MEMORY_PER_WORKER >> 20));
    }
    Some(Fit { value: workers.to_string(), why: format!("{}; {} CPUs visible", reasons.join(", "), host.visible_cpus) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
    }

    fn unlimited(cpus: usize) -> Host {
        Host { visible_cpus: cpus, limits: Limits::default() }
    }

    #[test]
    fn each_platform_is_told_from_what_it_sets() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Kind, &'a str);
        let cases: &[Case] = &[
            (&[("DYNO", "web.1")], Kind::Heroku, "heroku (dyno web.1)"),
            (&[("RENDER", "true"), ("RENDER_SERVICE_NAME", "api")], Kind::Render, "render (service api)"),
            (&[("RAILWAY_ENVIRONMENT_NAME", "production")], Kind::Railway, "railway"),
            (&[("RAILWAY_PROJECT_ID", "p")], Kind::Railway, "railway"),
            (&[("FLY_APP_NAME", "herdsman"), ("FLY_REGION", "ams")], Kind::Fly, "fly (app herdsman in ams)"),
            (
                &[("K_SERVICE", "api"), ("K_REVISION", "api-1")],
                Kind::CloudRun,
                "cloudrun (service api, revision api-1)",
            ),
            (
                &[("K_SERVICE", "api"), ("KUBERNETES_SERVICE_HOST", "10.0.0.1")],
                Kind::CloudRun,
                "cloudrun (service api)",
            ),
            (
                &[("KUBERNETES_SERVICE_HOST", "10.0.0.1"), ("HOSTNAME", "web-7d")],
                Kind::Kubernetes,
                "kubernetes (pod web-7d)",
            ),
        ];
        for (pairs, kind, shown) in cases {
            let detected = detect(&env(pairs)).unwrap_or_else(|| panic!("nothing detected from {pairs:?}"));
            assert_eq!(detected.kind, *kind, "{pairs:?}");
            assert_eq!(detected.to_string(), *shown);
        }
        assert_eq!(detect(&env(&[("PORT", "8080"), ("HOME", "/")])), None);
    }

    #[test]
    fn the_grace_period_is_fitted_below_short_kill_timeouts_only() {
        let grace = |pairs: &[(&str, &str)]| {
            detect(&env(pairs)).unwrap().fits(&unlimited(1)).get("GRACEFUL_TIMEOUT").map(|fit| fit.value.clone())
        };
        assert_eq!(grace(&[("K_SERVICE", "api")]).as_deref(), Some("8"));
        assert_eq!(grace(&[("FLY_APP_NAME", "a")]).as_deref(), Some("4"));
        assert_eq!(
            grace(&[("RAILWAY_PROJECT_ID", "p"), ("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "10")]).as_deref(),
            Some("8")
        );
        // 30 s platforms keep the 25 s default; so does Railway when it does not say.
        assert_eq!(grace(&[("DYNO", "web.1")]), None);
        assert_eq!(grace(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")]), None);
        assert_eq!(grace(&[("RAILWAY_PROJECT_ID", "p"), ("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "60")]), None);
        assert_eq!(grace(&[("RAILWAY_PROJECT_ID", "p")]), None);
    }

    #[test]
    fn behind_a_platform_router_one_proxy_hop_is_trusted_and_kubernetes_is_left_alone() {
        let hops = |pairs: &[(&str, &str)]| {
            detect(&env(pairs))
                .unwrap()
                .fits(&unlimited(1))
                .get("HERDSMAN_TRUSTED_PROXIES")
                .map(|fit| fit.value.clone())
        };
        for pairs in [
            &[("DYNO", "web.1")][..],
            &[("RENDER", "true")],
            &[("RAILWAY_PROJECT_ID", "p")],
            &[("FLY_APP_NAME", "a")],
            &[("K_SERVICE", "api")],
        ] {
            assert_eq!(hops(pairs).as_deref(), Some("1"), "{pairs:?}");
        }
        assert_eq!(hops(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")]), None);
        let resolved = crate::config::Config::resolve(&crate::config::Flags::default(), env(&[("DYNO", "web.1")]))
            .map(|config| config.trusted_proxies);
        assert_eq!(resolved, Ok(1), "the fit reaches the setting");
    }

    #[test]
    fn workers_follow_the_memory_limit_and_cpu_quota_not_the_visible_cpus() {
        let heroku = detect(&env(&[("DYNO", "web.1")])).unwrap();
        let standard_1x = Host { visible_cpus: 8, limits: Limits { cpus: None, memory_bytes: Some(512 << 20) } };
        let fit = heroku.fits(&standard_1x).remove("WEB_CONCURRENCY").unwrap();
        assert_eq!(fit.value, "2");
        assert!(fit.why.contains("512 MiB") && fit.why.contains("8 CPUs visible"), "{}", fit.why);

        let quota = Host { visible_cpus: 16, limits: Limits { cpus: Some(1.5), memory_bytes: Some(8 << 30) } };
        assert_eq!(heroku.fits(&quota)["WEB_CONCURRENCY"].value, "2");
        // Nothing to fit when the limits allow every visible CPU, or there are none.
        let roomy = Host { visible_cpus: 2, limits: Limits { cpus: Some(2.0), memory_bytes: Some(4 << 30) } };
        assert!(!heroku.fits(&roomy).contains_key("WEB_CONCURRENCY"));
        assert!(!heroku.fits(&unlimited(8)).contains_key("WEB_CONCURRENCY"));
        let tiny = Host { visible_cpus: 4, limits: Limits { cpus: None, memory_bytes: Some(100 << 20) } };
        assert_eq!(heroku.fits(&tiny)["WEB_CONCURRENCY"].value, "1");
    }

    #[test]
    fn the_memory_line_is_fitted_only_under_a_known_limit() {
        let fly = detect(&env(&[("FLY_APP_NAME", "a")])).unwrap();
        let fits = fly.fits(&Host { visible_cpus: 1, limits: Limits { cpus: Some(1.0), memory_bytes: Some(1 << 30) } });
        let line = &fits["HERDSMAN_MAX_WORKER_MEMORY"];
        assert_eq!(line.value, "80%");
        assert!(line.why.starts_with("fly memory limit 1024 MiB"), "{}", line.why);
        assert!(!fly.fits(&unlimited(8)).contains_key("HERDSMAN_MAX_WORKER_MEMORY"));
    }

    #[test]
    fn cgroup_limits_are_read_from_v2_then_v1() {
        let root = std::env::temp_dir().join(format!("herdsman-cgroup-{}", std::process::id()));
        let cgroup = |dir: &str, files: &[(&str, &str)]| {
            let dir = root.join(dir);
            for (file, content) in files {
                let path = dir.join(file);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
            Limits::read(&dir)
        };
        let v2 = cgroup("v2", &[("cpu.max", "150000 100000\n"), ("memory.max", "536870912\n")]);
        assert_eq!(v2, Limits { cpus: Some(1.5), memory_bytes: Some(512 << 20) });
        assert_eq!(cgroup("v2", &[("cpu.max", "max 100000\n"), ("memory.max", "max\n")]), Limits::default());

        let v1 = cgroup(
            "v1",
            &[
                ("cpu/cpu.cfs_quota_us", "200000\n"),
                ("cpu/cpu.cfs_period_us", "100000\n"),
                ("memory/memory.limit_in_bytes", "1073741824\n"),
            ],
        );
        assert_eq!(v1, Limits { cpus: Some(2.0), memory_bytes: Some(1 << 30) });
        let unlimited_v1 = cgroup(
            "v1",
            &[("cpu/cpu.cfs_quota_us", "-1\n"), ("memory/memory.limit_in_bytes", "9223372036854771712\n")],
        );
        assert_eq!(unlimited_v1, Limits::default());
        assert_eq!(Limits::read(&root.join("absent")), Limits::default());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_explicit_grace_past_the_kill_timeout_is_warned_about() {
        let cloud_run = detect(&env(&[("K_SERVICE", "api")])).unwrap();
        let warnings = cloud_run.warnings(Duration::from_secs(25), true);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("GRACEFUL_TIMEOUT=25") && warnings[0].contains("10 s"), "{warnings:?}");
        assert!(cloud_run.warnings(Duration::from_secs(8), true).is_empty());
        assert!(cloud_run.warnings(Duration::from_secs(25), false).is_empty(), "only explicit settings");
        let fly = detect(&env(&[("FLY_APP_NAME", "a")])).unwrap();
        assert!(fly.warnings(Duration::from_secs(25), true)[0].contains("kill_timeout"));
        let railway = detect(&env(&[("RAILWAY_PROJECT_ID", "p")])).unwrap();
        assert!(railway.warnings(Duration::from_secs(25), false)[0].contains("RAILWAY_DEPLOYMENT_DRAINING_SECONDS"));
    }
}
