//! Proxy rules under load: an upstream called directly, through a Marina proxy rule (on its serving cores, and on
//! one shared multi-thread runtime as before them), through the floor of this stack (hyper's HTTP/1.1 server and
//! client with nothing of Marina's, [`harness::start_floor`]), through the same floor served by one
//! `current_thread` runtime per core ([`harness::start_floor_per_core`]), and through nginx's `proxy_pass` with
//! keep-alive upstream connections, all in the same run with the same load.
//!
//! `cargo bench --bench marina -- proxy` (needs `wrk`: `apt-get install wrk`; nginx is included when `NGINX` names its
//! binary or `nginx` is on the PATH: `apt-get install nginx`). Each scenario is a `wrk -t1 -c64` run of
//! `BENCH_SECS` (default 10), the scenarios taking turns for `BENCH_ROUNDS` rounds (default 3); the table shows
//! each scenario's median round. The upstream is an axum "hello" handler on a runtime of its own. Run without
//! `--bench` (as `cargo test --all-targets` does) it only checks that every scenario answers.
//!
//! Besides rate and latency, each run reports the CPU time the forwarder and the upstream spent per request (from
//! `/proc`). On this shared 2-core machine the load generator, the upstream and the forwarder compete for the same
//! cores, so the rate a forwarder reaches follows from what each request costs it; CPU per request is also steadier
//! from run to run than the rate.
//!
//! The comparison is not quite like for like, in nginx's favour: Marina also resolves the app's version, matches
//! the rule's regex, and adds `X-Forwarded-For`, `-Proto`, `-Host` and `Via`, which this nginx config does not.
//! The floor does none of that either: it forwards path and headers as they come, one upstream connection per
//! client connection, so the distance between it and the rule is what routing, rules, header handling, timeouts,
//! metrics and Marina's upstream pool cost.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{self, start_marina, start_native, wrk, Load, CONNECTIONS};

/// The name of the upstream runtime's threads, whose CPU time is counted apart.
const UPSTREAM_THREADS: &str = "upstream";

/// Whose CPU time a scenario's forwarding costs.
enum Forwarder {
    /// No one: the load goes straight to the upstream.
    None,
    /// This process's threads, except the upstream's.
    ThisProcess,
    /// The nginx master process with this pid, and its workers.
    Nginx(u32),
}

impl Forwarder {
    fn cpu(&self) -> Duration {
        let this = std::process::id();
        match self {
            Forwarder::None => Duration::ZERO,
            Forwarder::ThisProcess => harness::process_cpu(this).saturating_sub(upstream_cpu()),
            Forwarder::Nginx(pid) => harness::process_tree_cpu(*pid),
        }
    }
}

fn upstream_cpu() -> Duration {
    harness::threads_cpu(std::process::id(), UPSTREAM_THREADS)
}

/// One scenario's run: the load's figures, and the CPU time spent per request by the forwarder and the upstream.
struct Round {
    load: Load,
    forwarder_us: f64,
    upstream_us: f64,
}

/// Runs the load against `url` and measures whose CPU it took.
fn round(url: &str, secs: u64, forwarder: &Forwarder) -> Round {
    let (forwarder_before, upstream_before) = (forwarder.cpu(), upstream_cpu());
    let load = wrk(url, secs);
    let per_request = |spent: Duration| spent.as_secs_f64() * 1e6 / load.requests.max(1) as f64;
    Round {
        forwarder_us: per_request(forwarder.cpu().saturating_sub(forwarder_before)),
        upstream_us: per_request(upstream_cpu().saturating_sub(upstream_before)),
        load,
    }
}

/// The median of each figure of `rounds`, taken separately.
fn median(rounds: Vec<Round>) -> Round {
    let middle = |figure: fn(&Round) -> f64| harness::median(rounds.iter().map(figure).collect());
    Round {
        forwarder_us: middle(|round| round.forwarder_us),
        upstream_us: middle(|round| round.upstream_us),
        load: harness::median_load(rounds.into_iter().map(|round| round.load).collect()),
    }
}

/// nginx serving `proxy_pass` to `upstream` with a keep-alive pool, as a child process, when there is an nginx.
fn start_nginx(upstream: SocketAddr, dir: &Path) -> Option<(Child, SocketAddr)> {
    let binary = std::env::var("NGINX").unwrap_or_else(|_| "nginx".into());
    let addr = harness::free_addr()?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           upstream backend {{ server {upstream}; keepalive {CONNECTIONS}; }}\n\
           server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://backend;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).ok()?;
    let child = Command::new(binary)
        .args(["-e", &format!("{d}/error.log"), "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    harness::when_listening(child, addr, Duration::from_secs(10))
}

pub fn main() {
    let (benchmarking, secs) = harness::settings();
    // The upstream gets its own runtime, so that what is measured through Marina is Marina's share of the work.
    let upstream_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(UPSTREAM_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let upstream = upstream_runtime.block_on(start_native());
    // Its threads run runtimes of their own, started here rather than from inside another runtime's task.
    let floor_per_core = harness::start_floor_per_core(upstream.addr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("marina")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let apps = harness::proxied_apps(upstream.addr);
        let marina = start_marina(apps.path(), None).await;
        let shared = harness::start_marina_with(apps.path(), |options| options.serving_cores = 0).await;
        let (floor, floor_task) = harness::start_floor(upstream.addr).await;
        let nginx_dir = tempfile::tempdir().unwrap();
        let nginx = start_nginx(upstream.addr, nginx_dir.path());

        let mut scenarios = vec![
            ("upstream, direct", upstream.url("/"), Forwarder::None),
            (
                "through a Marina proxy rule",
                marina.url("/api/"),
                Forwarder::ThisProcess,
            ),
            (
                "through a Marina proxy rule, on one shared runtime (`serving_cores: 0`)",
                shared.url("/api/"),
                Forwarder::ThisProcess,
            ),
            (
                "floor: hyper's server and client, nothing of Marina's",
                format!("http://{floor}/"),
                Forwarder::ThisProcess,
            ),
            (
                "floor, one current_thread runtime per core (SO_REUSEPORT)",
                format!("http://{floor_per_core}/"),
                Forwarder::ThisProcess,
            ),
        ];
        // The anchor a user would pick instead of a proxy rule: its row, when it runs.
        let nginx_row = nginx.as_ref().map(|(child, addr)| {
            scenarios.push((
                "through nginx `proxy_pass` (keep-alive upstream)",
                format!("http://{addr}/"),
                Forwarder::Nginx(child.id()),
            ));
            scenarios.len() - 1
        });
        if !benchmarking {
            for (_, url, _) in &scenarios {
                harness::smoke(url).await;
            }
        } else {
            for (_, url, _) in &scenarios {
                let _ = wrk(url, 1);
            }
            let mut rounds: Vec<Vec<Round>> = scenarios.iter().map(|_| Vec::new()).collect();
            for number in 0..harness::rounds() {
                for ((name, url, forwarder), rounds) in scenarios.iter().zip(&mut rounds) {
                    let run = round(url, secs, forwarder);
                    eprintln!(
                        "round {number}: {name}: {:.0} requests/s, p99 {:.2} ms, CPU per request: forwarder {:.1} us, \
                         upstream {:.1} us",
                        run.load.rps, run.load.p99_ms, run.forwarder_us, run.upstream_us
                    );
                    rounds.push(run);
                }
            }
            let results: Vec<Round> = rounds.into_iter().map(median).collect();
            let direct = &results[0].load;
            let nginx_rps = nginx_row.map(|row| results[row].load.rps);
            println!(
                "| scenario | requests/s | vs direct | vs nginx | p50 | p99 | p99 added | forwarder CPU/request | \
                 upstream CPU/request |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for ((name, _, _), result) in scenarios.iter().zip(&results) {
                let load = &result.load;
                let vs_nginx = nginx_rps.map_or(String::new(), |nginx| format!("{:.2}x", load.rps / nginx));
                println!(
                    "| {name} | {:.0} | {:.0}% | {vs_nginx} | {:.2} ms | {:.2} ms | {:+.2} ms | {:.1} us | {:.1} us |",
                    load.rps,
                    100.0 * load.rps / direct.rps,
                    load.p50_ms,
                    load.p99_ms,
                    load.p99_ms - direct.p99_ms,
                    result.forwarder_us,
                    result.upstream_us
                );
            }
        }
        marina.stop().await;
        shared.stop().await;
        floor_task.abort();
        if let Some((mut child, _)) = nginx {
            // SIGTERM, not `kill()`'s SIGKILL: nginx's master stops its workers on the way out, and a master killed
            // outright leaves them running, and listening, after the bench (and after every test run's smoke).
            let stopped = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .is_ok_and(|status| status.success());
            if !stopped {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    });
    upstream_runtime.block_on(upstream.stop());
}
