//! Arbitrary flags and environment pairs into `Config::resolve`: no panic; an error is one line
//! naming the flag or variable it came from; a resolved configuration survives the trip to a
//! worker.
#![no_main]

#[path = "../../tests/oracles/mod.rs"]
mod oracles;

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Name {
    /// A setting's variable, by index, as written or in lower case (envy ignores case).
    Known {
        index: usize,
        lower: bool,
    },
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    /// Values that get past a parser, so that later settings are reached too.
    Plausible(u8),
    Number(f64),
    Integer(i64),
    Text(String),
}

const PLAUSIBLE: &[&str] =
    &["1", "0", "0.5", "30", "true", "off", "json", "text", "info", "::", "127.0.0.1", "redis://h:1", "a,b", ""];

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Plausible(i) => PLAUSIBLE[usize::from(*i) % PLAUSIBLE.len()].to_string(),
            Value::Number(n) => n.to_string(),
            Value::Integer(n) => n.to_string(),
            Value::Text(text) => text.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    flags: Vec<(usize, Value)>,
    env: Vec<(Name, Value)>,
}

fuzz_target!(|input: Input| {
    static SETTINGS: OnceLock<Vec<(String, &'static str)>> = OnceLock::new();
    let settings = SETTINGS.get_or_init(oracles::settings);
    let flags: Vec<(usize, String)> = input.flags.iter().map(|(i, value)| (*i, value.text())).collect();
    let env: Vec<(String, String)> = input
        .env
        .iter()
        .map(|(name, value)| {
            let name = match name {
                Name::Known { index, lower } => {
                    let var = settings[index % settings.len()].1;
                    if *lower {
                        var.to_ascii_lowercase()
                    } else {
                        var.to_string()
                    }
                }
                Name::Other(name) => name.clone(),
            };
            (name, value.text())
        })
        .collect();
    if let Err(broken) = oracles::check_config(settings, &flags, &env) {
        panic!("{broken}");
    }
});
