//! An HTTP component written with spin-sdk 7, Spin's Rust SDK, exactly as for Spin: its `#[http_service]` makes
//! a WASI 0.3 handler (`wasi:http/handler@0.3.0`), which Marina serves like any other.
//!
//! `GET /` greets with the `GREETING` variable of the config's `env` (if set), `GET /count` answers how many
//! requests this instance has served, and `POST /echo` answers the request's body.

use std::sync::atomic::{AtomicU64, Ordering};

use spin_sdk::http::body::IncomingBodyExt;
use spin_sdk::http::{IntoResponse, Method, Request, StatusCode};
use spin_sdk::http_service;

/// Requests this instance has served.
static SERVED: AtomicU64 = AtomicU64::new(0);

#[http_service]
async fn handle(request: Request) -> impl IntoResponse {
    let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
    match (request.method().clone(), request.uri().path()) {
        (Method::POST, "/echo") => match request.into_body().bytes().await {
            Ok(body) => (StatusCode::OK, String::from_utf8_lossy(&body).into_owned()),
            Err(error) => (StatusCode::BAD_REQUEST, format!("{error:?}")),
        },
        (Method::GET, "/") => {
            let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
            (StatusCode::OK, format!("{greeting} from Spin\n"))
        }
        (Method::GET, "/count") => (StatusCode::OK, format!("{served}\n")),
        _ => (StatusCode::NOT_FOUND, "no such route\n".to_owned()),
    }
}
