//! `ferry`: parse, then hand over to the library. See `ferry --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match ferry_cli::parse_args() {
        Ok(cli) => ferry_cli::run(cli),
        Err(code) => code,
    }
}
