//! `ferry`: parse, then hand over to the library. See `ferry --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The one crypto provider of the process (ring), installed before anything can use TLS. The libraries pass
    // it explicitly too; this covers any dependency that asks rustls for the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ferry_cli::parse_args() {
        Ok(cli) => ferry_cli::run(cli),
        Err(code) => code,
    }
}
