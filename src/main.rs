//! The `marina` binary: all of it lives in the library; see `marina::cli`.

fn main() -> std::process::ExitCode {
    marina::cli::main()
}
