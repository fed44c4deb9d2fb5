//! The `marina` command line: `serve`, `check` and `schema`, and how the process logs ([`logging`]).
//!
//! Every flag of `serve` can also come from the environment (`--port` or `PORT`), and every setting is checked
//! before the port is bound, so a bad one fails at start with a message naming the flag, not on the first request.

pub(crate) mod logging;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::backends::wasm::engine;
use crate::deploy::registry;
use crate::server::ServeOptions;
use logging::LogFormat;

pub(crate) const DEFAULT_APPS_DIR: &str = "./apps";
pub(crate) const DEFAULT_HOST: &str = "127.0.0.1";
pub(crate) const DEFAULT_PORT: u16 = 8080;
pub(crate) use crate::backends::wasm::pool::{DEFAULT_POOL_SIZE, DEFAULT_QUEUE_LIMIT};
/// The pool reserves address space per slot, so the cap has a ceiling.
pub(crate) const MAX_POOL_SIZE: usize = 10_000;
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: &str = "30s";
/// The longest wait queue accepted: each waiter is a small allocation, but a queue this long is already a outage.
pub(crate) const MAX_QUEUE_LIMIT: usize = 1_000_000;
/// More serving threads than this is a typo, not a machine.
pub(crate) const MAX_SERVING_CORES: usize = 1024;
/// A drain longer than this is a misconfiguration, not a wish.
pub(crate) const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Exit code for settings that are wrong (as clap uses for bad flags).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "marina",
    version,
    about = "Hosts versioned WebAssembly and static apps from a directory."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve every app in the apps directory at /<app>@<version>/.
    Serve(ServeArgs),
    /// Check an apps directory: every version's config and entrypoint, and what each component exports. Exits
    /// non-zero if any is invalid.
    Check {
        /// The apps directory to check.
        #[arg(env = "APPS_DIR", default_value = DEFAULT_APPS_DIR)]
        dir: PathBuf,
    },
    /// Print the JSON schema of worker.config.json.
    Schema,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The directory holding <app>/<version>/ folders.
    #[arg(long, env = "APPS_DIR", default_value = DEFAULT_APPS_DIR)]
    pub(crate) apps_dir: PathBuf,
    /// The address to listen on (an IP address or a host name).
    #[arg(long, env = "HOST", default_value = DEFAULT_HOST)]
    pub(crate) host: String,
    /// The port to listen on; 0 picks a free one (the address is logged).
    #[arg(long, env = "PORT", default_value_t = DEFAULT_PORT)]
    pub(crate) port: u16,
    /// The most WASM instances alive at once, across all apps.
    #[arg(long, env = "POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE, value_parser = parse_pool_size)]
    pub(crate) pool_size: usize,
    /// Requests that may wait for a busy pool at once; beyond it they get 503 with Retry-After. 0 disables waiting.
    #[arg(long, env = "QUEUE_LIMIT", default_value_t = DEFAULT_QUEUE_LIMIT, value_parser = parse_queue_limit)]
    pub(crate) queue_limit: usize,
    /// Where compiled components are cached between runs [default: $XDG_CACHE_HOME/marina/components or
    /// ~/.cache/marina/components].
    #[arg(long, env = "MARINA_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Do not cache compiled components on disk.
    #[arg(long, conflicts_with = "cache_dir")]
    pub(crate) no_cache: bool,
    /// Compile every component before reporting ready, so no first request waits for a compile.
    #[arg(long, env = "PRECOMPILE")]
    pub(crate) precompile: bool,
    /// How log lines are written.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub(crate) log_format: LogFormat,
    /// A level (`info`, `debug`) or a filter (`marina=debug,hyper=warn`).
    #[arg(long, env = "LOG_LEVEL", default_value = DEFAULT_LOG_LEVEL)]
    pub(crate) log_level: String,
    /// How long a shutdown waits for in-flight requests (`30s`, `500ms`, or seconds).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = parse_shutdown_timeout)]
    pub(crate) shutdown_timeout: Duration,
    /// Do not count or time requests (pool metrics stay); only for measuring what request metrics cost.
    #[arg(long, env = "NO_REQUEST_METRICS")]
    pub(crate) no_request_metrics: bool,
    /// Threads serving connections, each with its own runtime [default: one per CPU]; 0 serves them on the
    /// process's shared runtime.
    #[arg(long, env = "SERVING_CORES", value_parser = parse_serving_cores)]
    pub(crate) serving_cores: Option<usize>,
}

/// A count: a whole number from `range`.
fn parse_count(text: &str, range: std::ops::RangeInclusive<usize>) -> Result<usize, String> {
    let count: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if !range.contains(&count) {
        return Err(match range.start() {
            0 => format!("must be at most {}", range.end()),
            start => format!("must be between {start} and {}", range.end()),
        });
    }
    Ok(count)
}

fn parse_pool_size(text: &str) -> Result<usize, String> {
    parse_count(text, 1..=MAX_POOL_SIZE)
}

fn parse_queue_limit(text: &str) -> Result<usize, String> {
    parse_count(text, 0..=MAX_QUEUE_LIMIT)
}

fn parse_serving_cores(text: &str) -> Result<usize, String> {
    parse_count(text, 0..=MAX_SERVING_CORES)
}

fn parse_shutdown_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration: {e}"))?,
    };
    if duration > MAX_SHUTDOWN_TIMEOUT {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_SHUTDOWN_TIMEOUT)
        ));
    }
    Ok(duration)
}

/// `serve`'s settings once every one has been checked: where to listen, how to log, and how to serve.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) addr: SocketAddr,
    pub(crate) log_format: LogFormat,
    pub(crate) log_filter: tracing_subscriber::EnvFilter,
    pub(crate) serve: ServeOptions,
}

impl ServeArgs {
    /// Checks what clap cannot: that the directory exists and the host resolves and the log filter parses.
    pub(crate) fn validate(self) -> Result<Settings, String> {
        let apps_dir = canonical_dir(&self.apps_dir, "--apps-dir")?;
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("--host {:?}: cannot resolve: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("--host {:?}: resolves to no address", self.host))?;
        let log_filter = logging::parse_filter(&self.log_level).map_err(|e| format!("--log-level: {e}"))?;
        let cache_dir = match (self.no_cache, self.cache_dir) {
            (true, _) => None,
            (false, Some(dir)) => Some(dir),
            (false, None) => Some(crate::backends::wasm::engine::default_cache_dir()),
        };
        let defaults = ServeOptions::new(apps_dir);
        let serve = ServeOptions {
            serving_cores: self.serving_cores.unwrap_or(defaults.serving_cores),
            pool_size: self.pool_size,
            queue_limit: self.queue_limit,
            cache_dir,
            precompile: self.precompile,
            drain_timeout: self.shutdown_timeout,
            request_metrics: !self.no_request_metrics,
            ..defaults
        };
        Ok(Settings {
            addr,
            log_format: self.log_format,
            log_filter,
            serve,
        })
    }
}

fn canonical_dir(dir: &std::path::Path, flag: &str) -> Result<PathBuf, String> {
    let canonical = dir
        .canonicalize()
        .map_err(|e| format!("{flag} {}: {e}", dir.display()))?;
    if !canonical.is_dir() {
        return Err(format!("{flag} {}: not a directory", dir.display()));
    }
    Ok(canonical)
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check { dir } => check(&dir),
        Command::Schema => {
            print!("{}", crate::deploy::config::schema_json());
            ExitCode::SUCCESS
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match args.validate() {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("marina: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Held until `serve` returns: dropping it flushes the last lines.
    let _log = logging::init(settings.log_format, settings.log_filter);
    // With serving cores, this runtime only accepts connections and runs the background work (reloads, the
    // reaper, the metrics sampler): one thread is enough. Without them it serves too, on every CPU.
    let mut builder = if settings.serve.serving_cores > 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("marina: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(settings.addr).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(addr = %settings.addr, %error, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => tracing::info!(apps_dir = %settings.serve.apps_dir.display(), "listening on http://{addr}"),
            Err(error) => tracing::warn!(%error, "listening, but the bound address is unknown"),
        }
        let shutdown = crate::server::signals::shutdown_signal();
        match crate::server::serve(listener, settings.serve, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Why a WebAssembly version's entrypoint could not be served, from its exports (without compiling it), or
/// `None` if it can be or the version is not WebAssembly.
fn component_problem(app: &str, version: &registry::AppVersion, deployment: &registry::Deployment) -> Option<String> {
    if !matches!(deployment.kind, registry::AppKind::Wasm) {
        return None;
    }
    let at = format!("{app}/{}: {}", version.dir_name, deployment.entrypoint.display());
    match std::fs::read(&deployment.entrypoint_path) {
        Err(error) => Some(format!("{at}: cannot read it: {error}")),
        Ok(bytes) => engine::check_exports(&bytes)
            .err()
            .map(|reason| format!("{at}: {reason}")),
    }
}

/// `marina check`: one line per problem on stdout; exit 1 if any version is invalid.
fn check(dir: &std::path::Path) -> ExitCode {
    let dir = match canonical_dir(dir, "apps directory") {
        Ok(dir) => dir,
        Err(message) => {
            eprintln!("marina: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let snapshot = match registry::scan_apps_dir(&dir) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            eprintln!("marina: cannot read {}: {error}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let (mut versions, mut errors) = (0, 0);
    let apps = snapshot.sorted_apps();
    for reason in &snapshot.ignored {
        println!("warning: {reason}");
    }
    for app in &apps {
        for reason in &app.ignored {
            println!("warning: {reason}");
        }
        for version in &app.versions {
            versions += 1;
            let problem = match &version.deployment {
                Err(error) => Some(error.clone()),
                Ok(deployment) => component_problem(&app.name, version, deployment),
            };
            if let Some(problem) = problem {
                errors += 1;
                println!("error: {problem}");
            }
        }
    }
    if errors > 0 {
        println!("{errors} of {versions} versions are invalid");
        return ExitCode::FAILURE;
    }
    println!("ok: {} apps, {versions} versions", apps.len());
    ExitCode::SUCCESS
}
