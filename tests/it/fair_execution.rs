//! Fair execution of guests, over the real server and real components: a looping app does not stall the host's
//! routes or other apps, one app cannot keep every pool slot (or the whole queue) while another waits, and each
//! version's guest CPU is counted where an operator looks. Behaviour, not timings: bounds are generous.

use std::time::{Duration, Instant};

use crate::common::{client, get_json as get, AppsDir, TestServer};
use marina::server::ServeOptions;
use serde_json::{json, Value};

async fn start(apps: &AppsDir, pool_size: usize, queue_limit: usize) -> TestServer {
    let mut options = ServeOptions::new(apps.path());
    options.pool_size = pool_size;
    options.queue_limit = queue_limit;
    options.drain_timeout = Duration::from_secs(2);
    // Compiled before ready: the short timeouts below are for the guests' run time, not a first compile.
    options.precompile = true;
    TestServer::start_with(options).await
}

/// Polls `/_/metrics` until `condition` holds (10 s at most).
async fn wait_for(server: &TestServer, what: &str, condition: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get(server, "/_/metrics").await;
        if condition(&metrics) {
            return;
        }
        assert!(Instant::now() < deadline, "never reached: {what}: {metrics}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn while_four_infinite_loops_run_the_host_and_a_healthy_app_keep_answering_and_the_loops_end_in_504() {
    let _machine = crate::heavy().await; // four guests spinning, and answers timed while they do
    let apps = AppsDir::new();
    apps.component("spin", "1.0.0", "lab", json!({"timeout": 3}));
    apps.component("calm", "1.0.0", "lab", json!({"ttl": 60}));
    let server = start(&apps, 8, 64).await;
    // Warm the healthy app first, so what is measured below is serving, not compiling.
    assert_eq!(get(&server, "/calm/count").await.0, 200);

    let started = Instant::now();
    let loops: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client().get(server.url("/spin/loop")).send()))
        .collect();
    wait_for(&server, "four loops running", |m| m["busyWorkers"] == 4).await;
    for _ in 0..20 {
        let asked = Instant::now();
        assert_eq!(get(&server, "/_/health").await.0, 200);
        assert_eq!(get(&server, "/calm/count").await.0, 200);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "the host and a healthy app answered in {:?} while the loops ran",
            asked.elapsed()
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the checks ran while the loops were still running"
    );
    for looping in loops {
        let response = looping.await.unwrap().unwrap();
        assert_eq!(response.status(), 504);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "timeout");
    }
}

#[tokio::test]
async fn guest_cpu_is_counted_per_version_in_stats_metrics_and_prometheus() {
    let apps = AppsDir::new();
    apps.component("spin", "1.0.0", "lab", json!({"timeout": 1}));
    apps.component("calm", "1.0.0", "lab", json!({"ttl": 60}));
    let server = start(&apps, 8, 64).await;
    assert_eq!(get(&server, "/calm/count").await.0, 200);
    assert_eq!(get(&server, "/spin/loop").await.0, 504);

    // Lane threads settle their CPU clock as they go and when they park, so the figures follow within moments. How
    // much CPU the loop got depends on what else the machine runs (a loop is demoted after a few milliseconds),
    // so it is compared with the healthy app's, not with the clock.
    let deadline = Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let (_, stats) = get(&server, "/_/stats").await;
        let cpu = |key: &str| stats["apps"][key]["cpuSeconds"].as_f64().unwrap_or(0.0);
        if cpu("spin@1.0.0") >= 0.004 && cpu("spin@1.0.0") > 5.0 * cpu("calm@1.0.0") {
            break stats;
        }
        assert!(Instant::now() < deadline, "the loop's CPU never stood out: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spin = stats["apps"]["spin@1.0.0"]["cpuSeconds"].as_f64().unwrap();
    assert!(spin <= 1.5, "a 1 s timeout bounds the loop's CPU: {spin}");
    assert!(
        stats["apps"]["calm@1.0.0"]["cpuSeconds"].as_f64().unwrap() > 0.0,
        "instantiating counts"
    );
    assert!(stats["apps"]["spin@1.0.0"]["cpuPercent"].as_f64().unwrap() > 0.0);
    assert!(stats["pool"]["guestCpuSeconds"].as_f64().unwrap() >= spin);

    let text = client()
        .get(server.url("/_/metrics?format=prometheus"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |app: &str| {
        let prefix = format!("marina_worker_cpu_seconds_total{{app=\"{app}\",version=\"1.0.0\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no CPU sample for {app} in:\n{text}"))
            .parse::<f64>()
            .unwrap()
    };
    // The JSON rounds to the microsecond; the Prometheus text does not.
    assert!(sample("spin") >= spin - 1e-6, "{text}");
    assert!(sample("calm") < sample("spin"));
    assert!(text.contains("# TYPE marina_worker_cpu_seconds_total counter"));
}

#[tokio::test]
async fn an_app_alone_can_use_the_whole_pool() {
    let apps = AppsDir::new();
    apps.component("slow", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    let server = start(&apps, 4, 64).await;
    let requests: Vec<_> = (0..4)
        .map(|_| tokio::spawn(client().get(server.url("/slow/slow?ms=1500")).send()))
        .collect();
    wait_for(&server, "every slot busy with the one app", |m| m["busyWorkers"] == 4).await;
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test]
async fn a_version_holding_every_slot_gives_the_next_free_one_to_another_that_waits() {
    let apps = AppsDir::new();
    apps.component("slow", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    apps.component("quick", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    let server = start(&apps, 2, 64).await;
    // Two slow requests hold both slots; two more of the same app queue behind them.
    let first: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client().get(server.url("/slow/slow?ms=1500")).send()))
        .collect();
    wait_for(&server, "both slots busy", |m| m["busyWorkers"] == 2).await;
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let url = server.url("/slow/slow?ms=1500");
            tokio::spawn(async move {
                let response = client().get(url).send().await.unwrap();
                (response.status().as_u16(), Instant::now())
            })
        })
        .collect();
    wait_for(&server, "two slow requests queued", |m| m["queueDepth"] == 2).await;
    // The quick app asks last, yet holds no slot: the first slot to free up is its, not the queued slow ones'.
    let (status, _) = get(&server, "/quick/count").await;
    let quick_done = Instant::now();
    assert_eq!(status, 200);
    for request in first {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    for request in queued {
        let (status, done) = request.await.unwrap();
        assert_eq!(status, 200);
        assert!(
            done > quick_done,
            "a queued request of the app holding the pool went first"
        );
    }
}

#[tokio::test]
async fn a_full_queue_makes_room_for_another_app_by_refusing_the_flooding_apps_newest_waiter() {
    let apps = AppsDir::new();
    apps.component("flood", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    apps.component("other", "1.0.0", "lab", json!({"ttl": 60, "timeout": 30}));
    let server = start(&apps, 1, 3).await;
    let holder = tokio::spawn(client().get(server.url("/flood/slow?ms=1500")).send());
    wait_for(&server, "the slot busy", |m| m["busyWorkers"] == 1).await;
    let waiters: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client().get(server.url("/flood/slow?ms=10")).send()))
        .collect();
    wait_for(&server, "the queue full of one app", |m| m["queueDepth"] == 3).await;
    // The queue is full, but all of it is one app's: the other app's request takes the newest flood waiter's place.
    let (status, body) = get(&server, "/other/count").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    let mut statuses = Vec::new();
    for waiter in waiters {
        statuses.push(waiter.await.unwrap().unwrap().status().as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503], "exactly one flood waiter was refused");
    // A flood alone still gets the plain answer when the queue is full.
    let (_, metrics) = get(&server, "/_/metrics").await;
    assert_eq!(metrics["queueRejected"], 1);
}
