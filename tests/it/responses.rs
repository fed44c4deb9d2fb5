//! Responses that never come, and bodies that go wrong, over the real server and real components: a handler
//! that returns without responding, a deadline that covers everything before the response head, a stalled body
//! cut while a steady stream is not, and request bodies over the limit with no `Content-Length`.

use std::time::{Duration, Instant};

use crate::common::{client, get_json as get, AppsDir, TestServer};
use futures_util::StreamExt;
use marina::server::ServeOptions;
use serde_json::{json, Value};

/// The server with every component compiled before it is ready: these tests use short timeouts, which a first
/// compile on a loaded machine could outlast.
async fn start(apps: &AppsDir) -> TestServer {
    let mut options = ServeOptions::new(apps.path());
    options.precompile = true;
    options.drain_timeout = Duration::from_secs(5);
    TestServer::start_with(options).await
}

#[tokio::test]
async fn a_handler_that_returns_without_responding_gets_500_at_once_and_the_next_request_a_new_instance() {
    let _machine = crate::timed().await; // the 500 within 1.5 s
    let apps = AppsDir::new();
    apps.component("fresh", "1.0.0", "raw_wasip2", json!({"ttl": 0, "timeout": 2}));
    apps.component("warm", "1.0.0", "raw_wasip2", json!({"ttl": 30, "timeout": 2}));
    let server = start(&apps).await;
    for app in ["fresh", "warm"] {
        for way in ["drop", "leak"] {
            let failed = |m: &Value| m["totalWorkersFailed"].as_u64().unwrap();
            let created = |m: &Value| m["totalWorkersCreated"].as_u64().unwrap();
            let (_, before) = get(&server, "/_/metrics").await;
            let asked = Instant::now();
            let (status, body) = get(&server, &format!("/{app}/no-response/{way}")).await;
            assert_eq!(status, 500, "{app} {way}: {body}");
            assert_eq!(body["code"], "app_failed");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("response-outparam::set was never called"),
                "{body}"
            );
            assert!(
                asked.elapsed() < Duration::from_millis(1500),
                "{app} {way}: the 500 came at once, not at the 2 s timeout ({:?})",
                asked.elapsed()
            );
            // The call counts its outcome just after it answers: wait for it.
            let deadline = Instant::now() + Duration::from_secs(5);
            let answered = loop {
                let (_, answered) = get(&server, "/_/metrics").await;
                if failed(&answered) > failed(&before) || Instant::now() > deadline {
                    break answered;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(
                failed(&answered) - failed(&before),
                1,
                "{app} {way}: the worker was discarded"
            );
            assert_eq!(answered["idleWorkers"], 0, "{app} {way}: nothing kept warm");
            let (status, body) = get(&server, &format!("/{app}/after")).await;
            assert_eq!(status, 200, "{app} {way}: the version still serves: {body}");
            assert_eq!(body["text"], "raw wasip2 component saw /after");
            let (_, after) = get(&server, "/_/metrics").await;
            assert_eq!(
                created(&after) - created(&answered),
                1,
                "{app} {way}: the next request got a new instance"
            );
        }
    }
}

#[tokio::test]
async fn one_route_that_answers_nothing_on_a_reused_instance_leaves_the_version_s_instances_reused() {
    let apps = AppsDir::new();
    apps.component("warm", "1.0.0", "raw_wasip2", json!({"ttl": 30, "timeout": 5}));
    let server = start(&apps).await;
    let idle_then_created = async || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, metrics) = get(&server, "/_/metrics").await;
            if metrics["idleWorkers"] == 1 {
                return metrics["totalWorkersCreated"].as_u64().unwrap();
            }
            assert!(Instant::now() < deadline, "no worker went back to the pool: {metrics}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // A reused instance answers: the version's instances can be reused.
    for _ in 0..2 {
        assert_eq!(get(&server, "/warm/ok").await.0, 200);
        idle_then_created().await;
    }
    // Then one route forgets its response on the reused instance: that call fails, and its instance goes...
    assert_eq!(get(&server, "/warm/no-response/drop").await.0, 500);
    let (_, listing) = get(&server, "/_/deployments").await;
    assert!(!listing.to_string().contains("reuseOff"), "{listing}");
    // ... but the version's next instance is kept and reused as before.
    assert_eq!(get(&server, "/warm/ok").await.0, 200);
    let created = idle_then_created().await;
    assert_eq!(get(&server, "/warm/ok").await.0, 200);
    assert_eq!(
        idle_then_created().await,
        created,
        "the second request reused the first one's instance"
    );
}

#[tokio::test]
async fn the_timeout_covers_the_wait_for_the_head_and_a_body_that_stalls_is_cut_and_its_worker_discarded() {
    let _machine = crate::timed().await; // the 504 within 2.5 s
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "timeout": 1}));
    let server = start(&apps).await;

    // No head within the timeout: 504, counted from the request's arrival.
    let asked = Instant::now();
    let (status, body) = get(&server, "/lab/slow?ms=3000").await;
    assert_eq!(status, 504, "{body}");
    assert!(asked.elapsed() < Duration::from_millis(2500), "{:?}", asked.elapsed());

    // A head, a first chunk, then nothing: the body is cut with an error, never left hanging.
    let response = client().get(server.url("/lab/stall")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"first chunk\n");
    let cut = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("the stalled body ends within 10 s");
    assert!(
        matches!(cut, Some(Err(_))),
        "a stalled body ends with an error, not a clean end: {cut:?}"
    );
    // Both the 504 and the stall count as timeouts, once the calls have wound up.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = get(&server, "/_/metrics").await;
        if metrics["timeouts"] == 2 && metrics["totalWorkersFailed"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = get(&server, "/lab/count").await;
    assert_eq!(status, 200, "the version serves on");
}

#[tokio::test]
async fn a_steady_stream_that_outlasts_the_timeout_is_not_cut() {
    let _machine = crate::timed().await; // chunks closer than the 1 s timeout
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "timeout": 1}));
    let server = start(&apps).await;
    let started = Instant::now();
    let (status, body) = get(&server, "/lab/drip?n=8&ms=300").await;
    assert_eq!(status, 200);
    let text = body["text"].as_str().unwrap();
    assert_eq!(text.matches("data: ").count(), 8, "{text}");
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "it did outlast the 1 s timeout"
    );
    // And the worker that streamed is healthy and kept.
    let (_, metrics) = get(&server, "/_/metrics").await;
    assert_eq!(metrics["totalWorkersFailed"], 0, "{metrics}");
}

/// A request body of `len` bytes sent in chunks without `Content-Length`.
fn chunked(len: usize) -> reqwest::Body {
    let chunk = 64 * 1024;
    let chunks = (0..len.div_ceil(chunk)).map(move |i| {
        let size = chunk.min(len - i * chunk);
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; size]))
    });
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

const LIMIT: usize = 1024 * 1024;

#[tokio::test]
async fn a_chunked_upload_over_the_limit_is_413_when_the_app_has_not_started_its_response() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "maxBodySize": LIMIT}));
    let server = start(&apps).await;
    for (name, http) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
        let response = http
            .post(server.url("/lab/consume"))
            .body(chunked(LIMIT + 1))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "body_too_large", "{name}");
        // Exactly the limit is fine.
        let response = http
            .post(server.url("/lab/consume"))
            .body(chunked(LIMIT))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["bytes"], LIMIT, "{name}");
    }
}

#[tokio::test]
async fn a_chunked_upload_over_the_limit_aborts_a_response_already_started_never_a_clean_200() {
    let apps = AppsDir::new();
    apps.component("echo", "1.0.0", "echo", json!({"ttl": 60, "maxBodySize": LIMIT}));
    let server = start(&apps).await;
    for (name, http) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
        let result = async {
            let response = http.post(server.url("/echo/")).body(chunked(LIMIT + 1)).send().await?;
            let status = response.status().as_u16();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body.len()))
        }
        .await;
        match result {
            // The echo began its response before the body went over: the client must see it broken.
            Err(_) => {}
            // Or it had not begun: then the answer is 413.
            Ok((status, len)) => assert_eq!(status, 413, "{name}: a {status} with {len} bytes"),
        }
        // The app serves on.
        let response = http.post(server.url("/echo/")).body("ok").send().await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
        assert_eq!(response.text().await.unwrap(), "ok");
    }
}

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder().http2_prior_knowledge().build().unwrap()
}
