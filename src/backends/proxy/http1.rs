//! Plain `http` upstreams over HTTP/1.1, each connection driven by the request that is using it.
//!
//! hyper-util's pooled client runs every connection as a task of its own, so each forwarded request crosses
//! tasks twice (a channel to the connection's task, a oneshot back), often between threads; profiling the proxy
//! benchmark found that hand-off and the pool around it among the largest costs of a proxied request. Here a
//! connection is hyper's `SendRequest`/`Connection` pair, polled by whoever holds it: the request's own future
//! until the response head arrives, then the response body as the front server pulls it (so a slow client slows
//! the upstream down, as it should). When the body ends the pair goes back to an idle list; a body dropped midway
//! closes its connection, since HTTP/1 cannot abandon a response and go on using the connection.
//!
//! `https` targets keep hyper-util's client (TLS, HTTP/2 by ALPN), whose costs are dwarfed by the encryption.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http::uri::Authority;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};
use crate::core_local::{Padded, PerCore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One upstream connection: the handle requests are sent on, and the state machine that moves its bytes.
struct Connection {
    sender: http1::SendRequest<Body>,
    driver: http1::Connection<TokioIo<TcpStream>, Body>,
}

impl Connection {
    /// Moves the connection's bytes; ready when the connection has ended (closed by either side, or failed), after
    /// which it must not be polled again.
    fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.driver).poll(cx).map(|_| ())
    }

    /// Whether the connection can take a request now: polled once, still open, and waiting for the next request
    /// (a response read to its end with the request fully written, and no `Connection: close`). Polled with a
    /// waker that does nothing: no task waits on an idle connection; the next request that takes it polls it
    /// with its own.
    fn poll_reusable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_drive(&mut cx).is_pending() && self.sender.is_ready()
    }
}

struct Idle {
    /// Boxed, as everywhere: the pair is ~700 bytes, moved in and out of the list on every request.
    connection: Box<Connection>,
    since: Instant,
}

/// How often a check-in also drops the stale connections of every upstream, not only its own: an upstream no rule
/// names any more (a config reload) would otherwise keep its idle connections open for the life of the process.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Idle connections to plain-HTTP upstreams, per serving core and authority, most recently used last.
///
/// A connection is polled by the I/O driver of the core that opened it, so it is only lent to requests on that
/// core (see [`crate::core_local`]): used from another, each of its reads would wait for the owning core to turn
/// its driver. One lock per core also keeps the cores from contending for the lists, and what a response body
/// holds to give its connection back (the core's lists, the core's copy of the authority) is written by that core
/// alone: the pool itself and the rule's authority are shared by every core, and cloning either for each request
/// wrote their reference counts from both.
#[derive(Default)]
pub(crate) struct Http1Pool {
    cores: PerCore<Arc<CoreLists>>,
}

/// One core's idle lists, on cache lines of their own.
type CoreLists = Padded<Mutex<IdleLists>>;

struct IdleLists {
    /// Hashed with foldhash: every request looks its upstream up here twice, the keys come from configs rather than
    /// clients, and SipHash over an authority (hashed a byte at a time, case-folded) cost more than the list work.
    by_authority: HashMap<Authority, Upstream, foldhash::fast::RandomState>,
    swept: Instant,
}

impl Default for IdleLists {
    fn default() -> Self {
        IdleLists {
            by_authority: HashMap::default(),
            swept: Instant::now(),
        }
    }
}

/// One upstream's idle connections on one core.
struct Upstream {
    /// The core's own copy of the authority, which its response bodies clone.
    authority: Authority,
    idle: Vec<Idle>,
}

impl IdleLists {
    /// Drops every connection idle for longer than [`POOL_IDLE_TIMEOUT`] at `now`, and the lists left empty.
    fn sweep(&mut self, now: Instant) {
        self.by_authority.retain(|_, upstream| {
            upstream
                .idle
                .retain(|entry| now.saturating_duration_since(entry.since) <= POOL_IDLE_TIMEOUT);
            !upstream.idle.is_empty()
        });
        self.swept = now;
    }

    /// A list for `authority`, which has none yet on this core, under a copy of the authority that this core
    /// alone clones. The callers look the list up first and come here only when it is missing: an authority hashes
    /// a byte at a time (case-folded), so each lookup is worth saving.
    fn add_upstream(&mut self, authority: &Authority) -> &mut Upstream {
        let own = Authority::from_maybe_shared(bytes::Bytes::copy_from_slice(authority.as_str().as_bytes()))
            .expect("a valid authority stays valid when copied");
        let upstream = Upstream {
            authority: own.clone(),
            idle: Vec::new(),
        };
        self.by_authority.entry(own).or_insert(upstream)
    }
}

impl Http1Pool {
    /// Sends `request` (origin-form URI, `Host` set) to `authority` on an idle connection, or a new one. A request
    /// that an idle connection closed under before a byte of it was written is sent again on a new connection.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        mut request: http::Request<Body>,
    ) -> Result<http::Response<UpstreamBody>, BoxError> {
        let lists = self.cores.local();
        loop {
            let (idle, own_authority) = ready_idle(lists, authority);
            let (mut connection, reused) = match idle {
                Some(connection) => (connection, true),
                // Boxed: a new connection is the rare case, and its DNS and connect futures are large.
                None => (Box::pin(connect(authority)).await?, false),
            };
            let mut response = std::pin::pin!(connection.sender.try_send_request(request));
            let mut ended = false;
            let result = poll_fn(|cx| {
                if !ended && connection.poll_drive(cx).is_ready() {
                    // The response future now fails too: hyper answers every queued request when it stops.
                    ended = true;
                }
                response.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(response) => {
                    let home = Home {
                        lists: lists.clone(),
                        authority: own_authority,
                    };
                    return Ok(stream(home, response, (!ended).then_some(connection)));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }
}

/// Where a connection goes back to when its response ends: the idle lists of the core it was taken on, under that
/// core's copy of its authority.
struct Home {
    lists: Arc<CoreLists>,
    authority: Authority,
}

impl Home {
    /// Puts `connection` on the idle list if it can take another request (polling it once to find out), or
    /// closes it.
    fn check_in(&self, mut connection: Box<Connection>) {
        if !connection.poll_reusable() {
            return;
        }
        let now = Instant::now();
        let mut lists = lock(&self.lists);
        if now.saturating_duration_since(lists.swept) > SWEEP_INTERVAL {
            lists.sweep(now);
        }
        let idle = Idle { connection, since: now };
        match lists.by_authority.get_mut(&self.authority) {
            Some(upstream) if upstream.idle.len() < POOL_MAX_IDLE_PER_HOST => upstream.idle.push(idle),
            Some(_) => {}
            // Swept away while the connection was lent.
            None => lists.add_upstream(&self.authority).idle.push(idle),
        }
    }
}

fn lock(lists: &CoreLists) -> std::sync::MutexGuard<'_, IdleLists> {
    lists.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The response with a body that keeps driving `connection` and hands it back at its end.
fn stream(
    home: Home,
    response: http::Response<Incoming>,
    mut connection: Option<Box<Connection>>,
) -> http::Response<UpstreamBody> {
    let (parts, incoming) = response.into_parts();
    if incoming.is_end_stream() {
        // No body to pull (HEAD, 204, 304, `Content-Length: 0`): the connection is free now.
        if let Some(connection) = connection.take() {
            home.check_in(connection);
        }
    }
    let body = UpstreamBody {
        incoming,
        connection,
        home,
    };
    http::Response::from_parts(parts, body)
}

/// The most recently used idle connection to `authority` in `lists` that is still open, dropping closed and stale
/// ones; and the core's copy of the authority.
fn ready_idle(lists: &CoreLists, authority: &Authority) -> (Option<Box<Connection>>, Authority) {
    loop {
        let (idle, own) = take_idle(lists, authority);
        let Some(mut idle) = idle else {
            return (None, own);
        };
        // Polling it reads what arrived while idle: an EOF ends it, and its sender turns ready.
        if idle.poll_reusable() {
            return (Some(idle), own);
        }
    }
}

fn take_idle(lists: &CoreLists, authority: &Authority) -> (Option<Box<Connection>>, Authority) {
    let mut lists = lock(lists);
    let Some(upstream) = lists.by_authority.get_mut(authority) else {
        return (None, lists.add_upstream(authority).authority.clone());
    };
    // One clock read, not one per entry the search looks at.
    let now = Instant::now();
    let list = &mut upstream.idle;
    let fresh_from = list.partition_point(|entry| now.saturating_duration_since(entry.since) > POOL_IDLE_TIMEOUT);
    list.drain(..fresh_from);
    let connection = list.pop().map(|entry| entry.connection);
    (connection, upstream.authority.clone())
}

/// Opens a TCP connection to `authority` (port 80 when it names none) and starts HTTP/1.1 on it.
async fn connect(authority: &Authority) -> Result<Box<Connection>, BoxError> {
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(format!("cannot connect to {authority}: {error}").into()),
        Err(_) => {
            let secs = CONNECT_TIMEOUT.as_secs();
            return Err(format!("cannot connect to {authority}: no answer within {secs} s").into());
        }
    };
    stream.set_nodelay(true)?;
    let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
    Ok(Box::new(Connection { sender, driver }))
}

/// A response body that drives its connection while it streams, and returns it to the pool at its end.
pub(crate) struct UpstreamBody {
    incoming: Incoming,
    /// Until the body ends (then idle in the pool) or the connection does.
    connection: Option<Box<Connection>>,
    home: Home,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(connection) = this.connection.as_mut() {
            if connection.poll_drive(cx).is_ready() {
                this.connection = None;
            }
        }
        let frame = ready!(Pin::new(&mut this.incoming).poll_frame(cx));
        let finished = match &frame {
            Some(Ok(_)) => this.incoming.is_end_stream(),
            Some(Err(_)) => {
                this.connection = None;
                false
            }
            None => true,
        };
        if finished {
            if let Some(connection) = this.connection.take() {
                this.home.check_in(connection);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a listener on 127.0.0.1 that accepts and then holds its end open.
    async fn idle_connection() -> (Authority, Box<Connection>, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let connection = connect(&authority).await.unwrap();
        (authority, connection, listener)
    }

    #[tokio::test]
    async fn a_sweep_closes_stale_connections_of_every_upstream_and_keeps_fresh_ones() {
        let pool = Http1Pool::default();
        let lists = pool.cores.local();
        let (gone, stale, _a) = idle_connection().await;
        let (used, fresh, _b) = idle_connection().await;
        let then = Instant::now();
        {
            let mut idle = lock(lists);
            idle.add_upstream(&gone).idle.push(Idle {
                connection: stale,
                since: then,
            });
            let later = then + POOL_IDLE_TIMEOUT;
            idle.add_upstream(&used).idle.push(Idle {
                connection: fresh,
                since: later,
            });
            idle.sweep(later + std::time::Duration::from_secs(1));
            assert!(!idle.by_authority.contains_key(&gone), "the stale list is gone");
            assert_eq!(idle.by_authority[&used].idle.len(), 1, "the fresh connection stays");
        }
        assert!(take_idle(lists, &used).0.is_some());
        assert!(take_idle(lists, &gone).0.is_none());
    }

    #[tokio::test]
    async fn a_connection_goes_back_under_its_cores_own_copy_of_the_authority() {
        let pool = Http1Pool::default();
        let lists = pool.cores.local();
        let (authority, connection, _listener) = idle_connection().await;
        let (none, own) = take_idle(lists, &authority);
        assert!(none.is_none());
        assert_eq!(own, authority);
        assert_ne!(
            own.as_str().as_ptr(),
            authority.as_str().as_ptr(),
            "the core's copy is its own buffer, not a clone of the rule's"
        );
        Home {
            lists: lists.clone(),
            authority: own,
        }
        .check_in(connection);
        assert!(
            take_idle(lists, &authority).0.is_some(),
            "checked in under the same upstream"
        );
    }
}
