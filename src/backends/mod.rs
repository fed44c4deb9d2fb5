//! What serves a request once its version is known: files ([`static_files`]), an upstream ([`proxy`]), or a
//! WebAssembly worker ([`wasm`]). The three do not import one another; what they share lives here.

pub mod proxy;
pub(crate) mod stall;
pub mod static_files;
pub mod wasm;
