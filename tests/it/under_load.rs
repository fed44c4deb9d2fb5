//! What already holds, checked under load: a SIGTERM while requests are in flight, and version directories swapped
//! while clients hammer the app. Real servers, real components, loopback only. Every check is on what the clients
//! saw (status, a complete body, which version answered) and what the server logged, never on how long it took;
//! time only tells which requests were sent before the signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use crate::common::{client, guest, AppsDir, MarinaProcess, TestServer};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// `--shutdown-timeout` of the process under SIGTERM: it must have exited, 0, by then.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest any phase of a test may wait for the load to reach a state; reaching it is the behaviour checked.
const PHASE_LIMIT: Duration = Duration::from_secs(10);

/// A client gives up on a request after this long: a request that hangs is a failure, not a slow success.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound on the requests one client sends, whatever happens.
const MAX_REQUESTS_PER_CLIENT: usize = 5_000;

/// A route of the `lab` example, and what a complete answer from it is.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// `/count`: `{"served": n}` from a warm instance.
    Count,
    /// `/slow?ms=N`: `slept N ms`, after holding its worker that long.
    Slow(u64),
    /// `/stream?mb=N`: N MiB of `x`, streamed.
    Stream(usize),
    /// `/env`: the worker's environment; the answer's label is `MARINA_VERSION/BUILD`, which deployment answered.
    Env,
}

impl Route {
    fn path(self) -> String {
        match self {
            Route::Count => "/count".into(),
            Route::Slow(ms) => format!("/slow?ms={ms}"),
            Route::Stream(mb) => format!("/stream?mb={mb}"),
            Route::Env => "/env".into(),
        }
    }

    /// Whether `body` is the whole of what the route answers; the label of the deployment that answered, if the
    /// route tells.
    fn check(self, body: &[u8]) -> Result<Option<String>, String> {
        match self {
            Route::Count => {
                let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
                match value["served"].as_u64() {
                    Some(served) if served >= 1 => Ok(None),
                    _ => Err(format!("no request count in {value}")),
                }
            }
            Route::Slow(ms) => {
                let expected = format!("slept {ms} ms");
                if body == expected.as_bytes() {
                    Ok(None)
                } else {
                    Err(format!(
                        "body {:?}, expected {expected:?}",
                        String::from_utf8_lossy(body)
                    ))
                }
            }
            Route::Stream(mb) => {
                if body.len() == mb * 1024 * 1024 && body.iter().all(|&b| b == b'x') {
                    Ok(None)
                } else {
                    Err(format!("a body of {} bytes, expected {mb} MiB of `x`", body.len()))
                }
            }
            Route::Env => {
                let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
                match (value["MARINA_APP"].as_str(), value["MARINA_VERSION"].as_str()) {
                    (Some("lab"), Some(version)) => {
                        Ok(Some(format!("{version}/{}", value["BUILD"].as_str().unwrap_or("?"))))
                    }
                    _ => Err(format!("not lab's environment: {value}")),
                }
            }
        }
    }
}

/// How one request ended, as its client saw it.
#[derive(Debug, Clone)]
enum Outcome {
    /// 200, with the complete body the route promises (and the label of the deployment, if the route tells).
    Complete(Option<String>),
    /// No response head at all: the connection was refused, or closed or reset before any of the response.
    NoResponse(String),
    /// Everything else: another status, a head then a body cut short or wrong, a request that hung.
    Broken(String),
}

#[derive(Debug, Clone)]
struct Record {
    client: usize,
    route: Route,
    started: Instant,
    /// When the request's first bytes had been written to the socket (on loopback, that is when they reach the
    /// server's receive queue); `None` if they never were.
    written: Option<Instant>,
    /// Which request it was on its connection: 1 on a connection of its own, more on one kept alive.
    nth: usize,
    finished: Instant,
    outcome: Outcome,
}

/// What [`KeepAlive::get`] knows of one request.
struct Exchange {
    outcome: Outcome,
    written: Option<Instant>,
    nth: usize,
}

/// An error with its sources, which is where hyper keeps the cause ("connection refused", "reset by peer").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// When a connection's first bytes since the stamp was last cleared were written.
type WriteStamp = Arc<Mutex<Option<Instant>>>;

/// A TCP stream that stamps its first write.
struct Stamped {
    io: TcpStream,
    first_write: WriteStamp,
}

impl AsyncRead for Stamped {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.first_write.lock().unwrap().get_or_insert_with(Instant::now);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// An HTTP/1.1 client on one keep-alive connection (hyper's, as reqwest uses, driven here so that the test knows
/// when each request went out). When the server has closed the connection while it was idle, the next request
/// opens a new one; nothing else is retried.
struct KeepAlive {
    addr: SocketAddr,
    open: Option<(SendRequest<Empty<Bytes>>, WriteStamp)>,
    /// Requests sent on the open connection.
    sent: usize,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            addr,
            open: None,
            sent: 0,
        }
    }

    /// GET `path`: how it ended, and when its bytes were written.
    async fn get(&mut self, path: &str, route: Route) -> Exchange {
        let mut written = None;
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(path, route, &mut written)).await;
        let outcome = outcome.unwrap_or_else(|_| Outcome::Broken(format!("no answer within {REQUEST_TIMEOUT:?}")));
        let nth = self.sent;
        if !matches!(outcome, Outcome::Complete(_)) {
            self.open = None;
        }
        Exchange { outcome, written, nth }
    }

    async fn exchange(&mut self, path: &str, route: Route, written: &mut Option<Instant>) -> Outcome {
        if let Some((sender, _)) = &mut self.open {
            if sender.ready().await.is_err() {
                self.open = None; // closed by the server while idle: a new connection, as any client would open
            }
        }
        if self.open.is_none() {
            let stream = match TcpStream::connect(self.addr).await {
                Ok(stream) => stream,
                Err(error) => return Outcome::NoResponse(format!("connect: {error}")),
            };
            stream.set_nodelay(true).unwrap();
            let stamp = WriteStamp::default();
            let io = TokioIo::new(Stamped {
                io: stream,
                first_write: stamp.clone(),
            });
            let (mut sender, connection) = match hyper::client::conn::http1::handshake(io).await {
                Ok(handshake) => handshake,
                Err(error) => return Outcome::NoResponse(format!("handshake: {}", error_chain(&error))),
            };
            tokio::spawn(connection); // ends with the connection; its errors reach the request
            if let Err(error) = sender.ready().await {
                return Outcome::NoResponse(format!("closed before the request was sent: {}", error_chain(&error)));
            }
            self.open = Some((sender, stamp));
            self.sent = 0;
        }
        let Some((sender, stamp)) = &mut self.open else {
            unreachable!("opened above")
        };
        *stamp.lock().unwrap() = None;
        self.sent += 1;
        let request = http::Request::get(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::new())
            .unwrap();
        let sent = sender.send_request(request).await;
        *written = *stamp.lock().unwrap();
        let response = match sent {
            Ok(response) => response,
            Err(error) => return Outcome::NoResponse(error_chain(&error)),
        };
        let status = response.status();
        match response.into_body().collect().await {
            Err(error) => Outcome::Broken(format!("{status}, then the body failed: {}", error_chain(&error))),
            Ok(body) if status != 200 => {
                Outcome::Broken(format!("{status}: {}", String::from_utf8_lossy(&body.to_bytes())))
            }
            Ok(body) => match route.check(&body.to_bytes()) {
                Ok(label) => Outcome::Complete(label),
                Err(why) => Outcome::Broken(format!("200 with an incomplete or wrong body: {why}")),
            },
        }
    }
}

/// What the controller of a test can see of a client while the load runs.
#[derive(Debug, Clone, Default)]
struct Progress {
    completed: usize,
    /// The label of its latest complete answer that had one.
    last: Option<String>,
    /// The request it stopped at, if one failed.
    failed: Option<String>,
}

/// Clients sending requests in a loop, each on its own keep-alive connection, one request at a time. A client
/// stops at its first request that did not complete (recorded), when told to, or after
/// [`MAX_REQUESTS_PER_CLIENT`].
struct Load {
    routes: Vec<Route>,
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<Vec<Progress>>>,
    tasks: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    /// One client per entry of `routes`, each sending `prefix` (`/lab`) and its route's path to `addr`.
    fn start(addr: SocketAddr, prefix: &str, routes: &[Route]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(vec![Progress::default(); routes.len()]));
        let tasks = routes
            .iter()
            .enumerate()
            .map(|(index, &route)| {
                let path = format!("{prefix}{}", route.path());
                let (stop, progress) = (stop.clone(), progress.clone());
                tokio::spawn(async move {
                    let mut client = KeepAlive::new(addr);
                    let mut records = Vec::new();
                    while !stop.load(Ordering::SeqCst) && records.len() < MAX_REQUESTS_PER_CLIENT {
                        let started = Instant::now();
                        let Exchange { outcome, written, nth } = client.get(&path, route).await;
                        records.push(Record {
                            client: index,
                            route,
                            started,
                            written,
                            nth,
                            finished: Instant::now(),
                            outcome: outcome.clone(),
                        });
                        let mut progress = progress.lock().unwrap();
                        let Outcome::Complete(label) = outcome else {
                            let written = written.map(|at| format!("{:?} ago", at.elapsed()));
                            progress[index].failed = Some(format!(
                                "request {nth} on its connection, written {}: {outcome:?}",
                                written.unwrap_or("never".into())
                            ));
                            break;
                        };
                        progress[index].completed += 1;
                        if label.is_some() {
                            progress[index].last = label;
                        }
                    }
                    records
                })
            })
            .collect();
        Load {
            routes: routes.to_vec(),
            stop,
            progress,
            tasks,
        }
    }

    fn progress(&self) -> Vec<Progress> {
        self.progress.lock().unwrap().clone()
    }

    /// Waits until `reached` holds of the clients' progress. Fails, naming `what`, after [`PHASE_LIMIT`], or as
    /// soon as a client has stopped (it stops only at a failure, which waiting would otherwise hide).
    async fn wait_until(&self, what: &str, reached: impl Fn(&[Progress]) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let progress = self.progress();
            if reached(&progress) {
                return Ok(());
            }
            if let Some(stopped) = self.tasks.iter().position(|task| task.is_finished()) {
                return Err(format!(
                    "client {stopped} ({:?}) stopped before {what}: {} (progress: {progress:?})",
                    self.routes[stopped],
                    progress[stopped].failed.as_deref().unwrap_or("it stopped")
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not reached within {PHASE_LIMIT:?}: {what}; progress: {progress:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every client has completed `more` requests beyond what it had when this was called.
    async fn wait_for_more(&self, what: &str, more: usize) -> Result<(), String> {
        let base: Vec<usize> = self.progress().iter().map(|p| p.completed).collect();
        self.wait_until(what, |progress| {
            progress.iter().zip(&base).all(|(p, &base)| p.completed >= base + more)
        })
        .await
    }

    /// Tells the clients to stop (when `stop`), waits for them, and returns every request they sent.
    async fn finish(self, stop: bool) -> Vec<Record> {
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        let mut records = Vec::new();
        for task in self.tasks {
            let mine = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), task)
                .await
                .expect("a client stops within its request timeout")
                .expect("a client task does not panic");
            records.extend(mine);
        }
        records
    }
}

/// Fails with every violation listed (the first few in full), rather than the first alone.
fn assert_none(violations: &[String], what: &str) {
    assert!(
        violations.is_empty(),
        "{what}: {} violation(s):\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Fails the test with the reason a phase of the load was not reached.
fn reached(phase: Result<(), String>) {
    if let Err(why) = phase {
        panic!("{why}");
    }
}

/// Milliseconds from `origin` to `at`, signed, for messages.
fn ms_from(origin: Instant, at: Instant) -> f64 {
    if at >= origin {
        at.duration_since(origin).as_secs_f64() * 1000.0
    } else {
        -(origin.duration_since(at).as_secs_f64() * 1000.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_in_flight_request() {
    let _machine = crate::heavy().await; // 16 clients, streamed bodies, a drain
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({ "ttl": 60 }));
    let timeout = format!("{}s", DRAIN_TIMEOUT.as_secs());
    let mut marina = MarinaProcess::serve(&apps.path(), &["--shutdown-timeout", &timeout]);

    // 16 clients: quick answers (half of them: a keep-alive connection that turns over fast is where a drain
    // can catch a request between two others), answers that hold their worker 300 ms, and 2 MiB streamed bodies.
    let routes: Vec<Route> = (0..16)
        .map(|i| match i % 4 {
            0 | 2 => Route::Count,
            1 => Route::Slow(300),
            _ => Route::Stream(2),
        })
        .collect();
    let load = Load::start(marina.addr, "/lab", &routes);
    let warm = load.wait_until("every client has completed two requests", |progress| {
        progress.iter().all(|p| p.completed >= 2)
    });
    if let Err(why) = warm.await {
        let log: Vec<String> =
            std::iter::from_fn(|| marina.log.recv_timeout(Duration::from_millis(500)).ok()).collect();
        panic!(
            "before any signal: {why}\nwhat the server logged after it was ready:\n{}",
            log.join("\n")
        );
    }

    // The signal lands somewhere between these two instants (`kill` is a process of its own: milliseconds apart
    // on a quiet machine, hundreds on a busy one). The wall clock, read with the first, lets the client's instants
    // be compared with the timestamps the server logs.
    let (signal_before, wall_before) = (Instant::now(), SystemTime::now());
    marina.terminate();
    let signal_after = Instant::now();

    let exited = tokio::task::spawn_blocking(move || {
        let code = marina.wait_exit(DRAIN_TIMEOUT);
        (marina, code)
    });
    // Once the listener is closed, each client's next request is refused, and the client stops there.
    let records = load.finish(false).await;
    let (marina, code) = exited.await.unwrap();
    assert_eq!(
        code,
        Some(0),
        "the process exits 0 within the drain timeout ({DRAIN_TIMEOUT:?})"
    );

    // Everything the process logged, to its exit. A line that is not JSON is something other than the logger
    // writing (a panic, say), which no request may cause.
    let mut log = Vec::new();
    let mut not_json = Vec::new();
    while let Ok(line) = marina.log.recv_timeout(Duration::from_secs(10)) {
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(entry) => log.push(entry),
            Err(_) => not_json.push(line),
        }
    }
    // The server's side of the drain, for the failure messages: what it logged after it was ready, besides the
    // access lines.
    let server_side = || {
        log.iter()
            .filter(|entry| entry["target"] != "marina::access")
            .map(|entry| format!("  {entry}"))
            .chain(not_json.iter().map(|line| format!("  (not JSON) {line}")))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // When the server had the signal, by its own log (the same machine's clock, so comparable with the clients'
    // instants through `wall_before`): for the failure messages.
    let received = log
        .iter()
        .find(|entry| entry["message"] == "SIGTERM received")
        .and_then(|entry| humantime::parse_rfc3339(entry["timestamp"].as_str()?).ok())
        .expect("the server logs when it receives SIGTERM, with a timestamp");
    let received = match received.duration_since(wall_before) {
        Ok(after) => signal_before + after,
        Err(before) => signal_before - before.duration(),
    };

    // What each client saw. A request whose bytes were in the server's socket before `kill` even ran was in
    // flight at the signal: it must complete. One written after may meet a connection the drain closed as idle
    // (the keep-alive race no server can avoid; which is why the line is drawn where the signal had certainly not
    // been sent yet, not where the server logged it), and one that never got its bytes to the server may have
    // been refused, but only once the server was told to stop. A response that began must always end, a 200 and
    // complete.
    let describe = |record: &Record| {
        let at = |instant: Instant| format!("{:+.1} ms", ms_from(signal_before, instant));
        format!(
            "client {} GET /lab{}, request {} on its connection (started {}, written {}, ended {}, from just \
             before the signal; the server had it at {}, kill returned at {})",
            record.client,
            record.route.path(),
            record.nth,
            at(record.started),
            record.written.map_or("never".into(), at),
            at(record.finished),
            at(received),
            at(signal_after)
        )
    };
    let mut violations = Vec::new();
    for record in &records {
        let request = describe(record);
        match (&record.outcome, record.written) {
            (Outcome::Complete(_), _) => {}
            (Outcome::Broken(why), _) => violations.push(format!("{request}: {why}")),
            (Outcome::NoResponse(error), Some(written)) if written < signal_before => violations.push(format!(
                "{request}: delivered before SIGTERM was sent, closed without a response: {error}"
            )),
            (Outcome::NoResponse(_), Some(_)) => {}
            (Outcome::NoResponse(_), None) if record.finished > signal_before => {}
            (Outcome::NoResponse(error), None) => {
                violations.push(format!("{request}: could not reach the server before SIGTERM: {error}"))
            }
        }
    }
    if !violations.is_empty() {
        violations.push(format!(
            "what the server logged from its start to its exit:\n{}",
            server_side()
        ));
    }
    assert_none(&violations, "requests lost to SIGTERM");
    assert!(not_json.is_empty(), "the process logged only JSON:\n{}", server_side());
    assert!(
        records.iter().any(|r| matches!(r.outcome, Outcome::NoResponse(_))),
        "the listener closed: some request after the signal was refused"
    );

    // The process's own account. It drained (every connection closed), rather than dropping connections at the
    // timeout. Requests were in flight when the drain began: slow ones were answered after it had (the log is
    // one stream, in order). It answered every request with a 200, and as many as the clients received in full.
    let position = |message: &str| log.iter().position(|entry| entry["message"] == message);
    let drain_began =
        position("draining: no new connections, waiting for in-flight requests").expect("the drain is logged");
    assert!(
        position("drained; every connection closed").is_some(),
        "the drain finished:\n{}",
        server_side()
    );
    assert!(
        position("shutdown timeout reached; dropping the connections still open").is_none(),
        "no connection was dropped at the timeout"
    );
    let access: Vec<(usize, &serde_json::Value)> = log
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry["target"] == "marina::access")
        .filter(|(_, entry)| entry["path"].as_str().is_some_and(|path| path.starts_with("/lab/")))
        .collect();
    let not_ok: Vec<_> = access.iter().filter(|(_, entry)| entry["status"] != 200).collect();
    assert!(
        not_ok.is_empty(),
        "every request the server answered was a 200: {not_ok:?}"
    );
    let completed = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Complete(_)))
        .count();
    assert_eq!(
        access.len(),
        completed,
        "the server answered exactly the requests the clients received in full"
    );
    let slow_after_drain = access
        .iter()
        .filter(|(at, entry)| *at > drain_began && entry["path"] == "/lab/slow")
        .count();
    if slow_after_drain == 0 {
        let slow: Vec<String> = records
            .iter()
            .filter(|r| matches!(r.route, Route::Slow(_)) && r.finished > signal_before)
            .map(|r| format!("  {}: {:?}", describe(r), r.outcome))
            .collect();
        panic!(
            "no slow request was answered after the drain began, so none was in flight then (or the test proved \
             nothing); the slow requests that ended after the signal:\n{}\nwhat the server logged:\n{}",
            slow.join("\n"),
            server_side()
        );
    }
}

/// `lab` as `version`, staged in a fresh directory under `staging` (outside APPS_DIR, on the same filesystem) with
/// `BUILD` in its environment, ready to be renamed into place.
fn stage(staging: &Path, version: &str, build: &str) -> PathBuf {
    let dir = staging.join(format!("{version}-{build}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(guest("lab"), dir.join("app.wasm")).unwrap();
    let config = json!({ "ttl": 30, "env": { "BUILD": build } });
    std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
    dir
}

/// Polls `path` (with a client of its own) until it answers `status`.
async fn answers(server: &TestServer, path: &str, status: u16) {
    let deadline = Instant::now() + PHASE_LIMIT;
    loop {
        let response = client().get(server.url(path)).send().await.unwrap();
        if response.status() == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {status} within {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_version_directory_under_load_loses_no_request() {
    let _machine = crate::heavy().await; // 10 clients while versions are swapped
    let apps = AppsDir::new();
    let staging = tempfile::tempdir_in(apps.path().parent().unwrap()).unwrap();
    let lab = apps.path().join("lab");
    std::fs::create_dir_all(&lab).unwrap();
    std::fs::rename(stage(staging.path(), "1.0.0", "one"), lab.join("1.0.0")).unwrap();
    let server = TestServer::start(&apps.path()).await;

    // The deployments, in the order they go live; each client must only ever move forward through them.
    let order = ["1.0.0/one", "1.1.0/first", "1.1.0/second"];
    let routes: Vec<Route> = (0..10)
        .map(|i| match i % 5 {
            0 | 2 | 4 => Route::Env,
            1 => Route::Slow(150),
            _ => Route::Stream(1),
        })
        .collect();
    let env_clients: Vec<usize> = (0..routes.len()).filter(|&i| matches!(routes[i], Route::Env)).collect();
    let all_on = |label: &'static str| {
        let env_clients = env_clients.clone();
        move |progress: &[Progress]| env_clients.iter().all(|&i| progress[i].last.as_deref() == Some(label))
    };
    let load = Load::start(server.addr, "/lab", &routes);
    reached(
        load.wait_until("every client is answered by 1.0.0", all_on(order[0]))
            .await,
    );
    reached(load.wait_for_more("two more requests each", 2).await);

    // A new version, written outside APPS_DIR and renamed in: unversioned requests move to it.
    std::fs::rename(stage(staging.path(), "1.1.0", "first"), lab.join("1.1.0")).unwrap();
    reached(
        load.wait_until("every client is answered by 1.1.0", all_on(order[1]))
            .await,
    );

    // The old version renamed out, then deleted.
    let gone = staging.path().join("1.0.0-removed");
    std::fs::rename(lab.join("1.0.0"), &gone).unwrap();
    std::fs::remove_dir_all(&gone).unwrap();
    answers(&server, "/lab@1.0.0/env", 404).await;
    reached(load.wait_for_more("three more requests each, on 1.1.0 alone", 3).await);

    // 1.1.0 replaced in place: renamed out, and a new 1.1.0 renamed in right behind it.
    let replaced = staging.path().join("1.1.0-replaced");
    std::fs::rename(lab.join("1.1.0"), &replaced).unwrap();
    std::fs::rename(stage(staging.path(), "1.1.0", "second"), lab.join("1.1.0")).unwrap();
    reached(
        load.wait_until("every client is answered by the new 1.1.0", all_on(order[2]))
            .await,
    );
    std::fs::remove_dir_all(&replaced).unwrap();
    reached(load.wait_for_more("two more requests each", 2).await);

    let records = load.finish(true).await;
    let mut violations = Vec::new();
    let mut furthest = vec![0; routes.len()];
    for record in &records {
        let request = format!("client {} GET /lab{}", record.client, record.route.path());
        match &record.outcome {
            Outcome::Complete(None) => {}
            Outcome::Complete(Some(label)) => match order.iter().position(|l| l == label) {
                Some(at) if at >= furthest[record.client] => furthest[record.client] = at,
                Some(_) => violations.push(format!(
                    "{request}: answered by {label} after {} had answered it",
                    order[furthest[record.client]]
                )),
                None => violations.push(format!("{request}: answered by an unknown deployment {label}")),
            },
            Outcome::NoResponse(error) => violations.push(format!("{request}: no response: {error}")),
            Outcome::Broken(why) => violations.push(format!("{request}: {why}")),
        }
    }
    assert_none(&violations, "requests lost while versions were swapped");
    assert!(records.len() >= routes.len() * 9, "the load ran throughout");
    server.stop().await;
}
