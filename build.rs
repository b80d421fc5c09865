//! Packs the relocations of a static glibc build (the container image's binary), so that every
//! such build gets it, whoever builds it: the Dockerfile, `scripts/test.sh`, `bench/image-size.sh`
//! or a user following the README.
//!
//! A `+crt-static` build on glibc is a static PIE: it relocates itself at start, from a table of
//! 24 bytes per pointer (vtables, string tables: 249 kB of a 6.07 MB binary, measured). With
//! `-z pack-relative-relocs` the linker writes the same relocations as DT_RELR bitmaps (3 kB),
//! and the binary stays position-independent (ASLR kept), unlike a non-PIE static link.
//! BENCHMARKS.md, "Issue 13", has the figures.
//!
//! Only static builds: a dynamic binary's relocations are applied by the system's loader, which
//! reads DT_RELR only from glibc 2.36 on, and the build machine cannot know the runtime one. A
//! static binary carries its own start-up code from the build machine's glibc (Debian bookworm,
//! the Dockerfile's `rust:1-bookworm`, has 2.36). The linkers know the option: rust-lld (rustc's
//! default on x86_64 Linux since 1.90) and GNU ld from 2.38 (bookworm: 2.40).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let static_glibc = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("CARGO_CFG_TARGET_FEATURE").split(',').any(|feature| feature == "crt-static");
    if static_glibc {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
