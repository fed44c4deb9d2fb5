//! How long the request path takes to turn `/<app>@<spec>` into a version, with 1,000 apps of 20 versions each.
//!
//! The baseline is the least any router must do for the same request: one hash lookup of the app name. Compare
//! the ratio, not the absolute times; this machine is noisy.
//!
//! Run: `cargo bench --bench resolve`

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use marina::deploy::config::WorkerConfig;
use marina::deploy::registry::{App, AppKind, AppVersion, Deployment, Registry, Snapshot};
use semver::Version;

const APPS: usize = 1_000;
const VERSIONS_PER_APP: usize = 20;

/// 20 versions per app across three majors, with one prerelease on top.
fn versions() -> Vec<Version> {
    let mut versions: Vec<Version> = (0..VERSIONS_PER_APP - 1)
        .map(|i| Version::new((i / 8) as u64, ((i % 8) / 2) as u64, (i % 2) as u64 * 10))
        .collect();
    versions.push(Version::parse("3.0.0-rc.1").unwrap());
    versions.sort_by(|a, b| b.cmp(a));
    versions
}

fn registry() -> Registry {
    let deployment = Deployment {
        config: WorkerConfig::default(),
        kind: AppKind::Static,
        entrypoint: PathBuf::from("index.html"),
        entrypoint_path: PathBuf::from("/apps/x/index.html"),
        root: PathBuf::from("/apps/x"),
        fingerprint: 0,
        proxy: Default::default(),
    };
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
                    deployment: Ok(deployment.clone()),
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
    Registry::from_snapshot(PathBuf::from("/apps"), snapshot)
}

fn resolve(c: &mut Criterion) {
    let registry = registry();
    let baseline: HashMap<String, Vec<Version>> = (0..APPS).map(|i| (format!("app-{i}"), versions())).collect();

    let mut group = c.benchmark_group("resolve");
    group.bench_function("baseline: hash lookup of the app name", |b| {
        b.iter(|| baseline.get(black_box("app-500")).map(|v| v[0].major))
    });
    let cases = [
        ("latest", "app-500"),
        ("exact", "app-500@1.2.10"),
        ("partial major", "app-500@1"),
        ("partial minor", "app-500@1.2"),
        ("caret range", "app-500@^1.2"),
        ("encoded range", "app-500@%3E%3D1.0.0%2C%20%3C2"),
        ("no match", "app-500@9"),
    ];
    for (name, segment) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                let snapshot = registry.snapshot();
                let resolved = snapshot.resolve(black_box(segment));
                black_box(resolved.is_ok())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, resolve);
criterion_main!(benches);
