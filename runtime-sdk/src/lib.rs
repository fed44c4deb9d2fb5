//! # marina-sdk: write a Marina app in a few lines of Rust
//!
//! A Marina app is a standard `wasi:http/proxy` component: the same file `wasmtime serve` and Spin run. This crate
//! hides the raw `wasi:http` resources behind a plain request/response handler, a small router with `:param` and
//! `*` segments, JSON helpers and streaming bodies.
//!
//! ```ignore
//! use marina_sdk::{Request, Response, Router};
//!
//! fn routes() -> Router {
//!     Router::new()
//!         .get("/", |_| Response::text(200, "hello"))
//!         .get("/greet/:name", |r| Response::json(200, &serde_json::json!({ "hi": r.param("name") })))
//! }
//!
//! marina_sdk::app!(router = routes);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`) and drop the `.wasm` into
//! `APPS_DIR/<app>/<version>/app.wasm`.
//!
//! `app!(handler)` takes a plain `fn(Request) -> Response` instead, for an app that needs no router. A handler
//! runs once per request. Whether statics survive between requests is the host's choice (`ttl` in
//! `worker.config.json`): with `ttl: 0` every request gets a fresh instance, with `ttl > 0` a warm one may be reused.

mod body;
mod outbound;
mod router;

use std::collections::BTreeMap;

pub use body::{BodyReader, BodyWriter};
pub use outbound::{fetch, FetchError, Fetched};
pub use router::Router;

#[doc(hidden)]
pub use wasip2 as __wasip2;

use wasip2::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

/// The request header in which the host names the prefix the app was reached under, e.g. `/hello@1`.
pub const BASE_HEADER: &str = "x-marina-base";

/// How much of a request body [`Request::bytes`] and [`Request::json`] read before refusing: 16 MiB. Stream with
/// [`Request::take_body`] for more.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// An incoming request, as the app sees it: the path after its mount prefix, the query, headers and a body that
/// is read on demand.
pub struct Request {
    method: String,
    path: String,
    query: Option<String>,
    /// Read from the host when the app first asks: a handler that never looks at them (most do not) costs no
    /// calls to the host for them, nor a copy of each.
    headers: std::cell::OnceCell<Vec<(String, Vec<u8>)>>,
    params: BTreeMap<String, String>,
    incoming: IncomingRequest,
    /// The body is opened only when the app asks for it, likewise, and at most once.
    body_taken: bool,
}

impl Request {
    fn from_wasi(request: IncomingRequest) -> Request {
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Connect => "CONNECT".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Trace => "TRACE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Other(other) => other,
        };
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let (path, query) = match path_with_query.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (path_with_query, None),
        };
        Request {
            method,
            path,
            query,
            headers: std::cell::OnceCell::new(),
            params: BTreeMap::new(),
            incoming: request,
            body_taken: false,
        }
    }

    /// `GET`, `POST`, ... in upper case.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path after the app's mount prefix, always starting with `/`, still percent-encoded.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query string, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(key) == name).then(|| decode_component(value))
        })
    }

    /// The first value of a header (names are case-insensitive), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// All headers, in the order they arrived.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        self.headers.get_or_init(|| self.incoming.headers().entries())
    }

    /// The prefix the app was reached under (`/hello@1`), for links that come back to the same version.
    pub fn base(&self) -> &str {
        self.header(BASE_HEADER).unwrap_or("")
    }

    /// A `:name` (or `*` for the rest) segment captured by the [`Router`].
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub(crate) fn set_params(&mut self, params: BTreeMap<String, String>) {
        self.params = params;
    }

    /// The body as a stream (`std::io::Read`), to pass through without holding it in memory. `None` after the
    /// first call.
    pub fn take_body(&mut self) -> Option<BodyReader> {
        if std::mem::replace(&mut self.body_taken, true) {
            return None;
        }
        self.incoming.consume().ok().and_then(BodyReader::new)
    }

    /// The whole body, up to [`DEFAULT_BODY_LIMIT`] bytes; a larger body is an error response (413).
    pub fn bytes(&mut self) -> Result<Vec<u8>, Response> {
        let Some(mut body) = self.take_body() else {
            return Ok(Vec::new());
        };
        body.read_to_limit(DEFAULT_BODY_LIMIT).map_err(|error| match error {
            body::ReadError::TooLarge => Response::error(413, "the request body is too large"),
            body::ReadError::Io(message) => {
                Response::error(400, &format!("the request body could not be read: {message}"))
            }
        })
    }

    /// The body parsed as JSON; a malformed body is an error response (400) that says what was wrong.
    pub fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, Response> {
        let bytes = self.bytes()?;
        serde_json::from_slice(&bytes).map_err(|error| Response::error(400, &format!("invalid JSON body: {error}")))
    }
}

/// A response: a status, headers, and a body that is either bytes or written by a closure as it streams.
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: ResponseBody,
}

/// Writes a streamed body; called once, after the response head is sent.
type WriteBody = Box<dyn FnOnce(&mut BodyWriter) -> std::io::Result<()>>;

enum ResponseBody {
    Bytes(Vec<u8>),
    Stream(WriteBody),
}

impl Response {
    /// A response with a body of bytes and no content type.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: ResponseBody::Bytes(body.into()),
        }
    }

    /// `text/plain; charset=utf-8`.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, body.into()).with_header("content-type", "text/plain; charset=utf-8")
    }

    /// `text/html; charset=utf-8`.
    pub fn html(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, body.into()).with_header("content-type", "text/html; charset=utf-8")
    }

    /// A value serialised as JSON.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status, body).with_header("content-type", "application/json"),
            Err(error) => Response::error(500, &format!("the response could not be serialised: {error}")),
        }
    }

    /// `{"error": message}` as JSON, the shape the host uses for its own errors.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    /// A body written as it is produced: the closure gets a `std::io::Write` whose writes reach the client as they
    /// happen, with back-pressure, so a large body never has to fit in memory.
    pub fn stream(status: u16, write: impl FnOnce(&mut BodyWriter) -> std::io::Result<()> + 'static) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: ResponseBody::Stream(Box::new(write)),
        }
    }

    /// Adds a header (repeated names are kept as separate values).
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Response {
        self.headers.push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    fn send(self, out: ResponseOutparam) {
        let Response {
            status,
            mut headers,
            body,
        } = self;
        if let ResponseBody::Bytes(bytes) = &body {
            // A known length lets the host send the response in one piece instead of chunked.
            if !headers.iter().any(|(name, _)| name == "content-length") {
                headers.push(("content-length".to_owned(), bytes.len().to_string().into_bytes()));
            }
        }
        let fields = Fields::from_list(&headers).unwrap_or_else(|_| Fields::new());
        let response = OutgoingResponse::new(fields);
        // Both calls only fail for an invalid status or a body taken twice: neither can happen here. 200 is the
        // default, which saves a call to the host on the common path.
        if status != 200 {
            let _ = response.set_status_code(status);
        }
        let Ok(outgoing) = response.body() else {
            ResponseOutparam::set(out, Ok(response));
            return;
        };
        ResponseOutparam::set(out, Ok(response));
        let mut writer = BodyWriter::new(&outgoing);
        let written = match body {
            ResponseBody::Bytes(bytes) => writer.write_all_bytes(&bytes),
            ResponseBody::Stream(write) => write(&mut writer),
        };
        drop(writer);
        match written {
            Ok(()) => {
                let _ = OutgoingBody::finish(outgoing, None);
            }
            // Dropping the body without `finish` tells the host the response is incomplete, so the client sees a
            // truncated body rather than a short one that looks whole.
            Err(error) => eprintln!("marina-sdk: response body write failed: {error}"),
        }
    }
}

/// The app's `env` from `worker.config.json` (plus `MARINA_APP` and `MARINA_VERSION`); nothing of the host's.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The app's name, as the host deployed it.
pub fn app_name() -> String {
    env("MARINA_APP").unwrap_or_default()
}

/// The app's version, as the host deployed it.
pub fn app_version() -> String {
    env("MARINA_VERSION").unwrap_or_default()
}

/// Runs `handler` for one `wasi:http` request. Called by the code [`app!`] generates.
#[doc(hidden)]
pub fn __serve(request: IncomingRequest, out: ResponseOutparam, handler: fn(Request) -> Response) {
    handler(Request::from_wasi(request)).send(out);
}

/// Exports the app as the component's `wasi:http/incoming-handler`: either `app!(handler)`, with
/// `handler: fn(Request) -> Response` run for every request, or `app!(router = routes)`, with `routes: fn() ->
/// Router` run once per instance and its router kept for the requests a warm instance serves after the first (with
/// `ttl: 0` each request is a first one). Building a router allocates for every route; building it once saves
/// that on every request but the first.
#[macro_export]
macro_rules! app {
    (router = $routes:path) => {
        fn __marina_route(request: $crate::Request) -> $crate::Response {
            ::std::thread_local! {
                static ROUTER: $crate::Router = $routes();
            }
            ROUTER.with(|router| router.handle(request))
        }

        $crate::app!(__marina_route);
    };
    ($handler:path) => {
        struct __MarinaApp;

        impl $crate::__wasip2::exports::http::incoming_handler::Guest for __MarinaApp {
            fn handle(
                request: $crate::__wasip2::http::types::IncomingRequest,
                out: $crate::__wasip2::http::types::ResponseOutparam,
            ) {
                $crate::__serve(request, out, $handler);
            }
        }

        $crate::__wasip2::http::proxy::export!(__MarinaApp with_types_in $crate::__wasip2);
    };
}

fn decode_component(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

#[cfg(test)]
mod tests {
    use super::decode_component;

    #[test]
    fn query_components_are_percent_decoded() {
        assert_eq!(decode_component("a%20b+c"), "a b c");
        assert_eq!(decode_component("100%"), "100%");
        assert_eq!(decode_component("%zz"), "%zz");
        assert_eq!(decode_component("%C3%A9"), "é");
    }
}
