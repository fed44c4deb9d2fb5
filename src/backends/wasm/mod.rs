//! Requests served by WebAssembly components, from the top down: [`invoke`] runs one request on a worker,
//! [`pool`] bounds and reuses the workers, [`engine`] compiles and instantiates, [`lanes`] are the threads guest
//! code runs on, [`wasi03`] is a call on a WASI 0.3 handler, [`worker`] is one isolated instance, and [`status`]
//! is the board every worker reports to.

pub mod engine;
pub(crate) mod guest_log;
pub(crate) mod invoke;
pub(crate) mod lanes;
pub mod pool;
pub(crate) mod status;
pub(crate) mod wasi03;
pub(crate) mod worker;
