//! Per serving core, what each first path segment (`hello@1`) has resolved to since the last reload: the version,
//! and the core's counters for it.
//!
//! Resolving is cheap, but what it hands out is shared by every core: the snapshot, the app and the version are
//! `Arc`s, and so are the version's counters. Each clone and each drop is an atomic write to a cache line that
//! both cores write, several per request. A [`Route`] made here belongs to one core, so a request clones only its
//! own core's route, a reference count no other core touches, and the app, version and counters it holds stay
//! alive without being cloned again. A reload moves the registry's generation on, and each core starts its cache
//! afresh at its next request.
//!
//! Only what resolved is kept (an unknown app or version is looked up in the registry each time), only segments
//! up to [`MAX_CACHED_SEGMENT_BYTES`] long, and at most [`MAX_ROUTES_PER_CORE`] of them per core: a client that
//! spells one version many ways (`@1`, `@1.0`, `@%31`, a long range) only empties the cache, which refills from
//! the registry, and cannot make it hold more than a few hundred KiB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::backends::wasm::pool::{Pool, VersionRuntime};
use crate::core_local::PerCore;
use crate::deploy::registry::{Deployment, Registry, ResolveError, Resolved};
use crate::metrics::{Metrics, Served};

/// Distinct first segments one core keeps; more empty its cache.
pub(crate) const MAX_ROUTES_PER_CORE: usize = 1024;
/// Longer segments are resolved every time: an app name with a version or a range is far shorter.
pub(crate) const MAX_CACHED_SEGMENT_BYTES: usize = 256;

/// Where a first path segment goes: the version it resolved to, and where this core counts its requests.
/// Aligned, so that the allocation holding it (and its `Arc`'s reference counts) shares no cache line with one of
/// another core's.
#[repr(align(128))]
pub(crate) struct Route {
    pub(crate) resolved: Resolved,
    pub(crate) served: Served,
    /// The worker pool's runtime for the version, from its first WebAssembly request on this core: the pool looks
    /// runtimes up under a lock that every core takes, by a key it builds of two new strings.
    runtime: OnceLock<Arc<VersionRuntime>>,
}

impl Route {
    /// The runtime that runs `deployment` (this route's version's) in `pool`. A reload that changes the version
    /// (and so retires its runtime) moves the registry's generation on: after it, the core's next request resolves
    /// afresh, and only requests already under way keep the runtime they started with, as they did before.
    pub(crate) fn runtime(&self, pool: &Pool, deployment: &Deployment) -> Arc<VersionRuntime> {
        let stats = &self.served.stats;
        self.runtime
            .get_or_init(|| pool.runtime(&stats.app, &stats.version, deployment))
            .clone()
    }
}

/// The routes each core has resolved; see the module header.
#[derive(Default)]
pub(crate) struct RouteCache {
    /// A lock per core, which only that core's thread takes (threads that are no serving core share the last).
    cores: PerCore<Mutex<Routes>>,
}

#[derive(Default)]
struct Routes {
    /// The registry's generation these were resolved under (or after).
    generation: u64,
    /// Hashed with foldhash: looked up on every request, and bounded, so a client choosing keys gains nothing.
    by_segment: HashMap<Box<str>, Arc<Route>, foldhash::fast::RandomState>,
}

impl RouteCache {
    /// The route for `segment` (as it appears in the URL, still percent-encoded) on the running core: from the
    /// cache, or resolved in `registry` with its counters from `metrics`.
    pub(crate) fn resolve(
        &self,
        registry: &Registry,
        metrics: &Metrics,
        segment: &str,
    ) -> Result<Arc<Route>, ResolveError> {
        let generation = registry.generation();
        let mut routes = self.cores.local().lock().unwrap_or_else(PoisonError::into_inner);
        if routes.generation != generation {
            routes.by_segment.clear();
            routes.generation = generation;
        }
        if let Some(route) = routes.by_segment.get(segment) {
            return Ok(route.clone());
        }
        let resolved = registry.snapshot().resolve(segment)?;
        let served = Served {
            stats: metrics.app(&resolved.app.name, &resolved.version.version),
        };
        let route = Arc::new(Route {
            resolved,
            served,
            runtime: OnceLock::new(),
        });
        if segment.len() > MAX_CACHED_SEGMENT_BYTES {
            return Ok(route);
        }
        if routes.by_segment.len() >= MAX_ROUTES_PER_CORE {
            routes.by_segment.clear();
        }
        routes.by_segment.insert(segment.into(), route.clone());
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(apps: &std::path::Path, version: &str) {
        let dir = apps.join("site").join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), version).unwrap();
    }

    fn cached(cache: &RouteCache) -> usize {
        cache.cores.local().lock().unwrap().by_segment.len()
    }

    #[test]
    fn a_core_reuses_its_route_until_a_reload_and_keeps_at_most_its_bound() {
        let apps = tempfile::tempdir().unwrap();
        deploy(apps.path(), "1.0.0");
        let registry = Registry::new(apps.path().to_owned());
        registry.reload_all().unwrap();
        let (metrics, cache) = (Metrics::for_tests(), RouteCache::default());

        let first = cache.resolve(&registry, &metrics, "site@1").unwrap();
        let again = cache.resolve(&registry, &metrics, "site@1").unwrap();
        assert!(Arc::ptr_eq(&first, &again), "the second request takes the cached route");
        assert!(cache.resolve(&registry, &metrics, "nothing").is_err());
        assert_eq!(cached(&cache), 1, "what did not resolve is not kept");

        deploy(apps.path(), "1.1.0");
        registry.reload_all().unwrap();
        let after = cache.resolve(&registry, &metrics, "site@1").unwrap();
        assert_eq!(after.resolved.version.version, semver::Version::new(1, 1, 0));
        assert_eq!(
            (first.served.stats.version.as_str(), after.served.stats.version.as_str()),
            ("1.0.0", "1.1.0"),
            "each version counts on its own counters"
        );

        for patch in 0..MAX_ROUTES_PER_CORE + 10 {
            let segment = format!("site@>=0.0.{patch}");
            assert!(cache.resolve(&registry, &metrics, &segment).is_ok());
            assert!(cached(&cache) <= MAX_ROUTES_PER_CORE);
        }

        let before = cached(&cache);
        // A range whose prerelease runs long: still any release from 0.0.0 on.
        let long = format!("site@>=0.0.0-{}", "a".repeat(MAX_CACHED_SEGMENT_BYTES));
        assert!(long.len() > MAX_CACHED_SEGMENT_BYTES);
        let resolved = cache.resolve(&registry, &metrics, &long).unwrap();
        assert_eq!(resolved.resolved.version.version, semver::Version::new(1, 1, 0));
        assert_eq!(cached(&cache), before, "a long segment is resolved but not kept");
    }
}
