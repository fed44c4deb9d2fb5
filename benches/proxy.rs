//! Proxy rules under load: an upstream called directly, through a Marina proxy rule, through Marina's upstream
//! pool behind a bare hyper server (the floor of this stack), and through nginx's `proxy_pass` with keep-alive
//! upstream connections, all in the same run with the same load.
//!
//! `cargo bench --bench proxy` (needs `wrk`: `apt-get install wrk`; nginx is included when `NGINX` names its
//! binary or `nginx` is on the PATH: `apt-get install nginx`). Each scenario is a `wrk -t2 -c64` run of
//! `BENCH_SECS` (default 10), the scenarios taking turns for `BENCH_ROUNDS` rounds (default 3); the table shows
//! each scenario's median round. The upstream is an axum "hello" handler on a runtime of its own. Run without
//! `--bench` (as `cargo test --all-targets` does) it only checks that every scenario answers.
//!
//! The comparison is not quite like for like, in nginx's favour: Marina also resolves the app's version, matches
//! the rule's regex, and adds `X-Forwarded-For`, `-Proto`, `-Host` and `Via`, which this nginx config does not.
//! The floor does none of that either: it forwards path and headers as they come, so the distance between it and
//! the rule is what routing, rules, header handling, timeouts and metrics cost.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use marina::proxy::http1::Http1Pool;
use serde_json::json;

mod harness;
use harness::{start_marina, start_native, wrk, Load, CONNECTIONS};

/// Marina's plain-HTTP upstream pool behind hyper's HTTP/1.1 server and nothing else: what forwarding costs on
/// this stack before any of Marina's own work.
async fn start_floor(upstream: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pool = std::sync::Arc::new(Http1Pool::default());
    let authority: http::uri::Authority = upstream.to_string().parse().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (pool, authority) = (pool.clone(), authority.clone());
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let (pool, authority) = (pool.clone(), authority.clone());
                async move {
                    let (parts, body) = request.into_parts();
                    let mut forwarded = http::Request::new(Body::new(body));
                    *forwarded.uri_mut() = parts.uri.path_and_query().cloned().map(http::Uri::from).unwrap();
                    *forwarded.headers_mut() = parts.headers;
                    let response = match pool.send(&authority, forwarded).await {
                        Ok(response) => response.map(Body::new),
                        Err(_) => http::Response::builder().status(502).body(Body::empty()).unwrap(),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    (addr, task)
}

/// The median of each figure of `runs`, taken separately.
fn median(runs: Vec<Load>) -> Load {
    let middle = |figure: fn(&Load) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Load {
        rps: middle(|load| load.rps),
        p50_ms: middle(|load| load.p50_ms),
        p99_ms: middle(|load| load.p99_ms),
    }
}

/// nginx serving `proxy_pass` to `upstream` with a keep-alive pool, as a child process, when there is an nginx.
fn start_nginx(upstream: SocketAddr, dir: &Path) -> Option<(Child, SocketAddr)> {
    let binary = std::env::var("NGINX").unwrap_or_else(|_| "nginx".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
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

fn main() {
    let (benchmarking, secs) = harness::settings();
    // The upstream gets its own runtime, so that what is measured through Marina is Marina's share of the work.
    let upstream_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("upstream")
        .enable_all()
        .build()
        .unwrap();
    let upstream = upstream_runtime.block_on(start_native());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("marina")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let apps = tempfile::tempdir().unwrap();
        let version = apps.path().join("api").join("1.0.0");
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("index.html"), "unproxied").unwrap();
        let config = json!({"proxy": {"^/(.*)$": {"target": format!("http://{}", upstream.addr), "rewrite": "/$1"}}});
        std::fs::write(version.join("worker.config.json"), config.to_string()).unwrap();
        let marina = start_marina(apps.path(), None).await;
        let (floor, floor_task) = start_floor(upstream.addr).await;
        let nginx_dir = tempfile::tempdir().unwrap();
        let nginx = start_nginx(upstream.addr, nginx_dir.path());

        let mut scenarios = vec![
            ("upstream, direct", upstream.url("/")),
            ("through a Marina proxy rule", marina.url("/api/")),
            (
                "floor: Marina's upstream pool behind bare hyper",
                format!("http://{floor}/"),
            ),
        ];
        if let Some((_, addr)) = &nginx {
            scenarios.push((
                "through nginx `proxy_pass` (keep-alive upstream)",
                format!("http://{addr}/"),
            ));
        }
        if !benchmarking {
            for (_, url) in &scenarios {
                harness::smoke(url).await;
            }
        } else {
            for (_, url) in &scenarios {
                let _ = wrk(url, 1);
            }
            let mut runs: Vec<Vec<Load>> = scenarios.iter().map(|_| Vec::new()).collect();
            for round in 0..harness::rounds() {
                for ((name, url), runs) in scenarios.iter().zip(&mut runs) {
                    let load = wrk(url, secs);
                    eprintln!(
                        "round {round}: {name}: {:.0} requests/s, p99 {:.2} ms",
                        load.rps, load.p99_ms
                    );
                    runs.push(load);
                }
            }
            let results: Vec<Load> = runs.into_iter().map(median).collect();
            let direct = &results[0];
            println!("| scenario | requests/s | vs direct | p50 | p99 | p99 added |");
            println!("|---|---:|---:|---:|---:|---:|");
            for ((name, _), load) in scenarios.iter().zip(&results) {
                println!(
                    "| {name} | {:.0} | {:.0}% | {:.2} ms | {:.2} ms | {:+.2} ms |",
                    load.rps,
                    100.0 * load.rps / direct.rps,
                    load.p50_ms,
                    load.p99_ms,
                    load.p99_ms - direct.p99_ms
                );
            }
        }
        marina.stop().await;
        floor_task.abort();
        if let Some((mut child, _)) = nginx {
            let _ = child.kill();
            let _ = child.wait();
        }
    });
    upstream_runtime.block_on(upstream.stop());
}
