//! Log lines on stderr, in the shape a PaaS log drain expects.
//!
//! Master and workers write to the same stderr, so every line carries the pid and the role of
//! the process that wrote it, like gunicorn's `[pid] [LEVEL]` prefix:
//!
//! ```text
//! 2026-11-25T08:00:00.123456Z [4242] [master] INFO Listening at: http://[::]:8080
//! ```
//!
//! With `LOG_FORMAT=json` the same fields become one JSON object per line.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the global subscriber. Called once per process; a second call is a no-op.
pub fn init(format: LogFormat, filter: &str, role: &'static str) {
    let filter =
        crate::config::parse_log_filter(filter).unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).event_format(LineFormat {
        format,
        role,
        pid: std::process::id(),
    });
    let _ = tracing_subscriber::registry().with(lines).with(filter).try_init();
}

struct LineFormat {
    format: LogFormat,
    role: &'static str,
    pid: u32,
}

/// Collects an event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest.insert(field.name().into(), format!("{value:?}").into());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.insert(field.name().into(), value.into());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.rest.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.rest.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.rest.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.rest.insert(field.name().into(), value.into());
    }
}

impl Fields {
    /// The text format's message and ` key=value` fields. Control characters are escaped (`\n`,
    /// `\u{1b}`): a value a client chose (a username at login, a cache key) cannot end the line
    /// and forge the next one, or drive a terminal. (The JSON format escapes them anyway.)
    fn write_text(&self, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        write_escaped(out, &self.message)?;
        for (key, value) in &self.rest {
            write!(out, " {key}=")?;
            match value {
                serde_json::Value::String(s) => write_escaped(out, s)?,
                other => write!(out, "{other}")?,
            }
        }
        Ok(())
    }
}

fn write_escaped(out: &mut impl std::fmt::Write, text: &str) -> std::fmt::Result {
    if !text.chars().any(char::is_control) {
        return out.write_str(text);
    }
    for c in text.chars() {
        match c.is_control() {
            true => write!(out, "{}", c.escape_default())?,
            false => out.write_char(c)?,
        }
    }
    Ok(())
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let level = event.metadata().level();
        match self.format {
            LogFormat::Text => {
                write!(writer, "{time} [{}] [{}] {level} ", self.pid, self.role)?;
                fields.write_text(&mut writer)?;
                writeln!(writer)
            }
            LogFormat::Json => {
                let mut line = serde_json::Map::new();
                line.insert("ts".into(), time.into());
                line.insert("level".into(), level.as_str().into());
                line.insert("pid".into(), self.pid.into());
                line.insert("role".into(), self.role.into());
                line.insert("msg".into(), fields.message.into());
                line.extend(fields.rest);
                writeln!(writer, "{}", serde_json::Value::Object(line))
            }
        }
    }
}

/// The message of a panic's payload (`panic!` with a literal or a formatted string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_escape_control_characters_so_a_value_cannot_forge_a_line() {
        let mut fields = Fields { message: "auth attempt\r\nthrottled".into(), ..Fields::default() };
        let forged = "eve\n2026-11-25T08:00:00.000000Z [1] [master] INFO Listening at: http://evil";
        fields.rest.insert("username".into(), forged.into());
        fields.rest.insert("terminal".into(), "\u{1b}[2J".into());
        fields.rest.insert("status".into(), 401.into());
        let mut line = String::new();
        fields.write_text(&mut line).expect("write");
        assert!(!line.contains(['\n', '\r', '\u{1b}']), "{line:?}");
        assert_eq!(
            line,
            "auth attempt\\r\\nthrottled status=401 terminal=\\u{1b}[2J \
             username=eve\\n2026-11-25T08:00:00.000000Z [1] [master] INFO Listening at: http://evil"
        );
        // What has no control character is written as it is.
        let plain = Fields { message: "redis connected".into(), ..Fields::default() };
        let mut line = String::new();
        plain.write_text(&mut line).expect("write");
        assert_eq!(line, "redis connected");
    }
}
