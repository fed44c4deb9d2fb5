//! What one proxied request costs in instructions, counted by valgrind's callgrind. The count is exact and the same
//! from run to run, where rates and CPU times on this shared machine move by 15% between runs. That makes it the
//! measure to judge a change to the forward path by.
//!
//! `cargo bench --bench marina -- proxy_cost` (needs valgrind: `apt-get install valgrind`). The benchmark runs itself
//! under callgrind, once per scenario and request count. A client sends `PROXY_COST_REQUESTS` (default 2000) sequential
//! requests on one keep-alive connection, then twice that many. The difference between the two counts, divided by the
//! difference in requests, is the cost of one request, with start-up and shutdown cancelled out. Counted: every
//! thread's user-space instructions (client, forwarder and upstream; not the kernel's). The scenarios are the same as
//! the `proxy` benchmark's: the upstream called directly, the floor (hyper's server and client with nothing of
//! Marina's), and a Marina proxy rule. Subtracting the direct count leaves what forwarding adds.
//!
//! Run without `--bench` (as `cargo test --all-targets` does), each scenario answers a few requests natively.

use std::net::SocketAddr;
use std::process::Command;

use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use crate::harness;

/// The scenarios, by the name the child process is given.
const SCENARIOS: [(&str, &str); 3] = [
    ("direct", "upstream, direct"),
    ("floor", "floor: hyper's server and client, nothing of Marina's"),
    ("marina", "through a Marina proxy rule"),
];

/// Set in the child that valgrind runs: the scenario to run, and how many requests.
const SCENARIO_VAR: &str = "PROXY_COST_SCENARIO";
const REQUESTS_VAR: &str = "PROXY_COST_REQUESTS_NOW";

/// Whether this process is the child that valgrind runs; if it is, it has run its scenario.
pub fn child() -> bool {
    let Ok(scenario) = std::env::var(SCENARIO_VAR) else {
        return false;
    };
    let requests = std::env::var(REQUESTS_VAR).unwrap().parse().unwrap();
    run(&scenario, requests);
    true
}

pub fn main() {
    let (benchmarking, _) = harness::settings();
    if !benchmarking {
        for (scenario, _) in SCENARIOS {
            run(scenario, 20);
        }
        return;
    }
    let requests = harness::env_number("PROXY_COST_REQUESTS", 2000).max(1);
    let costs: Vec<f64> = SCENARIOS
        .iter()
        .map(|(scenario, _)| {
            let once = instructions(scenario, requests);
            let twice = instructions(scenario, 2 * requests);
            (twice - once) as f64 / requests as f64
        })
        .collect();
    println!("| scenario | instructions per request | added by forwarding |");
    println!("|---|---:|---:|");
    for ((_, name), cost) in SCENARIOS.iter().zip(&costs) {
        println!("| {name} | {cost:.0} | {:.0} |", cost - costs[0]);
    }
}

/// The instructions callgrind counts for this program running `scenario` with `requests` requests.
fn instructions(scenario: &str, requests: u64) -> u64 {
    let output = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(std::env::current_exe().unwrap())
        .env(SCENARIO_VAR, scenario)
        .env(REQUESTS_VAR, requests.to_string())
        .output()
        .expect("valgrind is installed (apt-get install valgrind)");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{scenario} under valgrind failed:\n{log}");
    log.lines()
        .find_map(|line| line.split_once("Collected :").map(|(_, n)| n.trim().to_owned()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no instruction count in callgrind's output:\n{log}"))
}

/// Starts the upstream, the floor and Marina, and sends `requests` requests to `scenario`'s address, one after
/// another on one connection.
fn run(scenario: &str, requests: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = harness::start_native().await;
        let apps = harness::proxied_apps(upstream.addr);
        let marina = harness::start_marina(apps.path(), None).await;
        let (floor, floor_task) = harness::start_floor(upstream.addr).await;
        let (addr, path): (SocketAddr, &str) = match scenario {
            "direct" => (upstream.addr, "/"),
            "floor" => (floor, "/"),
            "marina" => (marina.addr, "/api/"),
            other => panic!("no scenario {other}"),
        };
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        for _ in 0..requests {
            let request = http::Request::get(path)
                .header(http::header::HOST, addr.to_string())
                .body(Body::empty())
                .unwrap();
            sender.ready().await.unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200, "{scenario}");
            response.into_body().collect().await.unwrap();
        }
        drop(sender);
        let _ = connection.await;
        floor_task.abort();
        marina.stop().await;
        upstream.stop().await;
    });
}
