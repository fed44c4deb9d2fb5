//! What the load benchmarks share: servers started in this process, and `wrk` runs read into numbers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use marina::server::ServeOptions;

/// Connections the load generator keeps open, as the targets are stated for.
pub const CONNECTIONS: u32 = 64;
/// The pool is sized so every connection can hold a warm worker: this measures the runtime, not queueing.
pub const POOL_SIZE: usize = 64;

/// A server running in this process until `stop`.
pub struct Running {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

pub async fn start_native() -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = axum::Router::new().fallback(|| async {
        (
            [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Hello from native\n",
        )
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running { addr, stop, task }
}

pub async fn start_marina(apps: &Path, cache_dir: Option<PathBuf>) -> Running {
    start_marina_with(apps, |options| options.cache_dir = cache_dir).await
}

/// Marina with the benchmarks' pool size, and whatever else `adjust` sets.
pub async fn start_marina_with(apps: &Path, adjust: impl FnOnce(&mut ServeOptions)) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut options = ServeOptions::new(apps);
    options.pool_size = POOL_SIZE;
    options.cache_dir = None;
    options.drain_timeout = Duration::from_secs(5);
    adjust(&mut options);
    let task = tokio::spawn(async move {
        marina::server::serve(listener, options, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let running = Running { addr, stop, task };
    let client = reqwest::Client::new();
    while client
        .get(running.url("/_/ready"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running
}

/// Deploys `wasm` as version 1.0.0 of `app` under `apps`, with `config`.
pub fn deploy(apps: &Path, app: &str, wasm: &Path, config: serde_json::Value) {
    let dir = apps.join(app).join("1.0.0");
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = std::fs::read(wasm).unwrap();
    // A custom section naming the app makes every deployed component distinct, so one version's compile (or cache
    // entry) never serves another's first request.
    let name = b"marina-bench";
    let section: Vec<u8> = [&[name.len() as u8][..], name, app.as_bytes()].concat();
    bytes.push(0);
    bytes.push(u8::try_from(section.len()).expect("a short section"));
    bytes.extend_from_slice(&section);
    std::fs::write(dir.join("app.wasm"), bytes).unwrap();
    std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
}

/// An apps directory with one app, `api`, whose only rule forwards everything to `upstream`: `^/(.*)$` -> `/$1`.
pub fn proxied_apps(upstream: SocketAddr) -> tempfile::TempDir {
    let apps = tempfile::tempdir().unwrap();
    let version = apps.path().join("api").join("1.0.0");
    std::fs::create_dir_all(&version).unwrap();
    std::fs::write(version.join("index.html"), "unproxied").unwrap();
    let config = serde_json::json!({"proxy": {"^/(.*)$": {"target": format!("http://{upstream}"), "rewrite": "/$1"}}});
    std::fs::write(version.join("worker.config.json"), config.to_string()).unwrap();
    apps
}

/// The floor under a proxy rule: hyper's HTTP/1.1 server and client and nothing else, so that the distance
/// from here to a Marina proxy rule is what Marina's own work costs (routing, the rule, header handling, timeouts,
/// metrics, and its upstream pool's bookkeeping). Each client connection gets one upstream connection, opened with
/// it and driven by the same task, and its requests go through as they came (path, headers, body): the client's
/// keep-alive connections make a pool unnecessary, and one task for both sides hands nothing between tasks (nor
/// does Marina's own plain-HTTP upstream pool).
pub async fn start_floor(upstream: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(floor_connection(stream, upstream));
        }
    });
    (addr, task)
}

/// The same floor with one serving thread per core, each a `current_thread` runtime with its own listener on the
/// shared port (`SO_REUSEPORT`, the kernel spreading connections among them): a connection, its upstream
/// connection and every wakeup of theirs stay on one thread, with no work stealing. It tells what that design
/// would save a proxy rule before the server is built that way. The threads serve until the process exits.
pub fn start_floor_per_core(upstream: SocketAddr) -> SocketAddr {
    let bind = |addr: SocketAddr| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(addr).unwrap();
        socket
    };
    let first = bind("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap();
    let mut first = Some(first);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (ready, listening) = std::sync::mpsc::channel();
    for core in 0..cores {
        let socket = first.take().unwrap_or_else(|| bind(addr));
        let ready = ready.clone();
        std::thread::Builder::new()
            .name(format!("floor-{core}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let listener = socket.listen(1024).unwrap();
                    ready.send(()).unwrap();
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(floor_connection(stream, upstream));
                    }
                });
            })
            .unwrap();
    }
    for _ in 0..cores {
        listening.recv().unwrap();
    }
    addr
}

/// One client connection of the floor, with its own upstream connection, both driven by this one task.
async fn floor_connection(stream: tokio::net::TcpStream, upstream: SocketAddr) {
    use hyper::body::Incoming;
    let _ = stream.set_nodelay(true);
    let Ok(upstream_stream) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = upstream_stream.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(upstream_stream);
    let Ok((sender, connection)) = hyper::client::conn::http1::handshake::<_, Incoming>(io).await else {
        return;
    };
    // HTTP/1.1 serves one request of a connection at a time, so the lock is never contended; it is tokio's
    // because it is held across the upstream's answer.
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    let inbound =
        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    // Whichever side ends first ends both.
    tokio::select! {
        _ = inbound => {}
        _ = connection => {}
    }
}

/// One wrk run's figures.
pub struct Load {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests completed in the run.
    pub requests: u64,
}

/// A `wrk` run of `secs` on `url` with [`CONNECTIONS`] connections and `WRK_THREADS` threads (default 1).
pub fn wrk(url: &str, secs: u64) -> Load {
    let output = Command::new("wrk")
        .args([
            &format!("-t{}", env_number("WRK_THREADS", 1)),
            &format!("-c{CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
    let field = |prefix: &str| -> &str {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in wrk output:\n{text}"))
            .trim()
    };
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}"));
    Load {
        rps: field("Requests/sec:").parse().unwrap(),
        p50_ms: millis(field("50%")),
        p99_ms: millis(field("99%")),
        requests,
    }
}

/// The middle value (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The median of each figure of `loads`, taken separately.
pub fn median_load(loads: Vec<Load>) -> Load {
    let middle = |figure: fn(&Load) -> f64| median(loads.iter().map(figure).collect());
    Load {
        rps: middle(|load| load.rps),
        p50_ms: middle(|load| load.p50_ms),
        p99_ms: middle(|load| load.p99_ms),
        requests: 0,
    }
}

fn millis(value: &str) -> f64 {
    let split = value.find(|c: char| c.is_ascii_alphabetic()).unwrap();
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().unwrap();
    match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        other => panic!("unknown unit {other}"),
    }
}

/// Checks that `url` answers 200, 50 times (what a benchmark does when run as a test).
pub async fn smoke(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..50 {
        assert_eq!(client.get(url).send().await.unwrap().status(), 200, "{url}");
    }
}

/// Whether this is a timed run (`cargo bench` passes `--bench`) and how long each wrk run lasts (`BENCH_SECS`,
/// default 10).
pub fn settings() -> (bool, u64) {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    (benchmarking, env_number("BENCH_SECS", 10))
}

/// How many rounds the scenarios take turns for (`BENCH_ROUNDS`, default 3, at least 1).
pub fn rounds() -> usize {
    env_number("BENCH_ROUNDS", 3).max(1) as usize
}

/// The number in the environment variable `name`, or `default` when it is unset or not a number.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// How many requests `wasmtime serve` may give one instance in the reuse anchor: in effect, never a new one.
const REUSE_COUNT: &str = "1000000000";

/// `wasmtime serve` on the same component, when a `wasmtime` binary is given in `WASMTIME` (or on the PATH), as
/// the reference host: with `reuse`, instances serve many requests (and a timeout is kept, as Marina always
/// has one); without, each request gets a fresh instance (`--max-instance-reuse-count 1`, `wasmtime serve`'s default
/// for WASI 0.2 components; a WASI 0.3 one is reused by default, 16 requests at once). Returns the child
/// and the address it listens on, once it listens (within `startup`, which covers its compile of the component).
pub fn start_wasmtime_serve(
    component: &Path,
    reuse: bool,
    startup: Duration,
) -> Option<(std::process::Child, SocketAddr)> {
    let binary = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    let addr = free_addr()?;
    let mut command = Command::new(binary);
    command.args(["serve", "-Scli", "--addr", &addr.to_string()]);
    if reuse {
        command.args([
            "--max-instance-reuse-count",
            REUSE_COUNT,
            "--idle-instance-timeout",
            "3600s",
            "-Wtimeout=30s",
        ]);
    } else {
        // The default for a WASI 0.2 component, said outright: a WASI 0.3 one's is 128.
        command.args(["--max-instance-reuse-count", "1"]);
    }
    let child = command
        .arg(component)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    when_listening(child, addr, startup)
}

/// A free port on 127.0.0.1, for a child process to listen on.
pub fn free_addr() -> Option<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()
}

/// `child` once it accepts connections on `addr`; `None` (and the child killed) if it does not within `limit`.
pub fn when_listening(
    mut child: std::process::Child,
    addr: SocketAddr,
    limit: Duration,
) -> Option<(std::process::Child, SocketAddr)> {
    let deadline = std::time::Instant::now() + limit;
    while std::net::TcpStream::connect(addr).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((child, addr))
}

/// Linux reports thread CPU times in `/proc` in units of USER_HZ, which is 100 on every architecture it runs on.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// CPU time (user and system) used so far by process `pid`, exited threads included.
pub fn process_cpu(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat")).unwrap_or_default()
}

/// CPU time used so far by those live threads of process `pid` whose name starts with `prefix`.
pub fn threads_cpu(pid: u32, prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix)))
        .filter_map(|task| stat_cpu(&task.path().join("stat").to_string_lossy()))
        .sum()
}

/// CPU time used so far by process `pid` and its direct children (nginx's master and its workers).
pub fn process_tree_cpu(pid: u32) -> Duration {
    let is_child = |stat: &str| stat_fields(stat).and_then(|fields| fields.get(1)?.parse::<u32>().ok()) == Some(pid);
    let children: Duration = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| is_child(stat))
        .filter_map(|stat| ticks(&stat))
        .sum();
    process_cpu(pid) + children
}

/// The fields of a `/proc/.../stat` line after the command name, which may itself hold spaces and parentheses;
/// the first is the state (field 3 in proc(5)).
fn stat_fields(stat: &str) -> Option<Vec<String>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime (fields 14 and 15 in proc(5)) of the `/proc/.../stat` file at `path`.
fn stat_cpu(path: &str) -> Option<Duration> {
    ticks(&std::fs::read_to_string(path).ok()?)
}

fn ticks(stat: &str) -> Option<Duration> {
    let fields = stat_fields(stat)?;
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_SEC))
}
