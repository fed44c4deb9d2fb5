//! Hot reload: versions and apps added, removed and edited while the server runs.

use std::time::{Duration, Instant};

use crate::common::{client, AppsDir, TestServer};
use futures_util::StreamExt;

/// The promise in the README: a change on disk is visible to new requests within this long.
const RELOAD_PROMISE: Duration = Duration::from_secs(2);

/// Polls `path` until it answers `status` with a body containing `text`, or the promise runs out.
async fn served_within_promise(server: &TestServer, path: &str, status: u16, text: &str) {
    let deadline = Instant::now() + RELOAD_PROMISE;
    let mut last = (0, String::new());
    while Instant::now() < deadline {
        let response = client().get(server.url(path)).send().await.unwrap();
        last = (response.status().as_u16(), response.text().await.unwrap());
        if last.0 == status && last.1.contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{path} did not answer {status} with {text:?} within {RELOAD_PROMISE:?}; last answer: {last:?}");
}

#[tokio::test]
async fn a_version_added_while_running_is_served_within_two_seconds() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let server = TestServer::start(&apps.path()).await;
    served_within_promise(&server, "/hello/", 200, "hello 1.0.0").await;

    apps.static_version("hello", "1.1.0");
    served_within_promise(&server, "/hello/", 200, "hello 1.1.0").await;
    served_within_promise(&server, "/hello@1.0.0/", 200, "hello 1.0.0").await;
}

#[tokio::test]
async fn an_app_added_while_running_is_served_and_a_removed_one_is_gone() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let server = TestServer::start(&apps.path()).await;

    apps.static_version("fresh", "0.1.0");
    served_within_promise(&server, "/fresh/", 200, "fresh 0.1.0").await;

    std::fs::remove_dir_all(apps.path().join("fresh")).unwrap();
    served_within_promise(&server, "/fresh/", 404, "app_not_found").await;
    served_within_promise(&server, "/hello/", 200, "hello 1.0.0").await;
}

#[tokio::test]
async fn a_removed_version_stops_resolving_and_the_next_best_takes_over() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.static_version("hello", "1.1.0");
    let server = TestServer::start(&apps.path()).await;
    served_within_promise(&server, "/hello@1/", 200, "hello 1.1.0").await;

    std::fs::remove_dir_all(apps.path().join("hello/1.1.0")).unwrap();
    served_within_promise(&server, "/hello@1.1.0/", 404, "version_not_found").await;
    served_within_promise(&server, "/hello@1/", 200, "hello 1.0.0").await;
}

#[tokio::test]
async fn an_edited_config_applies_to_new_requests() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.write("hello/1.0.0/other.html", "<h1>other entrypoint</h1>");
    let server = TestServer::start(&apps.path()).await;

    apps.write("hello/1.0.0/worker.config.json", r#"{"timeout": "soon"}"#);
    served_within_promise(&server, "/hello/", 503, "field `timeout`").await;

    apps.write("hello/1.0.0/worker.config.json", r#"{"entrypoint": "other.html"}"#);
    served_within_promise(&server, "/hello/some/route", 200, "other entrypoint").await;
}

#[tokio::test]
async fn an_in_flight_download_finishes_when_its_version_is_removed() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let size = 32 * 1024 * 1024;
    apps.write("hello/1.0.0/big.bin", vec![7u8; size]);
    let server = TestServer::start(&apps.path()).await;

    let response = client().get(server.url("/hello/big.bin")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().len();

    std::fs::remove_dir_all(apps.path().join("hello")).unwrap();
    served_within_promise(&server, "/hello/", 404, "app_not_found").await;

    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.iter().all(|&b| b == 7));
        received += chunk.len();
    }
    assert_eq!(received, size);
}

#[tokio::test]
async fn serving_and_compiling_files_does_not_count_as_a_change() {
    // inotify reports opens and reads too; if those counted, every rescan (which reads the configs) would schedule
    // the next one, forever.
    let apps = AppsDir::new();
    apps.static_version("site", "1.0.0");
    apps.write("site/1.0.0/worker.config.json", "{}");
    apps.component("hello", "1.0.0", "hello", serde_json::json!({}));
    let marina = crate::common::MarinaProcess::serve(&apps.path(), &[]);
    for path in ["/site/", "/hello/", "/site/", "/hello/"] {
        assert_eq!(client().get(marina.url(path)).send().await.unwrap().status(), 200);
    }
    let rescans = marina
        .drain_log(Duration::from_millis(1500))
        .into_iter()
        .filter(|e| e["message"] == "app reloaded")
        .count();
    assert_eq!(rescans, 0, "nothing changed on disk");
}
