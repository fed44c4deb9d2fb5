//! From the first path segment, `<app>[@<spec>]`, to one version of one app.
//!
//! This runs on every request, so it works on the snapshot's pre-sorted version lists and allocates only when
//! the spec is a range (`semver::VersionReq` holds its comparators in a `Vec`).

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use semver::{Version, VersionReq};

/// What the client asked for after the `@`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// No `@`: the highest release, or the highest prerelease when the app has only prereleases.
    Latest,
    /// A whole version, `1.2.3` or `v2.0.0-rc.1`: exactly that one.
    Exact(Version),
    /// A partial version (`1`, `1.2`) or any range (`^1.2`, `~1.2.3`, `>=1, <2`): the highest match.
    Range(VersionReq),
}

/// A version spec that is not semver; the client gets 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{spec:?} is not a version or a semver range: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub(crate) reason: String,
}

/// The first path segment split into its app name and version spec, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub app: Cow<'a, str>,
    pub spec: Spec,
    /// The spec as the client wrote it (decoded), for error messages.
    pub spec_text: Option<Cow<'a, str>>,
}

/// Splits and parses `<app>[@<spec>]`. The segment is as it appears in the URL (still percent-encoded).
pub fn parse_target(segment: &str) -> Result<Target<'_>, SpecError> {
    let decoded = decode(segment);
    let (app, spec_text) = match decoded {
        Cow::Borrowed(s) => match s.split_once('@') {
            Some((app, spec)) => (Cow::Borrowed(app), Some(Cow::Borrowed(spec))),
            None => (Cow::Borrowed(s), None),
        },
        Cow::Owned(s) => match s.split_once('@') {
            Some((app, spec)) => (Cow::Owned(app.to_owned()), Some(Cow::Owned(spec.to_owned()))),
            None => (Cow::Owned(s), None),
        },
    };
    let spec = match &spec_text {
        None => Spec::Latest,
        Some(text) => parse_spec(text)?,
    };
    Ok(Target { app, spec, spec_text })
}

fn decode(segment: &str) -> Cow<'_, str> {
    if !segment.contains('%') {
        return Cow::Borrowed(segment);
    }
    // Invalid UTF-8 after decoding cannot name an app; keep it lossy so the 404 can still quote it.
    percent_decode_str(segment).decode_utf8_lossy()
}

/// Parses what follows the `@`.
pub fn parse_spec(text: &str) -> Result<Spec, SpecError> {
    let error = |reason: &str| SpecError {
        spec: text.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(error("the spec after `@` is empty"));
    }
    // `v1.2.3` and `v1` are common spellings of versions; a `v` before anything but a digit is not.
    let bare = match trimmed.strip_prefix(['v', 'V']) {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => rest,
        _ => trimmed,
    };
    if let Ok(version) = Version::parse(bare) {
        return Ok(Spec::Exact(version));
    }
    // `1` and `1.2` mean "the highest 1.x.x / 1.2.x". semver reads a bare partial as a caret range (`1.2` would
    // admit 1.9.0), so it is spelled as the exact-partial comparator `=1.2`, which is precisely the 1.2.x range.
    if is_partial_version(bare) {
        return VersionReq::parse(&format!("={bare}"))
            .map(Spec::Range)
            .map_err(|e| error(&e.to_string()));
    }
    VersionReq::parse(trimmed)
        .map(Spec::Range)
        .map_err(|e| error(&e.to_string()))
}

/// `1` or `1.2`: one or two dot-separated numbers.
fn is_partial_version(text: &str) -> bool {
    let mut parts = 0;
    for part in text.split('.') {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        parts += 1;
    }
    parts <= 2
}

impl Spec {
    /// Picks the version to serve from `versions`, which must be sorted highest first.
    ///
    /// Prereleases are chosen only when the spec names one (npm's rule, which `VersionReq::matches` applies),
    /// or, for [`Spec::Latest`], when the app has nothing else.
    pub(crate) fn pick<'v, T>(&self, versions: &'v [T], version_of: impl Fn(&T) -> &Version) -> Option<&'v T> {
        match self {
            Spec::Latest => versions
                .iter()
                .find(|v| version_of(v).pre.is_empty())
                .or_else(|| versions.first()),
            // The version itself when it is deployed, else one that differs only by build metadata the spec left out.
            Spec::Exact(wanted) => versions
                .iter()
                .find(|v| version_of(v) == wanted)
                .or_else(|| versions.iter().find(|v| same_version(version_of(v), wanted))),
            Spec::Range(req) => versions.iter().find(|v| req.matches(version_of(v))),
        }
    }
}

/// Equal versions, where a spec without build metadata matches a version directory with some.
fn same_version(have: &Version, wanted: &Version) -> bool {
    have.major == wanted.major
        && have.minor == wanted.minor
        && have.patch == wanted.patch
        && have.pre == wanted.pre
        && (wanted.build.is_empty() || have.build == wanted.build)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERSIONS: &[&str] = &[
        "3.0.0-alpha.1",
        "2.1.0",
        "2.0.0",
        "2.0.0-rc.2",
        "2.0.0-rc.1",
        "1.10.0",
        "1.2.10",
        "1.2.3",
        "1.2.0",
        "1.0.0",
        "0.9.0",
    ];

    fn sorted(list: &[&str]) -> Vec<Version> {
        let mut versions: Vec<Version> = list.iter().map(|v| Version::parse(v).unwrap()).collect();
        versions.sort_by(|a, b| b.cmp(a));
        versions
    }

    fn resolve(list: &[&str], segment: &str) -> Result<Option<String>, SpecError> {
        let versions = sorted(list);
        let target = parse_target(segment)?;
        Ok(target.spec.pick(&versions, |v| v).map(|v| v.to_string()))
    }

    #[test]
    fn every_resolution_rule_in_one_table() {
        // (segment, expected version; None = no match)
        let cases: &[(&str, Option<&str>)] = &[
            // No spec: the highest release, never a prerelease while a release exists.
            ("app", Some("2.1.0")),
            // Exact versions, with or without a `v`.
            ("app@1.2.3", Some("1.2.3")),
            ("app@v1.2.3", Some("1.2.3")),
            ("app@2.0.0", Some("2.0.0")),
            ("app@1.2.4", None),
            // Partial versions: the highest of that major or minor, releases only.
            ("app@1", Some("1.10.0")),
            ("app@v1", Some("1.10.0")),
            ("app@1.2", Some("1.2.10")),
            ("app@0", Some("0.9.0")),
            ("app@2", Some("2.1.0")),
            ("app@3", None),
            ("app@4", None),
            // Ranges, with the highest match.
            ("app@^1.2", Some("1.10.0")),
            ("app@~1.2.3", Some("1.2.10")),
            ("app@~1.2", Some("1.2.10")),
            ("app@>=1.0.0, <2", Some("1.10.0")),
            ("app@%3E%3D1.0.0%2C%20%3C2", Some("1.10.0")),
            ("app@%5E1.2", Some("1.10.0")),
            ("app@<1.2.3", Some("1.2.0")),
            ("app@*", Some("2.1.0")),
            ("app@1.x", Some("1.10.0")),
            ("app@=1.2.0", Some("1.2.0")),
            // Prereleases only when the spec names one.
            ("app@2.0.0-rc.1", Some("2.0.0-rc.1")),
            ("app@v2.0.0-rc.2", Some("2.0.0-rc.2")),
            ("app@>=2.0.0-rc.1, <2.0.0", Some("2.0.0-rc.2")),
            ("app@^2.0.0-rc.1", Some("2.1.0")),
            ("app@>=2.1.0", Some("2.1.0")),
            ("app@3.0.0-alpha.1", Some("3.0.0-alpha.1")),
            ("app@^3.0.0-alpha", Some("3.0.0-alpha.1")),
        ];
        for (segment, expected) in cases {
            let got = resolve(VERSIONS, segment).unwrap_or_else(|e| panic!("{segment}: {e}"));
            assert_eq!(got.as_deref(), *expected, "resolving {segment}");
        }
    }

    #[test]
    fn an_app_with_only_prereleases_serves_its_highest_prerelease_without_a_spec() {
        let list = ["2.0.0-beta.1", "2.0.0-beta.2", "1.0.0-alpha"];
        assert_eq!(resolve(&list, "app").unwrap().as_deref(), Some("2.0.0-beta.2"));
        assert_eq!(
            resolve(&list, "app@2").unwrap(),
            None,
            "a partial spec never picks a prerelease"
        );
    }

    #[test]
    fn an_exact_spec_matches_a_directory_with_build_metadata() {
        let list = ["1.0.0+build.7"];
        assert_eq!(resolve(&list, "app@1.0.0").unwrap().as_deref(), Some("1.0.0+build.7"));
        assert_eq!(resolve(&list, "app@1.0.0+build.8").unwrap(), None);
        // With the plain version deployed too, the plain spec names it exactly (1.0.0+build.7 sorts higher).
        let list = ["1.0.0+build.7", "1.0.0"];
        assert_eq!(resolve(&list, "app@1.0.0").unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(
            resolve(&list, "app@1.0.0+build.7").unwrap().as_deref(),
            Some("1.0.0+build.7")
        );
    }

    #[test]
    fn malformed_specs_are_errors_that_quote_the_spec() {
        for segment in [
            "app@",
            "app@latest",
            "app@1.2.3.4",
            "app@^",
            "app@>=x",
            "app@1..2",
            "app@%20",
        ] {
            let error = parse_target(segment).expect_err(segment);
            assert!(
                error.to_string().contains("is not a version or a semver range"),
                "{segment}: {error}"
            );
        }
    }

    #[test]
    fn the_segment_is_percent_decoded_before_it_is_split() {
        let target = parse_target("my-app%40%5E1.2").unwrap();
        assert_eq!(target.app, "my-app");
        assert_eq!(target.spec_text.as_deref(), Some("^1.2"));
        assert_eq!(target.spec, Spec::Range(VersionReq::parse("^1.2").unwrap()));
    }

    #[test]
    fn a_segment_without_a_spec_borrows_instead_of_allocating() {
        let target = parse_target("hello").unwrap();
        assert!(matches!(target.app, Cow::Borrowed("hello")));
        assert_eq!(target.spec, Spec::Latest);
    }
}
