//! Hot reload: watch APPS_DIR and rescan what changed.
//!
//! Filesystem events come in bursts (a copy is many writes), so they are debounced, then reduced to the set of
//! app names they touch; each of those apps is rescanned once. Anything that cannot be pinned to one app (an
//! event on APPS_DIR itself, a watcher error such as an overflowed event queue) rescans everything.
//!
//! Only changes count. inotify also reports a file being opened or read, and the host opens files under APPS_DIR
//! all the time (a rescan reads configs, a compile reads the component, a static app serves its files): treating
//! those as changes made every rescan schedule the next one, forever.

use std::collections::BTreeSet;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

use super::Registry;

/// How long a burst of filesystem events must be quiet before the apps it touched are rescanned.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(200);

/// A running watch over APPS_DIR; dropping it stops the watch and its thread.
pub(crate) struct Watcher {
    _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
}

impl Watcher {
    /// Starts watching `registry`'s APPS_DIR. Reloads run on the watcher's own thread, off the request path.
    pub(crate) fn start(registry: Arc<Registry>) -> Result<Watcher, notify::Error> {
        let apps_dir = registry.apps_dir().to_path_buf();
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
            let changed = match result {
                Ok(events) => {
                    let changes: Vec<_> = events.iter().filter(|e| is_change(&e.kind)).collect();
                    if changes.is_empty() {
                        return;
                    }
                    changed_apps(
                        registry.apps_dir(),
                        changes.iter().flat_map(|e| e.paths.iter().map(|p| p.as_path())),
                    )
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(%error, "file watcher error; rescanning every app");
                    }
                    None
                }
            };
            match changed {
                Some(names) => names.iter().for_each(|name| registry.reload_app(name)),
                None => {
                    if let Err(error) = registry.reload_all() {
                        tracing::error!(%error, "cannot rescan the apps directory; keeping the apps loaded before");
                    }
                }
            }
        })?;
        debouncer.watch(&apps_dir, RecursiveMode::Recursive)?;
        Ok(Watcher { _debouncer: debouncer })
    }
}

/// Whether an event can change what is deployed: not a file merely opened, read or closed unwritten.
fn is_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            notify::event::AccessKind::Open(_)
                | notify::event::AccessKind::Read
                | notify::event::AccessKind::Close(notify::event::AccessMode::Read)
                | notify::event::AccessKind::Close(notify::event::AccessMode::Execute)
        )
    )
}

/// The app names touched by `paths`, or `None` when a path is APPS_DIR itself or lies outside it.
fn changed_apps<'a>(apps_dir: &Path, paths: impl Iterator<Item = &'a Path>) -> Option<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for path in paths {
        match path.strip_prefix(apps_dir).ok()?.components().next() {
            Some(Component::Normal(name)) => names.insert(name.to_string_lossy().into_owned()),
            _ => return None,
        };
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_reduced_to_the_apps_they_touch() {
        let root = Path::new("/srv/apps");
        let paths = [
            Path::new("/srv/apps/hello/1.0.0/worker.config.json"),
            Path::new("/srv/apps/hello/2.0.0"),
            Path::new("/srv/apps/todo"),
        ];
        let names = changed_apps(root, paths.into_iter()).unwrap();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["hello", "todo"]);
    }

    #[test]
    fn an_event_on_the_apps_dir_itself_rescans_everything() {
        let root = Path::new("/srv/apps");
        assert_eq!(changed_apps(root, [Path::new("/srv/apps")].into_iter()), None);
        assert_eq!(changed_apps(root, [Path::new("/elsewhere/x")].into_iter()), None);
    }
}
