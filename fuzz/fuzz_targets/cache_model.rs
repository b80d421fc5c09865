//! Sequences of set/get/delete with TTLs on a memory-only cache, against a map with deadlines.
//! The memory tier follows `std::time::Instant` (not tokio's clock), so the model brackets each
//! operation with real readings and judges only outside the window (see tests/oracles).
#![no_main]

#[path = "../../tests/oracles/mod.rs"]
mod oracles;

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oracles::{CacheOp, Ttl};

#[derive(Arbitrary, Debug)]
enum FuzzTtl {
    Forever,
    Millis(u8),
    Hour,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Set { key: u8, value: Vec<u8>, ttl: FuzzTtl },
    Get { key: u8 },
    Delete { key: u8 },
    Sleep { micros: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Below 8 (the number of keys), entries may be evicted.
    small_capacity: Option<u8>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime =
        RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));
    let ops: Vec<CacheOp> = input
        .ops
        .into_iter()
        .map(|op| match op {
            Op::Set { key, value, ttl } => {
                let ttl = match ttl {
                    FuzzTtl::Forever => Ttl::Forever,
                    FuzzTtl::Millis(ms) => Ttl::Millis(ms % 4),
                    FuzzTtl::Hour => Ttl::Hour,
                };
                CacheOp::Set { key, value, ttl }
            }
            Op::Get { key } => CacheOp::Get { key },
            Op::Delete { key } => CacheOp::Delete { key },
            Op::Sleep { micros } => CacheOp::Sleep { micros },
        })
        .collect();
    let capacity = input.small_capacity.map_or(10_000, |c| u64::from(c % 8));
    if let Err(broken) = runtime.block_on(oracles::check_cache_model(capacity, &ops)) {
        panic!("{broken}");
    }
});
