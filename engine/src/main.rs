//! The `blockferry` command line.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 verification found problems.
//! With `--json`, the result (or the error) is one JSON object on stdout.

// The CLI's output is its product: printing to stdout is what it is for.
#![allow(clippy::print_stdout)]

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
