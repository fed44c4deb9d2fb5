//! What a guest gets into the host's log, and the bounds that keep one guest from flooding it.
//!
//! A guest's stdout and stderr become log lines: split at `\n` (a trailing `\r` dropped), each an `info` event
//! with `target: "marina::guest"`, the `app` and `version` it came from and the `stream` it was written to, the
//! text as the message. A line longer than [`MAX_LOG_LINE_BYTES`] is cut, and a worker logs at most
//! [`MAX_LOG_LINES_PER_REQUEST`] lines per request (stdout and stderr together), then one warning, then nothing
//! until its next request. The host's own failure lines about a version (traps, timeouts, missing responses) are
//! rate-limited here too, by [`LogLimiter`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::backends::wasm::worker::Identity;

/// The longest guest output line logged whole; longer lines are cut, so one line cannot hold much memory.
pub(crate) const MAX_LOG_LINE_BYTES: usize = 4096;
/// Lines of guest output logged per request; the rest are counted and dropped, so a chatty guest cannot flood
/// the log.
pub(crate) const MAX_LOG_LINES_PER_REQUEST: u32 = 200;

/// Failure lines (traps, timeouts, missing responses) logged per app version per second; the rest are counted and
/// reported with the next line that gets through, so an app that crashes on every request cannot flood the log
/// (and slow the host writing it).
pub(crate) const MAX_FAILURE_LOGS_PER_SECOND: u32 = 10;

/// The origin of [`LogLimiter`]'s seconds.
static LIMITER_BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Admits at most [`MAX_FAILURE_LOGS_PER_SECOND`] lines a second.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    second: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// `Some(n)`: log this line, saying that `n` lines were dropped before it; `None`: drop it.
    pub(crate) fn admit(&self) -> Option<u64> {
        let second = LIMITER_BASE.elapsed().as_secs();
        if self.second.swap(second, Ordering::Relaxed) != second {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < MAX_FAILURE_LOGS_PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// How many lines a worker may still log in the current request, shared by its stdout and stderr.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    used: AtomicU32,
    dropped: AtomicU64,
}

impl LogBudget {
    fn take(&self) -> bool {
        if self.used.fetch_add(1, Ordering::Relaxed) < MAX_LOG_LINES_PER_REQUEST {
            return true;
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// A new request: the full budget again.
    pub(crate) fn reset(&self) {
        self.used.store(0, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
    }
}

/// A guest's stdout or stderr, as log lines tagged with `app@version`.
#[derive(Clone)]
pub(crate) struct GuestLog {
    app: String,
    version: String,
    stream: &'static str,
    budget: Arc<LogBudget>,
}

impl GuestLog {
    /// The stream named `stream` (`"stdout"` or `"stderr"`, the `stream` field of its lines), drawing on `budget`.
    pub(crate) fn new(identity: &Identity, stream: &'static str, budget: Arc<LogBudget>) -> GuestLog {
        GuestLog {
            app: identity.app.clone(),
            version: identity.version.clone(),
            stream,
            budget,
        }
    }

    fn emit(&self, line: &[u8]) {
        if !self.budget.take() {
            if self.budget.dropped.load(Ordering::Relaxed) == 1 {
                tracing::warn!(
                    target: "marina::guest",
                    app = %self.app,
                    version = %self.version,
                    "guest output over {MAX_LOG_LINES_PER_REQUEST} lines in one request; dropping the rest"
                );
            }
            return;
        }
        let line = String::from_utf8_lossy(line);
        tracing::info!(
            target: "marina::guest",
            app = %self.app,
            version = %self.version,
            stream = self.stream,
            "{}",
            line.trim_end_matches(['\r', '\n'])
        );
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineWriter::new(self))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter::new(self))
    }
}

/// Splits a byte stream into lines for [`GuestLog`], holding at most one partial line of
/// [`MAX_LOG_LINE_BYTES`].
struct LineWriter {
    log: GuestLog,
    pending: Vec<u8>,
}

impl LineWriter {
    fn new(log: &GuestLog) -> LineWriter {
        LineWriter {
            log: log.clone(),
            pending: Vec::new(),
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.append(&bytes[..end]);
            self.log.emit(&self.pending);
            self.pending.clear();
            bytes = &bytes[end + 1..];
        }
        self.append(bytes);
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_LOG_LINE_BYTES.saturating_sub(self.pending.len());
        self.pending.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.log.emit(&self.pending);
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The JSON log lines written while `write` runs, as the `json` log format prints them.
    fn logged(write: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_target(true)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, write);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn stdout(budget: &Arc<LogBudget>) -> GuestLog {
        let identity = Identity {
            app: "lab".into(),
            version: "1.0.0".into(),
        };
        GuestLog::new(&identity, "stdout", budget.clone())
    }

    fn messages(lines: &[serde_json::Value]) -> Vec<&str> {
        lines.iter().map(|line| line["message"].as_str().unwrap()).collect()
    }

    #[test]
    fn output_is_split_into_lines_tagged_with_the_app_version_and_stream() {
        let budget = Arc::new(LogBudget::default());
        let lines = logged(|| {
            let mut writer = LineWriter::new(&stdout(&budget));
            writer.push(b"one\r\ntw");
            writer.push(b"o\n\nthree");
            // The partial last line is logged when the stream closes.
        });
        assert_eq!(messages(&lines), ["one", "two", "", "three"]);
        for line in &lines {
            assert_eq!(line["target"], "marina::guest");
            assert_eq!(line["level"], "INFO");
            assert_eq!(
                (line["app"].as_str(), line["version"].as_str()),
                (Some("lab"), Some("1.0.0"))
            );
            assert_eq!(line["stream"], "stdout");
        }
    }

    #[test]
    fn a_long_line_is_cut_at_the_limit() {
        let budget = Arc::new(LogBudget::default());
        let lines = logged(|| {
            let mut writer = LineWriter::new(&stdout(&budget));
            writer.push(&[b'x'; MAX_LOG_LINE_BYTES + 10]);
            writer.push(&[b'y'; 10]);
            writer.push(b"\nnext\n");
        });
        assert_eq!(messages(&lines), ["x".repeat(MAX_LOG_LINE_BYTES).as_str(), "next"]);
    }

    #[test]
    fn a_request_logs_at_most_its_budget_then_one_warning_until_the_next_request() {
        let budget = Arc::new(LogBudget::default());
        let over = MAX_LOG_LINES_PER_REQUEST as usize + 50;
        let lines = logged(|| {
            let mut writer = LineWriter::new(&stdout(&budget));
            writer.push("line\n".repeat(over).as_bytes());
        });
        let (output, warnings): (Vec<_>, Vec<_>) = lines.iter().partition(|line| line["stream"].is_string());
        assert_eq!(output.len(), MAX_LOG_LINES_PER_REQUEST as usize);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0]["level"], "WARN");
        assert!(warnings[0]["message"].as_str().unwrap().contains("dropping the rest"));

        budget.reset();
        let lines = logged(|| LineWriter::new(&stdout(&budget)).push(b"again\n"));
        assert_eq!(messages(&lines), ["again"]);
    }

    #[test]
    fn failure_lines_are_admitted_a_few_a_second_and_the_dropped_ones_counted() {
        let limiter = LogLimiter::default();
        // Pin the limiter to the current second, far from its end, so the test does not straddle two seconds.
        while LIMITER_BASE.elapsed().subsec_millis() > 500 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for _ in 0..MAX_FAILURE_LOGS_PER_SECOND {
            assert_eq!(limiter.admit(), Some(0));
        }
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.admit(), None);
        limiter.second.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(
            limiter.admit(),
            Some(2),
            "the next second's first line says how many were dropped"
        );
    }
}
