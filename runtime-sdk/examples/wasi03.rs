//! A WASI 0.3 HTTP handler (`wasi:http/handler@0.3.0`, the `wasi:http/service` world), written against the
//! `wasip3` bindings alone, as any Rust app built for WASI 0.3 is: Marina serves it beside 0.2 components. Its
//! routes are what the host must get right for the 0.3 model, where the response body is a stream the guest may
//! go on writing after its handler returned.
//!
//! The routes the Python and JavaScript examples have too:
//! - `GET /` greets (with the `GREETING` variable of the config's `env`, if set);
//! - `GET /count` answers how many requests this instance has served, which shows whether instances are reused;
//! - `GET /env/<NAME>` answers that variable of the app's environment, or 404;
//! - `GET /base` answers the prefix the request came under (Marina's `x-marina-base` header);
//! - `POST /echo` reads the whole request body and answers it with its content type.
//!
//! And what only a 0.3 handler can do, or get wrong:
//! - `GET /stream` answers its head at once, then writes three lines 50 ms apart from a task it spawned.
//! - `GET /fetch?url=http://host:port/path` sends a request out through `wasi:http/client@0.3` and answers the
//!   upstream's status and body, or 502 with the error code (as when the host denies it).
//! - `GET /hog?mb=N` holds N MiB at once (the app's memory cap must stop it).
//! - `GET /error` answers with an error code instead of a response; `GET /trap` panics; `GET /loop` computes
//!   forever (the app's timeout must stop it).

use std::sync::atomic::{AtomicU64, Ordering};

use wasip3::http::types::{ErrorCode, Fields, Method, Request, Response, Scheme};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(App);

struct App;

/// Requests this instance has served.
static SERVED: AtomicU64 = AtomicU64::new(0);

impl wasip3::exports::http::handler::Guest for App {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let path = request.get_path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = match path.split_once('?') {
            Some((path, query)) => (path.to_owned(), query.to_owned()),
            None => (path, String::new()),
        };
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let header = |name: &str| request.get_headers().get(name).into_iter().next();
        match (request.get_method(), path.as_str()) {
            (Method::Post, "/echo") => {
                let content_type = header("content-type").unwrap_or_else(|| b"application/octet-stream".to_vec());
                let body = read_body(request).await;
                respond(200, body, content_type)
            }
            (Method::Get, "/") => {
                let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
                text(200, format!("{greeting} from WASI 0.3\n"))
            }
            (Method::Get, "/count") => text(200, format!("{served}\n")),
            (Method::Get, "/base") => respond(200, header("x-marina-base").unwrap_or_default(), TEXT.to_vec()),
            (Method::Get, "/stream") => stream(),
            (Method::Get, "/fetch") => fetch(&param("url").unwrap_or_default()).await,
            (Method::Get, "/hog") => {
                let mb: usize = param("mb").and_then(|mb| mb.parse().ok()).unwrap_or(1024);
                let hoard: Vec<Vec<u8>> = (0..mb).map(|_| vec![1u8; 1024 * 1024]).collect();
                text(200, format!("held {} MiB\n", hoard.len()))
            }
            (Method::Get, "/error") => Err(ErrorCode::ConnectionRefused),
            (Method::Get, "/trap") => panic!("the app panicked on purpose"),
            (Method::Get, "/loop") => {
                let mut spins = 0u64;
                loop {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            (Method::Get, path) if path.starts_with("/env/") => match std::env::var(&path["/env/".len()..]) {
                Ok(value) => text(200, value),
                Err(_) => text(404, "unset\n".into()),
            },
            (Method::Get, _) => text(404, "no such route\n".into()),
            _ => text(405, "use GET, or POST /echo\n".into()),
        }
    }
}

/// A GET of `url` (`http://authority/path`) from the guest, answered with the upstream's status and body.
async fn fetch(url: &str) -> Result<Response, ErrorCode> {
    let Some((authority, path)) = url.strip_prefix("http://").map(|rest| match rest.split_once('/') {
        Some((authority, path)) => (authority.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), "/".to_owned()),
    }) else {
        return text(400, "url must be http://authority/path\n".into());
    };
    let (_no_trailers, trailers) = wit_future::new(|| Ok(None));
    let (request, _sent) = Request::new(Fields::new(), None, trailers, None);
    let invalid = |()| ErrorCode::InternalError(Some("invalid url".into()));
    request.set_scheme(Some(&Scheme::Http)).map_err(invalid)?;
    request.set_authority(Some(&authority)).map_err(invalid)?;
    request.set_path_with_query(Some(&path)).map_err(invalid)?;
    match wasip3::http::client::send(request).await {
        Ok(response) => {
            let status = response.get_status_code();
            let (_done, done) = wit_future::new(|| Ok(()));
            let (contents, _trailers) = Response::consume_body(response, done);
            let body = contents.collect().await;
            text(200, format!("{status} {}", String::from_utf8_lossy(&body)))
        }
        Err(code) => text(502, format!("{code:?}")),
    }
}

/// The whole request body.
async fn read_body(request: Request) -> Vec<u8> {
    // Dropped unwritten, the future tells the host the body was read without error.
    let (_done, done) = wit_future::new(|| Ok(()));
    let (contents, _trailers) = Request::consume_body(request, done);
    contents.collect().await
}

const TEXT: &[u8] = b"text/plain; charset=utf-8";

fn text(status: u16, body: String) -> Result<Response, ErrorCode> {
    respond(status, body.into_bytes(), TEXT.to_vec())
}

/// A response whose body is written once the handler has returned and the host reads it.
fn respond(status: u16, body: Vec<u8>, content_type: Vec<u8>) -> Result<Response, ErrorCode> {
    let (response, mut contents) = response_with_stream(status, content_type)?;
    wit_bindgen::spawn_local(async move {
        let _unwritten = contents.write_all(body).await;
    });
    Ok(response)
}

fn stream() -> Result<Response, ErrorCode> {
    let (response, mut contents) = response_with_stream(200, TEXT.to_vec())?;
    wit_bindgen::spawn_local(async move {
        for line in 0..3 {
            if line > 0 {
                wasip3::clocks::monotonic_clock::wait_for(50_000_000).await;
            }
            let _unwritten = contents.write_all(format!("line {line}\n").into_bytes()).await;
        }
    });
    Ok(response)
}

fn response_with_stream(
    status: u16,
    content_type: Vec<u8>,
) -> Result<(Response, wit_bindgen::StreamWriter<u8>), ErrorCode> {
    let internal = |_| ErrorCode::InternalError(None);
    let headers = Fields::from_list(&[("content-type".to_owned(), content_type)]).map_err(internal)?;
    let (contents, body) = wit_stream::new();
    let (_no_trailers, trailers) = wit_future::new(|| Ok(None));
    let (response, _sent) = Response::new(headers, Some(body), trailers);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(None))?;
    Ok((response, contents))
}
