//! Proxy rules against real upstreams started here on 127.0.0.1: an axum server that reports what it received,
//! a TLS server with a self-signed certificate, and WebSocket echo servers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{client, AppsDir, MarinaProcess, TestServer};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use marina::server::ServeOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;

/// What the echo upstream saw, as JSON.
async fn report(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut headers = BTreeMap::new();
    for (name, value) in &parts.headers {
        let entry: &mut Vec<String> = headers.entry(name.to_string()).or_default();
        entry.push(value.to_str().unwrap_or("").to_owned());
    }
    // Counted as it streams in, never held.
    let mut stream = body.into_data_stream();
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk.map(|c| c.len()).unwrap_or(0);
    }
    axum::Json(json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("", |pq| pq.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "bytes": bytes,
    }))
    .into_response()
}

/// An HTTP upstream with a few behaviours, on 127.0.0.1:0.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/base/redirect/absolute",
            axum::routing::get(move || async move {
                (
                    StatusCode::FOUND,
                    [(header::LOCATION, format!("http://{addr}/base/landing?x=1"))],
                )
            }),
        )
        .route(
            "/base/redirect/path",
            axum::routing::get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/base/landing")]) }),
        )
        .route(
            "/base/redirect/elsewhere",
            axum::routing::get(|| async { (StatusCode::FOUND, [(header::LOCATION, "http://example.test/x")]) }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/hop",
            axum::routing::get(|| async {
                let mut headers = HeaderMap::new();
                headers.insert(header::CONNECTION, "x-private".parse().unwrap());
                headers.insert("x-private", "secret".parse().unwrap());
                headers.insert("keep-alive", "timeout=5".parse().unwrap());
                headers.insert("x-public", "shown".parse().unwrap());
                (headers, "hop")
            }),
        )
        .route(
            "/trickle",
            axum::routing::get(|| async {
                // Four chunks 400 ms apart: longer in all than a 1 s rule timeout, but never silent that long.
                let chunks = futures_util::stream::iter(0..4u8).then(|i| async move {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<_, std::io::Error>(vec![b'a' + i; 10])
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/stall",
            axum::routing::get(|| async {
                // One chunk, then nothing for 10 s.
                let chunks = futures_util::stream::iter(0..2u8).then(|i| async move {
                    if i == 1 {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    Ok::<_, std::io::Error>(vec![b'x'; 10])
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/big",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::iter((0..100).map(|i| Ok::<_, std::io::Error>(vec![i as u8; MIB])));
                Body::from_stream(chunks)
            }),
        )
        .fallback(report);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A version whose only job is its proxy rules (a static page for everything they do not match).
fn proxied(apps: &AppsDir, app: &str, config: Value) {
    apps.static_version(app, "1.0.0");
    apps.write(&format!("{app}/1.0.0/worker.config.json"), config.to_string());
}

/// The real server on an apps directory of versions that have only proxy rules (`app`, its config).
async fn serve(versions: &[(&str, Value)]) -> (TestServer, AppsDir) {
    let apps = proxied_apps(versions);
    let server = TestServer::start(&apps.path()).await;
    (server, apps)
}

fn proxied_apps(versions: &[(&str, Value)]) -> AppsDir {
    let apps = AppsDir::new();
    for (app, config) in versions {
        proxied(&apps, app, config.clone());
    }
    apps
}

/// Serving cores for the tests that count upstream connections: each core keeps its own (a connection is polled
/// by the core that opened it), so reuse shows as at most this many, whatever the machine's CPU count.
const CORES: usize = 2;

/// [`serve`] on [`CORES`] serving cores.
async fn serve_on_cores(versions: &[(&str, Value)]) -> (TestServer, AppsDir) {
    let apps = proxied_apps(versions);
    let mut options = ServeOptions::new(apps.path());
    options.serving_cores = CORES;
    (TestServer::start_with(options).await, apps)
}

async fn get_json(url: &str) -> Value {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn the_first_matching_rule_wins_and_captures_rewrite_the_path() {
    let up = upstream().await;
    let (server, _apps) = serve(&[(
        "site",
        json!({"proxy": [
            {"pattern": "^/api/v1/(?P<rest>.*)$", "target": format!("http://{up}/v1"), "rewrite": "/$rest"},
            {"pattern": "^/api/(.*)$", "target": format!("http://{up}/"), "rewrite": "/any/${1}"},
            {"pattern": "^/strip", "target": format!("http://{up}"), "rewrite": ""},
            {"pattern": "^/as-is", "target": format!("http://{up}/prefix/")},
        ]}),
    )])
    .await;

    let seen = get_json(&server.url("/site/api/v1/users/7?sort=asc&x=%20")).await;
    assert_eq!(seen["uri"], "/v1/users/7?sort=asc&x=%20", "first rule; query kept");
    let seen = get_json(&server.url("/site@1/api/other")).await;
    assert_eq!(seen["uri"], "/any/other", "second rule");
    let seen = get_json(&server.url("/site/strip/me?q=1")).await;
    assert_eq!(seen["uri"], "/me?q=1", "matched part cut, rest kept");
    let seen = get_json(&server.url("/site/as-is/x")).await;
    assert_eq!(
        seen["uri"], "/prefix/as-is/x",
        "no rewrite: the path under the target's own path"
    );

    // What no rule matches is served by the version itself.
    let page = client().get(server.url("/site/")).send().await.unwrap();
    assert_eq!(page.text().await.unwrap(), "<h1>site 1.0.0</h1>");
}

#[tokio::test]
async fn proxied_requests_carry_forwarding_headers_and_lose_hop_by_hop_ones() {
    let up = upstream().await;
    let (server, _apps) = serve(&[
        (
            "keep",
            json!({"proxy": {"^/": {"target": format!("http://{up}"),
                                "headers": {"X-Api-Key": "k1", "X-Replace": "from-rule"}}}}),
        ),
        (
            "change",
            json!({"proxy": {"^/": {"target": format!("http://{up}"), "changeOrigin": true}}}),
        ),
    ])
    .await;
    let host = server.addr.to_string();

    let seen: Value = client()
        .post(server.url("/keep/form"))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("x-forwarded-for", "10.1.2.3")
        .header("via", "1.0 edge")
        .header("x-replace", "from-client")
        .header("origin", "http://client.test")
        .body("hello")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let headers = &seen["headers"];
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["bytes"], 5);
    for gone in ["x-drop-me", "keep-alive", "te", "proxy-authorization"] {
        assert!(headers.get(gone).is_none(), "{gone} was forwarded: {headers}");
    }
    assert_eq!(headers["host"], json!([host]), "the client's Host is kept");
    assert_eq!(headers["origin"], json!(["http://client.test"]));
    assert_eq!(headers["x-forwarded-for"], json!(["10.1.2.3, 127.0.0.1"]));
    assert_eq!(headers["x-forwarded-proto"], json!(["http"]));
    assert_eq!(headers["x-forwarded-host"], json!([host]));
    assert_eq!(headers["via"], json!(["1.0 edge, 1.1 marina"]));
    assert_eq!(headers["x-api-key"], json!(["k1"]));
    assert_eq!(
        headers["x-replace"],
        json!(["from-rule"]),
        "rule headers are applied last"
    );

    let seen: Value = client()
        .get(server.url("/change/"))
        .header("origin", "http://client.test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["host"], json!([up.to_string()]));
    assert_eq!(seen["headers"]["origin"], json!([format!("http://{up}")]));

    // On the way back: hop-by-hop headers (and those Connection names) stop here; Via says who passed it on.
    let response = client().get(server.url("/keep/hop")).send().await.unwrap();
    let headers = response.headers();
    assert!(headers.get("x-private").is_none());
    assert!(headers.get("keep-alive").is_none());
    assert_eq!(headers["x-public"], "shown");
    assert_eq!(headers["via"], "1.1 marina");
    assert_eq!(response.text().await.unwrap(), "hop");
}

#[tokio::test]
async fn redirects_that_point_at_the_upstream_come_back_under_the_apps_prefix() {
    let up = upstream().await;
    let (server, _apps) = serve(&[
        ("web", json!({"proxy": [{"pattern": "^/app(/.*)$", "target": format!("http://{up}/base"), "rewrite": "/redirect$1"}]})),
        ("plain", json!({"proxy": [{"pattern": "^/", "target": format!("http://{up}/base")}]})),
    ])
    .await;
    let location = |path: &'static str| {
        let url = server.url(path);
        async move {
            let response = client().get(url).send().await.unwrap();
            assert_eq!(response.status(), 302);
            response.headers()[header::LOCATION].to_str().unwrap().to_owned()
        }
    };
    // The upstream sees /base/redirect/absolute and redirects to its /base/landing.
    assert_eq!(location("/web@1/app/absolute").await, "/web@1/landing?x=1");
    assert_eq!(location("/web@1/app/path").await, "/web@1/landing");
    assert_eq!(location("/web@1/app/elsewhere").await, "http://example.test/x");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_naming_the_rule() {
    let _machine = crate::timed().await; // the 504 within 4 s
    let up = upstream().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (server, _apps) = serve(&[
        (
            "broken",
            json!({"timeout": 30, "proxy": [
                {"pattern": "^/refused", "target": format!("http://{closed}")},
                {"pattern": "^/dns", "target": "http://no-such-host.invalid"},
                {"pattern": "^/slow", "target": format!("http://{up}"), "timeout": 1},
            ]}),
        ),
        ("healthy", json!({"proxy": {"^/": {"target": format!("http://{up}")}}})),
    ])
    .await;

    let response = client().get(server.url("/broken/refused")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "upstream_failed");
    assert_eq!(body["rule"], "proxy[0] (\"^/refused\")");
    assert_eq!(body["target"], format!("http://{closed}"));
    assert!(body["error"].as_str().unwrap().contains("refused"), "{body}");

    let response = client().get(server.url("/broken/dns")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["rule"], "proxy[1] (\"^/dns\")");

    let started = std::time::Instant::now();
    let response = client().get(server.url("/broken/slow")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the rule's 1 s timeout, not the upstream's 5 s"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "upstream_timeout");
    assert_eq!(body["rule"], "proxy[2] (\"^/slow\")");

    // Nothing of that touched another app.
    assert_eq!(get_json(&server.url("/healthy/ok")).await["uri"], "/ok");
}

#[tokio::test]
async fn a_response_body_is_cut_when_the_upstream_stalls_for_the_rules_timeout_but_not_when_it_trickles() {
    let _machine = crate::timed().await; // trickled chunks closer than the 1 s timeout
    let up = upstream().await;
    let rule = json!({"proxy": {"^/": {"target": format!("http://{up}"), "timeout": 1}}});
    let (server, _apps) = serve(&[("streams", rule)]).await;

    let started = std::time::Instant::now();
    let response = client().get(server.url("/streams/trickle")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "aaaaaaaaaabbbbbbbbbbccccccccccdddddddddd"
    );
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "longer in all than the rule's timeout"
    );

    let started = std::time::Instant::now();
    let mut response = client().get(server.url("/streams/stall")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.chunk().await.unwrap().unwrap().len(), 10);
    let rest = tokio::time::timeout(Duration::from_secs(8), response.chunk())
        .await
        .expect("cut off, not left waiting for the upstream's 10 s");
    assert!(
        rest.is_err(),
        "the body ends with an error, not as if it were complete: {rest:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_target_takes_its_host_from_the_environment_and_an_unset_variable_is_a_config_error() {
    let up = upstream().await;
    let apps = AppsDir::new();
    proxied(
        &apps,
        "env",
        json!({"proxy": {"^/": {"target": "http://${MARINA_TEST_UPSTREAM}/from-env"}}}),
    );
    proxied(
        &apps,
        "unset",
        json!({"proxy": {"^/": {"target": "http://${MARINA_TEST_UNSET}/"}}}),
    );
    let mut command = MarinaProcess::command(&apps.path(), &["--no-cache"]);
    command.env("MARINA_TEST_UPSTREAM", up.to_string());
    command.env_remove("MARINA_TEST_UNSET");
    let marina = MarinaProcess::spawn(command);

    let seen = get_json(&marina.url("/env/x?y=1")).await;
    assert_eq!(seen["uri"], "/from-env/x?y=1");

    let response = client().get(marina.url("/unset/")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("proxy[0].target"), "{message}");
    assert!(
        message.contains("environment variable MARINA_TEST_UNSET is not set"),
        "{message}"
    );

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_marina"))
        .args(["check", apps.path().to_str().unwrap()])
        .env_remove("MARINA_TEST_UNSET")
        .env("MARINA_TEST_UPSTREAM", "x")
        .output()
        .unwrap();
    assert!(!check.status.success());
    let report = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(report.contains("MARINA_TEST_UNSET is not set"), "{report}");
}

#[tokio::test]
async fn a_rewrite_that_names_a_missing_group_is_refused_with_a_hint() {
    let (server, _apps) = serve(&[(
        "typo",
        json!({"proxy": {"^/(a)": {"target": "http://127.0.0.1:9", "rewrite": "/$1abc"}}}),
    )])
    .await;
    let response = client().get(server.url("/typo/a")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let message = response.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("group `1abc`") && message.contains("`${1}abc`"),
        "{message}"
    );
}

#[tokio::test]
async fn a_100_mb_body_streams_through_the_proxy_both_ways_without_the_host_holding_it() {
    let _machine = crate::heavy().await; // 200 MiB through the proxy
    let up = upstream().await;
    let apps = AppsDir::new();
    proxied(
        &apps,
        "big",
        json!({"proxy": {"^/": {"target": format!("http://{up}")}}}),
    );
    let marina = MarinaProcess::serve(&apps.path(), &[]);
    let before = marina.peak_rss();

    let chunks = futures_util::stream::iter((0..100).map(|i| Ok::<_, std::io::Error>(vec![i as u8; MIB])));
    let seen: Value = client()
        .put(marina.url("/big/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["bytes"], 100 * MIB, "every byte reached the upstream");

    let response = client().get(marina.url("/big/big")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut total = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .unwrap()
    {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, 100 * MIB, "every byte came back");
    let grown = marina.peak_rss().saturating_sub(before);
    assert!(
        grown < 40 * MIB as u64,
        "the host's peak memory grew by {} MiB while 200 MiB passed through",
        grown / MIB as u64
    );
}

/// TLS with a freshly made self-signed certificate, offering `alpn`.
fn self_signed_tls(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A self-signed TLS upstream (HTTP/1.1 and HTTP/2 by ALPN) that reports what it received.
async fn tls_upstream() -> SocketAddr {
    let acceptor = self_signed_tls(&[b"h2", b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(report);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn secure_rules_refuse_a_self_signed_upstream_and_insecure_ones_accept_it() {
    let up = tls_upstream().await;
    let (server, _apps) = serve(&[
        ("strict", json!({"proxy": {"^/": {"target": format!("https://{up}")}}})),
        (
            "lax",
            json!({"proxy": {"^/": {"target": format!("https://localhost:{}", up.port()), "secure": false}}}),
        ),
    ])
    .await;

    let response = client().get(server.url("/strict/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().to_lowercase().contains("certificate"),
        "{body}"
    );

    for _ in 0..3 {
        let seen = get_json(&server.url("/lax/y?z=1")).await;
        assert_eq!(seen["uri"], "/y?z=1");
        assert_eq!(seen["version"], "HTTP/2.0", "HTTP/2 to an upstream that offers it");
    }
}

/// A WebSocket echo upstream (over TLS with a self-signed certificate when `tls`) that answers with the first
/// subprotocol offered and reports, in its first message, the request's path and query, its extensions header and
/// the `x-rule` header.
#[allow(clippy::result_large_err)] // the handshake callback's error type is tungstenite's, not ours
async fn websocket_upstream(tls: bool) -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{Request as WsRequest, Response as WsResponse};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| self_signed_tls(&[b"http/1.1"]));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut seen = String::new();
                let callback = |request: &WsRequest, mut response: WsResponse| {
                    let header = |name: &str| {
                        request
                            .headers()
                            .get(name)
                            .map_or(String::new(), |v| v.to_str().unwrap_or("").to_owned())
                    };
                    seen = format!(
                        "{} ext={} rule={}",
                        request.uri(),
                        header("sec-websocket-extensions"),
                        header("x-rule")
                    );
                    if let Some(protocols) = request.headers().get("sec-websocket-protocol") {
                        let first = protocols.to_str().unwrap().split(',').next().unwrap().trim().to_owned();
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    Ok(response)
                };
                match acceptor {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let Ok(socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                            return;
                        };
                        echo(socket, seen).await
                    }
                    None => {
                        let Ok(socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                            return;
                        };
                        echo(socket, seen).await
                    }
                }
            });
        }
    });
    addr
}

/// Says hello with what the handshake showed, then echoes every message until the client closes.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut socket: tokio_tungstenite::WebSocketStream<S>,
    seen: String,
) {
    let _ = socket.send(Message::text(format!("hello {seen}"))).await;
    while let Some(Ok(message)) = socket.next().await {
        if message.is_close() || socket.send(message).await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_websocket_is_tunnelled_with_its_subprotocol_query_and_binary_frames_on_the_first_request() {
    let up = websocket_upstream(false).await;
    let (server, _apps) = serve(&[(
        "chat",
        json!({"proxy": {"^/ws/(.*)$": {"target": format!("http://{up}/socket"), "rewrite": "/$1",
                                        "headers": {"x-rule": "chat"}}}}),
    )])
    .await;

    // The first request this server sees is the upgrade.
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/chat@1/ws/room?user=ann",
        server.addr
    ))
    .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat.v2, chat.v1".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v2");
    assert_eq!(response.headers()["via"], "1.1 marina");

    let hello = socket.next().await.unwrap().unwrap();
    assert_eq!(
        hello.into_text().unwrap().as_str(),
        "hello /socket/room?user=ann ext= rule=chat"
    );
    socket.send(Message::text("ping")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("ping"));
    let binary = Message::binary(vec![0u8, 1, 2, 255, 254]);
    socket.send(binary.clone()).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), binary);
    socket.close(None).await.unwrap();
}

/// A client text frame: FIN, masked, `payload` (under 126 bytes).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame's payload (under 126 bytes).
async fn read_frame(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
    stream.read_exact(&mut payload).await.unwrap();
    payload
}

#[tokio::test]
async fn a_frame_sent_right_behind_the_upgrade_request_is_not_lost() {
    let up = websocket_upstream(false).await;
    let (server, _apps) = serve(&[("eager", json!({"proxy": {"^/": {"target": format!("http://{up}")}}}))]).await;

    // The upgrade request and a frame in one write, without waiting for the 101.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = format!(
        "GET /eager/now?q=1 HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Extensions: x-test\r\n\r\n",
        server.addr
    )
    .into_bytes();
    bytes.extend(masked_text_frame(b"eager"));
    stream.write_all(&bytes).await.unwrap();

    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the upstream's accept key: {head}"
    );
    let hello = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut stream))
        .await
        .unwrap();
    assert_eq!(String::from_utf8(hello).unwrap(), "hello /now?q=1 ext=x-test rule=");
    let echoed = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut stream))
        .await
        .unwrap();
    assert_eq!(echoed, b"eager");
}

#[tokio::test]
async fn shutdown_closes_open_tunnels_instead_of_waiting_for_them() {
    let _machine = crate::timed().await; // shut down within 3 s
    let up = websocket_upstream(false).await;
    let (server, _apps) = serve(&[("live", json!({"proxy": {"^/": {"target": format!("http://{up}")}}}))]).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/live/", server.addr))
        .await
        .unwrap();
    socket.next().await.unwrap().unwrap();

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), server.stop())
        .await
        .expect("shutdown does not wait for the tunnel");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The client sees its connection end.
    let next = tokio::time::timeout(Duration::from_secs(3), socket.next())
        .await
        .unwrap();
    assert!(!matches!(next, Some(Ok(Message::Text(_)))), "{next:?}");
}

#[tokio::test]
async fn an_https_target_tunnels_over_wss() {
    let up = websocket_upstream(true).await;
    let (server, _apps) = serve(&[
        (
            "secure",
            json!({"proxy": {"^/": {"target": format!("https://localhost:{}", up.port()), "secure": false}}}),
        ),
        ("strict", json!({"proxy": {"^/": {"target": format!("https://{up}")}}})),
    ])
    .await;

    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/secure/tls?x=1", server.addr))
        .await
        .unwrap();
    let hello = socket.next().await.unwrap().unwrap();
    assert_eq!(hello.into_text().unwrap().as_str(), "hello /tls?x=1 ext= rule=");
    socket.send(Message::text("over tls")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("over tls"));

    // With verification on, the self-signed upstream is refused before any upgrade.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/strict/", server.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 502),
        other => panic!("expected a 502, got {other:?}"),
    }
}

/// An HTTP/1.1 upstream that counts the connections it accepts.
async fn counting_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let app = axum::Router::new().fallback(report);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let (up, accepted) = counting_upstream().await;
    let (server, _apps) =
        serve_on_cores(&[("pooled", json!({"proxy": {"^/": {"target": format!("http://{up}")}}}))]).await;
    // New client connections each time: only the host's side of the proxy may reuse anything.
    for i in 0..20 {
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let seen: Value = fresh
            .get(server.url(&format!("/pooled/{i}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(seen["uri"], format!("/{i}"));
    }
    let accepted = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=CORES).contains(&accepted),
        "{accepted} upstream connections for 20 requests: at most one per serving core"
    );
}

/// A raw HTTP/1.1 upstream that answers each connection's first request with `connection <n>` and then closes
/// it: having said `Connection: close` when `announce`, or without a word (as an upstream whose keep-alive timer
/// fired does). Counts the connections it accepts.
async fn one_shot_upstream(announce: bool) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let body = format!("connection {n}");
                let connection = if announce { "Connection: close\r\n" } else { "" };
                let response = format!(
                    "HTTP/1.1 200 OK\r\n{connection}Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_upstream_that_closes_its_connections_costs_no_request_an_error() {
    for announce in [true, false] {
        let (up, accepted) = one_shot_upstream(announce).await;
        let (server, _apps) = serve(&[("closing", json!({"proxy": {"^/": {"target": format!("http://{up}")}}}))]).await;
        for i in 1..=10 {
            let response = client().get(server.url("/closing/x")).send().await.unwrap();
            assert_eq!(response.status(), 200, "request {i}, announced: {announce}");
            assert_eq!(response.text().await.unwrap(), format!("connection {i}"));
            if i % 2 == 0 {
                // Sometimes the close has arrived before the next request, sometimes it crosses it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
    }
}

#[tokio::test]
async fn a_response_abandoned_midway_closes_its_connection_and_the_next_request_gets_a_clean_one() {
    let (up, accepted) = counting_upstream().await;
    let big = upstream().await;
    let (server, _apps) = serve_on_cores(&[(
        "mixed",
        json!({"proxy": [
            {"pattern": "^/big", "target": format!("http://{big}")},
            {"pattern": "^/", "target": format!("http://{up}")},
        ]}),
    )])
    .await;
    // 100 MiB, of which the client reads one chunk and hangs up.
    let mut response = client().get(server.url("/mixed/big")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.chunk().await.unwrap().unwrap().is_empty());
    drop(response);
    for i in 0..3 {
        let seen = get_json(&server.url(&format!("/mixed/after/{i}"))).await;
        assert_eq!(seen["uri"], format!("/after/{i}"));
    }
    let accepted = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=CORES).contains(&accepted),
        "{accepted} connections to the small upstream: its connection per serving core, reused"
    );
    // The big upstream's connection was closed rather than reused mid-body: a new request needs a new one, and
    // gets the whole body from the start.
    let response = client().get(server.url("/mixed/big")).send().await.unwrap();
    let mut total = 0;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, 100 * MIB);
}
