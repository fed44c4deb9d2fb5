//! Versioned apps over HTTP: resolution, errors, invalid configs, internal routes.

use crate::common::{client, raw_get, AppsDir, TestServer};
use serde_json::Value;

/// `hello` with releases, a prerelease and a `v` spelling; `beta` with only prereleases.
fn versioned_apps() -> AppsDir {
    let apps = AppsDir::new();
    for version in ["1.0.0", "1.2.0", "1.2.5", "v1.10.0", "2.0.0", "2.1.0-rc.1"] {
        apps.static_version("hello", version);
    }
    apps.static_version("beta", "0.1.0-alpha.1");
    apps.static_version("beta", "0.1.0-alpha.2");
    apps
}

async fn body_of(server: &TestServer, path: &str) -> (u16, String) {
    let response = client().get(server.url(path)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn each_spec_form_resolves_to_the_documented_version_over_http() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let cases = [
        ("/hello/", "hello 2.0.0"),
        ("/hello@1.2.0/", "hello 1.2.0"),
        ("/hello@v1.2.0/", "hello 1.2.0"),
        ("/hello@1/", "hello v1.10.0"),
        ("/hello@1.2/", "hello 1.2.5"),
        ("/hello@%5E1.2/", "hello v1.10.0"),
        ("/hello@~1.2.0/", "hello 1.2.5"),
        ("/hello@%3E%3D1.0.0%2C%20%3C1.2.5/", "hello 1.2.0"),
        ("/hello@2.1.0-rc.1/", "hello 2.1.0-rc.1"),
        ("/hello@%3E%3D2.1.0-rc.0/", "hello 2.1.0-rc.1"),
        ("/beta/", "beta 0.1.0-alpha.2"),
    ];
    for (path, expected) in cases {
        let (status, body) = body_of(&server, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, format!("<h1>{expected}</h1>"), "{path}");
    }
}

#[tokio::test]
async fn a_spec_with_no_match_is_404_naming_the_app_and_its_versions() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/hello@3/")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "version_not_found");
    assert_eq!(body["app"], "hello");
    assert_eq!(body["spec"], "3");
    assert_eq!(
        body["available"],
        serde_json::json!(["2.1.0-rc.1", "2.0.0", "1.10.0", "1.2.5", "1.2.0", "1.0.0"])
    );
}

#[tokio::test]
async fn an_unknown_app_is_404_and_a_malformed_spec_is_400() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/nope/")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "app_not_found");

    for path in ["/hello@latest/", "/hello@/", "/hello@1.2.3.4/", "/hello@%3E%3Dx/"] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "bad_version_spec", "{path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("is not a version or a semver range"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_static_app_reached_without_a_trailing_slash_is_redirected_under_its_prefix() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/hello@1.2?x=1")).send().await.unwrap();
    assert_eq!(response.status(), 308);
    assert_eq!(response.headers()["location"], "/hello@1.2/?x=1");
}

#[tokio::test]
async fn every_app_answers_health_when_its_version_is_valid() {
    let apps = versioned_apps();
    apps.write("broken/1.0.0/worker.config.json", "{\"ttl\": \"soon\"}");
    apps.write("broken/1.0.0/index.html", "x");
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(body_of(&server, "/hello@1/health").await, (200, "OK".to_owned()));
    assert_eq!(body_of(&server, "/hello/health").await, (200, "OK".to_owned()));
    assert_eq!(body_of(&server, "/broken/health").await.0, 503);
}

#[tokio::test]
async fn an_invalid_config_answers_503_with_its_error_while_other_apps_keep_working() {
    let apps = versioned_apps();
    apps.write("broken/1.0.0/index.html", "x");
    apps.write("broken/1.0.0/worker.config.json", "{\"timeout\": 5, \"maxRequest\": 3}");
    let server = TestServer::start(&apps.path()).await;

    let response = client().get(server.url("/broken/")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "invalid_version");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("broken/1.0.0: worker.config.json: unknown field `maxRequest`"),
        "{error}"
    );
    assert!(
        error.contains("maxRequests"),
        "the message lists the expected fields: {error}"
    );

    assert_eq!(body_of(&server, "/hello@1.0.0/").await.0, 200);
}

#[tokio::test]
async fn a_wasm_file_that_is_not_a_component_answers_503_naming_the_problem_and_other_apps_still_answer() {
    let apps = AppsDir::new();
    apps.write("svc/1.0.0/app.wasm", b"\0asm");
    apps.static_version("site", "1.0.0");
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/svc/anything")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "worker_failed");
    assert_eq!(body["app"], "svc");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("svc@1.0.0 cannot start a worker"), "{error}");
    assert!(error.contains("not a valid WebAssembly component"), "{error}");
    let health = client().get(server.url("/svc/health")).send().await.unwrap();
    assert_eq!(health.status(), 503, "health reports that no worker can be had");
    assert_eq!(body_of(&server, "/site/").await.0, 200);
}

#[tokio::test]
async fn a_command_or_a_core_module_answers_503_naming_what_it_is_and_what_marina_serves() {
    let apps = AppsDir::new();
    apps.component("cmd", "1.0.0", "command", serde_json::json!({}));
    apps.write("core/1.0.0/app.wasm", b"\0asm\x01\0\0\0");
    let server = TestServer::start(&apps.path()).await;
    for (app, what) in [
        ("cmd", "it is a command (it exports wasi:cli/run@0.2."),
        ("core", "it is a core WebAssembly module, not a component"),
    ] {
        let response = client().get(server.url(&format!("/{app}/"))).send().await.unwrap();
        assert_eq!(response.status(), 503);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "worker_failed");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(&format!("{app}@1.0.0 cannot start a worker")), "{error}");
        assert!(error.contains(what), "{error}");
        assert!(error.contains("wasi:http/incoming-handler@0.2.x"), "{error}");
    }
}

#[tokio::test]
async fn deployments_lists_apps_versions_kinds_configs_and_errors() {
    let apps = versioned_apps();
    apps.write("svc/1.0.0/app.wasm", b"\0asm");
    apps.write(
        "svc/1.0.0/worker.config.json",
        r#"{"ttl": 60, "env": {"API_KEY": "hunter2"}}"#,
    );
    apps.write("svc/0.9.0/index.wasm", b"\0asm");
    apps.write("svc/0.9.0/worker.config.json", "{not json");
    apps.write("svc/notes/readme.txt", "");
    apps.write("_private/1.0.0/index.html", "");
    let server = TestServer::start(&apps.path()).await;

    let body: Value = client()
        .get(server.url("/_/deployments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<_> = body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["beta", "hello", "svc"]);
    let svc = &body["apps"][2];
    let good = &svc["versions"][0];
    assert_eq!(good["version"], "1.0.0");
    assert_eq!(good["kind"], "wasm");
    assert_eq!(good["entrypoint"], "app.wasm");
    assert_eq!(good["config"]["ttl"], 60);
    assert_eq!(good["config"]["timeout"], 30, "defaults are filled in");
    assert_eq!(
        good["config"]["env"]["API_KEY"], "<redacted>",
        "env values are never listed"
    );
    assert_eq!(good["error"], Value::Null);
    let bad = &svc["versions"][1];
    let error = bad["error"].as_str().unwrap();
    assert_eq!(
        error,
        "svc/0.9.0: worker.config.json: key must be a string at line 1 column 2"
    );
    assert_eq!(
        svc["ignored"][0],
        "svc/notes: not a semver version (like 1.2.3 or v1.2.3), ignored"
    );
    assert!(body["ignored"][0].as_str().unwrap().contains("reserved"));
    assert_eq!(body["apps"][1]["versions"][0]["kind"], "static");
}

#[tokio::test]
async fn internal_routes_report_liveness_and_readiness_and_unknown_ones_are_404() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(
        body_of(&server, "/_/health").await,
        (200, r#"{"status":"ok"}"#.to_owned())
    );
    assert_eq!(
        body_of(&server, "/_/ready").await,
        (200, r#"{"status":"ready"}"#.to_owned())
    );
    for path in ["/_", "/_/", "/_/nope", "/_/health/extra"] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.json::<Value>().await.unwrap()["code"], "no_route", "{path}");
    }
    let (status, body) = body_of(&server, "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("name an app in the path"), "{body}");
}

#[tokio::test]
async fn an_overlong_request_target_is_414_with_a_json_error() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let response = raw_get(server.addr, &format!("/hello/{}", "a".repeat(10_000))).await;
    assert_eq!(response.status, 414);
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["code"], "uri_too_long");
}

#[tokio::test]
async fn oversized_headers_are_refused_without_hurting_the_server() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let request = format!(
        "GET /hello/ HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100_000)
    );
    let response = crate::common::raw_request(server.addr, &request).await;
    assert_eq!(response.status, 431);
    assert_eq!(body_of(&server, "/hello@1.0.0/").await.0, 200);
}

#[tokio::test]
async fn garbage_instead_of_http_closes_that_connection_only() {
    let apps = versioned_apps();
    let server = TestServer::start(&apps.path()).await;
    let response = crate::common::raw_request(server.addr, "NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(response.status, 400);
    assert_eq!(body_of(&server, "/hello@1.0.0/").await.0, 200);
}
