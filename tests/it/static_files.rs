//! Static apps: content types, conditional and range requests, precompressed files, the SPA fallback, and every
//! way a request might try to read outside the app's directory.

use crate::common::{client, raw_get, AppsDir, TestServer};
use reqwest::header;

fn site() -> AppsDir {
    let apps = AppsDir::new();
    apps.write("site/1.0.0/index.html", "<h1>home</h1>");
    apps.write("site/1.0.0/app.js", "console.log('hi')");
    apps.write("site/1.0.0/style.css", "body{}");
    apps.write("site/1.0.0/data.bin", (0u8..=255).collect::<Vec<u8>>());
    apps.write("site/1.0.0/docs/index.html", "<h1>docs</h1>");
    apps.write("site/1.0.0/big.txt", "x".repeat(10_000));
    apps.write("site/1.0.0/big.txt.gz", "gzip bytes");
    apps.write("site/1.0.0/big.txt.br", "brotli bytes");
    apps.write("site/1.0.0/.env", "SECRET=1");
    apps.write("site/1.0.0/.well-known/security.txt", "Contact: x");
    apps.write("site/1.0.0/worker.config.json", r#"{"env": {"SECRET": "hunter2"}}"#);
    apps.write("secret/1.0.0/index.html", "<h1>another app</h1>");
    apps.write("outside.txt", "outside the apps");
    apps
}

#[tokio::test]
async fn files_are_served_with_a_content_type_by_extension() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    for (path, content_type) in [
        ("/site/", "text/html"),
        ("/site/index.html", "text/html"),
        ("/site/app.js", "text/javascript"),
        ("/site/style.css", "text/css"),
        ("/site/data.bin", "application/octet-stream"),
        ("/site/.well-known/security.txt", "text/plain"),
    ] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(response.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
    }
    let bytes = client()
        .get(server.url("/site/data.bin"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.to_vec(), (0u8..=255).collect::<Vec<u8>>());
}

#[tokio::test]
async fn a_matching_etag_or_date_answers_304_and_a_stale_one_200() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let first = client().get(server.url("/site/app.js")).send().await.unwrap();
    let etag = first.headers()[header::ETAG].to_str().unwrap().to_owned();
    let modified = first.headers()[header::LAST_MODIFIED].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let get = |name: header::HeaderName, value: &str| client().get(server.url("/site/app.js")).header(name, value);
    let response = get(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(response.status(), 304);
    assert_eq!(response.headers()[header::ETAG], etag.as_str());
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(
        get(header::IF_NONE_MATCH, &format!("W/{etag}"))
            .send()
            .await
            .unwrap()
            .status(),
        304
    );
    assert_eq!(
        get(header::IF_NONE_MATCH, &format!("\"other\", {etag}"))
            .send()
            .await
            .unwrap()
            .status(),
        304
    );
    assert_eq!(
        get(header::IF_NONE_MATCH, "\"other\"").send().await.unwrap().status(),
        200
    );
    assert_eq!(
        get(header::IF_MODIFIED_SINCE, &modified).send().await.unwrap().status(),
        304
    );
    assert_eq!(
        get(header::IF_MODIFIED_SINCE, "Thu, 01 Jan 1970 00:00:00 GMT")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // If-None-Match wins over If-Modified-Since when both are sent.
    let response = client()
        .get(server.url("/site/app.js"))
        .header(header::IF_NONE_MATCH, "\"other\"")
        .header(header::IF_MODIFIED_SINCE, &modified)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn an_edited_file_gets_a_new_etag() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let etag_of = || async {
        let response = client().get(server.url("/site/style.css")).send().await.unwrap();
        response.headers()[header::ETAG].to_str().unwrap().to_owned()
    };
    let before = etag_of().await;
    apps.write("site/1.0.0/style.css", "body{color:red}");
    assert_ne!(etag_of().await, before);
}

#[tokio::test]
async fn byte_ranges_answer_206_and_unsatisfiable_ones_416() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let range = |value: &str| {
        client()
            .get(server.url("/site/data.bin"))
            .header(header::RANGE, value.to_owned())
    };

    let response = range("bytes=10-19").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes 10-19/256");
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "10");
    assert_eq!(
        response.bytes().await.unwrap().to_vec(),
        (10u8..20).collect::<Vec<u8>>()
    );

    let response = range("bytes=-6").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes 250-255/256");

    let response = range("bytes=200-").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().await.unwrap().len(), 56);

    let response = range("bytes=300-400").send().await.unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */256");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["code"],
        "range_not_satisfiable"
    );

    // Malformed ranges and several ranges are ignored, as RFC 9110 allows: the whole file.
    for ignored in ["bytes=abc", "lines=1-2", "bytes=0-1,5-6"] {
        let response = range(ignored).send().await.unwrap();
        assert_eq!(response.status(), 200, "{ignored}");
        assert_eq!(response.bytes().await.unwrap().len(), 256, "{ignored}");
    }
}

#[tokio::test]
async fn if_range_applies_the_range_only_while_the_file_is_unchanged() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let first = client().get(server.url("/site/data.bin")).send().await.unwrap();
    let etag = first.headers()[header::ETAG].to_str().unwrap().to_owned();
    let modified = first.headers()[header::LAST_MODIFIED].to_str().unwrap().to_owned();
    let with_if_range = |value: &str| {
        client()
            .get(server.url("/site/data.bin"))
            .header(header::RANGE, "bytes=0-9")
            .header(header::IF_RANGE, value.to_owned())
    };
    assert_eq!(with_if_range(&etag).send().await.unwrap().status(), 206);
    assert_eq!(with_if_range(&modified).send().await.unwrap().status(), 206);
    assert_eq!(with_if_range("\"stale\"").send().await.unwrap().status(), 200);
    assert_eq!(
        with_if_range(&format!("W/{etag}")).send().await.unwrap().status(),
        200,
        "weak tags never match"
    );
}

#[tokio::test]
async fn head_answers_the_headers_of_get_without_a_body() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let response = client().head(server.url("/site/data.bin")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "256");
    assert!(response.headers().contains_key(header::ETAG));
    assert!(response.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_precompressed_sibling_is_served_when_the_client_accepts_it() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let with_encoding = |value: &str| {
        client()
            .get(server.url("/site/big.txt"))
            .header(header::ACCEPT_ENCODING, value.to_owned())
    };

    let response = with_encoding("gzip, br").send().await.unwrap();
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "br");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
    assert_eq!(response.headers()[header::VARY], "accept-encoding");
    let br_etag = response.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert_eq!(response.text().await.unwrap(), "brotli bytes");

    let response = with_encoding("gzip").send().await.unwrap();
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
    assert_ne!(
        response.headers()[header::ETAG].to_str().unwrap(),
        br_etag,
        "each encoding has its own tag"
    );
    assert_eq!(response.text().await.unwrap(), "gzip bytes");

    let response = with_encoding("identity").send().await.unwrap();
    assert!(!response.headers().contains_key(header::CONTENT_ENCODING));
    assert_eq!(response.headers()[header::VARY], "accept-encoding");
    assert_eq!(response.text().await.unwrap().len(), 10_000);
}

#[tokio::test]
async fn unknown_paths_without_an_extension_fall_back_to_the_entrypoint() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    for path in ["/site/dashboard", "/site/users/42/edit"] {
        let response = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.text().await.unwrap(), "<h1>home</h1>", "{path}");
    }
    let response = client().get(server.url("/site/missing.png")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["code"], "not_found");
}

#[tokio::test]
async fn a_directory_serves_its_index_under_a_trailing_slash() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let response = client().get(server.url("/site/docs")).send().await.unwrap();
    assert_eq!(response.status(), 308);
    assert_eq!(response.headers()[header::LOCATION], "docs/");
    let response = client().get(server.url("/site/docs/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "<h1>docs</h1>");
}

#[tokio::test]
async fn static_apps_answer_only_get_and_head() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let response = client()
        .post(server.url("/site/index.html"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
}

#[tokio::test]
async fn no_traversal_attempt_reads_outside_the_app() {
    let apps = site();
    let server = TestServer::start(&apps.path()).await;
    let attempts = [
        "/site/../secret/1.0.0/index.html",
        "/site/../../outside.txt",
        "/site/%2e%2e/%2e%2e/outside.txt",
        "/site/%2E%2E/%2E%2E/outside.txt",
        "/site/..%2f..%2foutside.txt",
        "/site/%2e%2e%2f%2e%2e%2foutside.txt",
        "/site/docs/../../../outside.txt",
        "/site/..%5c..%5coutside.txt",
        "/site/%252e%252e/%252e%252e/outside.txt",
        "/site//etc/passwd",
        "/site/%2fetc%2fpasswd",
        "/site/%00/../index.html",
        "/site/.env",
        "/site/%2eenv",
        "/site/worker.config.json",
    ];
    for target in attempts {
        let response = raw_get(server.addr, target).await;
        assert_eq!(response.status, 404, "{target}: {}", response.text());
        let body = response.text();
        for secret in ["outside the apps", "another app", "hunter2", "SECRET=1", "root:"] {
            assert!(!body.contains(secret), "{target} leaked {secret:?}");
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_symlink_that_points_out_of_the_app_is_404_and_one_inside_is_served() {
    let apps = site();
    let version = apps.path().join("site/1.0.0");
    std::os::unix::fs::symlink(apps.path().join("outside.txt"), version.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink("/etc", version.join("etc")).unwrap();
    std::os::unix::fs::symlink(version.join("app.js"), version.join("alias.js")).unwrap();
    std::os::unix::fs::symlink(&version, version.join("here")).unwrap();
    std::os::unix::fs::symlink(version.join("worker.config.json"), version.join("config.txt")).unwrap();
    let server = TestServer::start(&apps.path()).await;
    for target in [
        "/site/escape.txt",
        "/site/etc/passwd",
        "/site/etc/",
        "/site/here/worker.config.json",
        "/site/config.txt",
    ] {
        let response = raw_get(server.addr, target).await;
        assert_eq!(response.status, 404, "{target}");
        assert!(
            !response.text().contains("outside the apps") && !response.text().contains("root:"),
            "{target}"
        );
    }
    let response = client().get(server.url("/site/alias.js")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "console.log('hi')");
}

#[tokio::test]
async fn a_nested_entrypoint_serves_from_its_own_directory_only() {
    let apps = AppsDir::new();
    apps.write("spa/1.0.0/public/index.html", "<h1>spa</h1>");
    apps.write("spa/1.0.0/public/main.js", "main");
    apps.write("spa/1.0.0/server-only.txt", "private");
    let server = TestServer::start(&apps.path()).await;
    assert_eq!(
        client()
            .get(server.url("/spa/main.js"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "main"
    );
    assert_eq!(raw_get(server.addr, "/spa/../server-only.txt").await.status, 404);
    assert_eq!(raw_get(server.addr, "/spa/server-only.txt").await.status, 404);
}
