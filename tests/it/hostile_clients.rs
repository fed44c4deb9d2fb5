//! Clients that connect and stall, or connect and idle: each must lose its connection after a timeout rather than
//! hold one of the server's connection slots forever, while every other client goes on being served. And the
//! host's `/<app>/health` is only GET and HEAD: other methods on that path are the app's.
//!
//! The timeouts are set short in the options; the bounds the tests wait within are generous, because they assert
//! what happens, not how fast.

use std::time::{Duration, Instant};

use crate::common::{AppsDir, TestServer};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use marina::server::ServeOptions;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The header timeout the tests set, and the one they set when the header timeout is not what is under test.
const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(60);
/// However loaded the machine, a connection the server means to close is closed within this.
const CLOSED_WITHIN: Duration = Duration::from_secs(10);
/// The HTTP/2 connection preface a client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

fn options(apps: &AppsDir, header: Duration, idle: Duration) -> ServeOptions {
    let mut options = ServeOptions::new(apps.path());
    options.drain_timeout = Duration::from_secs(5);
    options.header_timeout = header;
    options.idle_timeout = idle;
    options
}

async fn server_with(header: Duration, idle: Duration) -> (AppsDir, TestServer) {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let server = TestServer::start_with(options(&apps, header, idle)).await;
    (apps, server)
}

/// A client that opens a new connection for every request, so that none of its requests can meet a pooled
/// connection the server has just closed for idling.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

async fn assert_served(server: &TestServer) {
    let response = fresh_client().get(server.url("/hello/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "<h1>hello 1.0.0</h1>");
}

/// Reads, and throws away, whatever the server sends until it closes the connection (an end of file or a reset);
/// false if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until_closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}

/// Opens a connection, sends `sent` and nothing more, and checks that another client is served meanwhile and
/// that the stalled connection is closed.
async fn assert_closed_by_the_header_timeout(sent: &[u8]) {
    let (_apps, server) = server_with(SHORT, LONG).await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(sent).await.unwrap();
    assert_served(&server).await;
    assert!(
        closed_within(&mut stalled, CLOSED_WITHIN).await,
        "a connection that sent {:?} and stalled is still open",
        String::from_utf8_lossy(sent)
    );
    assert_served(&server).await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(b"").await;
}

#[tokio::test]
async fn a_connection_that_stalls_in_its_request_line_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(b"GET /hello/ HT").await;
}

#[tokio::test]
async fn a_connection_that_stalls_in_its_headers_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(b"GET /hello/ HTTP/1.1\r\nHost: test\r\nX-Slow: ").await;
}

#[tokio::test]
async fn a_connection_that_stalls_in_the_http2_preface_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(&H2_PREFACE[..10]).await;
}

#[tokio::test]
async fn a_connection_that_sends_the_http2_preface_but_no_settings_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(H2_PREFACE).await;
}

#[tokio::test]
async fn an_http2_connection_that_settles_its_settings_but_sends_no_request_is_closed_by_the_header_timeout() {
    assert_closed_by_the_header_timeout(&[H2_PREFACE, EMPTY_SETTINGS].concat()).await;
}

#[tokio::test]
async fn a_client_that_sends_its_request_head_in_pieces_within_the_timeout_is_served() {
    let (_apps, server) = server_with(LONG, LONG).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    for piece in [
        "GET /hel",
        "lo/ HTTP/1.1\r\nHo",
        "st: test\r\nConnection: close\r\n",
        "\r\n",
    ] {
        stream.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut response = Vec::new();
    tokio::time::timeout(CLOSED_WITHIN, stream.read_to_end(&mut response))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("<h1>hello 1.0.0</h1>"), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_silent_connections_do_not_lock_other_clients_out_and_are_all_closed() {
    const SILENT: usize = 300;
    let (_apps, server) = server_with(SHORT, LONG).await;
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    assert_served(&server).await;
    let deadline = Instant::now() + CLOSED_WITHIN;
    let mut still_open = 0;
    for stream in &mut silent {
        let left = deadline.saturating_duration_since(Instant::now());
        if !closed_within(stream, left).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "silent connections still open after the header timeout");
    assert_served(&server).await;
}

/// Sends one request on `stream` and reads its response (which must carry a `Content-Length`), leaving the
/// connection open.
async fn request_on(stream: &mut TcpStream, request: &str) -> (u16, Vec<u8>) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if bytes.len() >= end + 4 + length {
                return (status, bytes[end + 4..end + 4 + length].to_vec());
            }
        }
        let n = tokio::time::timeout(CLOSED_WITHIN, stream.read(&mut buf))
            .await
            .expect("the server answers")
            .unwrap();
        assert!(n > 0, "the server closed the connection before answering");
        bytes.extend_from_slice(&buf[..n]);
    }
}

async fn assert_idle_http1_connection_closed(header: Duration, idle: Duration) {
    let (_apps, server) = server_with(header, idle).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = "GET /hello/ HTTP/1.1\r\nHost: test\r\n\r\n";
    for _ in 0..2 {
        let (status, body) = request_on(&mut stream, request).await;
        assert_eq!((status, body.as_slice()), (200, &b"<h1>hello 1.0.0</h1>"[..]));
    }
    assert!(
        closed_within(&mut stream, CLOSED_WITHIN).await,
        "an idle keep-alive connection is still open"
    );
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_by_the_header_timeout() {
    // hyper times the wait for the next request's head: the idle timeout is not needed for this.
    assert_idle_http1_connection_closed(SHORT, LONG).await;
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_by_the_idle_timeout_when_that_is_shorter() {
    assert_idle_http1_connection_closed(LONG, SHORT).await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_shut_down_after_the_idle_timeout() {
    let (_apps, server) = server_with(LONG, SHORT).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    for _ in 0..2 {
        let request = http::Request::get(format!("http://{}/hello/", server.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "<h1>hello 1.0.0</h1>");
    }
    let ended = tokio::time::timeout(CLOSED_WITHIN, connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is still open");
    assert!(sender.is_closed(), "the client may no longer send on it");
}

fn clients() -> [(&'static str, reqwest::Client); 2] {
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    [("HTTP/1.1", fresh_client()), ("HTTP/2", h2)]
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sse_stream_outlasting_the_idle_timeout_is_not_cut() {
    let (_apps, server) = server_with(SHORT, SHORT).await;
    for (protocol, client) in clients() {
        let response = client.get(server.url("/_/sse?interval=1")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{protocol}");
        let mut events = response.bytes_stream();
        let until = Instant::now() + 4 * SHORT;
        let mut chunks = 0;
        while Instant::now() < until {
            let chunk = tokio::time::timeout(CLOSED_WITHIN, events.next())
                .await
                .unwrap_or_else(|_| panic!("{protocol}: the stream went quiet"));
            match chunk {
                Some(Ok(_)) => chunks += 1,
                Some(Err(error)) => panic!("{protocol}: the stream was cut: {error}"),
                None => panic!("{protocol}: the stream ended"),
            }
        }
        assert!(chunks >= 2, "{protocol}: {chunks} events in four idle timeouts");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_download_outlasting_the_idle_timeout_is_not_cut() {
    let size = 32 * 1024 * 1024;
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.write("hello/1.0.0/big.bin", vec![7u8; size]);
    let server = TestServer::start_with(options(&apps, SHORT, SHORT)).await;
    for (protocol, client) in clients() {
        let response = client.get(server.url("/hello/big.bin")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{protocol}");
        let mut body = response.bytes_stream();
        let slow_until = Instant::now() + 3 * SHORT;
        let mut received = 0;
        while let Some(chunk) = body.next().await {
            received += chunk
                .unwrap_or_else(|error| panic!("{protocol}: the download was cut: {error}"))
                .len();
            if Instant::now() < slow_until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert_eq!(received, size, "{protocol}: the whole file arrived");
    }
}

#[tokio::test]
async fn only_get_and_head_of_an_apps_health_path_are_the_hosts_and_other_methods_reach_the_app() {
    let apps = AppsDir::new();
    apps.component("echo", "1.0.0", "echo", json!({}));
    apps.static_version("site", "1.0.0");
    let server = TestServer::start_with(options(&apps, LONG, LONG)).await;
    let client = fresh_client();

    let response = client.get(server.url("/echo@1/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "OK", "GET is the host's health check");
    let response = client.head(server.url("/echo@1/health")).send().await.unwrap();
    assert_eq!(response.status(), 200, "so is HEAD");

    for method in [reqwest::Method::POST, reqwest::Method::PUT] {
        let response = client
            .request(method.clone(), server.url("/echo@1/health"))
            .body(format!("{method} from the client"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method}");
        assert_eq!(
            response.text().await.unwrap(),
            format!("{method} from the client"),
            "{method} reached the app, which echoed its body"
        );
    }

    assert_eq!(
        client
            .get(server.url("/site/health"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "OK"
    );
    let response = client.post(server.url("/site/health")).send().await.unwrap();
    assert_eq!(response.status(), 405, "a static app serves GET and HEAD only");
}
