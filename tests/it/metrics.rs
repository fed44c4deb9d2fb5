//! Observability over the real server and real components: the counters under load, the JSON and Prometheus views
//! agreeing, the SSE stream (framing, interval, disconnects, shutdown), and the dashboard in a real browser.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::{client, eventually, AppsDir, TestServer};
use futures_util::StreamExt;
use marina::server::ServeOptions;
use serde_json::{json, Value};

async fn get_json(server: &TestServer, path: &str) -> Value {
    let response = client().get(server.url(path)).send().await.unwrap();
    response.json().await.unwrap()
}

async fn status_of(server: &TestServer, path: &str) -> u16 {
    client().get(server.url(path)).send().await.unwrap().status().as_u16()
}

async fn lab(config: Value, pool_size: usize) -> (AppsDir, TestServer) {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", config);
    let mut options = ServeOptions::new(apps.path());
    options.pool_size = pool_size;
    options.drain_timeout = Duration::from_secs(30);
    // Compiled before the first request, whose timeout would otherwise count the compile too.
    options.precompile = true;
    let server = TestServer::start_with(options).await;
    (apps, server)
}

/// `/_/metrics` as Prometheus text, checked against the format and parsed into its series.
async fn prometheus(server: &TestServer) -> (String, BTreeMap<String, f64>) {
    let response = client()
        .get(server.url("/_/metrics?format=prometheus"))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let samples = parse_prometheus(&text);
    (text, samples)
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("{value} is not a count"))
}

#[tokio::test]
async fn n_requests_grow_the_totals_by_n_and_show_under_their_app_and_workers() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let before = get_json(&server, "/_/metrics").await;
    for _ in 0..25 {
        assert_eq!(status_of(&server, "/lab/count").await, 200);
    }
    // A worker goes back to the pool just after its response is out: wait for every one to be idle again.
    let stats = settled(&server, 25).await;
    let pool = &stats["pool"];
    assert_eq!(count(&pool["totalRequests"]) - count(&before["totalRequests"]), 25);
    let lookups = |m: &Value| count(&m["hits"]) + count(&m["misses"]);
    assert_eq!(lookups(pool) - lookups(&before), 25);
    assert!(count(&pool["hits"]) > 0, "warm workers are reused: {pool}");
    assert!(pool["requestsPerSecond"].as_f64().unwrap() > 0.0);
    assert!(pool["latencyMs"]["p50"].as_f64().unwrap() > 0.0, "{pool}");
    assert!(pool["latencyMs"]["p99"].as_f64().unwrap() >= pool["latencyMs"]["p50"].as_f64().unwrap());
    assert!(pool["memoryUsageMB"].as_f64().unwrap() > 0.0, "{pool}");

    let app = &stats["apps"]["lab@1.0.0"];
    assert_eq!(app["requests"], 25, "{app}");
    assert_eq!(app["statuses"], json!({"200": 25}));
    assert_eq!(app["errors"], 0);
    let workers = stats["workers"].as_object().unwrap();
    assert!(!workers.is_empty());
    let served: u64 = workers.values().map(|w| count(&w["requestCount"])).sum();
    assert_eq!(served, 25, "{workers:?}");
    for worker in workers.values() {
        assert_eq!(
            (&worker["app"], &worker["version"], &worker["state"]),
            (&json!("lab"), &json!("1.0.0"), &json!("idle"))
        );
        assert!(count(&worker["memoryBytes"]) >= 65536, "{worker}");
        assert!(count(&worker["ageMs"]) >= count(&worker["idleMs"]));
    }
    assert_eq!(count(&app["workers"]["idle"]), workers.len() as u64);
}

/// The stats once every worker is idle and they have served `requests` in all.
async fn settled(server: &TestServer, requests: u64) -> Value {
    eventually(Duration::from_secs(10), "every worker idle", async || {
        let stats = get_json(server, "/_/stats").await;
        let workers = stats["workers"].as_object().unwrap();
        let served: u64 = workers.values().map(|w| count(&w["requestCount"])).sum();
        (served == requests && workers.values().all(|w| w["state"] == "idle")).then_some(stats)
    })
    .await
}

#[tokio::test]
async fn latency_runs_to_the_end_of_the_body_not_to_the_head() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    // 64 MiB is far more than the sockets buffer: the body cannot finish before the client reads it.
    let response = client().get(server.url("/lab/stream?mb=64")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(response.bytes().await.unwrap().len(), 64 << 20);
    let stats = eventually(Duration::from_secs(10), "timing the streamed response", async || {
        let stats = get_json(&server, "/_/stats").await;
        stats["apps"]["lab@1.0.0"]["latencyMs"]["p50"].as_f64().map(|_| stats)
    })
    .await;
    let p50 = stats["apps"]["lab@1.0.0"]["latencyMs"]["p50"].as_f64().unwrap();
    assert!(
        p50 >= 1200.0,
        "the response took over 1.2 s to deliver, but was timed at {p50} ms"
    );
}

#[tokio::test]
async fn a_request_whose_client_goes_away_is_counted_as_499_with_its_time() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(impatient.get(server.url("/lab/slow?ms=3000")).send().await.is_err());
    let stats = eventually(Duration::from_secs(10), "counting the abandoned request", async || {
        let stats = get_json(&server, "/_/stats").await;
        (stats["apps"]["lab@1.0.0"]["statuses"] == json!({"499": 1})).then_some(stats)
    })
    .await;
    assert_eq!(stats["pool"]["totalRequests"], 1);
    let app = &stats["apps"]["lab@1.0.0"];
    assert!(
        app["latencyMs"]["p50"].as_f64().unwrap() >= 250.0,
        "timed to the disconnect: {app}"
    );
}

#[tokio::test]
async fn a_removed_versions_counts_fold_into_the_retired_total_and_the_totals_never_drop() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60}));
    apps.component("lab", "1.1.0", "lab", json!({"ttl": 60}));
    let server = TestServer::start(&apps.path()).await;
    for _ in 0..4 {
        assert_eq!(status_of(&server, "/lab@1.0.0/count").await, 200);
    }
    assert_eq!(status_of(&server, "/lab@1.0.0/panic").await, 500);
    assert_eq!(status_of(&server, "/lab@1.1.0/count").await, 200);
    let before = get_json(&server, "/_/metrics").await;

    std::fs::remove_dir_all(apps.path().join("lab/1.0.0")).unwrap();
    let stats = eventually(
        Duration::from_secs(15),
        "the removed version leaving the stats",
        async || {
            let stats = get_json(&server, "/_/stats").await;
            stats["apps"].get("lab@1.0.0").is_none().then_some(stats)
        },
    )
    .await;
    assert_eq!(stats["apps"]["lab@1.1.0"]["requests"], 1);
    for key in ["totalRequests", "errors"] {
        assert_eq!(stats["pool"][key], before[key], "{key}");
    }
    // All six requests are still in the window (the server is younger than it): moving the removed version's
    // share did not make the rate drop or jump.
    let pool = &stats["pool"];
    let seconds = pool["windowSeconds"].as_f64().unwrap().max(1.0);
    let in_window = pool["requestsPerSecond"].as_f64().unwrap() * seconds;
    assert!(
        (in_window - 6.0).abs() < 0.05,
        "{in_window} requests in the window: {pool}"
    );
    let (text, samples) = prometheus(&server).await;
    assert_eq!(
        samples[r#"marina_requests_total{app="",version="retired",status="200"}"#],
        4.0
    );
    assert_eq!(
        samples[r#"marina_requests_total{app="",version="retired",status="500"}"#],
        1.0
    );
    assert_eq!(
        samples[r#"marina_request_duration_seconds_count{app="",version="retired"}"#],
        5.0
    );
    assert!(
        !text.contains(r#"version="1.0.0""#),
        "no series left for the removed version"
    );
}

#[tokio::test]
async fn a_timeout_and_a_trap_are_counted_and_their_workers_failed() {
    let (_apps, server) = lab(json!({"ttl": 60, "timeout": 1}), 4).await;
    assert_eq!(status_of(&server, "/lab/loop").await, 504);
    assert_eq!(status_of(&server, "/lab/panic").await, 500);
    assert_eq!(status_of(&server, "/lab/count").await, 200);
    let stats = get_json(&server, "/_/stats").await;
    let pool = &stats["pool"];
    assert_eq!((count(&pool["timeouts"]), count(&pool["traps"])), (1, 1), "{pool}");
    assert_eq!(count(&pool["totalWorkersFailed"]), 2);
    assert_eq!(count(&pool["errors"]), 2);
    let app = &stats["apps"]["lab@1.0.0"];
    assert_eq!(app["statuses"], json!({"200": 1, "500": 1, "504": 1}));
    assert_eq!(app["errors"], 2);
}

#[tokio::test]
async fn an_eviction_is_counted() {
    let apps = AppsDir::new();
    apps.component("one", "1.0.0", "lab", json!({"ttl": 60}));
    apps.component("two", "1.0.0", "lab", json!({"ttl": 60}));
    let mut options = ServeOptions::new(apps.path());
    options.pool_size = 1;
    let server = TestServer::start_with(options).await;
    assert_eq!(status_of(&server, "/one/count").await, 200);
    // Idle, its worker can be evicted; still busy (its body just ended), `two` would wait in the queue for it.
    eventually(Duration::from_secs(10), "one's worker idle", async || {
        let metrics = get_json(&server, "/_/metrics").await;
        (metrics["idleWorkers"] == 1).then_some(())
    })
    .await;
    assert_eq!(count(&get_json(&server, "/_/metrics").await["evictions"]), 0);
    assert_eq!(status_of(&server, "/two/count").await, 200);
    let metrics = get_json(&server, "/_/metrics").await;
    assert_eq!(count(&metrics["evictions"]), 1, "{metrics}");
    assert_eq!(count(&metrics["activeWorkers"]), 1);
}

/// Samples of a Prometheus text exposition, checked line by line against the format's grammar: HELP and TYPE
/// before a family's samples and once each, metric and label names well formed, label values quoted and escaped,
/// values numbers, no series twice, and every histogram's buckets cumulative and ending at `+Inf` = `_count`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let name = r"[a-zA-Z_:][a-zA-Z0-9_:]*";
    let help = regex::Regex::new(&format!(r"^# HELP ({name}) .+$")).unwrap();
    let kind = regex::Regex::new(&format!(r"^# TYPE ({name}) (counter|gauge|histogram|summary|untyped)$")).unwrap();
    let label = r#"[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*""#;
    let sample = regex::Regex::new(&format!(
        r"^({name})(\{{{label}(?:,{label})*\}})? (-?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?|\+Inf|-Inf|NaN)$"
    ))
    .unwrap();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = Vec::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(c) = help.captures(line) {
            assert!(!helped.contains(&c[1].to_owned()), "HELP twice: {line}");
            helped.push(c[1].to_owned());
        } else if let Some(c) = kind.captures(line) {
            assert!(
                types.insert(c[1].to_owned(), c[2].to_owned()).is_none(),
                "TYPE twice: {line}"
            );
        } else if let Some(c) = sample.captures(line) {
            let metric = &c[1];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    metric
                        .strip_suffix(suffix)
                        .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(metric);
            assert!(types.contains_key(family), "a sample before its TYPE: {line}");
            let series = format!("{metric}{}", c.get(2).map_or("", |l| l.as_str()));
            let value: f64 = c[3].parse().unwrap();
            assert!(samples.insert(series, value).is_none(), "a series twice: {line}");
        } else {
            panic!("not a Prometheus exposition line: {line:?}");
        }
    }
    // Histograms: per series, buckets rise, and +Inf equals the count.
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let le = regex::Regex::new(r#",?le="([^"]+)""#).unwrap();
    for (series, value) in &samples {
        if let Some(rest) = series.strip_prefix("marina_request_duration_seconds_bucket") {
            let bound = &le.captures(rest).unwrap()[1];
            let bound: f64 = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().unwrap()
            };
            let base = le.replace(rest, "").replace("{,", "{").to_string();
            buckets.entry(base).or_default().push((bound, *value));
        }
    }
    for (labels, mut list) in buckets {
        list.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(
            list.windows(2).all(|w| w[0].1 <= w[1].1),
            "buckets of {labels} do not rise: {list:?}"
        );
        let (last_bound, last) = *list.last().unwrap();
        assert_eq!(last_bound, f64::INFINITY, "{labels} has no +Inf bucket");
        assert_eq!(
            Some(&last),
            samples.get(&format!("marina_request_duration_seconds_count{labels}"))
        );
    }
    samples
}

#[tokio::test]
async fn the_json_and_prometheus_views_agree_and_the_text_is_well_formed() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    for _ in 0..7 {
        status_of(&server, "/lab/count").await;
    }
    assert_eq!(status_of(&server, "/nope/x").await, 404);
    assert_eq!(status_of(&server, "/lab/panic").await, 500);

    let json = get_json(&server, "/_/metrics").await;
    // What Prometheus 2.x sends.
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,\
                  text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let response = client()
        .get(server.url("/_/metrics"))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let samples = parse_prometheus(&text);
    let (_, by_query) = prometheus(&server).await;
    assert_eq!(
        by_query.len(),
        samples.len(),
        "?format=prometheus gives the same series"
    );

    let series = |name: &str| {
        samples
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let requests: f64 = samples
        .iter()
        .filter(|(name, _)| name.starts_with("marina_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(requests, count(&json["totalRequests"]) as f64);
    assert_eq!(
        series(r#"marina_requests_total{app="lab",version="1.0.0",status="200"}"#),
        7.0
    );
    assert_eq!(
        series(r#"marina_requests_total{app="lab",version="1.0.0",status="500"}"#),
        1.0
    );
    assert_eq!(series(r#"marina_requests_total{app="",version="",status="404"}"#), 1.0);
    assert_eq!(
        series(r#"marina_request_duration_seconds_count{app="lab",version="1.0.0"}"#),
        8.0
    );
    for (name, key) in [
        ("marina_pool_size", "poolSize"),
        ("marina_pool_live_workers", "activeWorkers"),
        ("marina_pool_idle_workers", "idleWorkers"),
        ("marina_queue_depth", "queueDepth"),
        ("marina_queue_rejected_total", "queueRejected"),
        ("marina_queue_timeouts_total", "queueTimeouts"),
        ("marina_pool_hits_total", "hits"),
        ("marina_pool_misses_total", "misses"),
        ("marina_pool_evictions_total", "evictions"),
        ("marina_workers_created_total", "totalWorkersCreated"),
        ("marina_workers_failed_total", "totalWorkersFailed"),
        ("marina_worker_traps_total", "traps"),
        ("marina_worker_timeouts_total", "timeouts"),
    ] {
        assert_eq!(series(name), count(&json[key]) as f64, "{name} vs {key}");
    }
    // The trap discarded the one warm worker: the series stay, at zero.
    assert_eq!(
        series(r#"marina_workers{app="lab",version="1.0.0",state="idle"}"#),
        count(&json["idleWorkers"]) as f64
    );
    assert_eq!(series(r#"marina_workers{app="lab",version="1.0.0",state="busy"}"#), 0.0);
    assert!(
        !text.contains("/count") && !text.contains("nope"),
        "no raw paths or unknown names as labels"
    );

    // Browsers and curl get JSON; a format nobody knows is a clear error.
    for accept in [
        "*/*",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "application/json",
    ] {
        let response = client()
            .get(server.url("/_/metrics"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], "application/json", "{accept}");
    }
    let response = client().get(server.url("/_/metrics?format=xml")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "bad_query");
    assert!(body["error"].as_str().unwrap().contains("prometheus"), "{body}");
}

#[tokio::test]
async fn reading_the_metrics_changes_nothing_and_is_not_counted() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    status_of(&server, "/lab/count").await;
    // The request's latency is recorded when hyper drops its body, and its worker is back when its call ends: on a
    // loaded machine either may follow the response the client read by a moment, so the first reading waits.
    let first = eventually(
        Duration::from_secs(10),
        "the request timed and its worker back",
        async || {
            let stats = get_json(&server, "/_/stats").await;
            let app = &stats["apps"]["lab@1.0.0"];
            let settled = app["workers"]["busy"] == 0 && app["latencyMs"]["p50"].as_f64().is_some_and(|p50| p50 > 0.0);
            settled.then_some(stats)
        },
    )
    .await;
    for path in [
        "/_/stats",
        "/_/metrics",
        "/_/metrics?format=prometheus",
        "/_/dashboard",
        "/_/health",
    ] {
        assert_eq!(status_of(&server, path).await, 200, "{path}");
    }
    let second = get_json(&server, "/_/stats").await;
    for key in [
        "totalRequests",
        "hits",
        "misses",
        "evictions",
        "totalWorkersCreated",
        "activeWorkers",
    ] {
        assert_eq!(first["pool"][key], second["pool"][key], "{key}");
    }
    // Everything but the rates, whose window moves with the clock, and the guest CPU, which guest threads settle
    // a moment after the call (when they next read their CPU clock): it may only have grown.
    let without_rate = |stats: &Value| {
        let mut apps = stats["apps"].clone();
        let app = apps["lab@1.0.0"].as_object_mut().unwrap();
        for key in ["requestsPerSecond", "cpuPercent", "cpuSeconds"] {
            app.remove(key);
        }
        apps
    };
    assert_eq!(without_rate(&first), without_rate(&second));
    let cpu = |stats: &Value| stats["apps"]["lab@1.0.0"]["cpuSeconds"].as_f64().unwrap();
    assert!(cpu(&second) >= cpu(&first));
    let requests = |stats: &Value| -> Vec<Value> {
        stats["workers"]
            .as_object()
            .unwrap()
            .values()
            .map(|w| w["requestCount"].clone())
            .collect()
    };
    assert_eq!(requests(&first), requests(&second));
}

#[tokio::test]
async fn requests_per_second_covers_the_recent_window_not_the_whole_life() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    for _ in 0..20 {
        status_of(&server, "/lab/count").await;
    }
    let busy = get_json(&server, "/_/metrics").await;
    assert!(busy["requestsPerSecond"].as_f64().unwrap() > 0.0, "{busy}");
    tokio::time::sleep(marina::metrics::WINDOW + Duration::from_millis(2500)).await;
    let quiet = get_json(&server, "/_/metrics").await;
    assert_eq!(quiet["totalRequests"], 20);
    assert_eq!(quiet["requestsPerSecond"], 0.0, "{quiet}");
    assert_eq!(
        quiet["latencyMs"]["p99"],
        Value::Null,
        "no latency without requests in the window"
    );
    assert!(quiet["windowSeconds"].as_f64().unwrap() >= 10.0);
}

/// One server-sent event: its fields, and when it arrived.
#[derive(Debug)]
struct Frame {
    event: Option<String>,
    id: Option<u64>,
    retry: Option<u64>,
    data: Option<Value>,
    comment: bool,
    at: Instant,
}

/// An open `/_/sse` response, read frame by frame.
struct Subscriber {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Subscriber {
    async fn open(server: &TestServer, query: &str) -> Subscriber {
        let response = client()
            .get(server.url(&format!("/_/sse{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Subscriber {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next frame, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(text.trim_end_matches('\n')));
            }
            // Longer than the keep-alive interval: an open stream sends something within it.
            let limit = marina::routes::sse::KEEP_ALIVE + Duration::from_secs(5);
            let chunk = tokio::time::timeout(limit, self.body.next())
                .await
                .expect("a frame or a keep-alive within the keep-alive interval")?
                .ok()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next `metrics` event, skipping keep-alive comments.
    async fn event(&mut self) -> Frame {
        loop {
            let frame = self.next().await.expect("the stream is open");
            if !frame.comment {
                return frame;
            }
        }
    }
}

fn parse_frame(text: &str) -> Frame {
    let mut frame = Frame {
        event: None,
        id: None,
        retry: None,
        data: None,
        comment: false,
        at: Instant::now(),
    };
    for line in text.lines() {
        let (field, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("a field without a colon: {line:?}"));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => frame.comment = true,
            "event" => frame.event = Some(value.to_owned()),
            "id" => frame.id = Some(value.parse().expect("a numeric id")),
            "retry" => frame.retry = Some(value.parse().expect("retry in milliseconds")),
            "data" => {
                assert!(frame.data.is_none(), "the stats come as one data line");
                frame.data = Some(serde_json::from_str(value).expect("data is JSON"));
            }
            _ => panic!("an unexpected field {field:?}"),
        }
    }
    frame
}

#[tokio::test]
async fn sse_frames_are_well_formed_and_arrive_each_interval() {
    let _machine = crate::timed().await; // frames 0.2-5 s apart
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    status_of(&server, "/lab/count").await;
    let mut every_second = Subscriber::open(&server, "").await;
    let mut every_two = Subscriber::open(&server, "?interval=2").await;
    let frames = [
        every_second.event().await,
        every_second.event().await,
        every_second.event().await,
    ];
    assert_eq!(frames[0].retry, Some(2000), "the first frame sets the reconnect delay");
    for frame in &frames {
        assert_eq!(frame.event.as_deref(), Some("metrics"));
        let data = frame.data.as_ref().unwrap();
        assert_eq!(data["apps"]["lab@1.0.0"]["requests"], 1, "{data}");
        assert!(data["pool"]["uptimeMs"].is_u64() && data["workers"].is_object());
    }
    let ids: Vec<u64> = frames.iter().map(|f| f.id.unwrap()).collect();
    assert!(
        ids.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "ids rise by one each second: {ids:?}"
    );
    // Loose bounds: a tick a second, not a burst, whatever else the machine is doing.
    for pair in frames.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap > Duration::from_millis(200) && gap < Duration::from_secs(5),
            "{gap:?}"
        );
    }
    let (a, b) = (every_two.event().await, every_two.event().await);
    assert_eq!(b.id.unwrap() - a.id.unwrap(), 2, "?interval=2 sends every other tick");

    for bad in ["0", "61", "1.5", "x"] {
        let response = client()
            .get(server.url(&format!("/_/sse?interval={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "bad_query");
    }
}

#[tokio::test]
async fn a_quiet_sse_stream_sends_keep_alive_comments() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let mut subscriber = Subscriber::open(&server, "?interval=60").await;
    let first = subscriber.event().await;
    assert_eq!(
        first.event.as_deref(),
        Some("metrics"),
        "the first frame comes at the first tick"
    );
    // The next event is a minute away; a comment must come first, within the keep-alive interval.
    let next = subscriber.next().await.expect("the stream stays open");
    assert!(next.comment && next.event.is_none(), "{next:?}");
    assert!(next.at - first.at <= marina::routes::sse::KEEP_ALIVE + Duration::from_secs(2));
}

async fn sse_clients(server: &TestServer) -> u64 {
    count(&get_json(server, "/_/metrics").await["sseClients"])
}

#[tokio::test]
async fn a_disconnected_sse_client_is_dropped_and_many_cost_one_snapshot_per_tick() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let mut subscribers = Vec::new();
    for _ in 0..20 {
        subscribers.push(Subscriber::open(&server, "").await);
    }
    for subscriber in &mut subscribers {
        subscriber.event().await;
    }
    // Every snapshot is counted, by whatever takes it (these two reads included): 20 subscribers that each took
    // their own would show 20 a tick.
    let snapshots = async || prometheus(&server).await.1["marina_snapshots_total"];
    let built_before = snapshots().await;
    let started = Instant::now();
    for subscriber in &mut subscribers {
        subscriber.event().await;
        subscriber.event().await;
    }
    let built = snapshots().await - built_before - 1.0;
    let ticks = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(built <= ticks, "{built} snapshots in {ticks} ticks for 20 subscribers");
    assert_eq!(sse_clients(&server).await, 20);

    subscribers.truncate(5);
    eventually(
        Duration::from_secs(10),
        "dropping disconnected subscribers",
        async || (sse_clients(&server).await == 5).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_until_one_closes() {
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let mut open = Vec::new();
    for _ in 0..marina::routes::sse::MAX_CLIENTS {
        open.push(Subscriber::open(&server, "").await);
    }
    let refused = client().get(server.url("/_/sse")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");
    assert_eq!(
        count(&get_json(&server, "/_/metrics").await["sseClients"]),
        open.len() as u64
    );

    open.pop();
    eventually(Duration::from_secs(10), "freeing a closed stream's place", async || {
        let response = client().get(server.url("/_/sse")).send().await.unwrap();
        (response.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_completes_while_sse_clients_are_connected() {
    let _machine = crate::timed().await; // shut down within 10 s
    let (_apps, server) = lab(json!({"ttl": 60}), 4).await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut subscriber = Subscriber::open(&server, "").await;
        subscriber.event().await;
        subscribers.push(subscriber);
    }
    // The drain timeout is 30 s: finishing well before it means the streams ended rather than being cut off.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("shutdown does not wait on SSE streams");
    assert!(started.elapsed() < Duration::from_secs(10));
    for subscriber in &mut subscribers {
        while let Some(frame) = subscriber.next().await {
            assert!(frame.comment || frame.event.is_some());
        }
    }
}

/// Headless Chromium driven over WebDriver (chromedriver, from Debian's `chromium-driver`): the few commands the
/// dashboard test needs, as plain W3C WebDriver requests.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver runs (apt-get install -y chromium chromium-driver; .ci/run does)");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while client().get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // As root, Chromium needs --no-sandbox; the rest keeps it from reaching for the network at start.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let created: Value = client()
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            _profile: profile,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = client().request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(answer["value"]["error"].is_null(), "WebDriver {path}: {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.command(reqwest::Method::POST, "/execute/sync", Some(body)).await
    }

    async fn text(&self, id: &str) -> String {
        let value = self
            .eval(&format!("return document.getElementById('{id}').textContent"))
            .await;
        value.as_str().unwrap_or_default().trim().to_owned()
    }

    /// Polls `check` on the page until it holds, for at most `limit`.
    async fn wait_for(&self, limit: Duration, what: &str, check: impl AsyncFn(&Browser) -> bool) {
        let what = format!("the dashboard showing {what}");
        eventually(limit, &what, async || check(self).await.then_some(())).await;
    }

    async fn events(&self) -> u64 {
        let value = self.eval("return document.body.dataset.events").await;
        value.as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let png = self.command(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; then the driver goes.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async { client().delete(url).send().await.ok() });
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A number as the dashboard shows it (`12,345.6`).
fn number(text: &str) -> Option<f64> {
    text.replace(',', "").parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_under_load_and_reconnects_after_a_restart() {
    let _machine = crate::heavy().await; // a browser, and requests for 4 s
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"ttl": 60}));
    let options = || {
        let mut options = ServeOptions::new(apps.path());
        options.drain_timeout = Duration::from_secs(5);
        options
    };
    let server = TestServer::start_with(options()).await;
    let addr = server.addr;
    let browser = Browser::start().await;
    browser.open(&server.url("/_/dashboard")).await;
    browser
        .wait_for(Duration::from_secs(15), "the live status", async |b| {
            b.text("status").await == "live"
        })
        .await;
    assert_eq!(browser.text("total-requests").await, "0");
    assert_eq!(
        browser.text("pool-size").await,
        marina::backends::wasm::pool::DEFAULT_POOL_SIZE.to_string()
    );

    // Load for a few seconds: the numbers on the page move.
    let load = {
        let url = server.url("/lab/slow?ms=2");
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(4);
            let mut sent = 0u64;
            while Instant::now() < until {
                assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
                sent += 1;
            }
            sent
        })
    };
    browser
        .wait_for(Duration::from_secs(15), "requests per second", async |b| {
            number(&b.text("rps").await).is_some_and(|rps| rps > 0.0)
        })
        .await;
    let sent = load.await.unwrap();
    browser
        .wait_for(Duration::from_secs(15), "every request in the total", async |b| {
            b.text("total-requests").await.replace(',', "") == sent.to_string()
        })
        .await;
    let p50 = browser.text("p50").await;
    assert!(number(&p50).is_some_and(|ms| ms > 0.0), "p50 {p50:?}");
    let rows = browser
        .eval("return document.querySelector('#apps-table tbody').textContent")
        .await;
    assert!(rows.as_str().unwrap().contains("lab@1.0.0"), "{rows}");
    let workers = browser
        .eval("return document.querySelectorAll('#workers-table tbody tr').length")
        .await;
    assert!(workers.as_u64().unwrap() >= 1);
    let drawn = browser
        .eval("const c = document.getElementById('rps-chart'); return c.width > 0 && c.toDataURL().length > 1000")
        .await;
    assert_eq!(drawn, true, "the requests/s chart is drawn");
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts/dashboard.png");
    browser.screenshot(&artifact).await;

    // A restart on the same port: the page notices, then picks the stream up again by itself.
    server.stop().await;
    browser
        .wait_for(Duration::from_secs(15), "the lost connection", async |b| {
            b.text("status").await == "reconnecting"
        })
        .await;
    let before = browser.events().await;
    let restarted = TestServer::start_on(addr, options()).await;
    browser
        .wait_for(Duration::from_secs(20), "events from the restarted server", async |b| {
            b.text("status").await == "live" && b.events().await > before
        })
        .await;
    assert_eq!(browser.text("total-requests").await, "0", "the new server's numbers");
    restarted.stop().await;
}
