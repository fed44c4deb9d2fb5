//! The `marina` command line: settings refused before anything binds, `check`, `schema`, the environment.

use std::process::{Command, Output};

use crate::common::{AppsDir, MarinaProcess};

fn marina(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_marina"))
        .args(args)
        .env_remove("APPS_DIR")
        .env_remove("PORT")
        .env_remove("POOL_SIZE")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn bad_settings_are_refused_before_the_port_is_bound_with_a_message_naming_the_flag() {
    let apps = AppsDir::new();
    let dir = apps.path();
    let dir = dir.to_str().unwrap();
    let missing = format!("{dir}/missing");
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--apps-dir", &missing], "--apps-dir"),
        (&["serve", "--apps-dir", dir, "--pool-size", "0"], "--pool-size"),
        (&["serve", "--apps-dir", dir, "--pool-size", "many"], "--pool-size"),
        (&["serve", "--apps-dir", dir, "--port", "70000"], "--port"),
        (
            &["serve", "--apps-dir", dir, "--serving-cores", "5000"],
            "--serving-cores",
        ),
        (
            &["serve", "--apps-dir", dir, "--serving-cores", "all"],
            "--serving-cores",
        ),
        (&["serve", "--apps-dir", dir, "--log-format", "xml"], "--log-format"),
        (
            &["serve", "--apps-dir", dir, "--log-level", "marina=loud"],
            "--log-level",
        ),
        (
            &["serve", "--apps-dir", dir, "--shutdown-timeout", "2h"],
            "--shutdown-timeout",
        ),
        (
            &["serve", "--apps-dir", dir, "--shutdown-timeout", "soon"],
            "--shutdown-timeout",
        ),
        (&["serve", "--bogus"], "--bogus"),
    ];
    for (args, flag) in cases {
        let output = marina(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr(&output);
        assert!(message.contains(flag), "{args:?}: {message}");
        assert!(!message.contains("listening"), "{args:?} bound before failing");
    }
}

#[test]
fn a_file_given_as_the_apps_dir_is_refused() {
    let apps = AppsDir::new();
    let file = apps.write("file.txt", "x");
    let output = marina(&["serve", "--apps-dir", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("not a directory"));
}

#[test]
fn a_port_already_in_use_fails_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let apps = AppsDir::new();
    let output = marina(&["serve", "--apps-dir", apps.path().to_str().unwrap(), "--port", &port]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cannot listen"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_the_environment_too() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    let output = Command::new(env!("CARGO_BIN_EXE_marina"))
        .arg("serve")
        .env("APPS_DIR", apps.path())
        .env("POOL_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "POOL_SIZE=0 is read and refused");
    assert!(stderr(&output).contains("--pool-size"));

    let mut command = Command::new(env!("CARGO_BIN_EXE_marina"));
    command
        .arg("serve")
        .env("APPS_DIR", apps.path())
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("POOL_SIZE", "8")
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "debug")
        .env("SHUTDOWN_TIMEOUT", "2s");
    let marina = MarinaProcess::spawn(command);
    let body = reqwest::get(format!("http://{}/hello/", marina.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "<h1>hello 1.0.0</h1>", "APPS_DIR named the directory served");
}

#[test]
fn check_passes_a_valid_apps_dir() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.static_version("hello", "1.1.0");
    apps.write("hello/1.1.0/worker.config.json", r#"{"ttl": 5}"#);
    let output = marina(&["check", apps.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(stdout(&output), "ok: 1 apps, 2 versions\n");
}

#[test]
fn check_prints_one_line_per_problem_and_fails() {
    let apps = AppsDir::new();
    apps.static_version("hello", "1.0.0");
    apps.write("hello/1.1.0/worker.config.json", r#"{"ttl": -5}"#);
    apps.write("hello/1.1.0/index.html", "");
    apps.write("hello/1.2.0/readme.txt", "");
    apps.write("hello/next/index.html", "");
    apps.write("Bad/1.0.0/index.html", "");
    let output = marina(&["check", apps.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].starts_with("warning: \"Bad\": not a valid app name"), "{text}");
    assert_eq!(
        lines[1],
        "warning: hello/next: not a semver version (like 1.2.3 or v1.2.3), ignored"
    );
    assert!(
        lines[2].starts_with("error: hello/1.2.0: worker.config.json: field `entrypoint`: none set"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("error: hello/1.1.0: worker.config.json: field `ttl`: invalid value"),
        "{text}"
    );
    assert_eq!(lines[4], "2 of 3 versions are invalid");
}

#[test]
fn check_reports_a_component_that_is_not_an_http_handler_with_what_it_exports() {
    let apps = AppsDir::new();
    apps.component("cmd", "1.0.0", "command", serde_json::json!({}));
    apps.write("core/1.0.0/app.wasm", b"\0asm\x01\0\0\0");
    apps.component("hello", "1.0.0", "hello", serde_json::json!({}));
    let output = marina(&["check", apps.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("error: cmd/1.0.0: app.wasm: it is a command (it exports wasi:cli/run@0.2."),
        "{text}"
    );
    assert!(
        lines[1].starts_with("error: core/1.0.0: app.wasm: it is a core WebAssembly module, not a component"),
        "{text}"
    );
    assert_eq!(lines[2], "2 of 3 versions are invalid");
}

#[test]
fn check_on_a_missing_directory_says_so() {
    let output = marina(&["check", "/definitely/not/here"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("/definitely/not/here"));
}

#[test]
fn the_committed_schema_is_the_one_generated_from_the_config_types() {
    let output = marina(&["schema"]);
    assert!(output.status.success());
    let committed = include_str!("../../worker.config.schema.json");
    assert_eq!(
        stdout(&output),
        committed,
        "worker.config.schema.json drifted from the types: regenerate it with `cargo run -- schema > worker.config.schema.json`"
    );
}

#[test]
fn the_schema_names_every_documented_field_and_refuses_unknown_ones() {
    let schema: serde_json::Value = serde_json::from_str(include_str!("../../worker.config.schema.json")).unwrap();
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are refused by the schema as by serde"
    );
    let fields: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for field in [
        "$schema",
        "entrypoint",
        "timeout",
        "ttl",
        "idleTimeout",
        "maxRequests",
        "lowMemory",
        "env",
        "proxy",
    ] {
        assert!(fields.contains(&field), "{field} is missing from the schema");
    }
}

#[test]
fn the_shipped_apps_pass_check() {
    let output = marina(&["check", concat!(env!("CARGO_MANIFEST_DIR"), "/apps")]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(!stdout(&output).contains("warning"), "{}", stdout(&output));
}
