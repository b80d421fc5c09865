//! The command line: `herdsman [serve]`, `herdsman check`, `herdsman healthcheck`, the operator's
//! `herdsman status [--json]`, `herdsman reload` and `herdsman scale N`, and the hidden
//! `herdsman __worker` the master re-executes to start a worker.
//!
//! Errors here never become a clap usage dump or a panic: [`parse_args`] turns any clap error
//! into the single line the process prints before exiting with status 2.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args};

use crate::config::{Config, Flags, Resolution};
use crate::operator::{self, OperatorError, Reply, Request, SocketName};

/// `--help`'s first paragraph, which `-h` shows alone.
const ABOUT: &str = "A prefork runtime for web services on PaaS: binds $PORT at once, supervises WEB_CONCURRENCY workers, warms up in the background, and falls back to memory when Redis is away";

/// `--help`'s text above the usage line.
const LONG_ABOUT: &str = "A prefork runtime for web services on PaaS: binds $PORT at once, supervises WEB_CONCURRENCY workers, warms up in the background, and falls back to memory when Redis is away.

Every setting can be given as a flag or as the environment variable named in its help; a flag wins over the variable, the variable over the default.

Signals to the master: TERM or INT drain and exit 0; QUIT stops fast; HUP replaces every worker without dropping a request; TTIN and TTOU add and remove a worker.";

/// A parsed command line: the command (none means `serve`) and the settings given as flags.
#[derive(Debug)]
pub struct Cli {
    pub command: Option<Command>,
    pub flags: Flags,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the master and its workers (what plain `herdsman` does).
    Serve,
    /// Print the resolved configuration, secrets redacted, and exit 0; exit 2 if it is invalid.
    Check,
    /// Request /live on the local port and exit 0 if it answers 200, else 1.
    Healthcheck,
    /// Ask the running master for its report, as text or as JSON.
    Status { json: bool },
    /// Replace every worker of the running master without dropping a request.
    Reload,
    /// Set the running master's worker count (parsed by [`operator::parse_worker_count`]).
    Scale { count: String },
    /// Internal: run one worker on what the master passes (see the contract module).
    Worker,
}

/// The command line's grammar, built by hand rather than by clap's derive, like the settings'
/// flags ([`Flags`]): the derive wrote a block of builder code per item (17 kB of the binary).
fn grammar() -> clap::Command {
    let command = |name: &'static str, about: &'static str| clap::Command::new(name).about(about);
    let root = clap::Command::new("herdsman")
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .long_about(LONG_ABOUT)
        .max_term_width(100)
        .subcommands([
            command("serve", "Run the master and its workers (what plain `herdsman` does)"),
            command("check", "Print the resolved configuration, secrets redacted, and exit 0; exit 2 if it is invalid"),
            command("healthcheck", "Request /live on the local port and exit 0 if it answers 200, else 1 (for container HEALTHCHECKs in images without curl)"),
            command("status", "Show the running master's phase and each worker's serial, pid, state, age, requests, in-flight requests, heartbeat age and memory (through its control socket)")
                .arg(Arg::new("json").long("json").action(ArgAction::SetTrue).help("Print the report as JSON, for tools")),
            command("reload", "Replace every worker of the running master without dropping a request (as SIGHUP)"),
            command("scale", "Set the running master's worker count (1 to 512); extra workers drain gracefully").arg(
                Arg::new("count")
                    .value_name("N")
                    .required(true)
                    .allow_hyphen_values(true)
                    .help("The new worker count"),
            ),
            command(crate::contract::WORKER_SUBCOMMAND, "Internal: run one worker on what the master passes (see the contract module)")
                .hide(true),
        ]);
    Flags::augment_args(root)
}

/// The command `matches` names: it is one of [`grammar`]'s, which is what clap just checked.
fn command(matches: &ArgMatches) -> Option<Command> {
    let (name, matches) = matches.subcommand()?;
    Some(match name {
        "check" => Command::Check,
        "healthcheck" => Command::Healthcheck,
        "status" => Command::Status { json: matches.get_flag("json") },
        "reload" => Command::Reload,
        "scale" => Command::Scale { count: matches.get_one::<String>("count").cloned().unwrap_or_default() },
        name if name == crate::contract::WORKER_SUBCOMMAND => Command::Worker,
        _ => Command::Serve, // "serve"
    })
}

/// When the command line is not a command to run.
#[derive(Debug)]
pub enum ArgsOutcome {
    /// `--help` or `--version`: print this on stdout and exit 0.
    Print(String),
    /// A bad flag or argument: print this one line on stderr and exit 2.
    Invalid(String),
}

/// Parses the command line.
pub fn parse_args<I, T>(args: I) -> Result<Cli, ArgsOutcome>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = grammar().try_get_matches_from(args).and_then(|matches| {
        let flags = <Flags as clap::FromArgMatches>::from_arg_matches(&matches)?;
        Ok(Cli { command: command(&matches), flags })
    });
    parsed.map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            ArgsOutcome::Print(e.to_string())
        }
        _ => {
            // clap's first line names the culprit ("error: unexpected argument '--x' found");
            // the usage block after it is noise in a platform's deploy log.
            let rendered = e.to_string();
            let mut lines = rendered.lines();
            let first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            // "the following required arguments were not provided:" names them on the next line.
            let first = match (first.ends_with(':'), lines.next()) {
                (true, Some(culprit)) => format!("{first} {}", culprit.trim()),
                _ => first.to_string(),
            };
            ArgsOutcome::Invalid(format!("herdsman: {first} (see herdsman --help for the accepted flags)\n"))
        }
    })
}

/// `herdsman check`: the platform, then the resolved settings one per line, each with where its
/// value came from, then the warnings the master would log at start.
pub fn check(resolution: &Resolution) -> String {
    let platform = resolution.platform.as_ref().map_or_else(|| "none detected".to_string(), |p| p.to_string());
    let mut out = format!("Platform: {platform}\n");
    for (name, value) in resolution.config.describe() {
        let source = resolution.source(name).map_or_else(String::new, |source| format!("  ({source})"));
        out.push_str(&format!("{name} = {value}{source}\n"));
    }
    for warning in &resolution.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}

/// `herdsman status`, `reload` and `scale`: sends `request` to the master on this port (or
/// `--socket`) and returns what to print.
pub fn operate(config: &Config, request: &Request, json: bool) -> Result<String, OperatorError> {
    let socket = SocketName::for_master(config, config.port);
    match operator::send(&socket, request)? {
        Reply::Status(report) if json => Ok(serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"),
        Reply::Status(report) => Ok(operator::format_status(&report)),
        Reply::Done(message) => Ok(message + "\n"),
        Reply::Refused(why) => Err(OperatorError::Refused(why)),
    }
}

/// `herdsman healthcheck`: a minimal HTTP/1.1 GET of `/live` on the configured port. `Err`
/// says why it failed, for the line printed on stderr.
pub fn healthcheck(config: &Config) -> Result<(), String> {
    // An unspecified bind address is reached through loopback of the same family.
    let ip = match config.host {
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let timeout = Duration::from_secs(3);
    let candidates = [SocketAddr::new(ip, config.port), SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), config.port)];
    let mut failures = Vec::new();
    for addr in candidates {
        match live_answers(&addr, timeout) {
            Ok(()) => return Ok(()),
            Err(why) => failures.push(format!("http://{addr}/live: {why}")),
        }
    }
    Err(failures.join("; "))
}

fn live_answers(addr: &SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(addr, timeout).map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET /live HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let read = stream.take(4096).read_to_end(&mut response);
    let status_line = response.split(|b| *b == b'\r').next().unwrap_or_default();
    match (response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200"), read) {
        (true, _) => Ok(()),
        (false, Err(e)) if response.is_empty() => Err(format!("no answer ({e})")),
        (false, _) if response.is_empty() => Err("the connection closed without an answer".into()),
        (false, _) => Err(format!("answered {:?}", String::from_utf8_lossy(status_line))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_flag_is_one_line_with_status_2() {
        let Err(ArgsOutcome::Invalid(msg)) = parse_args(["herdsman", "--bogus"]) else { panic!("accepted --bogus") };
        assert_eq!(msg.trim_end().lines().count(), 1, "{msg}");
        assert!(msg.contains("--bogus"), "{msg}");
    }

    #[test]
    fn help_lists_every_variable() {
        let Err(ArgsOutcome::Print(help)) = parse_args(["herdsman", "--help"]) else { panic!("no help") };
        // Help text wraps at the terminal width; compare with the wrapping undone.
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for (var, _) in Config::default().describe() {
            assert!(help.contains(&format!("env: {var}")), "--help lacks {var}");
        }
    }
}
