//! The `herdsman` binary: the library's [`herdsman::App`] with the cache and auth HTTP APIs
//! turned on. Embedding herdsman in your own service is the same line with `.routes(...)`
//! (and only the APIs you want); see `examples/embed.rs`.

fn main() -> std::process::ExitCode {
    herdsman::App::new().with_cache_api().with_auth_api().run()
}
