//! The server as a process and a protocol: HTTP/2 cleartext, readiness, graceful shutdown on SIGTERM, access logs.

use std::time::{Duration, Instant};

use crate::common::{client, AppsDir, MarinaProcess, TestServer};
use axum::body::Body;
use futures_util::StreamExt;
use marina::backends::wasm::engine::EngineSettings;
use marina::routes::lifecycle::Lifecycle;
use marina::routes::AppState;
use marina::server::Front;

#[tokio::test]
async fn http2_with_prior_knowledge_is_served_on_the_same_port() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let server = TestServer::start(&apps.path()).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(server.url("/hello/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "<h1>hello 1.0.0</h1>");
    let response = client().get(server.url("/hello/")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
}

fn state_in(phase: impl Fn(&Lifecycle)) -> AppState {
    let engine = EngineSettings {
        pool_size: 1,
        cache_dir: None,
    };
    let state = AppState::new(std::env::temp_dir(), &engine, 0, true).unwrap();
    phase(&state.lifecycle);
    state
}

async fn get(state: AppState, path: &str) -> (u16, Option<String>, String) {
    let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
    let response = Front::new(state).handle(request).await;
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, retry, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn readiness_is_503_while_loading_and_while_draining_and_liveness_stays_200() {
    let loading = state_in(|_| {});
    assert_eq!(get(loading.clone(), "/_/ready").await.0, 503);
    assert!(get(loading.clone(), "/_/ready").await.2.contains("loading"));
    assert_eq!(get(loading.clone(), "/_/health").await.0, 200);
    let (status, retry, body) = get(loading, "/hello/").await;
    assert_eq!(
        (status, retry.as_deref()),
        (503, Some("1")),
        "apps wait for loading: {body}"
    );

    let ready = state_in(|l| l.set_ready());
    assert_eq!(get(ready, "/_/ready").await.0, 200);

    let draining = state_in(|l| {
        l.set_ready();
        l.set_draining();
    });
    let (status, _, body) = get(draining.clone(), "/_/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"));
    assert_eq!(get(draining, "/_/health").await.0, 200);
}

fn apps_with_big_file(size: usize) -> AppsDir {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.write("hello/1.0.0/big.bin", vec![1u8; size]);
    apps
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_lets_the_download_in_flight_finish_and_exits_zero() {
    let size = 64 * 1024 * 1024;
    let apps = apps_with_big_file(size);
    let mut marina = MarinaProcess::serve(&apps.path(), &["--shutdown-timeout", "60s"]);
    let url = format!("http://{}/hello/big.bin", marina.addr);

    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().len();

    marina.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(marina.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener kept accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        marina.child.try_wait().unwrap(),
        None,
        "the process waits for the download in flight"
    );

    while let Some(chunk) = body.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, size, "the whole file arrived");
    let code = tokio::task::spawn_blocking(move || marina.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_cannot_hold_shutdown_past_the_timeout() {
    let apps = apps_with_big_file(64 * 1024 * 1024);
    let mut marina = MarinaProcess::serve(&apps.path(), &["--shutdown-timeout", "1s"]);
    let response = client()
        .get(format!("http://{}/hello/big.bin", marina.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The response is held and never read further.
    marina.terminate();
    let code = tokio::task::spawn_blocking(move || marina.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "the process exits 0 once the shutdown timeout passes");
    drop(response);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_writes_one_json_access_log_line() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    let status = client()
        .get(format!("http://{}/hello@1/?q=1", marina.addr))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = marina
            .log
            .recv_timeout(Duration::from_secs(10))
            .expect("an access log line");
        let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
        if entry["target"] == "marina::access" && entry["path"] == "/hello@1/" {
            break entry;
        }
        assert!(Instant::now() < deadline);
    };
    assert_eq!(line["method"], "GET");
    assert_eq!(line["app"], "hello");
    assert_eq!(line["version"], "1.0.0");
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(line["level"], "INFO");
}
