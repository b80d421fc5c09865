//! Cargo skips the suites that need the `test-hooks` feature (`required-features` in Cargo.toml)
//! without a word when the feature is off, so a plain `cargo test` would pass having run none of
//! them. This suite is always built: without the feature its one test is reported ignored, the
//! reason naming the skipped suites. With the feature, that test checks the reason against
//! Cargo.toml, so that it cannot go stale, and that no suite hides behind a `cfg` instead.

use std::path::Path;

#[test]
#[cfg_attr(
    not(feature = "test-hooks"),
    ignore = "cargo skipped the http, supervision, warmup, platform, long_lived, h2c, memory_recycle suites: they need `--features test-hooks`"
)]
fn suites_that_need_test_hooks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Table = toml::from_str(include_str!("../Cargo.toml")).expect("Cargo.toml parses");
    let needing: Vec<&str> = manifest["test"]
        .as_array()
        .expect("[[test]] entries")
        .iter()
        .filter(|t| {
            t.get("required-features")
                .and_then(|f| f.as_array())
                .is_some_and(|f| f.iter().any(|f| f.as_str() == Some("test-hooks")))
        })
        .map(|t| t["name"].as_str().expect("a [[test]] name"))
        .collect();
    let reason =
        format!("ignore = \"cargo skipped the {} suites: they need `--features test-hooks`\"", needing.join(", "));
    assert!(include_str!("test_hooks.rs").contains(&reason), "the ignore reason above must read: {reason}");

    let gate = concat!("#![cfg(feature = ", "\"test-hooks\")]");
    for entry in std::fs::read_dir(root.join("tests")).expect("read tests/").flatten() {
        let path = entry.path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).expect("read a suite");
            assert!(
                !source.contains(gate),
                "tests/{name}.rs: name it in a [[test]] with required-features instead of {gate}"
            );
        }
    }
    for name in needing {
        assert!(root.join(format!("tests/{name}.rs")).is_file(), "Cargo.toml names tests/{name}.rs, which is missing");
    }
}
