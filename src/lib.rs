//! herdsman: a container-first prefork runtime for axum web services on PaaS.

pub mod auth;
pub mod cache;
pub mod http;
