//! The cost of one worker call in-process, without HTTP: the floor under the `workers` benchmark's figures.
//!
//! `cargo bench --bench call`. For the SDK's `hello` and for a component on plain `wasip2` bindings, on one
//! thread, in a loop: a warm call (one instance reused, and 64 instances taken in turn, as a loaded pool does),
//! instantiating and dropping an instance, and a fresh instance per call (what `ttl: 0` costs). `CALLS` sets the
//! warm loop's length (default 50,000). Run without `--bench` (as `cargo test --all-targets` does) it only checks
//! that each loop runs.
//!
//! A tight loop keeps wasmtime's code and the instance's memory in the CPU caches, so these are lower bounds: in
//! the server the same call shares the caches with hyper, tokio and the kernel's TCP stack.

use std::time::Instant;

use http_body_util::BodyExt;
use marina::backends::wasm::engine::{Engine, EngineSettings, Loaded};
use marina::backends::wasm::worker::{Identity, Worker};
use marina::deploy::registry::Deployment;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::WasiHttpView;

// The test harness's guest builder: the benchmark runs the same components the tests do.
#[path = "../tests/common/mod.rs"]
mod common;

/// The server's allocator, so allocation costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Instances taken in turn in the "many instances" loop: the benchmark's pool size.
const INSTANCES: usize = 64;

/// One request through a worker, its body read to the end.
async fn call(worker: &mut Worker) {
    let request = http::Request::builder()
        .uri("http://localhost/")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("a valid request");
    let (sender, receiver) = tokio::sync::oneshot::channel();
    worker.begin(std::sync::Arc::default());
    let data = worker.store.data_mut();
    let request = data.http().new_incoming_request(Scheme::Http, request).unwrap();
    let out = data.http().new_response_outparam(sender).unwrap();
    worker
        .proxy
        .wasi_http_incoming_handler()
        .call_handle(&mut worker.store, request, out)
        .await
        .unwrap();
    let response = receiver.await.unwrap().expect("the guest answered");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
}

struct Subject {
    engine: Engine,
    loaded: Loaded,
    deployment: Deployment,
    identity: Identity,
    workers: std::sync::Arc<marina::backends::wasm::status::WorkerTable>,
    _dir: tempfile::TempDir,
}

impl Subject {
    fn new(example: &str) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(common::guest(example), dir.path().join("app.wasm")).unwrap();
        std::fs::write(dir.path().join("worker.config.json"), "{}").unwrap();
        let deployment = marina::deploy::registry::load_version(dir.path()).unwrap();
        let engine = Engine::new(&EngineSettings {
            pool_size: INSTANCES,
            cache_dir: None,
        })
        .unwrap();
        let loaded = engine.load(&deployment.entrypoint_path).unwrap();
        Subject {
            engine,
            loaded,
            deployment,
            identity: Identity {
                app: example.into(),
                version: "1.0.0".into(),
            },
            workers: Default::default(),
            _dir: dir,
        }
    }

    async fn instance(&self) -> Worker {
        Worker::new(
            self.engine.wasmtime(),
            &self.loaded.pre,
            &self.deployment,
            &self.identity,
            std::sync::Arc::default(),
            &self.workers,
        )
        .await
        .unwrap()
    }
}

/// Microseconds per iteration of `body`, run `count` times.
async fn per_call<F: AsyncFnMut(usize)>(count: usize, mut body: F) -> f64 {
    let started = Instant::now();
    for i in 0..count {
        body(i).await;
    }
    started.elapsed().as_secs_f64() * 1e6 / count as f64
}

fn main() {
    let timed = std::env::args().any(|arg| arg == "--bench");
    let calls: usize = match timed {
        true => std::env::var("CALLS").map_or(50_000, |v| v.parse().expect("CALLS is a number")),
        false => 10,
    };
    let fresh_calls = (calls / 10).max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if timed {
        println!("| component | warm, 1 instance | warm, {INSTANCES} in turn | instantiate + drop | fresh per call |");
        println!("|---|---:|---:|---:|---:|");
    }
    for example in ["hello", "raw_wasip2"] {
        let subject = Subject::new(example);
        runtime.block_on(async {
            let mut one = subject.instance().await;
            per_call(calls / 10, async |_| call(&mut one).await).await;
            let warm = per_call(calls, async |_| call(&mut one).await).await;
            drop(one);

            let mut many = Vec::new();
            for _ in 0..INSTANCES {
                many.push(subject.instance().await);
            }
            let warm_many = per_call(calls, async |i| call(&mut many[i % INSTANCES]).await).await;
            drop(many);

            let instantiate = per_call(fresh_calls, async |_| drop(subject.instance().await)).await;
            let fresh = per_call(fresh_calls, async |_| call(&mut subject.instance().await).await).await;
            if timed {
                println!("| {example} | {warm:.1} µs | {warm_many:.1} µs | {instantiate:.1} µs | {fresh:.1} µs |");
            }
        });
    }
}
