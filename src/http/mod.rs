//! HTTP routes. (Core module owned by the main branch; this worktree only adds `cache_api`.)

pub mod cache_api;
