//! The `herdsman` binary: the library's [`herdsman::App`] with no routes of its own.
//! Embedding herdsman in your own service is the same line with `.routes(...)` added;
//! see `examples/embed.rs`.

fn main() -> std::process::ExitCode {
    herdsman::App::new().run()
}
