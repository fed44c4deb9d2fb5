//! What a worker can see and reach: only its config's env, only its own version directory (read-only), and
//! outbound HTTP only to the hosts its config lists. Also the request-body limit and streaming through a worker.

use std::time::Duration;

use crate::common::{bodies_over_1000_bytes_answer_413, client, says_hi_upstream, AppsDir, MarinaProcess, TestServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn get_json(server: &TestServer, path: &str) -> (u16, Value) {
    let response = client().get(server.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn a_worker_sees_only_its_config_env_and_its_identity_never_the_hosts_environment() {
    let apps = AppsDir::new();
    apps.component("lab", "1.2.3", "lab", json!({"env": {"GREETING": "hi", "EMPTY": ""}}));
    let server = TestServer::start(&apps.path()).await;
    assert!(std::env::var("PATH").is_ok(), "the host has an environment to leak");
    let (status, env) = get_json(&server, "/lab/env").await;
    assert_eq!(status, 200);
    assert_eq!(
        env,
        json!({"GREETING": "hi", "EMPTY": "", "MARINA_APP": "lab", "MARINA_VERSION": "1.2.3"})
    );
}

#[tokio::test]
async fn a_worker_sees_its_version_directory_read_only_as_its_whole_filesystem() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({}));
    apps.write("lab/1.0.0/data/notes.txt", "version-local data");
    apps.write("other/1.0.0/secret.txt", "another app's file");
    let server = TestServer::start(&apps.path()).await;

    let (_, root) = get_json(&server, "/lab/fs?path=/").await;
    let mut names: Vec<String> = serde_json::from_value(root["dir"].clone()).unwrap();
    names.sort();
    assert_eq!(names, ["app.wasm", "data", "worker.config.json"]);
    let (_, file) = get_json(&server, "/lab/fs?path=/data/notes.txt").await;
    assert_eq!(file["file"], "version-local data");

    for escape in [
        "/../other/1.0.0/secret.txt",
        "/../../other/1.0.0/secret.txt",
        "/etc/passwd",
        "../../..",
    ] {
        let (_, seen) = get_json(&server, &format!("/lab/fs?path={escape}")).await;
        assert!(
            seen.get("error").is_some() || seen["dir"] == root["dir"],
            "{escape} escaped: {seen}"
        );
        assert_ne!(seen["file"], "another app's file");
    }

    let response = client()
        .get(server.url("/lab/write?path=/new.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "writing fails inside the guest");
    assert!(!apps.path().join("lab/1.0.0/new.txt").exists());
}

#[tokio::test]
async fn outbound_http_is_denied_unless_the_host_is_allowed() {
    let upstream = says_hi_upstream().await;
    let apps = AppsDir::new();
    apps.component("closed", "1.0.0", "lab", json!({}));
    apps.component(
        "open",
        "1.0.0",
        "lab",
        json!({"allowedOutboundHosts": [format!("127.0.0.1:{}", upstream.port())]}),
    );
    apps.component(
        "other-port",
        "1.0.0",
        "lab",
        json!({"allowedOutboundHosts": ["127.0.0.1:1"]}),
    );
    let server = TestServer::start(&apps.path()).await;
    let url = format!("http://{upstream}/");

    let (status, body) = get_json(&server, &format!("/open/fetch?url={url}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"status": 200, "body": "upstream says hi"}));

    for app in ["closed", "other-port"] {
        let (status, body) = get_json(&server, &format!("/{app}/fetch?url={url}")).await;
        assert_eq!(status, 502, "{app}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("HttpRequestDenied"),
            "{app}: {body}"
        );
    }
}

#[tokio::test]
async fn a_request_body_over_the_limit_answers_413() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"maxBodySize": 1000, "ttl": 60}));
    let server = TestServer::start(&apps.path()).await;

    bodies_over_1000_bytes_answer_413(&server, "/lab/consume").await;

    let within = client()
        .post(server.url("/lab/consume"))
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(within.status(), 200);
    assert_eq!(within.json::<Value>().await.unwrap()["bytes"], 1000);
}

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_100_mb_upload_streams_through_a_worker_and_back_without_the_host_holding_it() {
    let _machine = crate::heavy().await; // 200 MiB through a worker
    let apps = AppsDir::new();
    apps.component(
        "echo",
        "1.0.0",
        "echo",
        json!({"ttl": 60, "timeout": 120, "maxBodySize": 200 * MIB}),
    );
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    // Warm up so that the compiled code and one instance are already counted in the baseline.
    let warm = client().post(marina.url("/echo/")).body("warm").send().await.unwrap();
    assert_eq!(warm.text().await.unwrap(), "warm");
    let before = marina.peak_rss();

    let chunks = futures_util::stream::iter((0..100).map(|i| Ok::<_, std::io::Error>(vec![i as u8; MIB])));
    let response = client()
        .post(marina.url("/echo/"))
        .header("content-type", "application/x-test")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-test");
    let mut stream = response.bytes_stream();
    let mut total = 0usize;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .unwrap()
    {
        let chunk = chunk.unwrap();
        for (offset, byte) in chunk.iter().enumerate() {
            assert_eq!(
                *byte,
                ((total + offset) / MIB) as u8,
                "byte {} came back wrong",
                total + offset
            );
        }
        total += chunk.len();
    }
    assert_eq!(total, 100 * MIB, "every byte came back");
    let grown = marina.peak_rss().saturating_sub(before);
    assert!(
        grown < 40 * MIB as u64,
        "the host's peak memory grew by {} MiB while 100 MiB passed through",
        grown / MIB as u64
    );
}

#[tokio::test]
async fn a_large_response_streams_to_the_client_as_the_guest_writes_it() {
    let _machine = crate::heavy().await; // 64 MiB through a worker
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({"timeout": 60}));
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/lab/stream?mb=64")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, 64 * MIB);
}
