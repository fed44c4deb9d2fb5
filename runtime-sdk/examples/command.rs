//! A WASI command, a program with a `main` that exports `wasi:cli/run`: what building a binary crate for
//! `wasm32-wasip2` makes, and what gets deployed by mistake for an HTTP handler. Marina refuses it with a `503`
//! naming what it exports, and `marina check` reports it.

fn main() {
    println!("a command, not an HTTP handler");
}
