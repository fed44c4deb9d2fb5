//! Compiled components on disk, so a restart (or a second version with the same `.wasm`) skips Cranelift.
//!
//! An entry is named by the SHA-256 of the component and a hash of the engine's compilation settings, so a new
//! Marina build or a different configuration never picks up code compiled for another. Each entry has a sidecar
//! with the SHA-256 of the compiled bytes: a truncated or corrupted file is detected before it is mapped, removed
//! and rebuilt. Entries are written to a temporary file and renamed into place, so a crash never leaves half an
//! entry under a real name, and concurrent writers of the same entry are harmless.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::{compile, LoadError};

/// The on-disk compile cache.
pub(crate) struct Cache {
    dir: PathBuf,
    /// Hex hash of the engine's compatibility settings, part of every entry's name.
    engine_hash: String,
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
    pub(crate) fn open(dir: &Path, engine: &wasmtime::Engine) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Cache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", hasher.finish()),
        })
    }

    fn entry(&self, component: &[u8]) -> PathBuf {
        let digest = Sha256::digest(component);
        self.dir.join(format!("{}-{}.cwasm", hex(&digest), self.engine_hash))
    }

    /// The compiled component for `bytes`: from the cache when a sound entry exists, compiled and stored otherwise.
    /// Returns whether it came from the cache.
    pub(crate) fn load_or_compile(
        &self,
        engine: &wasmtime::Engine,
        bytes: &[u8],
    ) -> Result<(Component, bool), LoadError> {
        let path = self.entry(bytes);
        if path.exists() {
            match self.load(engine, &path) {
                Ok(component) => return Ok((component, true)),
                Err(reason) => {
                    tracing::warn!(entry = %path.display(), "compile cache entry is unusable, rebuilding: {reason}");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(sidecar(&path));
                }
            }
        }
        let compiled = engine
            .precompile_component(bytes)
            .map_err(|e| LoadError(format!("not a valid WebAssembly component: {e:#}")))?;
        match self.store(&path, &compiled) {
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
        // rename, never modified in place. Wasmtime itself re-checks the header and engine settings.
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
