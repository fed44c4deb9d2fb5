//! Apps written in other languages, or against WASI 0.3, built in the run by their real toolchains from the sources
//! in `runtime-sdk/`: each serves GET and POST on fresh (`ttl: 0`) and reused (`ttl > 0`) instances, sees only its
//! own environment, and is counted by the metrics; a first request that outlasts its version's compile is told so.
//! A WASI 0.3 handler's body, written after it returned, streams; its failures and its limits are a 0.2 handler's.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    bodies_over_1000_bytes_answer_413, client, eventually, get_json, guest, js_fetch_event_guest, js_guest,
    languages_cache, python_guest, says_hi_upstream, TestServer,
};

/// Long enough for the first request to wait out a compile on a loaded 2-core machine (a Python component takes
/// 15 s in release builds).
const FIRST_REQUEST_TIMEOUT_SECS: u64 = 300;

/// Deploys `wasm` as `app@1.0.0` under `apps` with `config`.
fn deploy(apps: &Path, app: &str, wasm: &Path, config: Value) {
    let dir = apps.join(app).join("1.0.0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(wasm, dir.join("app.wasm")).unwrap();
    std::fs::write(dir.join("worker.config.json"), config.to_string()).unwrap();
}

async fn get(server: &TestServer, path: &str) -> (u16, String) {
    let response = client().get(server.url(path)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// `/_/stats` once `counted` holds of it (within 10 s): the requests just made are counted once each is over.
async fn stats_once(server: &TestServer, counted: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(10), "the requests' counting", async || {
        let (_, stats) = get_json(server, "/_/stats").await;
        counted(&stats).then_some(stats)
    })
    .await
}

/// The requests `app@1.0.0` has had, in the stats.
fn requests_of(stats: &Value, app: &str) -> Option<u64> {
    stats["apps"][format!("{app}@1.0.0")]["requests"].as_u64()
}

/// Serves the example `wasm` as a reused (`warm`) and a fresh (`fresh`) app and checks everything the examples
/// share: the greeting and the env of each app's own config, POST with a body, how many requests an instance saw,
/// and the metrics' counts.
async fn serves_get_and_post_fresh_and_reused_with_its_own_env(wasm: &Path, greeting_suffix: &str) {
    let apps = tempfile::tempdir().unwrap();
    let env = json!({"GREETING": "Hi", "SECRET": "warm's own"});
    deploy(
        apps.path(),
        "warm",
        wasm,
        json!({"ttl": 300, "timeout": FIRST_REQUEST_TIMEOUT_SECS, "env": env}),
    );
    deploy(
        apps.path(),
        "fresh",
        wasm,
        json!({"ttl": 0, "timeout": FIRST_REQUEST_TIMEOUT_SECS}),
    );
    let mut options = marina::server::ServeOptions::new(apps.path());
    // The first request compiles (or finds the code of an earlier run), the second app's loads what it wrote.
    options.cache_dir = Some(languages_cache());
    let server = TestServer::start_with(options).await;

    assert_eq!(get(&server, "/warm/").await, (200, format!("Hi {greeting_suffix}\n")));
    assert_eq!(
        get(&server, "/fresh/").await,
        (200, format!("Hello {greeting_suffix}\n"))
    );
    // One request after another: a reused instance counts on, a fresh one always starts at one. (Each waits for
    // the last one's worker to be back in the pool, which it is just after the client read the response.)
    let mut counts = Vec::new();
    for _ in 0..3 {
        eventually(Duration::from_secs(10), "the warm worker idle", async || {
            (get_json(&server, "/_/metrics").await.1["busyWorkers"] == 0).then_some(())
        })
        .await;
        counts.push(get(&server, "/warm/count").await.1.trim().parse::<u64>().unwrap());
    }
    assert!(counts.windows(2).all(|pair| pair[1] == pair[0] + 1), "{counts:?}");
    for _ in 0..3 {
        assert_eq!(get(&server, "/fresh/count").await, (200, "1\n".into()));
    }
    // Each app sees its own config's env, and nothing of the other's or of the host's.
    assert_eq!(get(&server, "/warm/env/SECRET").await, (200, "warm's own".into()));
    assert_eq!(get(&server, "/fresh/env/SECRET").await.0, 404);
    assert_eq!(get(&server, "/warm/env/PATH").await.0, 404);
    // The prefix it was reached under, for the links it makes.
    assert_eq!(get(&server, "/warm@1/base").await, (200, "/warm@1".into()));
    // A body of many chunks, each way.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for app in ["warm", "fresh"] {
        let response = client()
            .post(server.url(&format!("/{app}/echo")))
            .header("content-type", "application/x-test")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-test");
        assert_eq!(response.bytes().await.unwrap(), body, "{app} echoes the body");
    }

    // warm: 1 + 3 + 3 + 1 requests (one 404), fresh: 1 + 3 + 1 + 1 (one 404), each counted once it is over.
    let stats = stats_once(&server, |stats| {
        (requests_of(stats, "warm"), requests_of(stats, "fresh")) == (Some(8), Some(6))
    })
    .await;
    assert_eq!(stats["apps"]["warm@1.0.0"]["statuses"], json!({"200": 7, "404": 1}));
    assert_eq!(stats["apps"]["fresh@1.0.0"]["statuses"], json!({"200": 5, "404": 1}));
    assert_eq!(stats["pool"]["totalWorkersFailed"], 0, "{}", stats["pool"]);
}

#[tokio::test]
async fn a_python_app_serves_get_and_post_on_fresh_and_reused_instances_with_its_own_env() {
    serves_get_and_post_fresh_and_reused_with_its_own_env(&python_guest(), "from Python").await;
}

#[tokio::test]
async fn a_javascript_app_serves_get_and_post_on_fresh_and_reused_instances_with_its_own_env() {
    serves_get_and_post_fresh_and_reused_with_its_own_env(&js_guest(), "from JavaScript").await;
}

#[tokio::test]
async fn a_wasi_0_3_app_serves_get_and_post_on_fresh_and_reused_instances_with_its_own_env() {
    serves_get_and_post_fresh_and_reused_with_its_own_env(&guest("wasi03"), "from WASI 0.3").await;
}

#[tokio::test]
async fn a_wasi_0_3_body_written_after_its_handler_returned_streams_and_its_failures_fail_only_their_instance() {
    let apps = tempfile::tempdir().unwrap();
    deploy(apps.path(), "p3", &guest("wasi03"), json!({"ttl": 300, "timeout": 2}));
    deploy(apps.path(), "p2", &guest("hello"), json!({"ttl": 300}));
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.precompile = true;
    let server = TestServer::start_with(options).await;

    // The head comes at once; the lines, written 50 ms apart by a task the handler spawned, arrive as written.
    let started = Instant::now();
    let mut response = client().get(server.url("/p3/stream")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut arrivals = Vec::new();
    let mut body = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        arrivals.push(started.elapsed());
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(body, "line 0\nline 1\nline 2\n");
    assert!(
        arrivals.len() >= 2 && arrivals.last().unwrap().saturating_sub(arrivals[0]) >= Duration::from_millis(90),
        "the body streamed in parts as the guest wrote them, not all at the end: {arrivals:?}"
    );
    // The instance that streamed is reused: the body's end was its call's end. (It is back in the pool just after
    // the client read that end.)
    eventually(Duration::from_secs(10), "the streaming worker idle", async || {
        (get_json(&server, "/_/metrics").await.1["busyWorkers"] == 0).then_some(())
    })
    .await;
    let (status, count) = get(&server, "/p3/count").await;
    assert_eq!(
        (status, count.trim().parse::<u64>().unwrap() > 1),
        (200, true),
        "{count}"
    );

    // An error code instead of a response is the app's answer (500), its instance kept, as a 0.2 handler's. A trap
    // and a loop past the timeout are that request's 500 and 504, and the next request gets a new instance that
    // answers, while a 0.2 app beside it keeps answering.
    let (status, body) = get_json(&server, "/p3/error").await;
    assert_eq!((status, body["code"].as_str()), (500, Some("app_failed")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("ConnectionRefused"), "{body}");
    let (status, body) = get_json(&server, "/p3/trap").await;
    assert_eq!((status, body["code"].as_str()), (500, Some("app_failed")), "{body}");
    assert_eq!(
        get(&server, "/p3/count").await,
        (200, "1\n".into()),
        "a trapped instance is not reused"
    );
    let looping = tokio::spawn({
        let url = server.url("/p3/loop");
        async move { client().get(url).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&server, "/p2/").await.0,
        200,
        "the 0.2 app answers while the 0.3 one loops"
    );
    let looped = looping.await.unwrap();
    assert_eq!(looped.status(), 504);
    assert_eq!(
        get(&server, "/p3/count").await,
        (200, "1\n".into()),
        "a timed-out instance is not reused"
    );

    let stats = stats_once(&server, |stats| requests_of(stats, "p3") == Some(7)).await;
    let app = &stats["apps"]["p3@1.0.0"];
    assert_eq!(app["statuses"], json!({"200": 4, "500": 2, "504": 1}), "{app}");
    assert_eq!(stats["pool"]["totalWorkersFailed"], 2, "{}", stats["pool"]);
}

#[tokio::test]
async fn a_fetch_event_app_whose_reused_instance_answers_nothing_gets_a_fresh_instance_per_request_from_then_on() {
    let apps = tempfile::tempdir().unwrap();
    deploy(
        apps.path(),
        "listener",
        &js_fetch_event_guest(),
        json!({"ttl": 300, "timeout": FIRST_REQUEST_TIMEOUT_SECS}),
    );
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.cache_dir = Some(languages_cache());
    let server = TestServer::start_with(options).await;
    let (_, listing) = get_json(&server, "/_/deployments").await;
    assert!(!listing.to_string().contains("reuseOff"), "{listing}");

    assert_eq!(get(&server, "/listener/").await, (200, "fetch event 1\n".into()));
    // Its warm instance answers nothing the second time: that request fails, as with `wasmtime serve`...
    let (status, text) = get(&server, "/listener/").await;
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("response-outparam::set was never called"), "{text}");
    // ... and from then on every request gets an instance of its own, which answers.
    for _ in 0..5 {
        assert_eq!(get(&server, "/listener/").await, (200, "fetch event 1\n".into()));
    }
    let (_, listing) = get_json(&server, "/_/deployments").await;
    let version = &listing["apps"][0]["versions"][0];
    let reason = version["reuseOff"].as_str().unwrap_or_else(|| panic!("{version}"));
    assert!(reason.contains("componentize-js's fetch event"), "{reason}");
}

#[tokio::test]
async fn a_first_request_that_outlasts_the_compile_gets_503_compiling_and_the_requests_after_it_are_served() {
    let apps = tempfile::tempdir().unwrap();
    // No cache: a Python component takes 6 s or more to compile, longer than this timeout, which still leaves a
    // loaded machine time to start the instance once the compile is done (1 s did not, in one CI run).
    deploy(apps.path(), "slow", &python_guest(), json!({"ttl": 300, "timeout": 3}));
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.cache_dir = None;
    let server = TestServer::start_with(options).await;

    let response = client().get(server.url("/slow/")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "compiling", "{body}");
    assert_eq!((&body["app"], &body["version"]), (&json!("slow"), &json!("1.0.0")));
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("slow@1.0.0 is still being compiled (") && error.contains("longer than its 3s timeout"),
        "{error}"
    );

    // The compile went on without the request that started it: retried, the app answers once it is done.
    let deadline = Instant::now() + Duration::from_secs(FIRST_REQUEST_TIMEOUT_SECS);
    loop {
        let (status, text) = get(&server, "/slow/").await;
        if status == 200 {
            assert_eq!(text, "Hello from Python\n");
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("\"compiling\""), "{text}");
        assert!(Instant::now() < deadline, "the compile did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Waiting out a compile is no failure of the app's: no timeout, no failed worker.
    let (_, stats) = get_json(&server, "/_/stats").await;
    let pool = &stats["pool"];
    assert_eq!(
        (&pool["timeouts"], &pool["totalWorkersFailed"]),
        (&json!(0), &json!(0)),
        "{pool}"
    );
}

#[tokio::test]
async fn a_wasi_0_3_app_is_held_to_its_outbound_hosts_memory_cap_and_body_size_as_a_0_2_app_is() {
    let upstream = says_hi_upstream().await;
    let apps = tempfile::tempdir().unwrap();
    let wasm = guest("wasi03");
    let limits = json!({
        "ttl": 60,
        "maxMemoryMb": 16,
        "maxBodySize": 1000,
        "allowedOutboundHosts": [upstream.to_string()],
    });
    deploy(apps.path(), "open", &wasm, limits);
    deploy(apps.path(), "closed", &wasm, json!({"ttl": 60}));
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.precompile = true;
    let server = TestServer::start_with(options).await;

    // Its `wasi:http/client@0.3` requests go out only to the hosts its config allows.
    let fetch = format!("fetch?url=http://{upstream}/");
    assert_eq!(
        get(&server, &format!("/open/{fetch}")).await,
        (200, "200 upstream says hi".into())
    );
    let (status, denied) = get(&server, &format!("/closed/{fetch}")).await;
    assert_eq!(status, 502, "{denied}");
    assert!(denied.contains("HttpRequestDenied"), "{denied}");

    // Growing past its memory cap traps inside the guest; the next request gets a new instance, within the cap.
    let (status, body) = get_json(&server, "/open/hog?mb=64").await;
    assert_eq!((status, body["code"].as_str()), (500, Some("app_failed")), "{body}");
    assert_eq!(get(&server, "/open/hog?mb=4").await, (200, "held 4 MiB\n".into()));

    // A body over maxBodySize, declared or streamed without a length, is 413; one within it is echoed.
    bodies_over_1000_bytes_answer_413(&server, "/open/echo").await;
    let within = client()
        .post(server.url("/open/echo"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(within.status(), 200);
    assert_eq!(within.bytes().await.unwrap(), vec![7u8; 1000]);
}

/// Reads `response` to its end: true if its body ended with an error, false if it ended cleanly.
async fn ends_cut(mut response: reqwest::Response) -> bool {
    loop {
        match response.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[tokio::test]
async fn a_wasi_0_3_instance_serves_a_request_that_comes_while_another_streams_and_a_trap_stops_both() {
    let apps = tempfile::tempdir().unwrap();
    let wasm = guest("wasi03");
    deploy(
        apps.path(),
        "shared",
        &wasm,
        json!({"ttl": 300, "timeout": 2, "maxConcurrentRequests": 4}),
    );
    deploy(
        apps.path(),
        "alone",
        &wasm,
        json!({"ttl": 300, "timeout": 2, "maxConcurrentRequests": 1}),
    );
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.precompile = true;
    let server = TestServer::start_with(options).await;
    let created = async || {
        get_json(&server, "/_/metrics").await.1["totalWorkersCreated"]
            .as_u64()
            .unwrap()
    };
    let idle = async || {
        eventually(Duration::from_secs(10), "every worker idle", async || {
            (get_json(&server, "/_/metrics").await.1["busyWorkers"] == 0).then_some(())
        })
        .await
    };

    // A request that comes while another streams (its first line is out, the last two are 50 and 100 ms away)
    // joins its instance: the instance's count goes on from the stream's. With maxConcurrentRequests: 1 it gets an
    // instance of its own.
    for (app, shares) in [("shared", true), ("alone", false)] {
        assert_eq!(get(&server, &format!("/{app}/count")).await, (200, "1\n".into()));
        idle().await;
        let before = created().await;
        let mut streaming = client()
            .get(server.url(&format!("/{app}/stream")))
            .send()
            .await
            .unwrap();
        assert_eq!(streaming.chunk().await.unwrap().as_deref(), Some(&b"line 0\n"[..]));
        let during = get(&server, &format!("/{app}/count")).await;
        let mut rest = Vec::new();
        while let Some(chunk) = streaming.chunk().await.unwrap() {
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"line 1\nline 2\n", "{app}: the stream ended whole");
        if shares {
            assert_eq!(during, (200, "3\n".into()), "{app}: the third request of the instance");
            assert_eq!(created().await, before, "{app}: no instance was made for it");
        } else {
            assert_eq!(during, (200, "1\n".into()), "{app}: a fresh instance's first request");
            assert_eq!(created().await, before + 1, "{app}: an instance was made for it");
        }
        idle().await;
    }

    // A trap in a request sharing the instance stops the instance: the trapping request and the stream beside it
    // both fail, the stream cut short, never ended as if complete; the next request gets a new instance.
    let mut streaming = client().get(server.url("/shared/stream")).send().await.unwrap();
    assert_eq!(streaming.chunk().await.unwrap().as_deref(), Some(&b"line 0\n"[..]));
    let (status, body) = get_json(&server, "/shared/trap").await;
    assert_eq!((status, body["code"].as_str()), (500, Some("app_failed")), "{body}");
    assert!(
        ends_cut(streaming).await,
        "the stream beside the trap was cut, not ended cleanly"
    );
    idle().await;
    assert_eq!(
        get(&server, "/shared/count").await,
        (200, "1\n".into()),
        "a new instance"
    );

    // A loop past its timeout beside a stream: the loop answers 504, the stream is cut.
    let mut streaming = client().get(server.url("/shared/stream")).send().await.unwrap();
    assert_eq!(streaming.chunk().await.unwrap().as_deref(), Some(&b"line 0\n"[..]));
    let looped = client().get(server.url("/shared/loop")).send().await.unwrap();
    assert_eq!(looped.status(), 504);
    assert!(ends_cut(streaming).await, "the stream beside the loop was cut");
    let (_, stats) = get_json(&server, "/_/stats").await;
    assert_eq!(stats["pool"]["totalWorkersFailed"], 2, "{}", stats["pool"]);
}

#[tokio::test]
async fn many_requests_at_once_on_shared_wasi_0_3_instances_are_each_answered_with_their_own_body() {
    let apps = tempfile::tempdir().unwrap();
    deploy(apps.path(), "shared", &guest("wasi03"), json!({"ttl": 300}));
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.precompile = true;
    let server = TestServer::start_with(options).await;
    assert_eq!(get(&server, "/shared/count").await, (200, "1\n".into()));

    // 32 clients, 20 uploads each, every body its own: requests join and leave instances all the time.
    let clients: Vec<_> = (0..32)
        .map(|client_number| {
            let url = server.url("/shared/echo");
            tokio::spawn(async move {
                let http = client();
                for request in 0..20 {
                    let body = format!("client {client_number} request {request} ").repeat(50);
                    let response = http.post(&url).body(body.clone()).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    assert_eq!(response.text().await.unwrap(), body);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let stats = stats_once(&server, |stats| {
        requests_of(stats, "shared") == Some(641) && stats["pool"]["busyWorkers"] == 0
    })
    .await;
    assert_eq!(stats["apps"]["shared@1.0.0"]["statuses"], json!({"200": 641}));
    assert_eq!(stats["pool"]["totalWorkersFailed"], 0, "{}", stats["pool"]);
}

#[tokio::test]
async fn a_spin_sdk_7_component_serves_get_and_post_on_fresh_and_reused_instances_with_its_own_env() {
    let apps = tempfile::tempdir().unwrap();
    let wasm = guest("spin");
    deploy(
        apps.path(),
        "warm",
        &wasm,
        json!({"ttl": 300, "env": {"GREETING": "Hi"}}),
    );
    deploy(apps.path(), "fresh", &wasm, json!({"ttl": 0}));
    let mut options = marina::server::ServeOptions::new(apps.path());
    options.precompile = true;
    let server = TestServer::start_with(options).await;

    assert_eq!(get(&server, "/warm/").await, (200, "Hi from Spin\n".into()));
    assert_eq!(get(&server, "/fresh/").await, (200, "Hello from Spin\n".into()));
    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(get(&server, "/warm/count").await.1.trim().parse::<u64>().unwrap());
        assert_eq!(get(&server, "/fresh/count").await, (200, "1\n".into()));
    }
    assert!(counts.windows(2).all(|pair| pair[1] > pair[0]), "{counts:?}");
    for app in ["warm", "fresh"] {
        let body = "spin echoes this ".repeat(1000);
        let response = client()
            .post(server.url(&format!("/{app}/echo")))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), body, "{app}");
    }
    let stats = stats_once(&server, |stats| {
        (requests_of(stats, "warm"), requests_of(stats, "fresh")) == (Some(5), Some(5))
    })
    .await;
    assert_eq!(stats["pool"]["totalWorkersFailed"], 0, "{}", stats["pool"]);
}
