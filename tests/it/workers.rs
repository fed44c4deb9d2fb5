//! The worker pool's rules, over the real server and real components built from runtime-sdk: the POOL_SIZE cap
//! under load, fresh and warm workers, recycling, idle reaping, LRU eviction, the wait queue, and deadlines.

use std::time::{Duration, Instant};

use crate::common::{client, get_json, AppsDir, TestServer};
use marina::server::ServeOptions;
use serde_json::{json, Value};

/// How many requests the instance that answers this one has served, itself included. It asks once no worker is
/// busy: the head of a small response waits only a moment for its call to end, so on a loaded machine the
/// previous request's worker may not be back in the pool yet, and a request sent meanwhile would start another.
async fn served(server: &TestServer, app: &str) -> u64 {
    wait_for(server, |m| m["busyWorkers"] == 0).await;
    let (status, body) = get_json(server, &format!("/{app}/count")).await;
    assert_eq!(status, 200, "{body}");
    body["served"].as_u64().unwrap()
}

async fn metrics(server: &TestServer) -> Value {
    get_json(server, "/_/metrics").await.1
}

/// The server on `apps`, every component compiled before it is ready: a first request's wait for its compile
/// counts against its timeout, and the 1 s timeouts here are for what the pool and the guest do.
async fn start(apps: &AppsDir, pool_size: usize, queue_limit: usize) -> TestServer {
    let mut options = ServeOptions::new(apps.path());
    options.pool_size = pool_size;
    options.queue_limit = queue_limit;
    options.precompile = true;
    TestServer::start_with(options).await
}

#[tokio::test]
async fn the_pool_never_holds_more_instances_than_pool_size_under_load_across_apps() {
    let _machine = crate::heavy().await; // 200 requests at once
    let apps = AppsDir::new();
    for i in 0..5 {
        apps.component(&format!("app{i}"), "1.0.0", "lab", json!({"ttl": 60, "timeout": 60}));
    }
    let server = start(&apps, 4, 1000).await;
    let mut requests = Vec::new();
    for n in 0..200 {
        let url = server.url(&format!("/app{}/slow?ms=5", n % 5));
        requests.push(tokio::spawn(
            async move { client().get(url).send().await.unwrap().status() },
        ));
    }
    let mut peak_seen = 0;
    let sampler = async {
        for _ in 0..50 {
            let m = metrics(&server).await;
            peak_seen = peak_seen.max(m["activeWorkers"].as_u64().unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    sampler.await;
    for request in requests {
        assert_eq!(
            request.await.unwrap(),
            200,
            "every request is served, waiting if it must"
        );
    }
    let m = metrics(&server).await;
    assert!(peak_seen <= 4, "sampled {peak_seen} live workers");
    assert_eq!(m["peakWorkers"], 4, "the cap was reached and never passed: {m}");
    assert_eq!(m["poolSize"], 4);
    assert!(
        m["evictions"].as_u64().unwrap() > 0,
        "five apps in four slots must evict: {m}"
    );
}

#[tokio::test]
async fn ttl_zero_gives_every_request_a_fresh_instance_and_ttl_above_zero_reuses_a_warm_one() {
    let apps = AppsDir::new();
    apps.component("fresh", "1.0.0", "lab", json!({"ttl": 0}));
    apps.component("warm", "1.0.0", "lab", json!({"ttl": 60}));
    let server = TestServer::start(&apps.path()).await;
    for _ in 0..3 {
        assert_eq!(served(&server, "fresh").await, 1, "no state carries over with ttl: 0");
    }
    for expected in 1..=3 {
        assert_eq!(
            served(&server, "warm").await,
            expected,
            "the same instance serves again"
        );
    }
    let m = metrics(&server).await;
    assert_eq!(m["idleWorkers"], 1, "only the warm app keeps an instance: {m}");
}

#[tokio::test]
async fn a_worker_is_recycled_after_max_requests() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "maxRequests": 2}));
    let server = TestServer::start(&apps.path()).await;
    let counts = [
        served(&server, "lab").await,
        served(&server, "lab").await,
        served(&server, "lab").await,
        served(&server, "lab").await,
    ];
    assert_eq!(counts, [1, 2, 1, 2]);
}

#[tokio::test]
async fn a_worker_past_its_ttl_is_not_reused() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 1, "idleTimeout": 60}));
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(served(&server, "lab").await, 1);
    assert_eq!(served(&server, "lab").await, 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        served(&server, "lab").await,
        1,
        "a worker older than its ttl is replaced"
    );
}

#[tokio::test]
async fn an_idle_worker_is_reaped_after_idle_timeout() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "idleTimeout": 1}));
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(served(&server, "lab").await, 1);
    assert_eq!(metrics(&server).await["idleWorkers"], 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(&server).await;
        if m["activeWorkers"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the idle worker was never reaped: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served(&server, "lab").await, 1, "the next request gets a new instance");
}

#[tokio::test]
async fn at_the_cap_the_least_recently_used_idle_worker_of_another_app_is_evicted() {
    let apps = AppsDir::new();
    for app in ["a", "b", "c"] {
        apps.component(app, "1.0.0", "lab", json!({"ttl": 60}));
    }
    let server = start(&apps, 2, 10).await;
    assert_eq!(served(&server, "a").await, 1);
    assert_eq!(served(&server, "b").await, 1);
    // `a` is now the least recently used idle worker, so `c` takes its slot.
    assert_eq!(served(&server, "c").await, 1);
    assert_eq!(metrics(&server).await["evictions"], 1);
    assert_eq!(served(&server, "b").await, 2, "b's warm worker survived");
    assert_eq!(served(&server, "a").await, 1, "a's worker was evicted");
    let m = metrics(&server).await;
    assert_eq!(m["activeWorkers"], 2, "{m}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_queued_requests_are_still_served() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    let server = start(&apps, 1, 1).await;
    let busy = tokio::spawn(client().get(server.url("/lab/slow?ms=1500")).send());
    wait_for(&server, |m| m["busyWorkers"] == 1).await;
    let queued = tokio::spawn(client().get(server.url("/lab/count")).send());
    wait_for(&server, |m| m["queueDepth"] == 1).await;

    let refused = client().get(server.url("/lab/count")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "pool_busy");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("1 requests are already waiting"),
        "{body}"
    );

    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    let queued = queued.await.unwrap().unwrap();
    assert_eq!(queued.status(), 200);
    let body: Value = queued.json().await.unwrap();
    assert_eq!(body["served"], 2, "the queued request was handed the warm worker");
    assert_eq!(metrics(&server).await["queueRejected"], 1);
}

#[tokio::test]
async fn a_request_waits_in_the_queue_only_until_its_timeout() {
    let _machine = crate::timed().await; // the 503 within 2.4 s
    let apps = AppsDir::new();
    apps.component("slow", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    apps.component("quick", "1.0.0", "lab", json!({"ttl": 60, "timeout": 1}));
    let server = start(&apps, 1, 10).await;
    let busy = tokio::spawn(client().get(server.url("/slow/slow?ms=2500")).send());
    wait_for(&server, |m| m["busyWorkers"] == 1).await;
    let started = Instant::now();
    let (status, body) = get_json(&server, "/quick/count").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "pool_busy");
    assert!(
        started.elapsed() < Duration::from_millis(2400),
        "it gave up at its own deadline"
    );
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    assert_eq!(metrics(&server).await["queueDepth"], 0, "the waiter left the queue");
    assert_eq!(served(&server, "quick").await, 1);
}

#[tokio::test]
async fn an_infinite_loop_times_out_with_504_while_other_apps_keep_answering() {
    let apps = AppsDir::new();
    apps.component("spin", "1.0.0", "lab", json!({"ttl": 60, "timeout": 1}));
    apps.component("hello", "1.0.0", "hello", json!({"ttl": 60}));
    let defaults = ServeOptions::new(apps.path());
    let server = start(&apps, defaults.pool_size, defaults.queue_limit).await;
    let looping = tokio::spawn({
        let url = server.url("/spin/loop");
        async move { client().get(url).send().await.unwrap() }
    });
    // While the loop spins, another app answers (twice over the loop's lifetime).
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let response = client().get(server.url("/hello/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let response = looping.await.unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "timeout");
    assert_eq!(body["app"], "spin");
    assert!(body["error"].as_str().unwrap().contains("1s timeout"), "{body}");
    assert_eq!(
        served(&server, "spin").await,
        1,
        "the looping instance was discarded, not reused"
    );
}

#[tokio::test]
async fn a_memory_hog_fails_inside_its_cap_with_500_and_the_next_request_is_served() {
    let apps = AppsDir::new();
    apps.component("hog", "1.0.0", "lab", json!({"ttl": 60, "maxMemoryMb": 16}));
    let server = TestServer::start(&apps.path()).await;
    let (status, body) = get_json(&server, "/hog/hog?mb=64").await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "app_failed");
    assert_eq!(body["app"], "hog");
    let (status, body) = get_json(&server, "/hog/hog?mb=4").await;
    assert_eq!(status, 200, "an allocation within the cap works: {body}");
    assert_eq!(
        served(&server, "hog").await,
        2,
        "a fresh instance replaced the one that failed"
    );
}

#[tokio::test]
async fn a_panic_answers_500_with_a_json_error_and_the_next_request_is_served() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60}));
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(served(&server, "lab").await, 1);
    let (status, body) = get_json(&server, "/lab/panic").await;
    assert_eq!(status, 500);
    assert_eq!(body["code"], "app_failed");
    assert_eq!(body["version"], "1.0.0");
    assert!(
        body["error"].as_str().unwrap().starts_with("lab@1.0.0 failed"),
        "{body}"
    );
    assert_eq!(served(&server, "lab").await, 1, "the trapped instance is never reused");
}

#[tokio::test]
async fn the_version_health_route_answers_ok_only_when_a_worker_can_be_had() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60}));
    let server = start(&apps, 1, 0).await;
    let response = client().get(server.url("/lab@1/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "OK");
    assert_eq!(
        served(&server, "lab").await,
        1,
        "a health check does not count as a request"
    );

    // With the only slot busy and no queue, no worker can be had: not healthy.
    let busy = tokio::spawn(client().get(server.url("/lab/slow?ms=1000")).send());
    wait_for(&server, |m| m["busyWorkers"] == 1).await;
    let response = client().get(server.url("/lab/health")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn a_plain_wasip2_component_built_without_the_sdk_runs() {
    let apps = AppsDir::new();
    apps.component("raw", "1.0.0", "raw_wasip2", json!({}));
    let server = TestServer::start(&apps.path()).await;
    let response = client()
        .get(server.url("/raw@1.0.0/some/path?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "raw wasip2 component saw /some/path?x=1"
    );
}

#[tokio::test]
async fn the_todo_api_keeps_its_state_in_a_warm_worker() {
    let apps = AppsDir::new();
    apps.component("todo-api", "1.0.0", "todo_api", json!({"ttl": 3600, "maxRequests": 0}));
    let server = TestServer::start(&apps.path()).await;
    let created = client()
        .post(server.url("/todo-api/todos"))
        .json(&json!({"title": "write tests"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/todo-api/todos/1");
    // Each next request once the worker is back: one sent while it is still returning would start an instance
    // with an empty list (see `served`).
    wait_for(&server, |m| m["busyWorkers"] == 0).await;
    let patched = client()
        .patch(server.url("/todo-api/todos/1"))
        .json(&json!({"done": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    wait_for(&server, |m| m["busyWorkers"] == 0).await;
    let (status, list) = get_json(&server, "/todo-api/todos").await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([{"id": 1, "title": "write tests", "done": true}]));
    let bad = client()
        .post(server.url("/todo-api/todos"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    wait_for(&server, |m| m["busyWorkers"] == 0).await;
    let deleted = client().delete(server.url("/todo-api/todos/1")).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(get_json(&server, "/todo-api/todos/1").await.0, 404);
}

async fn wait_for(server: &TestServer, condition: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(server).await;
        if condition(&m) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never reached the expected state: {m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn low_memory_apps_get_a_smaller_cap_and_give_idle_workers_back_early() {
    let apps = AppsDir::new();
    apps.component(
        "small",
        "1.0.0",
        "lab",
        json!({"ttl": 60, "idleTimeout": 3600, "lowMemory": true}),
    );
    apps.component("normal", "1.0.0", "lab", json!({"ttl": 60, "idleTimeout": 3600}));
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(
        get_json(&server, "/normal/hog?mb=48").await.0,
        200,
        "48 MiB fits the default 128 MiB cap"
    );
    assert_eq!(
        get_json(&server, "/small/hog?mb=48").await.0,
        500,
        "48 MiB is over lowMemory's 32 MiB cap"
    );
    assert_eq!(served(&server, "small").await, 1);
    assert_eq!(metrics(&server).await["idleWorkers"], 2);
    // The lowMemory worker goes after at most 5 s idle, whatever its idleTimeout; the other one stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics(&server).await["idleWorkers"] != 1 {
        assert!(Instant::now() < deadline, "the lowMemory worker was not released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        served(&server, "normal").await,
        2,
        "the normal app's worker is still warm"
    );
    assert_eq!(
        served(&server, "small").await,
        1,
        "the lowMemory app's worker was released"
    );
}

#[tokio::test]
async fn a_worker_app_answers_over_http2() {
    let apps = AppsDir::new();
    apps.component("echo", "1.0.0", "echo", json!({}));
    let server = TestServer::start(&apps.path()).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(server.url("/echo@1/over/h2?x=1")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/over/h2");
    assert_eq!(body["query"], "x=1");
    assert_eq!(body["base"], "/echo@1");
    let posted = h2.post(server.url("/echo/")).body("h2 body").send().await.unwrap();
    assert_eq!(posted.text().await.unwrap(), "h2 body");
}

#[tokio::test]
async fn the_shipped_example_apps_run_as_committed() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("apps");
    let server = TestServer::start(&shipped).await;
    let text = |path: &'static str| {
        let url = server.url(path);
        async move {
            let response = client().get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(text("/hello@1.0.0/").await, (200, "Hello from hello@1.0.0\n".into()));
    assert_eq!(
        text("/hello/").await,
        (200, "Hi from hello@1.1.0\n".into()),
        "latest skips the prerelease"
    );
    assert_eq!(text("/hello@^1.0/").await.1, "Hi from hello@1.1.0\n");
    assert_eq!(
        text("/hello@2.0.0-beta.1/").await.1,
        "Hey (pre-release) from hello@2.0.0-beta.1\n"
    );
    assert_eq!(text("/hello@1/links").await.1, r#"{"self":"/hello@1/links"}"#);
    assert_eq!(text("/todo-api/todos").await, (200, "[]".into()));
    let echoed = client()
        .post(server.url("/echo/"))
        .body("shipped")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.text().await.unwrap(), "shipped");
}
