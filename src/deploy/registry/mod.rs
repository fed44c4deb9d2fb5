//! What is deployed: every app and version found in APPS_DIR, and how a request picks one.
//!
//! The request path reads an immutable [`Snapshot`] through an [`ArcSwap`], so resolving takes no lock and a
//! reload never blocks a request; a reload builds a new snapshot and swaps it in. Requests that already hold a
//! version keep it until they finish, even if the version is removed meanwhile.

mod resolve;
mod scan;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use semver::Version;
use serde::Serialize;

use crate::deploy::config::WorkerConfig;

pub use resolve::{parse_spec, parse_target, Spec, SpecError, Target};
pub use scan::{load_version, scan_app, scan_apps_dir, valid_app_name};
pub(crate) use watch::Watcher;

/// How a version serves requests, decided by its entrypoint's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    /// A `.wasm` component run by the worker pool.
    Wasm,
    /// An `.html` entrypoint: files served from its directory.
    Static,
}

/// A version whose config and entrypoint are valid: everything needed to serve it.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub config: WorkerConfig,
    pub kind: AppKind,
    /// The entrypoint relative to the version directory, as shown to people.
    pub entrypoint: PathBuf,
    /// The entrypoint's canonical path.
    pub entrypoint_path: PathBuf,
    /// The canonical directory static files are served from (the entrypoint's directory).
    pub root: PathBuf,
    /// Changes whenever the entrypoint file (size, mtime) or the config changes, so that whatever was built from
    /// a deployment (a compiled component, warm workers) can tell it is out of date.
    pub fingerprint: u64,
    /// The config's `proxy` rules, compiled: tried before the entrypoint sees a request.
    pub proxy: crate::deploy::rules::Rules,
}

/// One version directory of an app.
#[derive(Debug)]
pub struct AppVersion {
    pub version: Version,
    /// The directory's name as found on disk (`1.2.3` or `v1.2.3`).
    pub dir_name: String,
    pub dir: PathBuf,
    /// The version's deployment, or why it cannot be served (it then answers 503 with this text).
    pub deployment: Result<Deployment, String>,
}

/// One app: its versions, highest first.
#[derive(Debug)]
pub struct App {
    pub name: String,
    pub versions: Vec<Arc<AppVersion>>,
    /// Entries of the app directory that are not versions, with the reason they were skipped.
    pub ignored: Vec<String>,
}

impl App {
    /// The versions as strings, highest first, for error messages.
    pub(crate) fn version_list(&self) -> Vec<String> {
        self.versions.iter().map(|v| v.version.to_string()).collect()
    }
}

/// Every app at one moment. Never changes once built.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub apps: HashMap<Box<str>, Arc<App>>,
    /// Entries of APPS_DIR that are not apps, with the reason they were skipped.
    pub ignored: Vec<String>,
}

/// Why a path segment resolves to no version. The request path answers each with its own status (see
/// `crate::error`).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The text after `@` is not a version or a semver range.
    #[error(transparent)]
    BadSpec(#[from] SpecError),

    /// The segment names no deployed app.
    #[error("no app named {app:?}")]
    AppNotFound { app: String },

    /// The app exists but no version matches the spec. The app is kept whole so that the list of its versions is
    /// only built if an answer needs it.
    #[error("no version of {:?} matches {}", app.name, spec.as_deref().unwrap_or("(latest)"))]
    VersionNotFound { app: Arc<App>, spec: Option<String> },
}

/// The version a request resolved to, held by the request until it finishes.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub(crate) app: Arc<App>,
    pub version: Arc<AppVersion>,
}

impl Snapshot {
    /// Resolves the first path segment (`<app>[@<spec>]`, still percent-encoded) to a version.
    pub fn resolve(&self, segment: &str) -> Result<Resolved, ResolveError> {
        let target = parse_target(segment)?;
        let app = self
            .apps
            .get(target.app.as_ref())
            .ok_or_else(|| ResolveError::AppNotFound {
                app: target.app.to_string(),
            })?;
        match target.spec.pick(&app.versions, |v| &v.version) {
            Some(version) => Ok(Resolved {
                app: app.clone(),
                version: version.clone(),
            }),
            None => Err(ResolveError::VersionNotFound {
                app: app.clone(),
                spec: target.spec_text.map(|s| s.into_owned()),
            }),
        }
    }

    /// Apps sorted by name, for listings.
    pub(crate) fn sorted_apps(&self) -> Vec<&Arc<App>> {
        let mut apps: Vec<_> = self.apps.values().collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        apps
    }
}

/// The live set of apps under one APPS_DIR.
pub(crate) struct Registry {
    apps_dir: PathBuf,
    current: ArcSwap<Snapshot>,
    /// Held by a reload from its scan to its swap, so that a full rescan (at start, or after a watcher error)
    /// and a one-app rescan never build from the same old snapshot and lose each other's update. Readers never
    /// take it; a std mutex is right because no `.await` happens while it is held.
    reloading: Mutex<()>,
    /// Bumped after every swap, for those who keep state per version (the worker pool) and must follow changes.
    changes: tokio::sync::watch::Sender<u64>,
    /// The same count, for what looks on every request (the route cache): an atomic read, where reading the watch
    /// takes its lock.
    generation: AtomicU64,
}

impl Registry {
    /// An empty registry for `apps_dir`; call [`Registry::reload_all`] to fill it.
    pub(crate) fn new(apps_dir: PathBuf) -> Registry {
        Registry::from_snapshot(apps_dir, Snapshot::default())
    }

    /// A registry over a snapshot built in memory (benchmarks and tests of resolution).
    pub(crate) fn from_snapshot(apps_dir: PathBuf, snapshot: Snapshot) -> Registry {
        Registry {
            apps_dir,
            current: ArcSwap::from_pointee(snapshot),
            reloading: Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// A receiver that sees a new value after every reload.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn swap(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        // After the store: whoever reads the new generation and then the snapshot gets this one or a newer one.
        self.generation.fetch_add(1, Ordering::Release);
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// How many snapshots have been swapped in. Read it before [`Registry::snapshot`]: what is resolved from the
    /// snapshot is then at least as new as the generation read.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn apps_dir(&self) -> &Path {
        &self.apps_dir
    }

    /// The current snapshot. Cheap: one atomic load and a reference count.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Rescans the whole of APPS_DIR and swaps the result in.
    pub(crate) fn reload_all(&self) -> std::io::Result<()> {
        let _reloading = self.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let snapshot = scan_apps_dir(&self.apps_dir)?;
        log_problems(snapshot.apps.values().map(|a| a.as_ref()), &snapshot.ignored);
        self.swap(snapshot);
        Ok(())
    }

    /// Rescans one app directory (added, changed or removed) and swaps in a snapshot with just that app changed.
    pub(crate) fn reload_app(&self, name: &str) {
        if !valid_app_name(name) {
            return;
        }
        let _reloading = self.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let app = scan::scan_app(&self.apps_dir, name);
        let old = self.current.load();
        let mut apps = old.apps.clone();
        match app {
            Some(app) => {
                log_problems(std::iter::once(&app), &[]);
                tracing::info!(app = name, versions = ?app.version_list(), "app reloaded");
                apps.insert(name.into(), Arc::new(app));
            }
            None => {
                if apps.remove(name).is_some() {
                    tracing::info!(app = name, "app removed");
                }
            }
        }
        let ignored = old.ignored.clone();
        drop(old);
        self.swap(Snapshot { apps, ignored });
    }
}

fn log_problems<'a>(apps: impl Iterator<Item = &'a App>, ignored: &[String]) {
    for reason in ignored {
        tracing::warn!("{reason}");
    }
    for app in apps {
        for reason in &app.ignored {
            tracing::warn!(app = %app.name, "{reason}");
        }
        for version in &app.versions {
            if let Err(error) = &version.deployment {
                tracing::warn!(app = %app.name, version = %version.version, "invalid version: {error}");
            }
        }
    }
}
