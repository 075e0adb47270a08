//! Worker runtime tests against the in-process engine (one test binary, so the crate links once).
//! Webhook tests run a real HTTP server on 127.0.0.1:0.

mod common;
mod metrics;
mod profile;
mod runtime;
mod webhook;
