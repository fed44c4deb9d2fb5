//! `lab`: an app that misbehaves on purpose, for the host's tests and for trying the limits by hand. Every route
//! is something a real app might do by mistake (or by malice); the host must survive all of them.

use std::cell::Cell;
use std::io::Read;

use marina_sdk::{Request, Response, Router};

thread_local! {
    static SERVED: Cell<u64> = const { Cell::new(0) };
}

/// The most `/fetch` reads of a response body.
const FETCH_LIMIT: usize = 1024 * 1024;

fn handle(request: Request) -> Response {
    // Counts the requests this instance has served: 1 on every request means a fresh instance each time.
    let served = SERVED.with(|served| {
        served.set(served.get() + 1);
        served.get()
    });
    Router::new()
        .get("/count", move |_| {
            Response::json(200, &serde_json::json!({ "served": served }))
        })
        .get("/loop", |_| {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        })
        .get("/hog", |request| {
            let mb: usize = request.query_param("mb").and_then(|mb| mb.parse().ok()).unwrap_or(1024);
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mb {
                hoard.push(vec![1u8; 1024 * 1024]);
            }
            Response::json(200, &serde_json::json!({ "allocatedMb": hoard.len() }))
        })
        .get("/panic", |_| panic!("lab asked to panic"))
        .get("/slow", |request| {
            let ms: u64 = request.query_param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(1000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Response::text(200, format!("slept {ms} ms"))
        })
        .get("/print", |request| {
            let lines: u64 = request.query_param("lines").and_then(|n| n.parse().ok()).unwrap_or(1);
            for i in 0..lines {
                println!("lab stdout line {i}");
                eprintln!("lab stderr line {i}");
            }
            Response::text(200, format!("printed {lines} lines"))
        })
        .get("/env", |_| {
            let vars: serde_json::Map<String, serde_json::Value> =
                std::env::vars().map(|(key, value)| (key, value.into())).collect();
            Response::json(200, &vars)
        })
        .get("/fs", |request| {
            let path = request.query_param("path").unwrap_or_else(|| "/".to_owned());
            Response::json(200, &read_path(&path))
        })
        .get("/write", |request| {
            let path = request.query_param("path").unwrap_or_else(|| "/written.txt".to_owned());
            match std::fs::write(&path, b"lab was here") {
                Ok(()) => Response::json(200, &serde_json::json!({ "written": path })),
                Err(error) => Response::json(403, &serde_json::json!({ "error": error.to_string() })),
            }
        })
        .get("/fetch", |request| {
            let Some(url) = request.query_param("url") else {
                return Response::error(400, "give ?url=");
            };
            match marina_sdk::fetch(&url, FETCH_LIMIT) {
                Ok(fetched) => Response::json(
                    200,
                    &serde_json::json!({
                        "status": fetched.status,
                        "body": String::from_utf8_lossy(&fetched.body),
                    }),
                ),
                Err(error) => Response::json(502, &serde_json::json!({ "error": error.to_string() })),
            }
        })
        .post("/consume", |mut request| {
            // Reads and discards the body, reporting its size: a sink that never holds more than one chunk.
            let mut total: u64 = 0;
            if let Some(mut body) = request.take_body() {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match body.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(error) => return Response::error(400, &error.to_string()),
                    }
                }
            }
            Response::json(200, &serde_json::json!({ "bytes": total }))
        })
        .get("/drip", |request| {
            // `n` small chunks, `ms` apart: a steady stream (like server-sent events) that outlasts its timeout.
            let n: u64 = request.query_param("n").and_then(|n| n.parse().ok()).unwrap_or(5);
            let ms: u64 = request.query_param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(200);
            Response::stream(200, move |out| {
                for i in 0..n {
                    std::io::Write::write_all(out, format!("data: {i}\n\n").as_bytes())?;
                    std::io::Write::flush(out)?;
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                Ok(())
            })
        })
        .get("/stall", |_| {
            // Sends its head and a first chunk, then computes forever without writing another byte.
            Response::stream(200, |out| {
                std::io::Write::write_all(out, b"first chunk\n")?;
                std::io::Write::flush(out)?;
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
        })
        .get("/stream", |request| {
            // Writes `mb` MiB generated on the fly.
            let mb: usize = request.query_param("mb").and_then(|mb| mb.parse().ok()).unwrap_or(1);
            Response::stream(200, move |out| {
                let chunk = vec![b'x'; 1024 * 1024];
                for _ in 0..mb {
                    std::io::Write::write_all(out, &chunk)?;
                }
                Ok(())
            })
        })
        .handle(request)
}

fn read_path(path: &str) -> serde_json::Value {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            serde_json::json!({ "dir": names })
        }
        Err(_) => match std::fs::read(path) {
            Ok(bytes) => serde_json::json!({ "file": String::from_utf8_lossy(&bytes) }),
            Err(error) => serde_json::json!({ "error": error.to_string() }),
        },
    }
}

marina_sdk::app!(handle);
