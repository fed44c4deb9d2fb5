//! Every way a request can fail, and the one place each failure becomes an HTTP response.
//!
//! Clients always get a JSON body `{"error": "<what was wrong>", "code": "<stable code>", ...}`; the message is
//! written for the person reading it, the code for programs. Internal details are logged, not sent.
//!
//! Below this edge, causes stay typed: a variant that has one (a component that did not load, a full queue, a
//! trap) holds it as its [`source`](std::error::Error::source), boxed because the types that describe it live in
//! the layers above. Each cause's own message says only its step; its message here is the whole chain, read
//! outermost first (`the worker could not be started: not a valid WebAssembly component: ...`), so the client
//! reads the same story the log does.

use std::fmt;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::deploy::registry::ResolveError;

/// The `Retry-After` of a `503` that passes by itself (loading, compiling, a busy pool, the streams' limit): a
/// second, since none of them can say when it will be over.
const RETRY_AFTER_SECS: &str = "1";

/// What a failure was caused by, typed where it happened and boxed to cross the layers up to this one.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A request that cannot be served, with the status it answers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first path segment names no deployed version: a bad spec (400), or no such app or version (404).
    #[error(transparent)]
    Resolve(#[from] ResolveError),

    /// The resolved version's config or entrypoint is invalid.
    #[error("{app}@{version} cannot be served: {reason}")]
    InvalidVersion {
        app: String,
        version: String,
        reason: String,
    },

    /// The version's component could not be compiled or instantiated (or, for its health check, no worker
    /// could be had).
    #[error("{app}@{version} cannot start a worker: {}", chain(.cause.as_ref()))]
    WorkerFailed {
        app: String,
        version: String,
        #[source]
        cause: Cause,
    },

    /// The app trapped (a panic, an out-of-memory abort, ...), ended without a response, or answered with an
    /// error code.
    #[error("{app}@{version} failed while handling the request: {}", chain(.cause.as_ref()))]
    AppFailed {
        app: String,
        version: String,
        #[source]
        cause: Cause,
    },

    /// The version's component was still compiling when the request's `timeout` came (a first request, without
    /// `--precompile`, to a large component). The compile goes on; a retry after it is served.
    #[error(
        "{app}@{version} is still being compiled ({:.1} s so far), longer than its {secs}s timeout; retry shortly",
        so_far.as_secs_f64()
    )]
    Compiling {
        app: String,
        version: String,
        secs: u64,
        so_far: std::time::Duration,
    },

    /// The app did not finish within its `timeout`.
    #[error("{app}@{version} did not answer within its {secs}s timeout")]
    Timeout { app: String, version: String, secs: u64 },

    /// Every worker slot is busy and the wait queue is full, or the wait outlasted the request's deadline.
    #[error("the server is busy: {}; retry shortly", chain(.0.as_ref()))]
    PoolBusy(#[source] Cause),

    /// The request body is larger than the app's `maxBodySize`.
    #[error("the request body is larger than this app accepts ({limit} bytes)")]
    BodyTooLarge { limit: u64 },

    /// A proxy rule's upstream could not be reached or broke the exchange (refused, DNS, TLS, reset).
    #[error("{rule} could not reach {target}: {reason}")]
    UpstreamFailed {
        rule: String,
        target: String,
        reason: String,
    },

    /// A proxy rule's upstream did not answer within the rule's timeout.
    #[error("{rule}: {target} did not answer within {secs}s")]
    UpstreamTimeout { rule: String, target: String, secs: u64 },

    /// As many `/_/sse` streams are open as the server allows.
    #[error("{limit} metrics streams are already open; retry later")]
    TooManyStreams { limit: usize },

    /// Requests arrived before the first scan of APPS_DIR finished.
    #[error("apps are still loading; retry shortly")]
    Loading,

    /// The path asks for no app, or for an internal route that does not exist.
    #[error("{0}")]
    NoRoute(String),

    /// A static app has no file at this path (or the path tried to leave the app's directory).
    #[error("no file at {0}")]
    FileNotFound(String),

    /// Static apps answer only GET and HEAD.
    #[error("method {0} is not allowed here; use GET or HEAD")]
    MethodNotAllowed(String),

    /// A byte range beyond the end of the file.
    #[error("the requested range is outside the file's {len} bytes")]
    RangeNotSatisfiable { len: u64 },

    /// A query parameter of an internal route has a value it cannot take.
    #[error("{0}")]
    BadQuery(String),

    /// The request target is longer than the server accepts.
    #[error("the request path is {len} bytes long; the limit is {limit}")]
    UriTooLong { len: usize, limit: usize },

    /// Something failed on the server's side; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// `error` and its causes on one line, outermost first: `what failed: why: why that`.
pub(crate) fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
pub(crate) struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Resolve(ResolveError::BadSpec(_)) | Error::BadQuery(_) => StatusCode::BAD_REQUEST,
            Error::Resolve(_) | Error::NoRoute(_) | Error::FileNotFound(_) => StatusCode::NOT_FOUND,
            Error::InvalidVersion { .. }
            | Error::WorkerFailed { .. }
            | Error::Compiling { .. }
            | Error::PoolBusy(_)
            | Error::Loading
            | Error::TooManyStreams { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::AppFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Timeout { .. } | Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable name for the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Resolve(ResolveError::AppNotFound { .. }) => "app_not_found",
            Error::Resolve(ResolveError::VersionNotFound { .. }) => "version_not_found",
            Error::Resolve(ResolveError::BadSpec(_)) => "bad_version_spec",
            Error::InvalidVersion { .. } => "invalid_version",
            Error::WorkerFailed { .. } => "worker_failed",
            Error::AppFailed { .. } => "app_failed",
            Error::Compiling { .. } => "compiling",
            Error::Timeout { .. } => "timeout",
            Error::PoolBusy(_) => "pool_busy",
            Error::UpstreamFailed { .. } => "upstream_failed",
            Error::UpstreamTimeout { .. } => "upstream_timeout",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::Loading => "loading",
            Error::TooManyStreams { .. } => "too_many_streams",
            Error::NoRoute(_) => "no_route",
            Error::FileNotFound(_) => "not_found",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            Error::BadQuery(_) => "bad_query",
            Error::UriTooLong { .. } => "uri_too_long",
            Error::Internal(_) => "internal",
        }
    }

    fn body(&self) -> Value {
        let mut body = json!({ "error": self.to_string(), "code": self.code() });
        match self {
            Error::Resolve(ResolveError::AppNotFound { app }) => body["app"] = json!(app),
            Error::Resolve(ResolveError::VersionNotFound { app, spec }) => {
                body["app"] = json!(app.name);
                body["spec"] = json!(spec);
                body["available"] = json!(app.version_list());
            }
            Error::Resolve(ResolveError::BadSpec(e)) => body["spec"] = json!(e.spec),
            Error::InvalidVersion { app, version, .. }
            | Error::WorkerFailed { app, version, .. }
            | Error::AppFailed { app, version, .. }
            | Error::Compiling { app, version, .. }
            | Error::Timeout { app, version, .. } => {
                body["app"] = json!(app);
                body["version"] = json!(version);
            }
            Error::BodyTooLarge { limit } => body["limit"] = json!(limit),
            Error::TooManyStreams { limit } => body["limit"] = json!(limit),
            Error::UpstreamFailed { rule, target, .. } | Error::UpstreamTimeout { rule, target, .. } => {
                body["rule"] = json!(rule);
                body["target"] = json!(target);
            }
            _ => {}
        }
        body
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match &self {
            Error::Loading | Error::Compiling { .. } | Error::PoolBusy(_) | Error::TooManyStreams { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            Error::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Error::RangeNotSatisfiable { len } => {
                let value = HeaderValue::from_str(&format!("bytes */{len}")).expect("digits are a valid header");
                headers.insert(header::CONTENT_RANGE, value);
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_missing_version_lists_what_is_available() {
        let dir = tempfile::tempdir().unwrap();
        for version in ["1.0.0", "2.0.0"] {
            std::fs::create_dir_all(dir.path().join("hello").join(version)).unwrap();
        }
        let app = Arc::new(crate::deploy::registry::scan_app(dir.path(), "hello").unwrap());
        let error = Error::from(ResolveError::VersionNotFound {
            app,
            spec: Some("^3".into()),
        });
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            error.body(),
            json!({"error": "no version of \"hello\" matches ^3", "code": "version_not_found", "app": "hello",
                   "spec": "^3", "available": ["2.0.0", "1.0.0"]})
        );
    }

    #[test]
    fn a_cause_is_read_as_its_whole_chain_and_kept_as_the_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("the worker could not be started")]
        struct Outer(#[source] std::io::Error);
        let error = Error::WorkerFailed {
            app: "svc".into(),
            version: "1.0.0".into(),
            cause: Box::new(Outer(std::io::Error::other("out of slots"))),
        };
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            error.body(),
            json!({"error": "svc@1.0.0 cannot start a worker: the worker could not be started: out of slots",
                   "code": "worker_failed", "app": "svc", "version": "1.0.0"})
        );
        let source = std::error::Error::source(&error).expect("the cause is the source");
        assert!(source.downcast_ref::<Outer>().is_some(), "the cause keeps its type");
    }

    #[test]
    fn internal_details_are_not_sent_to_the_client() {
        let error = Error::Internal("/secret/path: permission denied".into());
        assert_eq!(error.body(), json!({"error": "internal error", "code": "internal"}));
    }
}
