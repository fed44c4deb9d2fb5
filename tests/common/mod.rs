//! Shared test harness: a temporary APPS_DIR, the real server on 127.0.0.1:0, and raw HTTP for requests that a
//! well-behaved client library would refuse to send (it would normalise `..` away).
#![allow(dead_code)] // the benches include this file too (`#[path]`), and each uses a different part of it

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A temporary apps directory that tests fill with files.
pub struct AppsDir {
    dir: tempfile::TempDir,
}

impl AppsDir {
    pub fn new() -> AppsDir {
        AppsDir {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// The canonical path, as the server will see it.
    pub fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    /// Writes `text` at `relative` (e.g. `hello/1.0.0/index.html`), creating directories on the way.
    pub fn write(&self, relative: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A static app version whose index page says which version it is.
    pub fn static_version(&self, app: &str, version: &str) {
        self.write(
            &format!("{app}/{version}/index.html"),
            format!("<h1>{app} {version}</h1>"),
        );
    }
}

/// The example components of `runtime-sdk/examples`, built from source once per process (for the test binary:
/// once per run, by whichever test asks first, while the others wait); returns the path of the built
/// `<name>.wasm` (`hello`, `echo`, `todo_api`, `lab`, `raw_wasip2`, `command`, `wasi03`, `spin`).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("guest");
        // A fresh machine may lack the target; adding it is a no-op when it is there.
        let _ = Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).output();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--examples",
            ])
            .current_dir(root.join("runtime-sdk"))
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building runtime-sdk's examples failed; is the target installed? (rustup target add wasm32-wasip2)"
        );
        target.join("wasm32-wasip2").join("release").join("examples")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The Python example of `runtime-sdk/python`, built from source by its build script with componentize-py (from
/// PyPI), once per process; returns the path of the built component.
pub fn python_guest() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| built_by("python", "hello-python", None)).clone()
}

/// The JavaScript example of `runtime-sdk/js` (`app.js`), built from source by its build script with
/// componentize-js (from npm), once per process; returns the path of the built component.
pub fn js_guest() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| built_by("js", "hello-js", None)).clone()
}

/// `runtime-sdk/js/fetch-event.js`, a `fetch` event listener, built the same way.
pub fn js_fetch_event_guest() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| built_by("js", "fetch-event", Some("fetch-event.js")))
        .clone()
}

/// Runs `runtime-sdk/<language>/build` (on `source`, if given) into `target/languages/<name>.wasm`; the script
/// does nothing when its output is newer than its sources.
fn built_by(language: &str, name: &str, source: Option<&str>) -> PathBuf {
    // One build at a time: two builds of one language share its toolchain's install (`npm ci` replaces
    // `node_modules` whole), and the machine has two cores either way.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("runtime-sdk").join(language);
    let out = root.join("target").join("languages").join(format!("{name}.wasm"));
    let mut command = Command::new(dir.join("build"));
    command.arg(&out);
    if let Some(source) = source {
        command.arg(dir.join(source));
    }
    let output = command.output().expect("the build script runs");
    assert!(
        output.status.success(),
        "building {name} with runtime-sdk/{language}/build failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Where the language examples' compiled code is kept between runs, so that only a clean checkout compiles them.
pub fn languages_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("languages")
        .join("cache")
}

impl AppsDir {
    /// Deploys the example component `example` as `app@version` with `config` as its worker.config.json.
    pub fn component(&self, app: &str, version: &str, example: &str, config: serde_json::Value) {
        let dir = self.dir.path().join(app).join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(guest(example), dir.join("app.wasm")).unwrap();
        std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
    }
}

/// The real server, in this process, on an ephemeral port; stopped (gracefully) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(apps_dir: &Path) -> TestServer {
        let mut options = marina::server::ServeOptions::new(apps_dir);
        options.drain_timeout = Duration::from_secs(5);
        TestServer::start_with(options).await
    }

    /// The server with the given options (pool size, queue limit, cache ...).
    pub async fn start_with(options: marina::server::ServeOptions) -> TestServer {
        TestServer::start_on("127.0.0.1:0".parse().unwrap(), options).await
    }

    /// The server on a given address (a restart on the same port, for clients that reconnect).
    pub async fn start_on(addr: SocketAddr, options: marina::server::ServeOptions) -> TestServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(marina::server::serve(listener, options, shutdown));
        let server = TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = client().get(self.url("/_/ready")).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the server did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP/1.1 client that does not follow redirects, so tests see them.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a GET for `target` exactly as given (no normalisation) and reads the whole response.
pub async fn raw_get(addr: SocketAddr, target: &str) -> RawResponse {
    raw_request(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw bytes and reads until the server closes the connection.
pub async fn raw_request(addr: SocketAddr, request: &str) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server answers and closes within 10 s")
        .unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    RawResponse {
        status,
        head,
        body: bytes[split + 4..].to_vec(),
    }
}

/// The `marina` binary as a child process, killed on drop if it is still running.
pub struct MarinaProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::mpsc::Receiver<String>,
    /// The log lines up to and including "apps loaded; ready", parsed.
    pub startup: Vec<serde_json::Value>,
}

impl MarinaProcess {
    /// Starts `marina serve` with JSON logs on port 0 and reads the address it reports. Unless `extra` names a
    /// `--cache-dir`, compiled components are not cached (tests must not fill the user's cache).
    pub fn serve(apps_dir: &Path, extra: &[&str]) -> MarinaProcess {
        let mut command = MarinaProcess::command(apps_dir, extra);
        if !extra.contains(&"--cache-dir") {
            command.arg("--no-cache");
        }
        MarinaProcess::spawn(command)
    }

    /// The `marina serve` command `serve` would run, to add environment before spawning.
    pub fn command(apps_dir: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_marina"));
        command
            .args(["serve", "--port", "0", "--log-format", "json", "--apps-dir"])
            .arg(apps_dir)
            .args(extra)
            .env_remove("MARINA_CACHE_DIR")
            .env_remove("PORT")
            .env_remove("HOST")
            .env_remove("APPS_DIR");
        command
    }

    /// Starts a prepared command that must log JSON, and reads the address it reports.
    pub fn spawn(mut command: Command) -> MarinaProcess {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut startup = Vec::new();
        loop {
            let line = log
                .recv_timeout(Duration::from_secs(60))
                .expect("marina reports its address, then ready");
            let entry: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
            let message = entry["message"].as_str().unwrap_or_default().to_owned();
            if let Some(listening) = message.strip_prefix("listening on http://") {
                addr = Some(listening.parse().unwrap());
            }
            startup.push(entry);
            if message == "apps loaded; ready" {
                break;
            }
        }
        let addr = addr.expect("the address is logged before readiness");
        MarinaProcess {
            child,
            addr,
            log,
            startup,
        }
    }

    /// The next log line (parsed) that `matches`, waiting up to `limit`; lines before it are consumed.
    pub fn wait_log(&self, limit: Duration, matches: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.log.recv_timeout(left).ok()?;
            let entry: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
            if matches(&entry) {
                return Some(entry);
            }
        }
    }

    /// Every log line that arrives within `window`, parsed.
    pub fn drain_log(&self, window: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + window;
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => lines.push(serde_json::from_str(&line).expect("every log line is JSON")),
                Err(_) => break,
            }
        }
        lines
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The peak resident set size of the process so far, in bytes (Linux `VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The resident set size of the process now, in bytes (Linux `VmRSS`).
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// A `/proc/<pid>/status` field given in kB, in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"));
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for MarinaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `path` and returns the status and the body as JSON (a body that is not JSON comes as `{"text": ...}`).
/// Polls `probe` until it gives a value, for at most `limit`; fails naming `what` if it never does.
pub async fn eventually<T>(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A local upstream that answers every request with `upstream says hi`.
pub async fn says_hi_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "upstream says hi" });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Checks that `path`, of an app with `maxBodySize: 1000`, answers 413 `body_too_large` to a body over it, whether
/// its `Content-Length` says so or it streams without one.
pub async fn bodies_over_1000_bytes_answer_413(server: &TestServer, path: &str) {
    let declared = client()
        .post(server.url(path))
        .body(vec![0u8; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    let body: serde_json::Value = declared.json().await.unwrap();
    assert_eq!(body["code"], "body_too_large");
    assert_eq!(body["limit"], 1000);
    // Without a Content-Length the limit is enforced as the body streams.
    let chunks = futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![0u8; 400])));
    let streamed = client()
        .post(server.url(path))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
}

pub async fn get_json(server: &TestServer, path: &str) -> (u16, serde_json::Value) {
    let response = client().get(server.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "text": text }));
    (status, value)
}
