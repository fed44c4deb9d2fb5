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

/// Installs the global subscriber. Logs go to stderr; stdout is left for what a command prints.
pub(crate) fn init(format: LogFormat, filter: EnvFilter) {
    // Colour codes only where a person is looking; a file or a pipe gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    // Only fails if a subscriber is already installed (a test that serves twice): the first one keeps working.
    let _ = result;
}
