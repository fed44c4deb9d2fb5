//! The WebAssembly engines of the process: how components are compiled, cached and linked.
//!
//! A `wasmtime::Engine` is shared by every app, so that compiled code, the pooling allocator's slots and the
//! epoch counter are too. The pooling allocator is sized from `POOL_SIZE`, so an instance is a slot taken, not
//! memory mapped, and memories start from copy-on-write images. One ticker thread advances the epoch while
//! instances are lent ([`ticker`]); each store turns ticks into yields (so a busy guest cannot starve the others)
//! and, past its deadline, a trap.
//!
//! WASI 0.3 handlers get a second engine, made at the first one deployed: theirs needs wasmtime's concurrency
//! support (`run_concurrent`, streams, async exports), which also turns every call of a 0.2 handler into the
//! concurrent machinery and gives every store its bookkeeping. 0.2 handlers, the common case, keep the engine
//! without it. The cap stays one (the pool counts instances of both); the ticker advances both epochs.

mod cache;
mod exports;
mod ticker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

pub(crate) use cache::{default_cache_dir, Cache};
pub(crate) use exports::{check as check_exports, Handler, NotServable};
use ticker::Ticker;
pub(crate) use ticker::Ticking;

use crate::backends::wasm::lanes::Lanes;
use crate::backends::wasm::worker::WorkerState;

/// How often the epoch advances. A guest yields to the scheduler at least this often, and a deadline is enforced
/// to within about this much.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Pooling-allocator slots per instance beyond its one component instance: core instances, memories and tables
/// of the (small) modules a component is made of. Generous, because a slot is only address space until used.
const CORE_INSTANCES_PER_COMPONENT: u32 = 32;
const MEMORIES_PER_COMPONENT: u32 = 4;
const TABLES_PER_COMPONENT: u32 = 8;

/// How much of a freed slot's linear memory, and of its tables, stays resident to be reset in place for the next
/// instance. A small app touches less than this in total; the pages of idle slots count towards RSS.
const MEMORY_KEEP_RESIDENT_BYTES: usize = 1024 * 1024;
const TABLE_KEEP_RESIDENT_BYTES: usize = 64 * 1024;

/// The largest linear memory a pooled slot can hold: the most `maxMemoryMb` allows.
const POOLED_MEMORY_BYTES: usize = crate::deploy::config::MAX_MEMORY_MB_LIMIT as usize * 1024 * 1024;

/// How the engine is built.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The most instances alive at once (`POOL_SIZE`); the pooling allocator reserves this many slots.
    pub pool_size: usize,
    /// Where compiled components are kept between runs; `None` compiles in memory every time.
    pub cache_dir: Option<PathBuf>,
}

/// A component compiled and linked, ready to be instantiated many times.
pub(crate) struct Loaded {
    pub(crate) pre: Pre,
    /// The engine it was compiled for, which its stores must be made in.
    pub(crate) engine: wasmtime::Engine,
    /// Whether the compiled code came from the disk cache.
    pub(crate) from_cache: bool,
    pub(crate) load_time: Duration,
}

/// A linked handler of either kind.
pub(crate) enum Pre {
    Wasi02(ProxyPre<WorkerState>),
    Wasi03(ServicePre<WorkerState>),
}

/// Why a component cannot be loaded: the cause of the version's log line and of its 503. Each message says
/// only its step; the error it wraps is its `source()` (both read as one line by [`crate::error::chain`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// The entrypoint file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a component this engine can compile.
    #[error("not a valid WebAssembly component")]
    Invalid(#[source] wasmtime::Error),
    /// The component imports something the host does not provide.
    #[error("the component cannot be linked")]
    Link(#[source] wasmtime::Error),
    /// The file is not a wasi:http handler, as its exports tell before it is compiled.
    #[error("the component cannot be served")]
    NotServable(#[source] NotServable),
    /// The component exports the handler's name, but not with the handler's type (or, for WASI 0.3, not the
    /// release the host implements).
    #[error("the component does not export the wasi:http handler the host implements")]
    NotAHandler(#[source] wasmtime::Error),
    /// The engine for WASI 0.3 handlers could not be made.
    #[error("the engine for WASI 0.3 components cannot be made")]
    Engine(#[source] wasmtime::Error),
    /// The compilation's thread ended without an answer (it panicked, or the runtime is shutting down).
    #[error("compilation did not finish")]
    Unfinished(#[source] tokio::task::JoinError),
}

/// The process-wide engines, linkers and cache.
pub(crate) struct Engine {
    wasmtime: wasmtime::Engine,
    linker: Linker<WorkerState>,
    /// The engine and linker for WASI 0.3 handlers, once one is loaded.
    concurrent: OnceLock<(wasmtime::Engine, Linker<WorkerState>)>,
    pool_size: usize,
    cache: Option<Cache>,
    pooling: bool,
    ticker: Arc<Ticker>,
    lanes: Lanes,
}

impl Engine {
    /// Builds the engine: pooled if the address space can be reserved, on-demand otherwise (with a log line).
    pub(crate) fn new(settings: &EngineSettings) -> anyhow::Result<Engine> {
        let (wasmtime, pooling) = new_engine(settings.pool_size, Handler::Wasi02)?;
        let linker = linker(&wasmtime, Handler::Wasi02)?;
        let cache = match &settings.cache_dir {
            Some(dir) => match Cache::open(dir) {
                Ok(cache) => Some(cache),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), "compile cache disabled: {error:#}");
                    None
                }
            },
            None => None,
        };
        let ticker = Ticker::start(wasmtime.clone(), EPOCH_TICK)
            .map_err(|e| anyhow::anyhow!("cannot start the epoch ticker thread: {e}"))?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let lanes = Lanes::new(threads).map_err(|e| anyhow::anyhow!("cannot start the guest threads: {e}"))?;
        Ok(Engine {
            lanes,
            wasmtime,
            linker,
            concurrent: OnceLock::new(),
            pool_size: settings.pool_size,
            cache,
            pooling,
            ticker,
        })
    }

    /// Keeps the epoch moving while it lives: taken for every instance lent, before its instantiation starts.
    pub(crate) fn ticking(&self) -> Ticking {
        self.ticker.ticking()
    }

    /// The executors guest code runs on.
    pub(crate) fn lanes(&self) -> &Lanes {
        &self.lanes
    }

    /// Whether instances come from the pooling allocator.
    pub(crate) fn is_pooling(&self) -> bool {
        self.pooling
    }

    /// Compiles (or loads from the cache) and links the component at `path`. Blocking: call it off the async
    /// runtime's worker threads.
    pub(crate) fn load(&self, path: &Path) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // An unreadable file is left to the compiler, whose reasons are the more precise.
        let handler = match exports::check(&bytes) {
            Ok(handler) => handler,
            Err(NotServable::Unreadable(_)) => Handler::Wasi02,
            Err(not_servable) => return Err(LoadError::NotServable(not_servable)),
        };
        let (engine, linker) = match handler {
            Handler::Wasi02 => (&self.wasmtime, &self.linker),
            Handler::Wasi03 => {
                let made = self.concurrent().map_err(LoadError::Engine)?;
                (&made.0, &made.1)
            }
        };
        let (component, from_cache) = match &self.cache {
            Some(cache) => cache.load_or_compile(engine, &bytes)?,
            None => (compile(engine, &bytes)?, false),
        };
        let pre = linker.instantiate_pre(&component).map_err(LoadError::Link)?;
        let pre = match handler {
            Handler::Wasi02 => Pre::Wasi02(ProxyPre::new(pre).map_err(LoadError::NotAHandler)?),
            Handler::Wasi03 => Pre::Wasi03(ServicePre::new(pre).map_err(LoadError::NotAHandler)?),
        };
        Ok(Loaded {
            pre,
            engine: engine.clone(),
            from_cache,
            load_time: started.elapsed(),
        })
    }
}

impl Engine {
    /// The engine and linker for WASI 0.3 handlers, made the first time one is loaded; the ticker advances its
    /// epoch from then on.
    fn concurrent(&self) -> wasmtime::Result<&(wasmtime::Engine, Linker<WorkerState>)> {
        if let Some(made) = self.concurrent.get() {
            return Ok(made);
        }
        // Two first loads at once may both make one; the first kept wins, the other is dropped unused.
        let (engine, pooling) = new_engine(self.pool_size, Handler::Wasi03)?;
        let linker = linker(&engine, Handler::Wasi03)?;
        let made = self.concurrent.get_or_init(|| {
            tracing::info!(pooling, "engine for WASI 0.3 components made");
            self.ticker.also_tick(engine.clone());
            (engine, linker)
        });
        Ok(made)
    }
}

/// An engine for `handler`s: pooled if the address space can be reserved, on-demand otherwise (with a log line).
fn new_engine(pool_size: usize, handler: Handler) -> wasmtime::Result<(wasmtime::Engine, bool)> {
    match wasmtime::Engine::new(&config(Some(pool_size), handler)) {
        Ok(engine) => Ok((engine, true)),
        Err(error) => {
            tracing::warn!(
                pool_size,
                "the pooling allocator could not reserve its slots ({error:#}); falling back to on-demand \
                 instance allocation, which is slower to instantiate"
            );
            Ok((wasmtime::Engine::new(&config(None, handler))?, false))
        }
    }
}

/// What a worker may import: WASI and wasi:http, of 0.2 and, for a 0.3 handler (whose bindings may use either),
/// of 0.3 too. The store's WASI context is the same for both, so a worker sees the same world through either.
fn linker(engine: &wasmtime::Engine, handler: Handler) -> wasmtime::Result<Linker<WorkerState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    if handler == Handler::Wasi03 {
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
    }
    Ok(linker)
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

fn compile(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Component, LoadError> {
    Component::new(engine, bytes).map_err(LoadError::Invalid)
}

fn config(pool_size: Option<usize>, handler: Handler) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    match handler {
        Handler::Wasi02 => config.concurrency_support(false),
        Handler::Wasi03 => config.concurrency_support(true).wasm_component_model_async(true),
    };
    config.memory_init_cow(true);
    if let Some(pool_size) = pool_size {
        let slots = u32::try_from(pool_size).unwrap_or(u32::MAX);
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(slots.saturating_mul(MEMORIES_PER_COMPONENT))
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(slots.saturating_mul(TABLES_PER_COMPONENT))
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .total_stacks(slots)
            .max_memory_size(POOLED_MEMORY_BYTES);
        // A freed slot keeps the pages its instance touched and has them reset in place (the kernel's
        // PAGEMAP_SCAN finds which, where it has it), instead of `madvise` handing them back only for the next
        // instance to fault them in again: that is most of what a fresh instance per request costs.
        pooling
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT_BYTES)
            .table_keep_resident(TABLE_KEEP_RESIDENT_BYTES)
            .pagemap_scan(Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_error_reads_as_its_step_then_the_engine_s_reasons() {
        let engine = wasmtime::Engine::default();
        let reasons = Component::new(&engine, b"not wasm").unwrap_err();
        let error = compile(&engine, b"not wasm").unwrap_err();
        assert!(matches!(error, LoadError::Invalid(_)), "{error:?}");
        assert_eq!(
            crate::error::chain(&error).to_string(),
            format!("not a valid WebAssembly component: {reasons:#}")
        );

        let missing = Path::new("/nonexistent/app.wasm");
        let io = std::fs::read(missing).unwrap_err();
        let error = LoadError::Read {
            path: missing.to_path_buf(),
            source: std::fs::read(missing).unwrap_err(),
        };
        assert_eq!(
            crate::error::chain(&error).to_string(),
            format!("cannot read {}: {io}", missing.display())
        );
    }
}
