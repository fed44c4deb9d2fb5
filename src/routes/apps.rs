//! Requests for apps: split `/<app>[@<spec>]/rest`, resolve the version, and hand the rest to what serves it.
//!
//! Everything that is not an internal `/_/` route lands here. The version is resolved once, from one snapshot (or
//! taken from the core's [`route_cache`](super::route_cache), which holds what it resolved to), and held for the
//! whole request, so a reload or removal mid-request cannot change what serves it.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::backends::proxy::ClientAddr;
use crate::backends::static_files;
use crate::deploy::registry::AppKind;
use crate::error::Error;
use crate::metrics::Served;
use crate::routes::lifecycle::Phase;
use crate::routes::route_cache::Route;
use crate::routes::AppState;

/// The request header that tells an app the prefix it was reached under, e.g. `/hello@1`.
pub(crate) const BASE_HEADER: &str = "x-marina-base";

/// How long `GET /<app>@<spec>/health` waits for a worker before answering 503.
pub(crate) const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Every request that is not for an internal route, from `client` when it came over the network, arrived at
/// `arrived`: the response, and the version it came from.
pub(crate) async fn handle(
    state: &AppState,
    request: Request,
    client: Option<&ClientAddr>,
    arrived: Instant,
) -> (Served, Response) {
    let (served, result) = route(state, request, client, arrived).await;
    (served, result.unwrap_or_else(IntoResponse::into_response))
}

async fn route(
    state: &AppState,
    request: Request,
    client: Option<&ClientAddr>,
    arrived: Instant,
) -> (Served, Result<Response, Error>) {
    let unrouted = || Served {
        stats: state.metrics.unrouted(),
    };
    if state.lifecycle.phase() == Phase::Loading {
        return (unrouted(), Err(Error::Loading));
    }
    // A shared buffer: the clone copies nothing, and lets the path be borrowed while the request moves on.
    let uri = request.uri().clone();
    let path = uri.path();
    let (segment, rest) = split_mount(path);
    if segment.is_empty() {
        let error = Error::NoRoute("name an app in the path: /<app>[@<version>]/...".into());
        return (unrouted(), Err(error));
    }
    let route = match state.route_cache.resolve(&state.registry, &state.metrics, segment) {
        Ok(route) => route,
        Err(error) => return (unrouted(), Err(error.into())),
    };
    let served = route.served.clone();
    // `/app@1`: what the client put before the app's own path.
    let mount = &path[..path.len() - rest.len()];
    let target = Target {
        route: &route,
        mount,
        rest,
        client,
    };
    // Everything before this point is synchronous; from here the client may go away while we wait.
    let in_flight = state.metrics.in_flight(&served.stats, arrived);
    let result = serve(state, target, request, arrived).await;
    in_flight.answered();
    (served, result)
}

/// Where a request for an app goes, as the router found it.
struct Target<'a> {
    route: &'a Route,
    /// What the client put before the app's own path (`/app@1`).
    mount: &'a str,
    /// The app's own path, empty for `/app@1`.
    rest: &'a str,
    client: Option<&'a ClientAddr>,
}

async fn serve(state: &AppState, target: Target<'_>, request: Request, arrived: Instant) -> Result<Response, Error> {
    let Target {
        route,
        mount,
        rest,
        client,
    } = target;
    let resolved = &route.resolved;
    let version = &resolved.version;
    let deployment = version.deployment.as_ref().map_err(|reason| Error::InvalidVersion {
        app: resolved.app.name.clone(),
        version: version.version.to_string(),
        reason: reason.clone(),
    })?;
    let runtime = || route.runtime(&state.pool, deployment);
    // The host's health check is GET or HEAD only: an app may serve other methods on its own `/health`.
    let host_health = rest == "/health" && matches!(*request.method(), Method::GET | Method::HEAD);
    if host_health {
        if deployment.kind == AppKind::Wasm {
            // Healthy means a worker can actually be had: compiled, instantiated, within the cap.
            crate::backends::wasm::invoke::check(&state.pool, runtime(), arrived + HEALTH_TIMEOUT)
                .await
                .map_err(|cause| Error::WorkerFailed {
                    app: resolved.app.name.clone(),
                    version: version.version.to_string(),
                    cause: cause.into(),
                })?;
        }
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "OK",
        )
            .into_response());
    }
    // Proxy rules come before whatever the version runs: a matched request never reaches a worker.
    let app_path = if rest.is_empty() { "/" } else { rest };
    if let Some(matched) = deployment.proxy.find(app_path) {
        return state
            .upstreams
            .forward(&matched, mount, app_path, request, client)
            .await;
    }
    match deployment.kind {
        AppKind::Static => {
            let method = request.method();
            if rest.is_empty() && (method == Method::GET || method == Method::HEAD) {
                // `/app@1` -> `/app@1/`, so that the page's relative links resolve under its prefix.
                let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
                return static_files::redirect(&format!("{mount}/{query}"));
            }
            static_files::serve(deployment, app_path, method, request.headers()).await
        }
        AppKind::Wasm => {
            crate::backends::wasm::invoke::invoke(&state.pool, runtime(), app_request(request), arrived).await
        }
    }
}

/// `/hello@1/a/b` -> (`hello@1`, `/a/b`); `/hello@1` -> (`hello@1`, ``).
pub fn split_mount(path: &str) -> (&str, &str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    match path.find('/') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    }
}

/// The request as an app sees it: the path after its mount prefix (`/` when nothing follows), the query kept,
/// and the prefix in [`BASE_HEADER`] so the app can build links that come back to the same version.
pub(crate) fn app_request<B>(mut request: http::Request<B>) -> http::Request<B> {
    let (segment, rest) = split_mount(request.uri().path());
    let base = format!("/{segment}");
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    if let Ok(value) = HeaderValue::from_str(&base) {
        request.headers_mut().insert(BASE_HEADER, value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_is_the_mount_and_the_rest_goes_to_the_app() {
        assert_eq!(split_mount("/hello@1/a/b"), ("hello@1", "/a/b"));
        assert_eq!(split_mount("/hello@1/"), ("hello@1", "/"));
        assert_eq!(split_mount("/hello@1"), ("hello@1", ""));
        assert_eq!(split_mount("/"), ("", ""));
    }

    #[test]
    fn an_app_sees_the_rest_of_the_path_and_its_mount_prefix() {
        let cases = [
            ("/hello@1/a/b?q=1", "/a/b?q=1", "/hello@1"),
            ("/hello@1", "/", "/hello@1"),
            ("/hello@1?x=y", "/?x=y", "/hello@1"),
            ("/hello/", "/", "/hello"),
            ("/hello@%5E1.2/x", "/x", "/hello@%5E1.2"),
        ];
        for (uri, seen, base) in cases {
            let request = app_request(http::Request::get(uri).body(()).unwrap());
            assert_eq!(request.uri(), seen, "{uri}");
            assert_eq!(request.headers()[BASE_HEADER], base, "{uri}");
        }
    }

    #[test]
    fn a_client_cannot_forge_the_mount_prefix() {
        let request = http::Request::get("/hello@1/x")
            .header(BASE_HEADER, "/evil")
            .body(())
            .unwrap();
        assert_eq!(app_request(request).headers()[BASE_HEADER], "/hello@1");
    }
}
