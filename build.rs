//! Two link options for a static glibc build (the container image's binary), so that every such
//! build gets them, whoever builds it: the Dockerfile, `scripts/test.sh`, `bench/image-size.sh`
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
//!
//! Identical code folding (`--icf=all`): the linker keeps one copy of functions whose machine
//! code is the same (generic instances that compile alike, such as drop glue and `Debug`
//! impls), 42 kB of the image. Rust does not promise distinct functions distinct addresses
//! (see `std::ptr::fn_addr_eq`), and rustc folds the same way on Windows (`/OPT:ICF`). Only lld has
//! the option, not GNU ld, so it is added only where rustc links with its own rust-lld: its
//! default on x86_64-unknown-linux-gnu from rustc 1.90, unless the build picks a linker itself.
//! Elsewhere the binary is 42 kB larger and otherwise the same.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let static_glibc = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("CARGO_CFG_TARGET_FEATURE").split(',').any(|feature| feature == "crt-static");
    if static_glibc {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        if links_with_rust_lld(&var) {
            println!("cargo::rustc-link-arg-bins=-Wl,--icf=all");
        }
    }
}

/// Whether rustc links this build with its own rust-lld: the default linker on
/// x86_64-unknown-linux-gnu from rustc 1.90, unless a linker is configured (cargo's
/// `RUSTC_LINKER`) or the flags choose one (`-C linker=`, `-C linker-features`,
/// `-C link-self-contained`, `-fuse-ld`).
fn links_with_rust_lld(var: &dyn Fn(&str) -> String) -> bool {
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let chooses_linker = flags
        .split('\x1f')
        .any(|flag| flag.contains("linker") || flag.contains("link-self-contained") || flag.contains("fuse-ld"));
    var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("RUSTC_LINKER").is_empty()
        && !chooses_linker
        && rustc_minor(&var("RUSTC")) >= Some(90)
}

/// The minor version of rustc 1.x (`rustc 1.95.0 (...)` gives 95); `None` if it cannot be read.
fn rustc_minor(rustc: &str) -> Option<u32> {
    let output = std::process::Command::new(rustc).arg("--version").output().ok()?;
    let version = String::from_utf8(output.stdout).ok()?;
    let mut numbers = version.split_whitespace().nth(1)?.split('.');
    (numbers.next()? == "1").then_some(())?;
    numbers.next()?.parse().ok()
}
