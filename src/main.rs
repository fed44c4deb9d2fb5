//! The `marina` binary: everything lives in the library; this only picks the allocator and runs the CLI.

/// mimalloc instead of glibc's malloc: the request path allocates many small short-lived buffers across threads,
/// where glibc spends measurable time consolidating (see the README's benchmark notes).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    marina::cli::main()
}
