//! `federation` binary: the controller and its command-line tools.
#![forbid(unsafe_code)]

/// mimalloc: per submit, glibc's malloc and free cost more than any one
/// part of the controller's own work (see README, runtime bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    federation::cli::main()
}
