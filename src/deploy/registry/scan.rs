//! Reading APPS_DIR from disk: which entries are apps, which are versions, and whether each version can be served.
//!
//! Nothing here fails as a whole because of one bad entry: a bad name is skipped with a reason, a bad version is
//! kept with its error so that it answers 503 and shows up in `/_/deployments` and `marina check`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use semver::Version;

use super::{App, AppKind, AppVersion, Deployment, Snapshot};
use crate::deploy::config::{WorkerConfig, CONFIG_FILE};
use crate::deploy::rules::Rules;

/// App names longer than this are skipped: they are path segments, and no real app needs more.
pub const MAX_APP_NAME_LEN: usize = 128;

/// Entrypoints tried in order when the config does not name one.
pub const DEFAULT_ENTRYPOINTS: [&str; 4] = ["app.wasm", "index.wasm", "index.html", "public/index.html"];

/// Lowercase letters, digits, `-`, `_` and `.`; not starting with `_` (reserved for `/_/`) or `.` (hidden).
pub fn valid_app_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_APP_NAME_LEN
        && !name.starts_with(['_', '.'])
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
}

/// Reads every app under `apps_dir`.
pub fn scan_apps_dir(apps_dir: &Path) -> std::io::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(apps_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // hidden entries (.git, editor files) are not worth a warning
        }
        if !entry.path().is_dir() {
            snapshot.ignored.push(format!("{name}: not a directory, ignored"));
        } else if name.starts_with('_') {
            snapshot
                .ignored
                .push(format!("{name}: names starting with `_` are reserved, ignored"));
        } else if !valid_app_name(&name) {
            snapshot.ignored.push(format!(
                "{name:?}: not a valid app name (lowercase letters, digits, `-`, `_`, `.`), ignored"
            ));
        } else {
            names.push(name);
        }
    }
    for name in names {
        if let Some(app) = scan_app(apps_dir, &name) {
            snapshot.apps.insert(name.into(), Arc::new(app));
        }
    }
    snapshot.ignored.sort();
    Ok(snapshot)
}

/// Reads one app directory; `None` when it is gone (or no longer a directory).
pub fn scan_app(apps_dir: &Path, name: &str) -> Option<App> {
    let dir = apps_dir.join(name);
    let entries = std::fs::read_dir(&dir).ok()?;
    let mut found: HashMap<Version, (String, PathBuf)> = HashMap::new();
    let mut ignored = Vec::new();
    for entry in entries.flatten() {
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        if dir_name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !path.is_dir() {
            ignored.push(format!("{name}/{dir_name}: not a version directory, ignored"));
            continue;
        }
        let Some(version) = version_of_dir(&dir_name) else {
            ignored.push(format!(
                "{name}/{dir_name}: not a semver version (like 1.2.3 or v1.2.3), ignored"
            ));
            continue;
        };
        // `1.0.0` and `v1.0.0` name the same version; keep the plain spelling, deterministically.
        match found.get(&version) {
            Some((kept, _)) if (dir_name.starts_with('v'), &dir_name) < (kept.starts_with('v'), kept) => {
                ignored.push(format!("{name}/{kept}: same version as {name}/{dir_name}, ignored"));
                found.insert(version, (dir_name, path));
            }
            Some((kept, _)) => ignored.push(format!("{name}/{dir_name}: same version as {name}/{kept}, ignored")),
            None => {
                found.insert(version, (dir_name, path));
            }
        }
    }
    let mut versions: Vec<Arc<AppVersion>> = found
        .into_iter()
        .map(|(version, (dir_name, dir))| {
            let deployment = load_version(&dir).map_err(|e| format!("{name}/{dir_name}: {e}"));
            Arc::new(AppVersion {
                version,
                dir_name,
                dir,
                deployment,
            })
        })
        .collect();
    versions.sort_by(|a, b| b.version.cmp(&a.version));
    ignored.sort();
    Some(App {
        name: name.to_owned(),
        versions,
        ignored,
    })
}

fn version_of_dir(name: &str) -> Option<Version> {
    let bare = match name.strip_prefix('v') {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => rest,
        _ => name,
    };
    Version::parse(bare).ok()
}

/// Loads one version directory: its config and its entrypoint. The error text starts with the file it is about
/// (`worker.config.json: field …`).
pub fn load_version(dir: &Path) -> Result<Deployment, String> {
    let config = WorkerConfig::load(dir).map_err(|e| format!("{CONFIG_FILE}: {e}"))?;
    let proxy = Rules::compile(&config.proxy.0, config.timeout, &|name| std::env::var(name).ok())
        .map_err(|e| format!("{CONFIG_FILE}: {e}"))?;
    let version_root = dir
        .canonicalize()
        .map_err(|e| format!("cannot open the version directory: {e}"))?;
    let (entrypoint, entrypoint_path) = find_entrypoint(&version_root, config.entrypoint.as_deref())
        .map_err(|e| format!("{CONFIG_FILE}: field `entrypoint`: {e}"))?;
    let kind = match entrypoint.extension().and_then(|e| e.to_str()) {
        Some("wasm") => AppKind::Wasm,
        Some("html" | "htm") => AppKind::Static,
        _ => {
            return Err(format!(
                "{CONFIG_FILE}: field `entrypoint`: {} is neither a .wasm component nor an .html page",
                entrypoint.display()
            ))
        }
    };
    let root = entrypoint_path.parent().unwrap_or(&version_root).to_path_buf();
    let fingerprint = fingerprint(&entrypoint_path, &config);
    Ok(Deployment {
        fingerprint,
        config,
        kind,
        entrypoint,
        entrypoint_path,
        root,
        proxy,
    })
}

/// A hash of what a deployment is built from: the entrypoint's identity on disk and the config.
fn fingerprint(entrypoint: &Path, config: &WorkerConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    entrypoint.hash(&mut hasher);
    if let Ok(meta) = std::fs::metadata(entrypoint) {
        meta.len().hash(&mut hasher);
        meta.modified().ok().hash(&mut hasher);
    }
    serde_json::to_string(config).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// The configured entrypoint, or the first default one that exists; it must be a file inside the version directory
/// even after following symlinks.
fn find_entrypoint(version_root: &Path, configured: Option<&str>) -> Result<(PathBuf, PathBuf), String> {
    let inside = |relative: &Path| -> Result<Option<PathBuf>, String> {
        let Ok(path) = version_root.join(relative).canonicalize() else {
            return Ok(None);
        };
        if !path.starts_with(version_root) {
            return Err(format!("{} points outside the version directory", relative.display()));
        }
        Ok(path.is_file().then_some(path))
    };
    if let Some(configured) = configured {
        let relative = Path::new(configured);
        let confined = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if configured.is_empty() || !confined {
            return Err(format!(
                "{configured:?} must be a relative path inside the version directory"
            ));
        }
        return match inside(relative)? {
            Some(path) => Ok((relative.to_path_buf(), path)),
            None => Err(format!("{configured:?} is not a file in the version directory")),
        };
    }
    for candidate in DEFAULT_ENTRYPOINTS {
        if let Some(path) = inside(Path::new(candidate))? {
            return Ok((PathBuf::from(candidate), path));
        }
    }
    Err(format!(
        "none set, and none of {} exists",
        DEFAULT_ENTRYPOINTS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn version_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        dir
    }

    fn entrypoint_of(files: &[(&str, &str)]) -> Result<(String, AppKind), String> {
        let dir = version_dir(files);
        load_version(dir.path()).map(|d| (d.entrypoint.display().to_string(), d.kind))
    }

    #[test]
    fn app_names_follow_the_documented_alphabet() {
        for good in ["hello", "todo-api", "a_b", "v1.app", "0"] {
            assert!(valid_app_name(good), "{good}");
        }
        for bad in [
            "",
            "Hello",
            "_internal",
            ".hidden",
            "a b",
            "a@b",
            "a/b",
            "ü",
            &"a".repeat(129),
        ] {
            assert!(!valid_app_name(bad), "{bad}");
        }
    }

    #[test]
    fn default_entrypoints_are_tried_in_order() {
        let all = [
            ("app.wasm", ""),
            ("index.wasm", ""),
            ("index.html", ""),
            ("public/index.html", ""),
        ];
        assert_eq!(entrypoint_of(&all).unwrap(), ("app.wasm".into(), AppKind::Wasm));
        assert_eq!(entrypoint_of(&all[1..]).unwrap(), ("index.wasm".into(), AppKind::Wasm));
        assert_eq!(
            entrypoint_of(&all[2..]).unwrap(),
            ("index.html".into(), AppKind::Static)
        );
        assert_eq!(
            entrypoint_of(&all[3..]).unwrap(),
            ("public/index.html".into(), AppKind::Static)
        );
    }

    #[test]
    fn a_version_without_any_entrypoint_says_which_files_were_looked_for() {
        let error = entrypoint_of(&[("readme.txt", "")]).unwrap_err();
        assert_eq!(
            error,
            "worker.config.json: field `entrypoint`: none set, and none of app.wasm, index.wasm, index.html, \
             public/index.html exists"
        );
    }

    #[test]
    fn a_configured_entrypoint_wins_over_the_defaults() {
        let files = [
            ("index.html", ""),
            ("dist/site.html", ""),
            ("worker.config.json", r#"{"entrypoint": "dist/site.html"}"#),
        ];
        let dir = version_dir(&files);
        let deployment = load_version(dir.path()).unwrap();
        assert_eq!(deployment.entrypoint, Path::new("dist/site.html"));
        assert_eq!(deployment.root, dir.path().canonicalize().unwrap().join("dist"));
    }

    #[test]
    fn a_configured_entrypoint_must_stay_inside_the_version_directory() {
        for entrypoint in ["../other/index.html", "/etc/passwd", "a/../../x.html", ""] {
            let config = format!(r#"{{"entrypoint": {entrypoint:?}}}"#);
            let error = entrypoint_of(&[("index.html", ""), ("worker.config.json", &config)]).unwrap_err();
            assert!(
                error.contains("must be a relative path inside the version directory"),
                "{entrypoint}: {error}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn an_entrypoint_symlinked_outside_the_version_directory_is_refused() {
        let outside = version_dir(&[("index.html", "secret")]);
        let dir = version_dir(&[]);
        std::os::unix::fs::symlink(outside.path().join("index.html"), dir.path().join("index.html")).unwrap();
        let error = load_version(dir.path()).unwrap_err();
        assert!(
            error.contains("index.html points outside the version directory"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_configured_entrypoint_or_an_unknown_kind_is_an_error() {
        let error = entrypoint_of(&[("worker.config.json", r#"{"entrypoint": "app.wasm"}"#)]).unwrap_err();
        assert!(error.contains("\"app.wasm\" is not a file"), "{error}");
        let error =
            entrypoint_of(&[("main.js", ""), ("worker.config.json", r#"{"entrypoint": "main.js"}"#)]).unwrap_err();
        assert!(
            error.contains("main.js is neither a .wasm component nor an .html page"),
            "{error}"
        );
    }

    #[test]
    fn a_config_error_names_the_file_and_the_field() {
        let error = entrypoint_of(&[("index.html", ""), ("worker.config.json", r#"{"ttl": "long"}"#)]).unwrap_err();
        assert!(
            error.starts_with("worker.config.json: field `ttl`: invalid type"),
            "{error}"
        );
    }

    #[test]
    fn an_app_lists_versions_highest_first_and_skips_what_is_not_a_version() {
        let apps = version_dir(&[
            ("hello/1.0.0/index.html", ""),
            ("hello/v1.10.0/index.html", ""),
            ("hello/2.0.0-beta.1/index.html", ""),
            ("hello/1.2.0/worker.config.json", "{oops"),
            ("hello/latest/index.html", ""),
            ("hello/notes.txt", ""),
            ("hello/v1.0.0/index.html", ""),
        ]);
        let app = scan_app(apps.path(), "hello").unwrap();
        assert_eq!(app.version_list(), ["2.0.0-beta.1", "1.10.0", "1.2.0", "1.0.0"]);
        assert_eq!(app.versions[1].dir_name, "v1.10.0");
        assert_eq!(app.versions[3].dir_name, "1.0.0", "the plain spelling wins a duplicate");
        assert!(app.versions[2]
            .deployment
            .as_ref()
            .unwrap_err()
            .starts_with("hello/1.2.0: worker.config.json: "));
        assert_eq!(
            app.ignored,
            [
                "hello/latest: not a semver version (like 1.2.3 or v1.2.3), ignored",
                "hello/notes.txt: not a version directory, ignored",
                "hello/v1.0.0: same version as hello/1.0.0, ignored",
            ]
        );
    }

    #[test]
    fn apps_dir_entries_that_are_not_apps_are_listed_as_ignored() {
        let apps = version_dir(&[
            ("good/1.0.0/index.html", ""),
            ("_reserved/1.0.0/index.html", ""),
            ("Bad Name/1.0.0/index.html", ""),
            ("README.md", ""),
            (".git/HEAD", ""),
        ]);
        let snapshot = scan_apps_dir(apps.path()).unwrap();
        assert_eq!(snapshot.apps.keys().map(|k| k.as_ref()).collect::<Vec<_>>(), ["good"]);
        assert_eq!(snapshot.ignored.len(), 3, "{:?}", snapshot.ignored);
    }
}
