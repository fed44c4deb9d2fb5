//! The guest SDK's own unit tests (router matching, query decoding), run on the host as part of the suite.

use std::path::Path;
use std::process::Command;

#[test]
fn the_sdk_unit_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--quiet", "--lib"])
        .current_dir(root.join("runtime-sdk"))
        .env("CARGO_TARGET_DIR", root.join("target").join("guest-host"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "runtime-sdk's tests failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
