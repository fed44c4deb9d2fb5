//! Log output: human-readable by default, one JSON object per line for log collectors.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Pretty,
    Json,
}

/// Parses a level or filter (`info`, `marina=debug,hyper=warn`), so a bad one is refused before anything starts.
pub(crate) fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("invalid log level {level:?}: {e}"))
}

/// Lines waiting for the log thread before a thread that logs waits for room: generous, since a line is never
/// dropped.
const LOG_BUFFER_LINES: usize = 64 * 1024;

/// Installs the global subscriber. Logs go to stderr; stdout is left for what a command prints.
///
/// Lines are written by a thread of their own (tracing-appender's non-blocking writer), in batches through a
/// buffer: the access line of every request would otherwise cost its serving core a `write` to stderr, and a slow
/// reader of stderr (a pipe to a log shipper) would stall every core that logs. None is dropped: when the buffer
/// is full, the thread that logs waits. The guard flushes what is left when it is dropped, so `serve` holds it to
/// the end.
pub(crate) fn init(format: LogFormat, filter: EnvFilter) -> tracing_appender::non_blocking::WorkerGuard {
    // Colour codes only where a person is looking; a file or a pipe gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("marina-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    // Only fails if a subscriber is already installed (a test that serves twice): the first one keeps working.
    let _ = result;
    guard
}
