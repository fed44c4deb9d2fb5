//! WebSocket upgrades through a proxy rule: the upgrade request goes to the target (`ws`/`wss` as the target is
//! `http`/`https`) on a connection of its own; when the upstream switches protocols, the client gets its 101 and
//! the two connections are joined byte for byte until either side closes, or the server shuts down.
//!
//! Bytes the client sends right behind its upgrade request are not lost: hyper hands them over with the upgraded
//! connection, and they are written to the upstream first.

use axum::body::Body;
use axum::response::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tower::Service;

use super::{client_response, error_chain, failed, headers, within, Rule, Upstreams};
use crate::error::Error;

/// Whether `request` asks to switch to WebSocket (an HTTP/1.1 `Upgrade`; HTTP/2 has no such thing).
pub(crate) fn is_upgrade<B>(request: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    };
    request.version() == http::Version::HTTP_11
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
}

/// One upgrade on its way to the upstream.
pub(crate) struct Tunnel<'a> {
    pub(crate) rule: &'a Rule,
    pub(crate) uri: Uri,
    /// The request headers as forwarded (hop-by-hop ones already removed).
    pub(crate) headers: HeaderMap,
    pub(crate) client_upgrade: OnUpgrade,
    /// The client's side of a forwarded path, for redirects (see `client_prefix`).
    pub(crate) client_prefix: &'a (dyn Fn() -> String + Sync),
}

impl Tunnel<'_> {
    /// Sends the upgrade upstream. A 101 is passed to the client and the tunnel starts; any other answer is
    /// passed on as a normal response.
    pub(crate) async fn open(self, upstreams: &Upstreams) -> Result<Response, Error> {
        let Tunnel {
            rule,
            uri,
            mut headers,
            client_upgrade,
            client_prefix,
        } = self;
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut connector = match rule.secure {
            true => upstreams.tunnel_verified.clone(),
            false => upstreams.tunnel_unverified.clone(),
        };
        let exchange = async {
            std::future::poll_fn(|cx| connector.poll_ready(cx))
                .await
                .map_err(|e| error_chain(e.as_ref()))?;
            let stream = connector.call(uri.clone()).await.map_err(|e| error_chain(e.as_ref()))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(stream)
                .await
                .map_err(|e| error_chain(&e))?;
            tokio::spawn(async move {
                if let Err(error) = connection.with_upgrades().await {
                    tracing::debug!(%error, "upstream WebSocket connection ended with an error");
                }
            });
            let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
            let mut request = Request::get(path).body(Body::empty()).expect("a valid request");
            *request.headers_mut() = headers;
            sender.send_request(request).await.map_err(|e| error_chain(&e))
        };
        let mut response = within(rule, exchange).await?.map_err(|reason| failed(rule, reason))?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(client_response(rule, response, client_prefix));
        }

        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let mut answer = Response::new(Body::empty());
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let mut answer_headers = std::mem::take(response.headers_mut());
        headers::strip_hop_by_hop(&mut answer_headers);
        headers::add_via(&mut answer_headers, http::Version::HTTP_11);
        answer_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        answer_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        *answer.headers_mut() = answer_headers;

        let shutdown = upstreams.shutdown.clone();
        let name = rule.describe();
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(rule = %name, %error, "a WebSocket upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(error) = result {
                        tracing::debug!(rule = %name, %error, "a WebSocket tunnel ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    // Close both ends properly (a FIN, not a reset), so each side sees the connection end.
                    let _ = client.shutdown().await;
                    let _ = upstream.shutdown().await;
                }
            }
        });
        Ok(answer)
    }
}
