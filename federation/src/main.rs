//! `federation` binary: the controller and its command-line tools.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    federation::cli::main()
}
