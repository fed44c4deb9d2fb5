//! Compiled components on disk, so a restart (or a second version with the same `.wasm`) skips Cranelift.
//!
//! An entry is named by the SHA-256 of the component and a hash of the engine's compilation settings, so a new
//! Marina build or a different configuration never picks up code compiled for another. Each entry has a sidecar
//! with the SHA-256 of the compiled bytes: a truncated or corrupted file is detected before it is mapped, removed
//! and rebuilt. Entries are written to a temporary file and renamed into place, so a crash never leaves half an
//! entry under a real name, and concurrent writers of the same entry are harmless.
//!
//! # Bounds
//!
//! The directory is kept to [`DEFAULT_MAX_CACHE_BYTES`] (1 GiB) and to entries used in the last
//! [`DEFAULT_MAX_CACHE_AGE`] (30 days), checked when the cache opens and after each entry written. Every use of
//! an entry sets its modification time, so the least recently used entries go first; an entry this process is
//! reading or has just written is never removed. A compiled component takes about three times its `.wasm`
//! (360 KiB for the examples' `hello`, 480 KiB for `todo_api`; a large app's is tens of MiB), so 1 GiB keeps
//! hundreds to thousands of versions; it is also what wasmtime's own cache allows by default. Every start and
//! every load touches the entries of the versions deployed, so an entry unused for a month belongs to a version
//! removed since or to a Marina build no longer run; should it come back, it costs one compile. Only names this
//! module writes are considered (entries, their checksums, and a dead writer's temporary files once an hour old);
//! anything else in the directory is left alone, and a file that vanishes or cannot be removed during the cleanup
//! is skipped, not an error.
//!
//! # Why not wasmtime's cache
//!
//! `wasmtime::Cache` (the `cache` feature) bounds its directory by size too, but not by age, and trims it from a
//! background thread at most once per `cleanup-interval` (1 h by default) rather than after each write. It keeps
//! entries zstd-compressed and loads one by decompressing it and copying the code into fresh memory, where this
//! cache maps the file as it is. It counts hits only for the whole cache, so a load could not report whether it
//! came from the cache (`cached` in `component loaded`, which the tests check), nor warn that it rebuilt a
//! corrupted entry. And it would add zstd (a C build) and toml, among others, to every build.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::{compile, LoadError};

/// The most the cache directory holds by default: entries and their checksums, in bytes (as their lengths).
pub(crate) const DEFAULT_MAX_CACHE_BYTES: u64 = 1024 * 1024 * 1024;
/// How long an entry is kept by default without being used.
pub(crate) const DEFAULT_MAX_CACHE_AGE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How old a temporary file, or a checksum without its entry, must be to be taken for the leftovers of a writer
/// that died: a live writer renames both into place within the seconds a compile takes.
const ABANDONED_AFTER: Duration = Duration::from_secs(60 * 60);

/// How much the cache keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Total bytes of entries and checksums; past it, the least recently used entries are removed.
    pub(crate) max_bytes: u64,
    /// Entries not used for longer are removed.
    pub(crate) max_age: Duration,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            max_bytes: DEFAULT_MAX_CACHE_BYTES,
            max_age: DEFAULT_MAX_CACHE_AGE,
        }
    }
}

/// The on-disk compile cache.
pub(crate) struct Cache {
    dir: PathBuf,
    bounds: Bounds,
    /// Entries being read or written by this process, with how many loads hold each; the cleanup skips them. A
    /// `std` mutex: it is held for a map update or for one entry's removal, never across an `.await`, and holding
    /// it while an entry is removed is what makes "check it is not in use, then remove it" one step.
    in_use: Mutex<HashMap<PathBuf, usize>>,
}

/// What one cleanup removed, for its log line and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
struct Trimmed {
    entries: usize,
    bytes: u64,
    leftovers: usize,
}

/// Where compiled components go when `--cache-dir` is not given: the user's cache directory, never APPS_DIR.
pub(crate) fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|home| PathBuf::from(home).join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("marina").join("components")
}

impl Cache {
    /// Opens (creating) the cache directory. It is made private to the user: whoever can write it can make the
    /// host run code.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Cache> {
        Cache::open_bounded(dir, Bounds::default())
    }

    /// [`Cache::open`] with other bounds than the defaults; trims the directory to them.
    fn open_bounded(dir: &Path, bounds: Bounds) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let cache = Cache {
            dir: dir.to_path_buf(),
            bounds,
            in_use: Mutex::new(HashMap::new()),
        };
        cache.trim();
        Ok(cache)
    }

    /// The entry of `component` compiled by `engine`: named by both, since the two engines (for WASI 0.2 and
    /// 0.3 handlers) compile differently.
    fn entry(&self, engine: &wasmtime::Engine, component: &[u8]) -> PathBuf {
        let digest = Sha256::digest(component);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir
            .join(format!("{}-{:016x}.cwasm", hex(&digest), hasher.finish()))
    }

    /// The compiled component for `bytes`: from the cache when a sound entry exists, compiled and stored otherwise.
    /// Returns whether it came from the cache.
    pub(crate) fn load_or_compile(
        &self,
        engine: &wasmtime::Engine,
        bytes: &[u8],
    ) -> Result<(Component, bool), LoadError> {
        let path = self.entry(engine, bytes);
        let _in_use = self.hold(&path);
        if path.exists() {
            // Marks it recently used (for this process's cleanup and any other sharing the directory) before it
            // is read. A failure only makes it look older.
            let _ = std::fs::File::open(&path).and_then(|file| file.set_modified(SystemTime::now()));
            match self.load(engine, &path) {
                Ok(component) => return Ok((component, true)),
                Err(reason) => {
                    tracing::warn!(entry = %path.display(), "compile cache entry is unusable, rebuilding: {reason}");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(sidecar(&path));
                }
            }
        }
        let compiled = engine.precompile_component(bytes).map_err(LoadError::Invalid)?;
        let stored = self.store(&path, &compiled);
        if stored.is_ok() {
            self.trim();
        }
        match stored {
            Ok(()) => match self.load(engine, &path) {
                Ok(component) => return Ok((component, false)),
                Err(reason) => tracing::warn!(entry = %path.display(), "a fresh cache entry did not load: {reason}"),
            },
            Err(error) => tracing::warn!(entry = %path.display(), "cannot write compile cache entry: {error}"),
        }
        // The cache is an optimisation: when it fails, compile in memory rather than fail the app.
        Ok((compile(engine, bytes)?, false))
    }

    fn load(&self, engine: &wasmtime::Engine, path: &Path) -> Result<Component, String> {
        let expected = std::fs::read_to_string(sidecar(path)).map_err(|e| format!("no checksum: {e}"))?;
        let actual = hex(&Sha256::digest(std::fs::read(path).map_err(|e| e.to_string())?));
        if expected.trim() != actual {
            return Err("checksum mismatch (truncated or corrupted)".into());
        }
        // SAFETY: `deserialize_file` requires that the file holds code produced by `precompile_component` for a
        // compatible engine and that it is not modified while mapped. The entry was written by `store` below into
        // a directory only this user can write, under a name that includes the engine's compatibility hash, and
        // its content was just checked against the checksum written with it; entries are only ever replaced by
        // rename, never modified in place. The cleanup only unlinks entries (which leaves a mapped file's pages as
        // they are), and never one this process holds, as the caller does this one; one removed by another process
        // before it is opened fails here and is rebuilt. Wasmtime itself re-checks the header and engine settings.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize_file(engine, path) };
        component.map_err(|e| format!("{e:#}"))
    }

    fn store(&self, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
        let mut temp = tempfile_in(&self.dir)?;
        temp.1.write_all(compiled)?;
        temp.1.sync_all()?;
        let mut sum = tempfile_in(&self.dir)?;
        sum.1.write_all(hex(&Sha256::digest(compiled)).as_bytes())?;
        sum.1.sync_all()?;
        // The checksum goes in first: a reader that finds the entry always finds its checksum.
        std::fs::rename(&sum.0, sidecar(path))?;
        std::fs::rename(&temp.0, path)
    }

    /// Marks `entry` in use until the guard is dropped: the cleanup leaves it alone meanwhile.
    fn hold(&self, entry: &Path) -> InUse<'_> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *in_use.entry(entry.to_path_buf()).or_default() += 1;
        InUse {
            cache: self,
            entry: entry.to_path_buf(),
        }
    }

    /// Brings the directory within its bounds (see the module's header), logging what it removed.
    fn trim(&self) -> Trimmed {
        let trimmed = self.trim_at(SystemTime::now());
        if trimmed != Trimmed::default() {
            tracing::info!(
                dir = %self.dir.display(),
                entries = trimmed.entries,
                bytes = trimmed.bytes,
                leftovers = trimmed.leftovers,
                "compile cache trimmed"
            );
        }
        trimmed
    }

    fn trim_at(&self, now: SystemTime) -> Trimmed {
        let Some(survey) = self.survey(now) else {
            return Trimmed::default();
        };
        self.evict(survey, now)
    }

    /// Lists the entries, least recently used first, removing on the way the leftovers of writers that died.
    /// `None` when the directory cannot be listed.
    fn survey(&self, now: SystemTime) -> Option<Survey> {
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), "cannot list the compile cache to trim it: {error}");
                return None;
            }
        };
        let abandoned = |found: &Found| age(now, found.modified) > ABANDONED_AFTER;
        let mut leftovers = 0;
        // By entry name (`<hash>-<engine>.cwasm`).
        let mut entries: HashMap<String, Found> = HashMap::new();
        let mut checksums: HashMap<String, Found> = HashMap::new();
        for item in listing.flatten() {
            let Ok(name) = item.file_name().into_string() else {
                continue;
            };
            let Some(kind) = kind_of(&name) else { continue };
            // Not following links: only regular files this module could have written are touched.
            let Ok(meta) = item.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let found = Found {
                path: item.path(),
                bytes: meta.len(),
                modified: meta.modified().unwrap_or(now),
            };
            match kind {
                Kind::Entry => {
                    entries.insert(name, found);
                }
                Kind::Checksum => {
                    checksums.insert(name.trim_end_matches(".sha256").to_owned(), found);
                }
                Kind::Temporary => {
                    if abandoned(&found) && std::fs::remove_file(&found.path).is_ok() {
                        leftovers += 1;
                    }
                }
            }
        }
        // A checksum without its entry: a writer died between the two renames, or a removal was cut short.
        for (name, checksum) in &checksums {
            if !entries.contains_key(name) && abandoned(checksum) {
                let in_use = self.in_use.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if !in_use.contains_key(&self.dir.join(name)) && std::fs::remove_file(&checksum.path).is_ok() {
                    leftovers += 1;
                }
            }
        }
        let mut entries: Vec<(Found, u64)> = entries
            .into_iter()
            .map(|(name, entry)| {
                let checksum = checksums.get(&name).map_or(0, |checksum| checksum.bytes);
                (entry, checksum)
            })
            .collect();
        entries.sort_by(|(a, _), (b, _)| a.modified.cmp(&b.modified).then_with(|| a.path.cmp(&b.path)));
        Some(Survey { entries, leftovers })
    }

    /// Removes the least recently used entries of `survey` until the rest are within the bounds, skipping those
    /// in use and any that cannot be removed.
    fn evict(&self, survey: Survey, now: SystemTime) -> Trimmed {
        let mut trimmed = Trimmed {
            leftovers: survey.leftovers,
            ..Trimmed::default()
        };
        let mut total: u64 = survey
            .entries
            .iter()
            .map(|(entry, checksum)| entry.bytes + checksum)
            .sum();
        for (entry, checksum) in survey.entries {
            // Least recently used first: once one is recent enough and the rest fit, so is every later one.
            if age(now, entry.modified) <= self.bounds.max_age && total <= self.bounds.max_bytes {
                break;
            }
            // Held while the entry is removed, so a load cannot start on it in between.
            let in_use = self.in_use.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if in_use.contains_key(&entry.path) {
                continue;
            }
            match std::fs::remove_file(&entry.path) {
                Ok(()) => {
                    trimmed.entries += 1;
                    trimmed.bytes += entry.bytes + checksum;
                }
                // Removed meanwhile (by another process sharing the directory): it no longer counts either.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                // Kept, and counted: younger entries go in its place.
                Err(_) => continue,
            }
            // The entry goes first, so a reader that finds the entry still finds its checksum.
            let _ = std::fs::remove_file(sidecar(&entry.path));
            drop(in_use);
            total -= entry.bytes + checksum;
        }
        trimmed
    }
}

/// How long ago `modified` was; a time in the future (a skewed clock) counts as now.
fn age(now: SystemTime, modified: SystemTime) -> Duration {
    now.duration_since(modified).unwrap_or(Duration::ZERO)
}

/// The entries the cleanup found, least recently used first, each with its checksum's length; and how many
/// leftovers it removed.
struct Survey {
    entries: Vec<(Found, u64)>,
    leftovers: usize,
}

/// An entry held by a load; see [`Cache::hold`].
struct InUse<'a> {
    cache: &'a Cache,
    entry: PathBuf,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        let mut in_use = self
            .cache
            .in_use
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = in_use.get_mut(&self.entry) {
            *count -= 1;
            if *count == 0 {
                in_use.remove(&self.entry);
            }
        }
    }
}

/// A file of the cache directory, as the cleanup saw it.
struct Found {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

/// The files this module writes.
enum Kind {
    /// `<sha256 of the component>-<engine hash>.cwasm`
    Entry,
    /// The entry's name plus `.sha256`.
    Checksum,
    /// `.tmp-<pid>-<n>`, before its rename.
    Temporary,
}

fn kind_of(name: &str) -> Option<Kind> {
    let hex_of =
        |text: &str, len: usize| text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let is_entry = |stem: &str| {
        stem.split_once('-')
            .is_some_and(|(component, engine)| hex_of(component, 64) && hex_of(engine, 16))
    };
    if let Some(stem) = name.strip_suffix(".cwasm") {
        return is_entry(stem).then_some(Kind::Entry);
    }
    if let Some(stem) = name.strip_suffix(".cwasm.sha256") {
        return is_entry(stem).then_some(Kind::Checksum);
    }
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(".tmp-")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(pid, n)| digits(pid) && digits(n))
        .then_some(Kind::Temporary)
}

fn sidecar(entry: &Path) -> PathBuf {
    entry.with_extension("cwasm.sha256")
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    Ok((path, file))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    const MINUTE: Duration = Duration::from_secs(60);
    /// The engine hash of entries made up by the tests; any 16 hex digits are an entry's.
    const ENGINE: &str = "0123456789abcdef";

    /// The smallest component, with a custom section naming it so that each name compiles to its own entry.
    fn component(name: &str) -> Vec<u8> {
        let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
        let section: Vec<u8> = [&[4u8][..], b"test", name.as_bytes()].concat();
        bytes.push(0);
        bytes.push(u8::try_from(section.len()).unwrap());
        bytes.extend_from_slice(&section);
        bytes
    }

    /// A file of `len` bytes (sparse: the tests' gigabytes take no disk) last modified `age` ago.
    fn file(path: &Path, len: u64, age: Duration) -> PathBuf {
        let file = File::create(path).unwrap();
        file.set_len(len).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
        path.to_path_buf()
    }

    /// A made-up entry named after `n` and its 64-byte checksum, both last used `age` ago.
    fn entry(dir: &Path, n: u8, len: u64, age: Duration) -> PathBuf {
        let entry = dir.join(format!("{}-{ENGINE}.cwasm", hex(&[n; 32])));
        file(&sidecar(&entry), 64, age);
        file(&entry, len, age)
    }

    fn set_age(path: &Path, age: Duration) {
        File::open(path).unwrap().set_modified(SystemTime::now() - age).unwrap();
    }

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    fn bounded(max_bytes: u64) -> Bounds {
        Bounds {
            max_bytes,
            max_age: DEFAULT_MAX_CACHE_AGE,
        }
    }

    #[test]
    fn a_write_over_the_size_bound_removes_the_least_recently_used_entry_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let engine = wasmtime::Engine::default();
        const LEN: u64 = 64 * 1024 * 1024;
        // Exactly full: three entries and their checksums.
        let cache = Cache::open_bounded(dir.path(), bounded(3 * (LEN + 64))).unwrap();
        let oldest = entry(dir.path(), 1, LEN, 3 * DAY);
        let middle = entry(dir.path(), 2, LEN, 2 * DAY);
        let newest = entry(dir.path(), 3, LEN, DAY);
        // Not ours, however old or large: never removed, and not counted.
        let foreign = [
            file(&dir.path().join("notes.txt"), 10 * LEN, 400 * DAY),
            file(&dir.path().join("app.cwasm"), LEN, 400 * DAY),
            file(
                &dir.path().join(format!("{}-{ENGINE}.cwasm.bak", hex(&[9; 32]))),
                LEN,
                400 * DAY,
            ),
            file(
                &dir.path().join(format!("{}-{ENGINE}.cwasm", hex(&[9; 31]))),
                LEN,
                400 * DAY,
            ),
            file(&dir.path().join(".tmp-old"), LEN, 400 * DAY),
        ];
        assert_eq!(cache.trim(), Trimmed::default(), "within the bounds, nothing goes");

        let bytes = component("new");
        let (_, cached) = cache.load_or_compile(&engine, &bytes).unwrap();
        assert!(!cached);
        let written = cache.entry(&engine, &bytes);
        assert!(len(&written) < LEN, "one removal makes room");
        assert!(
            written.exists() && sidecar(&written).exists(),
            "the entry just written stays"
        );
        assert!(
            !oldest.exists() && !sidecar(&oldest).exists(),
            "the least recently used entry goes"
        );
        for kept in [&middle, &newest] {
            assert!(kept.exists() && sidecar(kept).exists(), "{kept:?} is kept");
        }
        for kept in &foreign {
            assert!(kept.exists(), "{kept:?} is not the cache's and stays");
        }
        let (_, cached) = cache.load_or_compile(&engine, &bytes).unwrap();
        assert!(cached, "and it serves the next load");
    }

    #[test]
    fn an_entry_used_is_the_last_to_go() {
        let dir = tempfile::tempdir().unwrap();
        let engine = wasmtime::Engine::default();
        let (a, b, c) = (component("a"), component("b"), component("c"));
        let roomy = Cache::open_bounded(dir.path(), bounded(u64::MAX)).unwrap();
        roomy.load_or_compile(&engine, &a).unwrap();
        roomy.load_or_compile(&engine, &b).unwrap();
        let (entry_a, entry_b) = (roomy.entry(&engine, &a), roomy.entry(&engine, &b));
        // `a` was written first and is the older, until it is used.
        set_age(&entry_a, 10 * DAY);
        set_age(&entry_b, 5 * DAY);
        let size = len(&entry_a).max(len(&entry_b)) + len(&sidecar(&entry_a));
        let cache = Cache::open_bounded(dir.path(), bounded(2 * size + size / 2)).unwrap();
        assert!(entry_a.exists() && entry_b.exists(), "two fit");

        let (_, cached) = cache.load_or_compile(&engine, &a).unwrap();
        assert!(cached);
        // A third does not fit: the least recently used goes, which is now `b`.
        cache.load_or_compile(&engine, &c).unwrap();
        assert!(entry_a.exists(), "used last, kept");
        assert!(
            !entry_b.exists() && !sidecar(&entry_b).exists(),
            "the least recently used goes"
        );
        assert!(cache.entry(&engine, &c).exists());
    }

    #[test]
    fn entries_unused_past_the_age_bound_and_leftovers_of_dead_writers_go_when_the_cache_opens() {
        let dir = tempfile::tempdir().unwrap();
        let stale = entry(dir.path(), 1, 100, DEFAULT_MAX_CACHE_AGE + DAY);
        let recent = entry(dir.path(), 2, 100, DEFAULT_MAX_CACHE_AGE - DAY);
        let temp_abandoned = file(&dir.path().join(".tmp-41-7"), 100, ABANDONED_AFTER + MINUTE);
        let temp_writing = file(&dir.path().join(".tmp-41-8"), 100, MINUTE);
        let orphan = file(
            &sidecar(&dir.path().join(format!("{}-{ENGINE}.cwasm", hex(&[3; 32])))),
            64,
            2 * DAY,
        );
        let being_renamed = file(
            &sidecar(&dir.path().join(format!("{}-{ENGINE}.cwasm", hex(&[4; 32])))),
            64,
            MINUTE,
        );
        let foreign = file(&dir.path().join("notes.txt"), 100, 400 * DAY);
        let directory = dir.path().join(format!("{}-{ENGINE}.cwasm", hex(&[5; 32])));
        std::fs::create_dir(&directory).unwrap();

        Cache::open(dir.path()).unwrap();
        assert!(
            !stale.exists() && !sidecar(&stale).exists(),
            "unused for over {DEFAULT_MAX_CACHE_AGE:?}"
        );
        assert!(recent.exists() && sidecar(&recent).exists());
        assert!(
            !temp_abandoned.exists() && !orphan.exists(),
            "a dead writer's leftovers go"
        );
        assert!(
            temp_writing.exists() && being_renamed.exists(),
            "a live writer's files stay"
        );
        assert!(foreign.exists() && directory.is_dir(), "what is not the cache's stays");
    }

    #[test]
    fn an_entry_being_read_or_just_written_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let engine = wasmtime::Engine::default();
        // Nothing fits: everything that may go, goes.
        let cache = Cache::open_bounded(dir.path(), bounded(0)).unwrap();
        let bytes = component("held");
        let (_, cached) = cache.load_or_compile(&engine, &bytes).unwrap();
        assert!(!cached);
        let written = cache.entry(&engine, &bytes);
        assert!(written.exists(), "the trim after a write spares the entry written");

        let held = cache.hold(&written);
        let also = cache.hold(&written);
        assert_eq!(cache.trim().entries, 0);
        drop(held);
        assert_eq!(cache.trim().entries, 0, "still held by the second load");
        drop(also);
        assert_eq!(cache.trim().entries, 1);
        assert!(!written.exists() && !sidecar(&written).exists());
    }

    #[test]
    fn a_file_that_vanishes_or_cannot_be_removed_during_the_cleanup_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_bounded(dir.path(), bounded(0)).unwrap();
        let vanished = entry(dir.path(), 1, 100, 3 * DAY);
        let replaced = entry(dir.path(), 2, 100, 2 * DAY);
        let removable = entry(dir.path(), 3, 100, DAY);
        let now = SystemTime::now();
        let survey = cache.survey(now).unwrap();
        assert_eq!(survey.entries.len(), 3);
        std::fs::remove_file(&vanished).unwrap();
        std::fs::remove_file(sidecar(&vanished)).unwrap();
        // A directory where the entry was cannot be removed as a file.
        std::fs::remove_file(&replaced).unwrap();
        std::fs::create_dir(&replaced).unwrap();
        let trimmed = cache.evict(survey, now);
        assert_eq!(
            (trimmed.entries, trimmed.bytes),
            (1, 164),
            "only the one it could remove counts"
        );
        assert!(!removable.exists() && replaced.is_dir());

        // A cache directory that is gone is not listed, and nothing fails.
        drop(dir);
        assert_eq!(cache.trim(), Trimmed::default());
    }
}
