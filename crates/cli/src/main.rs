//! `ferry`: parse, then hand over to the library. See `ferry --help`.

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: allocation and free were the largest single cost of a gateway under submit
/// load (about 17 % of its samples); see loadtest/README.md, "submit".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The one crypto provider of the process (ring), installed before anything can use TLS. The libraries pass
    // it explicitly too; this covers any dependency that asks rustls for the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ferry_cli::parse_args() {
        Ok(cli) => ferry_cli::run(cli),
        Err(code) => code,
    }
}
