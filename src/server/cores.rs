//! Serving cores: one thread per CPU, each running a `current_thread` runtime of its own, that accepted
//! connections are handed to.
//!
//! On tokio's multi-thread runtime a connection's wakeups land on whichever worker is free, and idle workers steal
//! tasks from busy ones, so one request's work (the socket read, the app, an upstream's answer, the write) hops
//! between threads and caches, and every hop costs a wakeup across cores. Measured with the proxy bench's floor
//! (hyper's server and client and nothing else), a runtime per core served 1.02x nginx where the multi-thread
//! runtime served 0.86-0.92x. Here a connection lives on one core: its tasks (HTTP/2 streams too), the sockets it
//! opens upstream and the guest calls it starts inline all stay on that thread.
//!
//! The accept loop stays where [`serve`](super::serve) runs and gives each connection to the core with the fewest
//! open, so cores fill evenly whatever the clients' addresses (`SO_REUSEPORT` hashes them, and a few keep-alive
//! clients can land on one core), and a listener bound by the caller (the tests bind `127.0.0.1:0`) works as it
//! is. Without work stealing one core cannot lend another its idle time. Guest code that computes leaves the core
//! for the guest lanes; host work a request does inline (starting a worker, say, the first one of a version most
//! of all) holds the other connections on its core meanwhile, which is what the memory bench's tail beside a
//! thousand first requests shows.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The serving cores, until [`Cores::stop`] (or drop) ends their threads, and with them the connections still
/// open there.
pub(crate) struct Cores {
    cores: Vec<Core>,
    /// Where the search for the least loaded core starts, moved on at every pick so that ties rotate.
    next: AtomicUsize,
}

struct Core {
    handle: Handle,
    /// Connections handed to this core and not yet closed.
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Threads all the cores together may run blocking work on (static files read through `tokio::fs`, compiles),
/// shared out evenly: tokio's default for a single runtime, so more cores do not multiply it.
const BLOCKING_THREADS: usize = 512;
/// The fewest blocking threads a core gets, however many cores share [`BLOCKING_THREADS`].
const MIN_BLOCKING_THREADS_PER_CORE: usize = 8;

impl Cores {
    /// Starts `count` serving cores (none for 0: connections are then served on the caller's runtime).
    pub(crate) fn start(count: usize) -> std::io::Result<Cores> {
        let mut cores = Vec::with_capacity(count);
        let blocking = (BLOCKING_THREADS / count.max(1)).max(MIN_BLOCKING_THREADS_PER_CORE);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(blocking)
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("marina-core-{index}"))
                .spawn(move || {
                    crate::core_local::enter(index);
                    // A dropped sender (the server failed, or is gone) stops the core as a sent one does.
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime here drops the tasks still on it: connections the drain gave up on.
                })?;
            cores.push(Core {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Cores {
            cores,
            next: AtomicUsize::new(0),
        })
    }

    /// Serves `stream` with `serve` on the core with the fewest open connections, or on the running runtime when
    /// there are no cores. A stream that cannot be moved to its core is closed, and the reason logged.
    pub(crate) fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(core) = self.least_loaded() else {
            tokio::spawn(serve(stream));
            return;
        };
        // The socket leaves this runtime's I/O driver and joins the core's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot hand a connection to a serving core; it is closed");
                return;
            }
        };
        let open = OpenConnection::new(&core.open);
        core.handle.spawn(async move {
            let _open = open;
            // Registered with the core's I/O driver: this runs on the core.
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::warn!(%error, "a serving core cannot take a connection; it is closed"),
            }
        });
    }

    fn least_loaded(&self) -> Option<&Core> {
        let count = self.cores.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        (0..count)
            .map(|offset| &self.cores[(start + offset) % count])
            .min_by_key(|core| core.open.load(Ordering::Relaxed))
    }

    /// Stops every core and waits for its thread to end, dropping what still runs there.
    pub(crate) async fn stop(mut self) {
        let threads: Vec<_> = self
            .cores
            .iter_mut()
            .filter_map(|core| {
                core.stop.take().map(|stop| stop.send(()));
                core.thread.take()
            })
            .collect();
        if threads.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        // Not joined here: a drop may run on an async thread. Each core ends as soon as it sees its sender gone.
        for core in &mut self.cores {
            core.stop.take();
        }
    }
}

/// One connection counted open on its core until it is dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Accepts a connection from a new client on `listener`: the server's end, and the client's to hold.
    async fn accepted(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// Hands `stream` to a core, where it reports the core it runs on and stays open until the client closes.
    fn hold(cores: &Cores, stream: TcpStream, seen: &tokio::sync::mpsc::UnboundedSender<Option<usize>>) {
        let seen = seen.clone();
        cores.spawn(stream, move |mut stream| async move {
            seen.send(crate::core_local::current()).unwrap();
            let _ = stream.read(&mut [0; 1]).await;
        });
    }

    fn open(cores: &Cores) -> Vec<usize> {
        cores
            .cores
            .iter()
            .map(|core| core.open.load(Ordering::Relaxed))
            .collect()
    }

    #[tokio::test]
    async fn connections_go_to_the_core_with_the_fewest_open_and_run_there() {
        let cores = Cores::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (seen, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (server, client) = accepted(&listener).await;
            hold(&cores, server, &seen);
            clients.push(client);
        }
        let mut on = Vec::new();
        for _ in 0..4 {
            on.push(ran_on.recv().await.unwrap());
        }
        on.sort();
        assert_eq!(
            on,
            [Some(0), Some(0), Some(1), Some(1)],
            "two on each core, run by that core"
        );
        assert_eq!(open(&cores), [2, 2]);

        // Two clients leave (from either core); the two that come next fill whatever gap they left.
        clients.truncate(2);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open(&cores).iter().sum::<usize>() != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "closed connections still counted: {:?}",
                open(&cores)
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let before = open(&cores);
        for _ in 0..2 {
            let (server, client) = accepted(&listener).await;
            hold(&cores, server, &seen);
            clients.push(client);
            ran_on.recv().await.unwrap();
        }
        let after = open(&cores);
        assert_eq!(after, [2, 2], "the emptier core took the new ones (from {before:?})");
        cores.stop().await;
    }

    #[tokio::test]
    async fn stopping_the_cores_closes_the_connections_still_on_them() {
        let cores = Cores::start(1).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (seen, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let (server, mut client) = accepted(&listener).await;
        hold(&cores, server, &seen);
        assert_eq!(ran_on.recv().await.unwrap(), Some(0));
        cores.stop().await;
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut [0; 1])).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection was closed: {read:?}"
        );
    }

    #[tokio::test]
    async fn with_no_cores_a_connection_is_served_on_the_running_runtime() {
        let cores = Cores::start(0).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (seen, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let (server, _client) = accepted(&listener).await;
        hold(&cores, server, &seen);
        assert_eq!(ran_on.recv().await.unwrap(), None);
        cores.stop().await;
    }
}
