//! Property tests for the parsers that take outside input: version specs and their resolution, the first path
//! segment, static-file paths, proxy rewrite templates and `worker.config.json`.
//!
//! Each property states what must hold for every input, checked against an independent model where there is one
//! (npm's range rules, the regex crate's own reading of a replacement, RFC 3986 reference resolution). Case counts
//! are moderate so the whole file runs in a few seconds even on a busy 2-core machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use marina::deploy::config::{
    ProxyRule, ProxyRules, WorkerConfig, MAX_CONCURRENT_REQUESTS_LIMIT, MAX_MEMORY_MB_LIMIT, MAX_TIMEOUT_SECS,
};
use marina::deploy::registry::{
    load_version, parse_spec, parse_target, scan_app, scan_apps_dir, valid_app_name, App, AppVersion, Deployment,
    ResolveError, Snapshot, Spec,
};
use marina::deploy::rules::Rules;
use marina::error::Error;
use marina::routes::apps::split_mount;
use percent_encoding::percent_decode_str;
use proptest::prelude::*;
use proptest::test_runner::Config;
use semver::{BuildMetadata, Prerelease, Version};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------------------------
// Shared strategies and helpers
// ---------------------------------------------------------------------------------------------------------------

/// `n` cases, without failure persistence (proptest cannot find a source root for an integration test; a
/// failure prints its minimal input, which then becomes a plain regression test here).
fn cases(n: u32) -> Config {
    Config {
        failure_persistence: None,
        ..Config::with_cases(n)
    }
}

/// Prereleases and build metadata drawn from a few values, so that generated specs and versions meet often.
const PRERELEASES: &[&str] = &["", "", "", "", "alpha", "alpha.1", "beta", "rc.1", "rc.2", "1"];
const BUILDS: &[&str] = &["", "", "", "", "", "", "b7", "20240101"];

fn version() -> impl Strategy<Value = Version> {
    (
        0u64..3,
        0u64..3,
        0u64..3,
        prop::sample::select(PRERELEASES),
        prop::sample::select(BUILDS),
    )
        .prop_map(|(major, minor, patch, pre, build)| Version {
            major,
            minor,
            patch,
            pre: Prerelease::new(pre).unwrap(),
            build: BuildMetadata::new(build).unwrap(),
        })
}

/// A set of deployed versions, highest first (the order the registry keeps them in).
fn deployed() -> impl Strategy<Value = Vec<Version>> {
    prop::collection::btree_set(version(), 0..10).prop_map(|set| set.into_iter().rev().collect())
}

fn app_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,15}"
}

/// The version without build metadata: what semver's precedence (and every comparator) looks at.
fn bare(version: &Version) -> Version {
    Version {
        build: BuildMetadata::EMPTY,
        ..version.clone()
    }
}

/// One app with these versions, in memory (the registry's snapshot type, as a scan would build it).
fn snapshot(app: &str, versions: &[Version]) -> Snapshot {
    let versions = versions
        .iter()
        .map(|version| {
            Arc::new(AppVersion {
                version: version.clone(),
                dir_name: version.to_string(),
                dir: PathBuf::from(version.to_string()),
                deployment: Err("not on disk".into()),
            })
        })
        .collect();
    let app = App {
        name: app.to_owned(),
        versions,
        ignored: Vec::new(),
    };
    let mut apps = HashMap::new();
    apps.insert(app.name.clone().into_boxed_str(), Arc::new(app));
    Snapshot {
        apps,
        ignored: Vec::new(),
    }
}

/// What a resolution came to, in a form tests can compare.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Served(Version),
    VersionNotFound,
    AppNotFound,
    BadSpec,
}

fn outcome(snapshot: &Snapshot, segment: &str) -> Outcome {
    match snapshot.resolve(segment) {
        Ok(resolved) => Outcome::Served(resolved.version.version.clone()),
        Err(error) => {
            let expected = match &error {
                ResolveError::VersionNotFound { .. } => (Outcome::VersionNotFound, "version_not_found", 404),
                ResolveError::AppNotFound { .. } => (Outcome::AppNotFound, "app_not_found", 404),
                ResolveError::BadSpec(_) => (Outcome::BadSpec, "bad_version_spec", 400),
            };
            let error = Error::from(error);
            assert_eq!(error.code(), expected.1, "{segment:?}");
            assert_eq!(error.status().as_u16(), expected.2, "{segment:?}");
            expected.0
        }
    }
}

/// Percent-encodes `text` the way a client might: each character raw or encoded as `mask` says (upper or lower
/// case hex), except `%` and `/`, which a segment can only carry encoded.
fn encode(text: &str, mask: &[u8]) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        let choice = if mask.is_empty() { 0 } else { mask[i % mask.len()] };
        if choice % 3 == 0 && c != '%' && c != '/' {
            out.push(c);
            continue;
        }
        let mut buf = [0; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            if choice % 3 == 1 {
                write!(out, "%{b:02X}").unwrap();
            } else {
                write!(out, "%{b:02x}").unwrap();
            }
        }
    }
    out
}

fn encoding_mask() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..8)
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Version specs and resolution
// ---------------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Op {
    Eq,
    Gt,
    Ge,
    Lt,
    Le,
    Tilde,
    Caret,
}

impl Op {
    fn text(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Tilde => "~",
            Op::Caret => "^",
        }
    }
}

/// A spec as the README describes them, with its text and an independent model of what it selects.
#[derive(Debug, Clone)]
enum SpecModel {
    /// No `@`.
    Latest,
    /// `1.2.3`, `v1.2.3-rc.1`, `1.0.0+b7`.
    Exact { version: Version, v: bool },
    /// `1` (or `1.x` with `x`).
    Major { major: u64, x: bool },
    /// `1.2` (or `1.2.x`).
    Minor { major: u64, minor: u64, x: bool },
    /// `*`.
    Any,
    /// Comparators on whole versions, `>=1.0.0, <2.0.0-rc.1`.
    Range(Vec<(Op, Version)>),
}

impl SpecModel {
    fn text(&self) -> Option<String> {
        Some(match self {
            SpecModel::Latest => return None,
            SpecModel::Exact { version, v } => format!("{}{version}", if *v { "v" } else { "" }),
            SpecModel::Major { major, x } => format!("{major}{}", if *x { ".x" } else { "" }),
            SpecModel::Minor { major, minor, x } => format!("{major}.{minor}{}", if *x { ".x" } else { "" }),
            SpecModel::Any => "*".into(),
            SpecModel::Range(comparators) => comparators
                .iter()
                .map(|(op, version)| format!("{}{version}", op.text()))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Whether `have` satisfies the spec, by npm's rules (for every spec but `Latest` and `Exact`, which pick).
    fn admits(&self, have: &Version) -> bool {
        let release = have.pre.is_empty();
        match self {
            SpecModel::Latest | SpecModel::Exact { .. } => unreachable!("these pick, they do not filter"),
            SpecModel::Major { major, .. } => release && have.major == *major,
            SpecModel::Minor { major, minor, .. } => release && have.major == *major && have.minor == *minor,
            SpecModel::Any => release,
            SpecModel::Range(comparators) => {
                let w = bare(have);
                let each = comparators.iter().all(|(op, c)| match op {
                    Op::Eq => w == *c,
                    Op::Gt => w > *c,
                    Op::Ge => w >= *c,
                    Op::Lt => w < *c,
                    Op::Le => w <= *c,
                    Op::Tilde => w >= *c && w.major == c.major && w.minor == c.minor,
                    Op::Caret => {
                        w >= *c
                            && match (c.major, c.minor) {
                                (0, 0) => w.major == 0 && w.minor == 0 && w.patch == c.patch,
                                (0, minor) => w.major == 0 && w.minor == minor,
                                (major, _) => w.major == major,
                            }
                    }
                });
                // npm: a prerelease only when a comparator names a prerelease of the same major.minor.patch.
                let named = comparators.iter().any(|(_, c)| {
                    !c.pre.is_empty() && (c.major, c.minor, c.patch) == (have.major, have.minor, have.patch)
                });
                each && (release || named)
            }
        }
    }

    /// The version the README says is served from `deployed`.
    fn pick(&self, deployed: &[Version]) -> Option<Version> {
        match self {
            SpecModel::Latest => deployed
                .iter()
                .filter(|v| v.pre.is_empty())
                .max()
                .or_else(|| deployed.iter().max())
                .cloned(),
            // Exactly that version; a spec without build metadata also takes a directory that has some.
            SpecModel::Exact { version, .. } => deployed
                .iter()
                .find(|have| *have == version)
                .or_else(|| {
                    deployed
                        .iter()
                        .filter(|have| version.build.is_empty() && bare(have) == *version)
                        .max()
                })
                .cloned(),
            spec => deployed.iter().filter(|have| spec.admits(have)).max().cloned(),
        }
    }

    fn names_a_prerelease(&self) -> bool {
        match self {
            SpecModel::Exact { version, .. } => !version.pre.is_empty(),
            SpecModel::Range(comparators) => comparators.iter().any(|(_, c)| !c.pre.is_empty()),
            _ => false,
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop::sample::select(vec![Op::Eq, Op::Gt, Op::Ge, Op::Lt, Op::Le, Op::Tilde, Op::Caret])
}

fn spec_model() -> impl Strategy<Value = SpecModel> {
    prop_oneof![
        1 => Just(SpecModel::Latest),
        2 => (version(), any::<bool>()).prop_map(|(version, v)| SpecModel::Exact { version, v }),
        1 => (0u64..4, any::<bool>()).prop_map(|(major, x)| SpecModel::Major { major, x }),
        1 => (0u64..4, 0u64..4, any::<bool>()).prop_map(|(major, minor, x)| SpecModel::Minor { major, minor, x }),
        1 => Just(SpecModel::Any),
        4 => prop::collection::vec((op(), version().prop_map(|v| bare(&v))), 1..3).prop_map(SpecModel::Range),
    ]
}

/// The first path segment for `app` and `spec`, percent-encoded by `mask`.
fn segment(app: &str, spec: &SpecModel, mask: &[u8]) -> String {
    match spec.text() {
        None => encode(app, mask),
        Some(text) => encode(&format!("{app}@{text}"), mask),
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_spec_text_parses_or_is_a_clean_error_that_quotes_it(text in any::<String>()) {
        check_spec_text(&text)?;
    }

    #[test]
    fn any_semver_like_spec_text_parses_or_is_a_clean_error_that_quotes_it(
        text in "[0-9vVxX*^~<>=., +|a-z-]{0,24}",
    ) {
        check_spec_text(&text)?;
    }
}

/// A spec either parses (and a parsed exact version is the text's version) or fails with a message quoting it.
fn check_spec_text(text: &str) -> Result<(), TestCaseError> {
    match parse_spec(text) {
        Ok(Spec::Exact(version)) => {
            let trimmed = text.trim();
            let bare_text = trimmed.strip_prefix(['v', 'V']).unwrap_or(trimmed);
            prop_assert_eq!(Version::parse(bare_text).ok(), Some(version));
        }
        Ok(Spec::Range(req)) => {
            // Whatever it is, it can be evaluated against any version without trouble.
            for v in ["0.0.0", "1.2.3", "2.0.0-rc.1", "18446744073709551615.0.0"] {
                let _ = req.matches(&Version::parse(v).unwrap());
            }
        }
        Ok(Spec::Latest) => prop_assert!(false, "{text:?}: only a missing `@` means latest"),
        Err(error) => {
            prop_assert_eq!(&error.spec, text);
            let message = error.to_string();
            prop_assert!(message.contains("is not a version or a semver range"), "{}", message);
            prop_assert!(message.starts_with(&format!("{text:?}")), "{}", message);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn every_spec_resolves_to_what_npm_rules_pick_from_the_deployed_versions(
        app in app_name(),
        versions in deployed(),
        spec in spec_model(),
        mask in encoding_mask(),
    ) {
        let snapshot = snapshot(&app, &versions);
        let segment = segment(&app, &spec, &mask);
        let expected = match spec.pick(&versions) {
            Some(version) => Outcome::Served(version),
            None => Outcome::VersionNotFound,
        };
        prop_assert_eq!(outcome(&snapshot, &segment), expected, "segment {:?}", segment);
    }

    #[test]
    fn an_exact_spec_resolves_to_exactly_that_version_when_it_is_deployed(
        app in app_name(),
        versions in deployed().prop_filter("something deployed", |v| !v.is_empty()),
        index in any::<prop::sample::Index>(),
        v in any::<bool>(),
        with_builds in any::<bool>(),
        mask in encoding_mask(),
    ) {
        let wanted = index.get(&versions).clone();
        let mut versions = versions;
        if with_builds {
            // The same version with and without build metadata, deployed side by side.
            let mut all: BTreeSet<Version> = versions.into_iter().collect();
            all.insert(bare(&wanted));
            all.insert(Version { build: BuildMetadata::new("b7").unwrap(), ..bare(&wanted) });
            versions = all.into_iter().rev().collect();
        }
        let snapshot = snapshot(&app, &versions);
        let spec = SpecModel::Exact { version: wanted.clone(), v };
        prop_assert_eq!(outcome(&snapshot, &segment(&app, &spec, &mask)), Outcome::Served(wanted));
    }

    #[test]
    fn a_resolved_version_always_satisfies_the_spec_as_semver_reads_it(
        versions in deployed(),
        spec in spec_model(),
    ) {
        let snapshot = snapshot("app", &versions);
        let segment = segment("app", &spec, &[]);
        let parsed = parse_target(&segment).unwrap().spec;
        if let Outcome::Served(version) = outcome(&snapshot, &segment) {
            match &parsed {
                Spec::Latest => prop_assert!(versions.contains(&version)),
                Spec::Exact(wanted) => prop_assert_eq!(bare(&version), bare(wanted)),
                Spec::Range(req) => prop_assert!(req.matches(&version), "{} does not match {}", version, req),
            }
        }
    }

    #[test]
    fn a_prerelease_is_chosen_only_when_the_spec_names_one_or_nothing_else_exists(
        versions in deployed(),
        spec in spec_model(),
    ) {
        let snapshot = snapshot("app", &versions);
        if let Outcome::Served(version) = outcome(&snapshot, &segment("app", &spec, &[])) {
            if !version.pre.is_empty() {
                let only_prereleases = versions.iter().all(|v| !v.pre.is_empty());
                prop_assert!(
                    spec.names_a_prerelease() || (matches!(spec, SpecModel::Latest) && only_prereleases),
                    "{spec:?} chose the prerelease {version}"
                );
            }
        }
    }

    #[test]
    fn the_highest_matching_version_is_chosen(
        versions in deployed(),
        spec in spec_model().prop_filter("a range", |s| !matches!(s, SpecModel::Latest | SpecModel::Exact { .. })),
    ) {
        let snapshot = snapshot("app", &versions);
        let segment = segment("app", &spec, &[]);
        let Spec::Range(req) = parse_target(&segment).unwrap().spec else {
            return Err(TestCaseError::fail(format!("{segment:?} is not a range")));
        };
        match outcome(&snapshot, &segment) {
            Outcome::Served(version) => {
                for higher in versions.iter().filter(|v| **v > version) {
                    prop_assert!(!req.matches(higher), "{} also matches {} and is higher than {}", higher, req, version);
                }
            }
            Outcome::VersionNotFound => prop_assert!(versions.iter().all(|v| !req.matches(v))),
            other => prop_assert!(false, "{segment:?}: {other:?}"),
        }
    }
}

proptest! {
    // Each case writes a few directories to disk.
    #![proptest_config(cases(32))]

    #[test]
    fn version_directories_scanned_from_disk_resolve_as_the_model_says(
        versions in deployed(),
        spellings in prop::collection::vec(any::<bool>(), 10),
        spec in spec_model(),
    ) {
        let apps = tempfile::tempdir().unwrap();
        for (version, v) in versions.iter().zip(&spellings) {
            let dir = apps.path().join("app").join(format!("{}{version}", if *v { "v" } else { "" }));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("index.html"), version.to_string()).unwrap();
        }
        std::fs::create_dir_all(apps.path().join("app")).unwrap();
        let app = scan_app(apps.path(), "app").unwrap();
        let listed: Vec<Version> = app.versions.iter().map(|v| v.version.clone()).collect();
        prop_assert_eq!(&listed, &versions, "the scan lists every version, highest first");
        let mut snapshot = Snapshot::default();
        snapshot.apps.insert("app".into(), Arc::new(app));
        let expected = match spec.pick(&versions) {
            Some(version) => Outcome::Served(version),
            None => Outcome::VersionNotFound,
        };
        prop_assert_eq!(outcome(&snapshot, &segment("app", &spec, &[])), expected);
    }
}

#[test]
fn an_exact_spec_prefers_the_directory_without_build_metadata_over_one_with_it() {
    // With `1.0.0` and `1.0.0+b7` deployed, `@1.0.0` served 1.0.0+b7 (it sorts higher), not the version it
    // names exactly; `an_exact_spec_resolves_to_exactly_that_version_when_it_is_deployed` now deploys such pairs.
    let versions = [Version::parse("1.0.0+b7").unwrap(), Version::parse("1.0.0").unwrap()];
    let snapshot = snapshot("app", &versions);
    assert_eq!(outcome(&snapshot, "app@1.0.0"), Outcome::Served(versions[1].clone()));
    assert_eq!(outcome(&snapshot, "app@1.0.0+b7"), Outcome::Served(versions[0].clone()));
}

// ---------------------------------------------------------------------------------------------------------------
// 2. The first path segment, `<app>[@<spec>]`
// ---------------------------------------------------------------------------------------------------------------

/// Arbitrary bytes as a client could send them in a segment: every byte percent-encoded, some raw when ASCII.
fn encoded_bytes() -> impl Strategy<Value = String> {
    prop::collection::vec((any::<u8>(), any::<bool>()), 0..40).prop_map(|bytes| {
        let mut out = String::new();
        for (b, raw) in bytes {
            if raw && b.is_ascii_graphic() && b != b'/' {
                out.push(b as char);
            } else {
                write!(out, "%{b:02X}").unwrap();
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_segment_parses_or_is_a_bad_spec_and_resolution_never_panics(segment in any::<String>()) {
        let snapshot = snapshot("app", &[Version::new(1, 0, 0)]);
        let _ = parse_target(&segment);
        let _ = outcome(&snapshot, &segment);
    }

    #[test]
    fn any_bytes_in_a_segment_never_panic_and_invalid_utf8_never_names_an_app(segment in encoded_bytes()) {
        let snapshot = snapshot("app", &[Version::new(1, 0, 0)]);
        let valid_utf8 = percent_decode_str(&segment).decode_utf8().is_ok();
        let result = outcome(&snapshot, &segment);
        if !valid_utf8 {
            prop_assert!(matches!(result, Outcome::AppNotFound | Outcome::BadSpec), "{segment:?}: {result:?}");
        }
    }

    #[test]
    fn an_encoded_segment_decodes_back_to_its_app_and_spec_text(
        app in "[^@]{0,20}",
        spec in prop::option::of(any::<String>()),
        mask in encoding_mask(),
    ) {
        let text = match &spec {
            Some(spec) => format!("{app}@{spec}"),
            None => app.clone(),
        };
        let encoded = encode(&text, &mask);
        match parse_target(&encoded) {
            Ok(target) => {
                prop_assert_eq!(target.app.as_ref(), app.as_str());
                prop_assert_eq!(target.spec_text.as_deref(), spec.as_deref());
                prop_assert_eq!(target.spec == Spec::Latest, spec.is_none());
            }
            Err(error) => prop_assert_eq!(Some(error.spec), spec, "only a spec can be wrong"),
        }
    }

    #[test]
    fn split_mount_cuts_the_path_after_its_first_segment(path in "/?[a-z@%/.]{0,16}") {
        let (segment, rest) = split_mount(&path);
        prop_assert!(!segment.contains('/'));
        prop_assert!(rest.is_empty() || rest.starts_with('/'));
        let unprefixed = path.strip_prefix('/').unwrap_or(&path);
        prop_assert_eq!(format!("{segment}{rest}"), unprefixed);
    }
}

/// A name that breaks the documented alphabet in one way, and that a filesystem can still hold.
fn invalid_app_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{0,6}[A-Z][a-z0-9]{0,6}",
        "_[a-z0-9_.-]{0,8}",
        "\\.[a-z0-9_.-]{1,8}",
        "[a-z0-9]{1,6}[ !#$&'()+,;=~\\[\\]ü€][a-z0-9]{0,6}",
        "[a-z]{129,140}",
    ]
    .prop_filter("a name a directory can have", |name| name != "." && name != "..")
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn an_invalid_app_name_is_never_served_even_when_its_directory_exists(
        name in invalid_app_name(),
        spec in prop::option::of("1|1\\.0\\.0|\\^1|latest"),
        mask in encoding_mask(),
    ) {
        prop_assert!(!valid_app_name(&name));
        let apps = tempfile::tempdir().unwrap();
        for app in [name.as_str(), "good"] {
            let dir = apps.path().join(app).join("1.0.0");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("index.html"), app).unwrap();
        }
        let snapshot = scan_apps_dir(apps.path()).unwrap();
        prop_assert_eq!(snapshot.apps.keys().map(|k| k.as_ref()).collect::<Vec<_>>(), ["good"]);
        let text = match &spec {
            Some(spec) => format!("{name}@{spec}"),
            None => name.clone(),
        };
        let expected = match spec.as_deref() {
            Some("latest") => Outcome::BadSpec,
            _ => Outcome::AppNotFound,
        };
        prop_assert_eq!(outcome(&snapshot, &encode(&text, &mask)), expected);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Static files stay inside their directory
// ---------------------------------------------------------------------------------------------------------------

/// Two static versions beside a directory they must never serve from. Every file holds a unique marker; the
/// markers a version may serve start with `PUBLIC-` or `ENTRY-`, everything else is a secret.
struct Site {
    _dir: tempfile::TempDir,
    /// `index.html` at the top of its version directory, beside `worker.config.json`.
    top: Deployment,
    /// `public/index.html`: the version directory itself (and its config) is outside the root.
    public: Deployment,
    runtime: tokio::runtime::Runtime,
}

const TOP_PUBLIC: &[&str] = &[
    "ENTRY-TOP",
    "PUBLIC-A",
    "PUBLIC-A-GZ",
    "PUBLIC-A-BR",
    "PUBLIC-SUB-INDEX",
    "PUBLIC-B",
    "PUBLIC-WELL-KNOWN",
];
const PUBLIC_PUBLIC: &[&str] = &["ENTRY-PUBLIC", "PUBLIC-C"];

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("outside/secret.txt", "SECRET-OUTSIDE");
        write("outside/index.html", "SECRET-OUTSIDE-INDEX");
        write("outside/sub/b.txt", "SECRET-OUTSIDE-B");
        write("top/index.html", "ENTRY-TOP");
        write("top/a.txt", "PUBLIC-A");
        write("top/a.txt.gz", "PUBLIC-A-GZ");
        write("top/a.txt.br", "PUBLIC-A-BR");
        write("top/sub/index.html", "PUBLIC-SUB-INDEX");
        write("top/sub/b.txt", "PUBLIC-B");
        write("top/.well-known/w.txt", "PUBLIC-WELL-KNOWN");
        write("top/.env", "SECRET-DOTENV");
        write("top/.hidden/h.txt", "SECRET-HIDDEN");
        write("top/worker.config.json", r#"{"env": {"MARKER": "SECRET-CONFIG-TOP"}}"#);
        write("public/public/index.html", "ENTRY-PUBLIC");
        write("public/public/c.txt", "PUBLIC-C");
        write("public/private.txt", "SECRET-PRIVATE");
        write(
            "public/worker.config.json",
            r#"{"env": {"MARKER": "SECRET-CONFIG-PUBLIC"}}"#,
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            let link = |target: &Path, at: &str| symlink(target, root.join(at)).unwrap();
            link(Path::new("a.txt"), "top/link-in");
            link(Path::new("../outside/secret.txt"), "top/link-out");
            link(Path::new("../outside"), "top/linkdir-out");
            link(&root.join("outside/secret.txt"), "top/link-abs");
            link(Path::new("worker.config.json"), "top/link-config");
            link(Path::new("../../outside/secret.txt"), "top/sub/b.txt.br");
            link(Path::new("../../outside/secret.txt"), "top/sub/b.txt.gz");
            link(Path::new(".."), "public/public/up");
            link(Path::new("../worker.config.json"), "public/public/config");
            link(Path::new("../private.txt"), "public/public/private.txt");
        }
        let top = load_version(&root.join("top")).unwrap();
        let public = load_version(&root.join("public")).unwrap();
        assert_eq!(public.entrypoint, Path::new("public/index.html"));
        Site {
            _dir: dir,
            top,
            public,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

/// Segments chosen to reach every file, directory, symlink and escape of the site, and the spellings that try.
const SEGMENTS: &[&str] = &[
    "a.txt",
    "sub",
    "b.txt",
    "index.html",
    "link-in",
    "link-out",
    "linkdir-out",
    "link-abs",
    "link-config",
    "secret.txt",
    "outside",
    "top",
    "public",
    "up",
    "config",
    "c.txt",
    "private.txt",
    "worker.config.json",
    ".well-known",
    "w.txt",
    ".env",
    ".hidden",
    "h.txt",
    "..",
    ".",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%2e.",
    "%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    "..\\..",
    "%00",
    "\0",
    "a.txt%00.html",
    "",
    "%252e%252e",
    "%c0%ae%c0%ae",
    "%ff",
    "etc",
    "passwd",
    "C:",
    "c:\\windows",
    "~",
    "sub%2fb.txt",
    "..%2f..%2foutside",
    "%2e%2e%2f",
    "worker.config.json%00",
    "WORKER.CONFIG.JSON",
    "/",
    "a%2etxt",
    "su%62",
];

fn request_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        6 => prop::sample::select(SEGMENTS).prop_map(str::to_owned),
        1 => "[a-z.%25ef0\\\\]{0,6}",
    ];
    (
        prop::sample::select(vec!["/", "/", "/", "//", "/./", "/../"]),
        prop::collection::vec(segment, 0..5),
        any::<bool>(),
    )
        .prop_map(|(start, segments, slash)| {
            let mut path = format!("{start}{}", segments.join("/"));
            if slash {
                path.push('/');
            }
            path
        })
}

fn accept_encoding() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![None, Some("gzip"), Some("br, gzip"), Some("*"), Some("identity")])
}

/// What serving `path` came to: the body for a 200, the location for a redirect, or the error.
#[derive(Debug)]
enum Served {
    File(String),
    Redirect(String),
    NotFound,
}

fn serve(site: &Site, deployment: &Deployment, path: &str, encoding: Option<&str>) -> Served {
    let mut headers = HeaderMap::new();
    if let Some(encoding) = encoding {
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(encoding).unwrap());
    }
    site.runtime.block_on(async {
        match marina::backends::static_files::serve(deployment, path, &Method::GET, &headers).await {
            Ok(response) => match response.status() {
                StatusCode::OK => {
                    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
                    Served::File(String::from_utf8(body.to_vec()).unwrap())
                }
                StatusCode::PERMANENT_REDIRECT => {
                    Served::Redirect(response.headers()[header::LOCATION].to_str().unwrap().to_owned())
                }
                other => panic!("{path:?}: unexpected status {other}"),
            },
            Err(Error::FileNotFound(_)) => Served::NotFound,
            Err(other) => panic!("{path:?}: unexpected error {other:?}"),
        }
    })
}

/// The path's segments decoded, as a client's path names a file: empty and `.` segments dropped.
fn named_segments(path: &str) -> Vec<String> {
    path.split('/')
        .map(|raw| percent_decode_str(raw).decode_utf8_lossy().into_owned())
        .filter(|s| !s.is_empty() && s != ".")
        .collect()
}

/// RFC 3986 §5.2: a relative-path reference resolved against `base` (merge, then remove dot segments).
fn resolve_reference(base: &str, reference: &str) -> String {
    let merged = format!("{}{reference}", &base[..=base.rfind('/').unwrap()]);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = merged.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i == segments.len() - 1;
        match *segment {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Whether a segment of the request path is one the README says must answer 404 whatever the files are.
fn is_hostile(raw: &str, only: bool) -> bool {
    let Ok(decoded) = percent_decode_str(raw).decode_utf8() else {
        return true;
    };
    match decoded.as_ref() {
        "" => !only,
        "." => false,
        ".." => true,
        s if s.contains(['/', '\\', '\0']) => true,
        s => s.starts_with('.') && s != ".well-known",
    }
}

fn check_confined(
    site: &Site,
    deployment: &Deployment,
    public: &[&str],
    path: &str,
    encoding: Option<&str>,
) -> Result<(), TestCaseError> {
    let served = serve(site, deployment, path, encoding);
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    let raw_segments: Vec<&str> = inner.split('/').collect();
    let only = raw_segments.len() == 1;
    if raw_segments.iter().any(|raw| is_hostile(raw, only)) {
        prop_assert!(
            matches!(served, Served::NotFound),
            "{path:?} must be 404, got {served:?}"
        );
    }
    match served {
        Served::File(body) => prop_assert!(public.contains(&body.as_str()), "{path:?} served {body:?}"),
        Served::Redirect(location) => {
            // A redirect adds the directory's trailing slash, relative to where the client is: never elsewhere.
            prop_assert!(
                !location.starts_with('/') && !location.contains(':'),
                "{path:?} -> {location:?}"
            );
            let mount = "/app@1";
            let base = format!("{mount}{path}");
            let resolved = resolve_reference(&base, &location);
            prop_assert!(resolved.ends_with('/'), "{path:?} -> {location:?} -> {resolved:?}");
            let resolved_path = resolved.strip_prefix(mount).unwrap_or("");
            prop_assert_eq!(
                named_segments(resolved_path),
                named_segments(path),
                "{:?} -> {:?} resolves to {:?}, another directory",
                path,
                location,
                resolved
            );
            // And the directory it names is served with the slash.
            let again = serve(site, deployment, resolved_path, encoding);
            prop_assert!(
                !matches!(again, Served::Redirect(_)),
                "{resolved_path:?} redirects again: {again:?}"
            );
        }
        Served::NotFound => {}
    }
    Ok(())
}

#[test]
fn a_static_app_serves_only_its_own_public_files_whatever_the_path() {
    let site = Site::new();
    proptest!(cases(256), |(path in request_path(), encoding in accept_encoding())| {
        check_confined(&site, &site.top, TOP_PUBLIC, &path, encoding)?;
        check_confined(&site, &site.public, PUBLIC_PUBLIC, &path, encoding)?;
    });
}

#[test]
fn an_arbitrary_path_is_served_from_inside_the_directory_or_answers_404() {
    let site = Site::new();
    // The app's path always starts with `/` (dispatch hands `/` for `/app@1`).
    proptest!(cases(256), |(path in any::<String>())| {
        check_confined(&site, &site.top, TOP_PUBLIC, &format!("/{path}"), None)?;
    });
}

#[test]
fn a_directory_reached_through_a_dot_segment_redirects_to_itself() {
    // Found by `a_static_app_serves_only_its_own_public_files_whatever_the_path`: `/sub/.` redirected to
    // `sub/`, which resolves to `/app@1/sub/sub/`, and `/.` (or `/%2e`) to `/`, the host's root.
    let site = Site::new();
    for (path, location) in [
        ("/sub/.", "./"),
        ("/sub/%2e", "./"),
        ("/.", "./"),
        ("/%2E", "./"),
        ("/sub", "sub/"),
    ] {
        match serve(&site, &site.top, path, None) {
            Served::Redirect(got) => assert_eq!(got, location, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Proxy rewrite templates
// ---------------------------------------------------------------------------------------------------------------

fn proxy_rule(pattern: &str, rewrite: Option<&str>) -> ProxyRule {
    ProxyRule {
        pattern: pattern.into(),
        target: "http://upstream".into(),
        rewrite: rewrite.map(Into::into),
        change_origin: false,
        secure: true,
        headers: BTreeMap::new(),
        timeout: None,
    }
}

fn compile_one(pattern: &str, rewrite: Option<&str>) -> Result<Rules, String> {
    Rules::compile(&[proxy_rule(pattern, rewrite)], 30, &|_| None)
}

/// A pattern built from groups, some named, some optional, so that which group exists is known.
#[derive(Debug, Clone)]
struct PatternModel {
    text: String,
    /// Names of the named groups.
    names: Vec<String>,
    /// How many groups, the whole match included (what `captures_len` says).
    groups: usize,
}

fn pattern_model() -> impl Strategy<Value = PatternModel> {
    let group = (
        prop::option::of(prop::sample::select(vec!["n", "grp_", "X", "rest", "a1"])),
        prop::sample::select(vec!["a+", "b*", "[0-9]+", "[^/]*", "x?", ".*?", "(?:ab)+"]),
        any::<bool>(),
        prop::sample::select(vec!["", "/", "-"]),
    );
    (prop::collection::vec(group, 0..4), any::<bool>(), any::<bool>()).prop_map(|(groups, start, end)| {
        let mut text = String::from(if start { "^/" } else { "/" });
        let mut names = Vec::new();
        for (i, (name, body, optional, separator)) in groups.iter().enumerate() {
            text.push_str(separator);
            match name {
                Some(name) => {
                    let name = format!("{name}{i}");
                    write!(text, "(?P<{name}>{body})").unwrap();
                    names.push(name);
                }
                None => write!(text, "({body})").unwrap(),
            }
            if *optional {
                text.push('?');
            }
        }
        if end {
            text.push('$');
        }
        PatternModel {
            text,
            names,
            groups: groups.len() + 1,
        }
    })
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Dollar,
    Number(usize, bool),
    Name(String, bool),
}

fn parts(model: &PatternModel) -> impl Strategy<Value = Vec<Part>> {
    let mut names = model.names.clone();
    names.push("missing".into());
    let groups = model.groups;
    let part = prop_oneof![
        3 => "[a-z/._{}-]{0,4}".prop_map(Part::Literal),
        1 => Just(Part::Dollar),
        3 => (0..groups + 2, any::<bool>()).prop_map(|(n, braced)| Part::Number(n, braced)),
        2 => (prop::sample::select(names), any::<bool>()).prop_map(|(name, braced)| Part::Name(name, braced)),
    ];
    prop::collection::vec(part, 0..6)
}

/// Writes the parts as a template; a reference is braced when the text after it would extend its name.
fn template_of(parts: &[Part]) -> String {
    let rendered: Vec<String> = parts
        .iter()
        .map(|part| match part {
            Part::Literal(text) => text.clone(),
            Part::Dollar => "$$".into(),
            Part::Number(n, _) => n.to_string(),
            Part::Name(name, _) => name.clone(),
        })
        .collect();
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        let next_extends = rendered[i + 1..]
            .iter()
            .find(|s| !s.is_empty())
            .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'));
        match part {
            Part::Literal(_) | Part::Dollar => out.push_str(&rendered[i]),
            Part::Number(_, braced) | Part::Name(_, braced) => {
                if *braced || next_extends {
                    write!(out, "${{{}}}", rendered[i]).unwrap();
                } else {
                    write!(out, "${}", rendered[i]).unwrap();
                }
            }
        }
    }
    out
}

/// How the regex crate reads a replacement string (its `interpolate::string`): the group references it makes,
/// and whether some `$` was left as a literal (not followed by a name, or an unclosed `${`).
fn regex_reading(template: &str) -> (Vec<String>, bool) {
    let bytes = template.as_bytes();
    let mut refs = Vec::new();
    let mut literal_dollar = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'$') {
            i += 2;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'{') {
            match template[i + 2..].find('}') {
                Some(end) => {
                    refs.push(template[i + 2..i + 2 + end].to_owned());
                    i += 3 + end;
                }
                None => {
                    literal_dollar = true;
                    i += 1;
                }
            }
            continue;
        }
        let len = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        if len == 0 {
            literal_dollar = true;
            i += 1;
        } else {
            refs.push(template[i + 1..i + 1 + len].to_owned());
            i += 1 + len;
        }
    }
    (refs, literal_dollar)
}

fn group_exists(regex: &regex::Regex, name: &str) -> bool {
    match name.parse::<usize>() {
        Ok(n) => n < regex.captures_len(),
        Err(_) => regex.capture_names().flatten().any(|group| group == name),
    }
}

fn with_leading_slash(path: String) -> String {
    if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn a_rewrite_expands_existing_groups_exactly_as_the_model_says_and_a_missing_one_is_a_config_error(
        (model, parts) in pattern_model().prop_flat_map(|model| {
            let parts = parts(&model);
            (Just(model), parts)
        }),
        paths in prop::collection::vec("/[ab0-9x/-]{0,12}", 1..6),
    ) {
        let template = template_of(&parts);
        let regex = regex::Regex::new(&model.text).unwrap();
        prop_assert_eq!(regex.captures_len(), model.groups);
        let missing = parts.iter().find_map(|part| match part {
            Part::Number(n, _) if *n >= model.groups => Some(n.to_string()),
            Part::Name(name, _) if !model.names.contains(name) => Some(name.clone()),
            _ => None,
        });
        let compiled = compile_one(&model.text, Some(&template));
        if let Some(name) = missing {
            let error = compiled.expect_err("a reference to a missing group compiles");
            prop_assert!(error.starts_with("field `proxy[0].rewrite`"), "{}", error);
            prop_assert!(error.contains(&format!("refers to group `{name}`")), "{}: {}", template, error);
            return Ok(());
        }
        let rules = compiled.map_err(|e| TestCaseError::fail(format!("{template:?}: {e}")))?;
        for path in &paths {
            let Some(captures) = regex.captures(path) else {
                prop_assert!(rules.find(path).is_none());
                continue;
            };
            let group = |n: usize| captures.get(n).map_or("", |m| m.as_str()).to_owned();
            let expanded: String = parts
                .iter()
                .map(|part| match part {
                    Part::Literal(text) => text.clone(),
                    Part::Dollar => "$".into(),
                    Part::Number(n, _) => group(*n),
                    Part::Name(name, _) => captures.name(name).map_or("", |m| m.as_str()).to_owned(),
                })
                .collect();
            let whole = captures.get(0).unwrap();
            let expected = with_leading_slash(format!("{}{expanded}{}", &path[..whole.start()], &path[whole.end()..]));
            let found = rules.find(path).expect("the pattern matches");
            prop_assert_eq!(&found.path, &expected, "{} on {}", template, path);
            prop_assert_eq!(&found.path, &with_leading_slash(regex.replace(path, template.as_str()).into_owned()));
        }
    }

    #[test]
    fn any_template_is_accepted_exactly_when_every_reference_the_regex_crate_reads_names_a_group(
        template in prop_oneof!["[$a-z0-9{}_/ 1-3]{0,16}", any::<String>()],
        paths in prop::collection::vec("/[a-z0-9/]{0,10}", 1..4),
    ) {
        let pattern = "^/(?P<first>[a-z]+)/([0-9]*)(?:/(?P<opt>x))?";
        let regex = regex::Regex::new(pattern).unwrap();
        let (refs, literal_dollar) = regex_reading(&template);
        let all_exist = refs.iter().all(|name| group_exists(&regex, name));
        match compile_one(pattern, Some(&template)) {
            Ok(rules) => {
                prop_assert!(all_exist && !literal_dollar, "{template:?} was accepted; the regex crate reads {refs:?}");
                for path in &paths {
                    let found = rules.find(path).map(|m| m.path);
                    let expected = regex.is_match(path).then(|| with_leading_slash(regex.replace(path, template.as_str()).into_owned()));
                    prop_assert_eq!(found, expected);
                }
            }
            Err(error) => {
                prop_assert!(!all_exist || literal_dollar, "{template:?} was refused: {error}");
                prop_assert!(error.starts_with("field `proxy[0].rewrite`"), "{}", error);
            }
        }
    }

    #[test]
    fn any_pattern_and_template_compile_or_fail_naming_the_rule(
        pattern in any::<String>(),
        template in prop::option::of(any::<String>()),
        path in any::<String>(),
    ) {
        // The path a rule sees always starts with `/` (`/app@1` is `/`).
        let path = format!("/{path}");
        match compile_one(&pattern, template.as_deref()) {
            Ok(rules) => {
                if let Some(matched) = rules.find(&path) {
                    prop_assert!(matched.path.starts_with('/'));
                }
            }
            Err(error) => prop_assert!(error.starts_with("field `proxy[0]"), "{}", error),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 5. worker.config.json
// ---------------------------------------------------------------------------------------------------------------

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z/:.*${}0-9 ^=-]{0,10}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(config_key(), inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Keys that are the config's own fields (and a rule's) as often as not.
fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(FIELDS.iter().chain(RULE_FIELDS).copied().collect::<Vec<_>>()).prop_map(str::to_owned),
        "[a-zA-Z$^/]{0,8}",
    ]
}

const FIELDS: &[&str] = &[
    "$schema",
    "entrypoint",
    "timeout",
    "ttl",
    "idleTimeout",
    "maxRequests",
    "lowMemory",
    "maxMemoryMb",
    "maxBodySize",
    "allowedOutboundHosts",
    "env",
    "proxy",
];
const RULE_FIELDS: &[&str] = &[
    "pattern",
    "target",
    "rewrite",
    "changeOrigin",
    "secure",
    "headers",
    "timeout",
];

fn env_name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_.-]{0,8}"
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_owned()),
        "[a-z][a-z0-9-]{0,8}(\\.[a-z]{2,4})?",
        ("[a-z]{1,8}", 1u16..=u16::MAX).prop_map(|(h, p)| format!("{h}:{p}")),
        Just("127.0.0.1:8080".to_owned()),
        Just("[::1]:443".to_owned()),
    ]
}

fn valid_rule() -> impl Strategy<Value = ProxyRule> {
    (
        "\\^/[a-z]{0,6}(\\(\\.\\*\\))?\\$?",
        prop::sample::select(vec![
            "http://127.0.0.1:9000",
            "https://api.example.com/v1",
            "http://${UPSTREAM}",
        ]),
        prop::option::of("/[a-z$1]{0,6}"),
        any::<bool>(),
        any::<bool>(),
        prop::collection::btree_map("[a-z-]{1,8}", "[a-z0-9 ]{0,8}", 0..3),
        prop::option::of(0..=MAX_TIMEOUT_SECS),
    )
        .prop_map(
            |(pattern, target, rewrite, change_origin, secure, headers, timeout)| ProxyRule {
                pattern,
                target: target.into(),
                rewrite,
                change_origin,
                secure,
                headers,
                timeout,
            },
        )
}

fn valid_config() -> impl Strategy<Value = WorkerConfig> {
    (
        (
            prop::option::of("[a-z./:]{0,20}"),
            prop::option::of("[a-z/]{1,10}\\.(wasm|html)"),
            0..=MAX_TIMEOUT_SECS,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::option::of(1..=MAX_MEMORY_MB_LIMIT),
        ),
        (
            any::<u64>(),
            prop::collection::vec(host(), 0..3),
            prop::collection::btree_map(env_name(), "[^\0]{0,10}", 0..4),
            prop::collection::vec(valid_rule(), 0..3),
            1..=MAX_CONCURRENT_REQUESTS_LIMIT,
        ),
    )
        .prop_map(
            |(
                (schema, entrypoint, timeout, ttl, idle_timeout, max_requests, low_memory, max_memory_mb),
                (max_body_size, allowed_outbound_hosts, env, proxy, max_concurrent_requests),
            )| WorkerConfig {
                schema,
                entrypoint,
                timeout,
                ttl,
                idle_timeout,
                max_requests,
                max_concurrent_requests,
                low_memory,
                max_memory_mb,
                max_body_size,
                allowed_outbound_hosts,
                env,
                proxy: ProxyRules(proxy),
            },
        )
}

/// A config error names a field, says what was expected, or points into the text (line and column).
fn check_config_error(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.is_empty());
    prop_assert!(
        message.starts_with("field `")
            || message.starts_with("unknown field `")
            || message.starts_with("invalid type")
            || message.starts_with("missing field `")
            || message.contains(" at line "),
        "{}",
        message
    );
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_bytes_as_a_config_parse_or_give_a_clean_error(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        if let Err(error) = WorkerConfig::parse(&bytes) {
            check_config_error(&error.message)?;
        }
    }

    #[test]
    fn any_json_value_as_a_config_parses_or_gives_a_clean_error(value in json_value()) {
        if let Err(error) = WorkerConfig::parse(value.to_string().as_bytes()) {
            check_config_error(&error.message)?;
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn a_valid_config_serialized_and_parsed_back_is_equal(config in valid_config()) {
        let text = serde_json::to_string(&config).unwrap();
        prop_assert_eq!(WorkerConfig::parse(text.as_bytes()).map_err(|e| e.message), Ok(config.clone()));
        let pretty = serde_json::to_string_pretty(&config).unwrap();
        prop_assert_eq!(WorkerConfig::parse(pretty.as_bytes()).map_err(|e| e.message), Ok(config));
    }

    #[test]
    fn proxy_rules_written_keyed_by_pattern_parse_to_the_same_config_as_the_array(config in valid_config()) {
        let patterns: BTreeSet<&str> = config.proxy.0.iter().map(|r| r.pattern.as_str()).collect();
        prop_assume!(patterns.len() == config.proxy.0.len());
        // Written by hand: a `serde_json::Map` would sort the patterns, and their order is the point.
        let mut value = serde_json::to_value(&config).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("proxy");
        let keyed: Vec<String> = config
            .proxy
            .0
            .iter()
            .map(|rule| {
                let mut rule = serde_json::to_value(rule).unwrap();
                let pattern = rule.as_object_mut().unwrap().remove("pattern").unwrap();
                format!("{pattern}: {rule}")
            })
            .collect();
        let mut text = value.to_string();
        if !keyed.is_empty() {
            text.pop();
            if text.len() > 1 {
                text.push(',');
            }
            write!(text, r#""proxy": {{{}}}}}"#, keyed.join(", ")).unwrap();
        }
        prop_assert_eq!(WorkerConfig::parse(text.as_bytes()).map_err(|e| e.message), Ok(config));
    }

    #[test]
    fn a_field_given_any_value_parses_or_the_error_names_that_field(
        config in valid_config(),
        field in prop::sample::select(FIELDS),
        value in json_value(),
    ) {
        let mut object = serde_json::to_value(&config).unwrap();
        object.as_object_mut().unwrap().insert(field.to_owned(), value.clone());
        if let Err(error) = WorkerConfig::parse(object.to_string().as_bytes()) {
            prop_assert!(
                error.message.starts_with(&format!("field `{field}")),
                "{} = {}: {}",
                field,
                value,
                error.message
            );
        }
    }

    #[test]
    fn an_unknown_field_is_refused_by_name(config in valid_config(), field in "[a-zA-Z_]{1,12}", value in json_value()) {
        prop_assume!(!FIELDS.contains(&field.as_str()));
        let mut object = serde_json::to_value(&config).unwrap();
        object.as_object_mut().unwrap().insert(field.clone(), value);
        let error = WorkerConfig::parse(object.to_string().as_bytes()).unwrap_err();
        prop_assert!(error.message.starts_with(&format!("unknown field `{field}`")), "{}", error.message);
    }
}

/// Numbers as a JSON text can spell them: integers of any size and sign, and fractions or exponents.
fn json_number() -> impl Strategy<Value = (String, Option<i128>)> {
    prop_oneof![
        4 => any::<i128>().prop_map(|n| (n.to_string(), Some(n))),
        4 => (-10i128..5000).prop_map(|n| (n.to_string(), Some(n))),
        2 => prop::sample::select(vec![
            0,
            1,
            4096,
            4097,
            i128::from(MAX_TIMEOUT_SECS),
            i128::from(MAX_TIMEOUT_SECS) + 1,
            i128::from(u64::MAX),
            i128::from(u64::MAX) + 1,
            -1,
        ])
        .prop_map(|n| (n.to_string(), Some(n))),
        1 => prop::sample::select(vec!["1.0", "1e3", "0.5", "-0.0", "30.000001", "1E400"]).prop_map(|t| (t.to_owned(), None)),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn numbers_outside_a_fields_range_are_refused_naming_the_field(
        field in prop::sample::select(vec![
            "timeout", "ttl", "idleTimeout", "maxRequests", "maxMemoryMb", "maxBodySize", "maxConcurrentRequests",
            "proxy[0].timeout",
        ]),
        (text, number) in json_number(),
    ) {
        let config = match field {
            "proxy[0].timeout" => format!(r#"{{"proxy": [{{"pattern": "^/", "target": "http://a", "timeout": {text}}}]}}"#),
            field => format!(r#"{{"{field}": {text}}}"#),
        };
        let range = match field {
            "maxMemoryMb" => 1..=i128::from(MAX_MEMORY_MB_LIMIT),
            "maxConcurrentRequests" => 1..=i128::from(MAX_CONCURRENT_REQUESTS_LIMIT),
            "timeout" | "proxy[0].timeout" => 0..=i128::from(MAX_TIMEOUT_SECS),
            _ => 0..=i128::from(u64::MAX),
        };
        let accepted = number.is_some_and(|n| range.contains(&n));
        match WorkerConfig::parse(config.as_bytes()) {
            Ok(parsed) => {
                prop_assert!(accepted, "{} = {} was accepted", field, text);
                let n = number.unwrap();
                let got = match field {
                    "timeout" => parsed.timeout,
                    "ttl" => parsed.ttl,
                    "idleTimeout" => parsed.idle_timeout,
                    "maxRequests" => parsed.max_requests,
                    "maxMemoryMb" => parsed.max_memory_mb.unwrap(),
                    "maxBodySize" => parsed.max_body_size,
                    "maxConcurrentRequests" => parsed.max_concurrent_requests,
                    _ => parsed.proxy.0[0].timeout.unwrap(),
                };
                prop_assert_eq!(i128::from(got), n);
            }
            Err(error) => {
                prop_assert!(!accepted, "{} = {} was refused: {}", field, text, error.message);
                prop_assert!(error.message.starts_with(&format!("field `{field}`")), "{}", error.message);
            }
        }
    }
}
