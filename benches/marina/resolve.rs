//! How long the request path takes to turn `/<app>@<spec>` into a version, with 1,000 apps of 20 versions each.
//!
//! Each iteration does what the dispatcher does: load the registry's current snapshot (held in an `ArcSwap`, as
//! the registry holds it: one atomic load and a reference count) and resolve the first path segment against it.
//! The snapshot is built in memory, as the tests of resolution build theirs. The baseline is the least any router
//! must do for the same request: one hash lookup of the app name. Compare the ratio, not the absolute times; this
//! machine is noisy.
//!
//! `cargo bench --bench marina -- resolve` (criterion, with its default settings: the one binary's arguments are
//! not criterion's). Run without `--bench`, it resolves every case once and checks the outcome.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::Criterion;
use marina::deploy::registry::{App, AppVersion, Snapshot};
use semver::Version;

const APPS: usize = 1_000;
const VERSIONS_PER_APP: usize = 20;

/// The cases, by name, with whether each resolves.
const CASES: [(&str, &str, bool); 7] = [
    ("latest", "app-500", true),
    ("exact", "app-500@1.2.10", true),
    ("partial major", "app-500@1", true),
    ("partial minor", "app-500@1.2", true),
    ("caret range", "app-500@^1.2", true),
    ("encoded range", "app-500@%3E%3D1.0.0%2C%20%3C2", true),
    ("no match", "app-500@9", false),
];

/// 20 versions per app across three majors, with one prerelease on top.
fn versions() -> Vec<Version> {
    let mut versions: Vec<Version> = (0..VERSIONS_PER_APP - 1)
        .map(|i| Version::new((i / 8) as u64, ((i % 8) / 2) as u64, (i % 2) as u64 * 10))
        .collect();
    versions.push(Version::parse("3.0.0-rc.1").unwrap());
    versions.sort_by(|a, b| b.cmp(a));
    versions
}

/// The snapshot a scan of 1,000 such apps would give, but for the deployments: resolution never reads them.
fn snapshot() -> Snapshot {
    let mut snapshot = Snapshot::default();
    for i in 0..APPS {
        let name = format!("app-{i}");
        let versions = versions()
            .into_iter()
            .map(|version| {
                Arc::new(AppVersion {
                    dir_name: version.to_string(),
                    dir: PathBuf::from(format!("/apps/{name}/{version}")),
                    version,
                    deployment: Err("not on disk".into()),
                })
            })
            .collect();
        snapshot.apps.insert(
            name.clone().into(),
            Arc::new(App {
                name,
                versions,
                ignored: Vec::new(),
            }),
        );
    }
    snapshot
}

pub fn main() {
    let (benchmarking, _) = crate::harness::settings();
    let current = ArcSwap::from_pointee(snapshot());
    if !benchmarking {
        for (name, segment, resolves) in CASES {
            assert_eq!(
                current.load_full().resolve(segment).is_ok(),
                resolves,
                "{name}: {segment}"
            );
        }
        return;
    }
    let baseline: HashMap<String, Vec<Version>> = (0..APPS).map(|i| (format!("app-{i}"), versions())).collect();
    let mut criterion = Criterion::default();
    let mut group = criterion.benchmark_group("resolve");
    group.bench_function("baseline: hash lookup of the app name", |b| {
        b.iter(|| baseline.get(black_box("app-500")).map(|v| v[0].major))
    });
    for (name, segment, _) in CASES {
        group.bench_function(name, |b| {
            b.iter(|| {
                let snapshot = current.load_full();
                let resolved = snapshot.resolve(black_box(segment));
                black_box(resolved.is_ok())
            })
        });
    }
    group.finish();
    criterion.final_summary();
}
