//! The compile cache's bounds as `marina serve` applies them: its default size (1 GiB) and age (30 days), the
//! least recently used entries first, checked at start and after each write. The mechanics (use refreshing an
//! entry, what is in use, files vanishing midway) are unit tests in `src/backends/wasm/engine/cache.rs`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::{AppsDir, MarinaProcess};
use serde_json::json;

const MIB: u64 = 1024 * 1024;
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A file of `len` bytes, last modified `age` ago. Sparse: the gigabytes here take no disk.
fn file(path: &Path, len: u64, age: Duration) -> PathBuf {
    let file = File::create(path).unwrap();
    file.set_len(len).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
    path.to_path_buf()
}

/// A made-up entry and its checksum, named as the cache names them (any engine hash is the cache's).
fn entry(dir: &Path, n: u8, len: u64, age: Duration) -> PathBuf {
    let name = format!("{}-0123456789abcdef.cwasm", format!("{n:02x}").repeat(32));
    file(&dir.join(format!("{name}.sha256")), 64, age);
    file(&dir.join(name), len, age)
}

#[test]
fn the_compile_cache_keeps_to_a_gibibyte_and_a_month_dropping_the_least_recently_used_first() {
    let apps = AppsDir::new();
    apps.component("hello", "1.0.0", "hello", json!({}));
    let cache = tempfile::tempdir().unwrap();
    let expired = entry(cache.path(), 1, MIB, 31 * DAY);
    let oldest = entry(cache.path(), 2, 400 * MIB, 20 * DAY);
    let middle = entry(cache.path(), 3, 300 * MIB, 10 * DAY);
    // Up to 64 KiB short of 1 GiB with the others and their checksums: compiling `hello` (360 KiB) goes over.
    let newest = entry(cache.path(), 4, 1024 * MIB - 700 * MIB - 64 * 1024 - 3 * 64, DAY);
    let foreign = file(&cache.path().join("notes.txt"), 2048 * MIB, 400 * DAY);

    let marina = MarinaProcess::serve(
        &apps.path(),
        &["--cache-dir", cache.path().to_str().unwrap(), "--precompile"],
    );
    assert!(!expired.exists(), "unused for over 30 days: removed at start");
    assert!(
        !oldest.exists(),
        "the compile of hello went past 1 GiB: the least recently used entry made room"
    );
    for kept in [&middle, &newest] {
        assert!(kept.exists(), "{kept:?} is kept");
    }
    assert!(foreign.exists(), "a file that is not the cache's is left alone");
    let written: Vec<PathBuf> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|item| item.unwrap().path())
        .filter(|path| path.extension().is_some_and(|x| x == "cwasm") && ![&middle, &newest].contains(&path))
        .collect();
    assert_eq!(written.len(), 1, "hello's entry is written and kept: {written:?}");
    let trimmed: Vec<_> = marina
        .startup
        .iter()
        .filter(|e| e["message"] == "compile cache trimmed")
        .collect();
    assert_eq!(trimmed.len(), 2, "once at start, once after the write: {trimmed:?}");
}
