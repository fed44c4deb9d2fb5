//! Proxy rules: a version's `proxy` config sends requests whose path matches a rule to an upstream, before any
//! worker is involved.
//!
//! Rules are compiled when the config loads ([`Rules`]); this module forwards a matched request: the URL from the
//! target and the rewritten path, the client's query kept; headers as a proxy should treat them ([`headers`]);
//! bodies streamed both ways; failures as 502 or 504 naming the rule. Upstream connections are pooled: plain `http`
//! ones on connections the requests drive themselves ([`http1`]), `https` ones in hyper-util's client (keep-alive,
//! HTTP/2 where the upstream offers it), one pool for verified TLS and another for `secure: false`.
//! WebSocket upgrades are tunnelled ([`websocket`]).

mod headers;
mod http1;
mod tls;
mod websocket;

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::header::{self, HeaderValue};
use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::backends::stall;
use crate::deploy::rules::{Matched, Rule};
use crate::error::Error;

/// The client's IP as an `X-Forwarded-For` entry: made once per connection by the accept loop rather than formatted
/// for every proxied request, and passed down with each request (not in its extensions, whose map would be one
/// more allocation per request).
#[derive(Debug, Clone)]
pub(crate) struct ClientAddr {
    pub(crate) forwarded_for: http::HeaderValue,
}

impl ClientAddr {
    pub(crate) fn new(addr: std::net::SocketAddr) -> ClientAddr {
        let ip = addr.ip().to_string();
        let forwarded_for = http::HeaderValue::try_from(ip).expect("an IP address is a valid header value");
        ClientAddr { forwarded_for }
    }
}

/// How long connecting to an upstream may take (DNS and TCP; TLS is part of the rule's timeout).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle upstream connection is kept for reuse.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
pub(crate) const POOL_MAX_IDLE_PER_HOST: usize = 256;

type Connector = HttpsConnector<HttpConnector>;

/// The clients that reach upstreams, shared by every rule of every app.
pub(crate) struct Upstreams {
    /// Plain `http` targets: connections driven by the requests themselves ([`http1`]).
    plain: http1::Http1Pool,
    /// `https` targets, HTTP/1.1 or HTTP/2 by ALPN.
    verified: Client<Connector, Body>,
    unverified: Client<Connector, Body>,
    /// HTTP/1.1-only connectors for WebSocket upgrades, which are not pooled.
    tunnel_verified: Connector,
    tunnel_unverified: Connector,
    /// Cancelled at shutdown: open tunnels close.
    shutdown: CancellationToken,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams::new()
    }
}

impl Upstreams {
    pub(crate) fn new() -> Upstreams {
        let client = |connector: Connector| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
                .build(connector)
        };
        Upstreams {
            plain: http1::Http1Pool::default(),
            verified: client(connector(tls::verified(), true)),
            unverified: client(connector(tls::unverified(), true)),
            tunnel_verified: connector(tls::verified(), false),
            tunnel_unverified: connector(tls::unverified(), false),
            shutdown: CancellationToken::new(),
        }
    }

    /// Closes every open WebSocket tunnel (at shutdown: they would otherwise outlive the drain).
    pub(crate) fn close_tunnels(&self) {
        self.shutdown.cancel();
    }

    /// Forwards `request` as `matched` says. `mount` is the client's prefix for the app (`/app@1`), `app_path`
    /// the path the app would have seen (what the rule matched), `client` who sent it (none for a request made in
    /// process).
    pub(crate) async fn forward(
        &self,
        matched: &Matched<'_>,
        mount: &str,
        app_path: &str,
        mut request: Request,
        client: Option<&ClientAddr>,
    ) -> Result<Response, Error> {
        let rule = matched.rule;
        let invalid = |e: http::Error| failed(rule, format!("the forwarded URL is invalid: {e}"));
        let path_and_query = rule
            .target
            .path_and_query(&matched.path, request.uri().query())
            .map_err(invalid)?;
        let client_version = request.version();
        // A header value is a shared buffer: cloning it copies nothing.
        let client_host = match request.headers().get(header::HOST) {
            Some(host) => Some(host.clone()),
            None => request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let client_ip = client.map(|client| client.forwarded_for.clone());
        let client_upgrade = websocket::is_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();

        let mut headers = parts.headers;
        headers::strip_hop_by_hop(&mut headers);
        headers::add_forwarded(
            &mut headers,
            &headers::Forwarded {
                client_ip,
                // The front server speaks plain HTTP (h1 and h2c); TLS termination, when it comes, sets this.
                proto: "http",
                host: client_host.as_ref(),
            },
        );
        headers::add_via(&mut headers, client_version);
        if rule.change_origin {
            headers.insert(header::HOST, rule.target.host.clone());
            if headers.contains_key(header::ORIGIN) {
                if let Ok(origin) = HeaderValue::from_str(&rule.target.origin()) {
                    headers.insert(header::ORIGIN, origin);
                }
            }
        } else if let Some(host) = client_host {
            headers.insert(header::HOST, host);
        }
        if !headers.contains_key(header::HOST) {
            // HTTP/1.1 requires one; a client without (HTTP/1.0, or HTTP/2 without `:authority`) gets the target's.
            headers.insert(header::HOST, rule.target.host.clone());
        }
        for name in rule.headers.keys() {
            headers.remove(name);
        }
        for (name, value) in &rule.headers {
            headers.append(name, value.clone());
        }

        // Only a redirect needs it.
        let prefix = || client_prefix(mount, app_path, &matched.path);
        if let Some(client_upgrade) = client_upgrade {
            let tunnel = websocket::Tunnel {
                rule,
                uri: rule.target.absolute(path_and_query).map_err(invalid)?,
                headers,
                client_upgrade,
                client_prefix: &prefix,
            };
            // Boxed: rare, and its handshakes would otherwise size every proxied request's future.
            return Box::pin(tunnel.open(self)).await;
        }

        let mut upstream = http::Request::new(body);
        *upstream.method_mut() = parts.method;
        *upstream.headers_mut() = headers;
        if rule.target.scheme == http::uri::Scheme::HTTP {
            // Origin-form on the wire: a hyper connection writes the URI as it is given.
            *upstream.uri_mut() = Uri::from(path_and_query);
            let response = within(rule, self.plain.send(&rule.target.authority, upstream))
                .await?
                .map_err(|e| failed(rule, error_chain(e.as_ref())))?;
            return Ok(client_response(rule, response, &prefix));
        }
        *upstream.uri_mut() = rule.target.absolute(path_and_query).map_err(invalid)?;
        let client = if rule.secure { &self.verified } else { &self.unverified };
        let response = within(rule, client.request(upstream))
            .await?
            .map_err(|e| failed(rule, error_chain(&e)))?;
        Ok(client_response(rule, response, &prefix))
    }
}

fn connector(tls: rustls::ClientConfig, pooled: bool) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if pooled {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    }
}

/// Runs `future` within the rule's timeout; running out is a 504 naming the rule.
async fn within<T>(rule: &Rule, future: impl std::future::Future<Output = T>) -> Result<T, Error> {
    match rule.timeout {
        Some(limit) => tokio::time::timeout(limit, future)
            .await
            .map_err(|_| Error::UpstreamTimeout {
                rule: rule.describe(),
                target: rule.target.origin(),
                secs: limit.as_secs(),
            }),
        None => Ok(future.await),
    }
}

fn failed(rule: &Rule, reason: String) -> Error {
    Error::UpstreamFailed {
        rule: rule.describe(),
        target: rule.target.origin(),
        reason,
    }
}

/// An error and its causes in one line: hyper's own message is only "client error (Connect)"; the cause says
/// "Connection refused" or which certificate check failed.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// The upstream's response as the client gets it: hop-by-hop headers dropped, `Via` added, redirects to the
/// upstream rewritten, the body streamed (and cut if the upstream stalls longer than the rule's timeout).
fn client_response<B>(rule: &Rule, response: http::Response<B>, client_prefix: &(dyn Fn() -> String + Sync)) -> Response
where
    B: http_body::Body<Data = bytes::Bytes, Error = hyper::Error> + Send + Unpin + 'static,
{
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::add_via(&mut parts.headers, parts.version);
    if parts.headers.contains_key(header::LOCATION) {
        headers::rewrite_location(&mut parts.headers, &rule.target, &client_prefix());
    }
    parts.version = http::Version::HTTP_11;
    let body = match rule.timeout {
        Some(limit) => Body::new(stall::StallTimeout::new(body, limit)),
        None => Body::new(body),
    };
    Response::from_parts(parts, body)
}

/// What stands before a forwarded path on the client's side: the mount, plus the part of the app's path that the
/// rewrite cut off (`/api/users` forwarded as `/users` -> `/api`). When the rewrite did more than cut a prefix,
/// only the mount.
fn client_prefix(mount: &str, app_path: &str, forwarded: &str) -> String {
    // A rewrite to nothing forwards `/`, which the app's path need not end with.
    let cut = match forwarded == "/" && !app_path.ends_with('/') {
        true => Some(app_path),
        false => app_path.strip_suffix(forwarded),
    };
    match cut {
        Some(cut) => format!("{mount}{}", cut.trim_end_matches('/')),
        None => mount.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::client_prefix;

    #[test]
    fn the_client_prefix_keeps_what_a_rewrite_cut_off() {
        assert_eq!(client_prefix("/app@1", "/api/users", "/users"), "/app@1/api");
        assert_eq!(client_prefix("/app@1", "/users", "/users"), "/app@1");
        assert_eq!(client_prefix("/app@1", "/api/", "/"), "/app@1/api");
        assert_eq!(client_prefix("/app@1", "/api", "/"), "/app@1/api");
        assert_eq!(client_prefix("/app@1", "/", "/"), "/app@1");
        assert_eq!(client_prefix("/app@1", "/a/b", "/v2/b"), "/app@1");
    }
}
