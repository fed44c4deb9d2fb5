//! Compiling components: the on-disk cache (reused across restarts, rebuilt when corrupt), `--precompile`, and
//! versions added by hot reload compiling before their first request. Also what workers write to the log.

use std::time::Duration;

use crate::common::{client, AppsDir, MarinaProcess};
use serde_json::{json, Value};

fn is_component_loaded(entry: &Value, app: &str) -> bool {
    entry["message"] == "component loaded" && entry["app"] == app
}

async fn get(marina: &MarinaProcess, path: &str) -> (u16, String) {
    let response = client().get(marina.url(path)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn a_compiled_component_is_reused_from_the_cache_after_a_restart() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();

    let first = MarinaProcess::serve(&apps.path(), &["--cache-dir", cache_dir]);
    assert_eq!(get(&first, "/hello/").await.0, 200);
    let loaded = first
        .wait_log(Duration::from_secs(10), |e| is_component_loaded(e, "hello"))
        .expect("the load is logged");
    assert_eq!(loaded["cached"], false, "the first run compiles");
    drop(first);
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        entries.iter().any(|p| p.extension().is_some_and(|x| x == "cwasm")),
        "{entries:?}"
    );

    let second = MarinaProcess::serve(&apps.path(), &["--cache-dir", cache_dir]);
    assert_eq!(get(&second, "/hello/").await.0, 200);
    let loaded = second
        .wait_log(Duration::from_secs(10), |e| is_component_loaded(e, "hello"))
        .expect("the load is logged");
    assert_eq!(loaded["cached"], true, "the restart loads the cached code: {loaded}");
}

#[tokio::test]
async fn a_corrupted_cache_entry_is_detected_and_rebuilt() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let first = MarinaProcess::serve(&apps.path(), &["--cache-dir", cache_dir, "--precompile"]);
    drop(first);

    let entry = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .expect("an entry was written");
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();

    let second = MarinaProcess::serve(&apps.path(), &["--cache-dir", cache_dir, "--precompile"]);
    let warned = second.startup.iter().any(|e| {
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("compile cache entry is unusable, rebuilding")
    });
    assert!(warned, "the corruption is reported: {:?}", second.startup);
    let loaded = second.startup.iter().find(|e| is_component_loaded(e, "hello")).unwrap();
    assert_eq!(loaded["cached"], false);
    assert_eq!(get(&second, "/hello/").await, (200, "Hello from hello@1.0.0\n".into()));
    drop(second);

    let third = MarinaProcess::serve(&apps.path(), &["--cache-dir", cache_dir, "--precompile"]);
    let loaded = third.startup.iter().find(|e| is_component_loaded(e, "hello")).unwrap();
    assert_eq!(loaded["cached"], true, "the rebuilt entry is sound");
}

#[tokio::test]
async fn precompile_compiles_every_component_before_reporting_ready() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    apps.component("echo", "1.0.0", "echo", json!({}));
    let marina = MarinaProcess::serve(&apps.path(), &["--precompile"]);
    for app in ["hello", "echo"] {
        assert!(
            marina.startup.iter().any(|e| is_component_loaded(e, app)),
            "{app} was compiled before ready: {:?}",
            marina.startup
        );
    }
}

#[tokio::test]
async fn a_version_added_by_hot_reload_compiles_before_its_first_request() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    assert!(
        !marina.startup.iter().any(|e| is_component_loaded(e, "hello")),
        "without --precompile, nothing compiles before the first request"
    );
    apps.component("hello", "1.1.0", "hello", json!({}));
    let others = std::cell::Cell::new(0);
    let loaded = marina
        .wait_log(Duration::from_secs(20), |e| {
            if is_component_loaded(e, "hello") && e["version"] != "1.1.0" {
                others.set(others.get() + 1);
            }
            is_component_loaded(e, "hello") && e["version"] == "1.1.0"
        })
        .expect("the new version is compiled in the background");
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(
        others.get(),
        0,
        "only the added version is compiled, not the untouched 1.0.0"
    );
    assert_eq!(get(&marina, "/hello@1.1.0/").await.0, 200);
}

#[tokio::test]
async fn guest_output_becomes_log_lines_tagged_with_the_app_and_a_flood_is_cut_short() {
    let apps = AppsDir::new();
    apps.component("lab", "1.0.0", "lab", json!({}));
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    assert_eq!(get(&marina, "/lab/print?lines=2").await.0, 200);
    let lines = marina.drain_log(Duration::from_millis(500));
    let guest: Vec<&Value> = lines.iter().filter(|e| e["target"] == "marina::guest").collect();
    let texts: Vec<(&str, &str)> = guest
        .iter()
        .map(|e| (e["stream"].as_str().unwrap(), e["message"].as_str().unwrap()))
        .collect();
    for expected in [
        ("stdout", "lab stdout line 0"),
        ("stdout", "lab stdout line 1"),
        ("stderr", "lab stderr line 0"),
        ("stderr", "lab stderr line 1"),
    ] {
        assert!(texts.contains(&expected), "{expected:?} in {texts:?}");
    }
    assert!(guest.iter().all(|e| e["app"] == "lab" && e["version"] == "1.0.0"));

    assert_eq!(get(&marina, "/lab/print?lines=5000").await.0, 200);
    let lines = marina.drain_log(Duration::from_millis(1000));
    let guest_lines = lines
        .iter()
        .filter(|e| e["target"] == "marina::guest" && e["stream"].is_string())
        .count();
    assert_eq!(guest_lines, 200, "a request logs at most 200 lines of guest output");
    assert!(lines
        .iter()
        .any(|e| e["message"].as_str().unwrap_or("").contains("dropping the rest")));
}

#[tokio::test]
async fn a_trap_is_logged_with_its_message_and_the_app_version() {
    let apps = AppsDir::new();
    apps.component("lab", "2.0.0", "lab", json!({}));
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    let (status, body) = get(&marina, "/lab/panic").await;
    assert_eq!(status, 500, "{body}");
    let panic_line = marina
        .wait_log(Duration::from_secs(5), |e| {
            e["message"].as_str().unwrap_or("").contains("lab asked to panic")
        })
        .expect("the guest's panic message reaches the log");
    assert_eq!(panic_line["app"], "lab");
    let trap = marina
        .wait_log(Duration::from_secs(5), |e| {
            e["message"].as_str().unwrap_or("").starts_with("the worker trapped")
        })
        .expect("the trap is logged");
    assert_eq!(
        (trap["app"].as_str(), trap["version"].as_str()),
        (Some("lab"), Some("2.0.0"))
    );
    assert_eq!(trap["level"], "ERROR");
}

#[tokio::test]
async fn a_pool_too_large_to_reserve_falls_back_to_on_demand_instances_and_says_so() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    // 10,000 slots of 4 memories, each reserving 4 GiB of address space, is more than x86-64 user space holds.
    let marina = MarinaProcess::serve(&apps.path(), &["--pool-size", "10000"]);
    let fallback = marina.startup.iter().any(|e| {
        e["level"] == "WARN"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("falling back to on-demand")
    });
    assert!(fallback, "{:?}", marina.startup);
    let metrics: Value = client()
        .get(marina.url("/_/metrics"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metrics["pooling"], false);
    assert_eq!(metrics["poolSize"], 10000, "the cap still applies");
    assert_eq!(get(&marina, "/hello/").await.0, 200);
}
