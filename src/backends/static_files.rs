//! Static apps: the files beside an `.html` entrypoint, served the way browsers and caches expect.
//!
//! Conditional requests (`ETag`, `Last-Modified`, 304), single byte ranges (206/416, `If-Range`), precompressed
//! `.br`/`.gz` siblings, and a single-page-app fallback to the entrypoint. Every path is confined to the
//! entrypoint's directory: segments are decoded one by one and `..`, separators and NUL are refused before the
//! filesystem is touched, then the real path (after symlinks) must still lie inside that directory.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::deploy::config::CONFIG_FILE;
use crate::deploy::registry::Deployment;
use crate::error::Error;
use crate::negotiate::weighted;

/// Dot-files are private (`.env`, `.git`) except this one, which exists to be public.
const PUBLIC_DOT_DIR: &str = ".well-known";

/// Static files are revalidated on every use: a version directory can be edited in place, and the same URL under
/// `/<app>/` moves to another version's file when a new version is deployed. A 304 is cheap.
const CACHE_CONTROL: &str = "no-cache";

/// Serves `path` (the request path after the app's mount prefix, still percent-encoded) from a static app.
pub async fn serve(
    deployment: &Deployment,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::MethodNotAllowed(method.to_string()));
    }
    let not_found = || Error::FileNotFound(path.to_owned());
    let segments = decode_segments(path).ok_or_else(not_found)?;
    let root = &deployment.root;
    let requested = segments.iter().fold(root.clone(), |dir, segment| dir.join(segment));

    let file = match confined(root, &requested).await {
        Found::Inside(real, meta) if meta.is_dir() => {
            if !path.ends_with('/') {
                // Relative links in the directory's index only work under a trailing slash. The location is
                // relative to the path's last segment: `sub` -> `sub/`, but `sub/.` (or `sub/%2e`), whose last
                // segment is the directory itself, -> `./` (`sub/` would name `sub/sub/`, and `/.` the host's `/`).
                let last_raw = path.rsplit('/').next().unwrap_or_default();
                let location = if percent_decode_str(last_raw).decode_utf8().is_ok_and(|s| s == ".") {
                    "./".to_owned()
                } else {
                    let last = segments.last().map(String::as_str).unwrap_or_default();
                    format!("{}/", encode_segment(last))
                };
                return redirect(&location);
            }
            match confined(root, &real.join("index.html")).await {
                Found::Inside(index, meta) if meta.is_file() => Some(index),
                _ => None,
            }
        }
        Found::Inside(real, meta) if meta.is_file() => Some(real),
        // A symlink out of the directory is an escape, not a route: no fallback for it.
        Found::Outside => return Err(not_found()),
        _ => None,
    };
    let file = match file {
        Some(file) if !is_private(root, &file) => file,
        Some(_) => return Err(not_found()),
        // A path without an extension is a route of a single-page app: the entrypoint renders it.
        None if !segments.last().is_some_and(|s| s.contains('.')) => deployment.entrypoint_path.clone(),
        None => return Err(not_found()),
    };
    respond(root, &file, method, headers).await
}

/// Splits the path into decoded segments; `None` if any segment could escape the directory or is hidden, or the
/// path holds an empty segment (`//etc/passwd` is an absolute path in disguise, not a route).
fn decode_segments(path: &str) -> Option<Vec<String>> {
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    let mut segments = Vec::new();
    for raw in inner.split('/') {
        let segment = percent_decode_str(raw).decode_utf8().ok()?;
        match segment.as_ref() {
            "" if inner.is_empty() => continue,
            "" => return None,
            "." => continue,
            ".." => return None,
            s if s.contains(['/', '\\', '\0']) => return None,
            s if s.starts_with('.') && s != PUBLIC_DOT_DIR => return None,
            s => segments.push(s.to_owned()),
        }
    }
    Some(segments)
}

/// What a path is once symlinks are followed.
enum Found {
    /// It exists inside the root: its real path and metadata.
    Inside(PathBuf, std::fs::Metadata),
    /// It exists, but outside the root.
    Outside,
    Missing,
}

async fn confined(root: &Path, path: &Path) -> Found {
    let Ok(real) = tokio::fs::canonicalize(path).await else {
        return Found::Missing;
    };
    if !real.starts_with(root) {
        return Found::Outside;
    }
    match tokio::fs::metadata(&real).await {
        Ok(meta) => Found::Inside(real, meta),
        Err(_) => Found::Missing,
    }
}

/// The version's own config sits beside the files when the entrypoint is at the top of the version directory;
/// it holds the app's `env`, so it is never served, under any name that leads to it (the path is the real one).
fn is_private(root: &Path, file: &Path) -> bool {
    file.parent() == Some(root) && file.file_name().is_some_and(|n| n == CONFIG_FILE)
}

fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A 308 to `location`: the method and body are kept, and clients may remember it. A location that cannot be a
/// header value (it is built from the request's own path, so this does not happen) is refused rather than sent
/// without a `Location`.
pub(crate) fn redirect(location: &str) -> Result<Response, Error> {
    let value = HeaderValue::from_str(location).map_err(|_| Error::NoRoute("the path cannot be redirected".into()))?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, value);
    Ok(response)
}

/// A file and the representation chosen for this request.
struct Representation {
    path: PathBuf,
    encoding: Option<&'static str>,
    len: u64,
    modified: SystemTime,
}

impl Representation {
    fn etag(&self) -> String {
        let nanos = self
            .modified
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        match self.encoding {
            Some(encoding) => format!("\"{:x}-{nanos:x}-{encoding}\"", self.len),
            None => format!("\"{:x}-{nanos:x}\"", self.len),
        }
    }
}

async fn respond(root: &Path, file: &Path, method: &Method, headers: &HeaderMap) -> Result<Response, Error> {
    let (chosen, has_variants) = choose_representation(root, file, headers).await?;
    let etag = chosen.etag();
    let last_modified = httpdate::fmt_http_date(chosen.modified);
    let mime = mime_guess::from_path(file).first_or_octet_stream();

    let mut response = Response::new(Body::empty());
    let h = response.headers_mut();
    h.insert(header::ETAG, header_value(&etag));
    h.insert(header::LAST_MODIFIED, header_value(&last_modified));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if has_variants {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if not_modified(headers, &etag, chosen.modified) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(response);
    }
    h.insert(header::CONTENT_TYPE, header_value(mime.as_ref()));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some(encoding) = chosen.encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
    }

    let (start, len) = match requested_range(headers, &etag, &last_modified, chosen.len)? {
        Some((start, end)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let range = format!("bytes {start}-{end}/{}", chosen.len);
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, header_value(&range));
            (start, end - start + 1)
        }
        None => (0, chosen.len),
    };
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if method == Method::HEAD {
        return Ok(response);
    }
    let mut opened = tokio::fs::File::open(&chosen.path)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", chosen.path.display())))?;
    if start > 0 {
        opened
            .seek(SeekFrom::Start(start))
            .await
            .map_err(|e| Error::Internal(format!("{}: {e}", chosen.path.display())))?;
    }
    *response.body_mut() = Body::from_stream(ReaderStream::new(opened.take(len)));
    Ok(response)
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// The precompressed sibling the client accepts (brotli first), else the file itself; and whether any sibling
/// exists, because then the answer varies with `Accept-Encoding`.
async fn choose_representation(root: &Path, file: &Path, headers: &HeaderMap) -> Result<(Representation, bool), Error> {
    let mut has_variants = false;
    for (suffix, encoding) in [("br", "br"), ("gz", "gzip")] {
        let mut name = file.as_os_str().to_owned();
        name.push(".");
        name.push(suffix);
        let Found::Inside(sibling, meta) = confined(root, Path::new(&name)).await else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        has_variants = true;
        if accepts_encoding(headers, encoding) {
            let modified = meta.modified().unwrap_or(UNIX_EPOCH);
            let chosen = Representation {
                path: sibling,
                encoding: Some(encoding),
                len: meta.len(),
                modified,
            };
            return Ok((chosen, true));
        }
    }
    let meta = tokio::fs::metadata(file)
        .await
        .map_err(|e| Error::Internal(format!("{}: {e}", file.display())))?;
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    Ok((
        Representation {
            path: file.to_path_buf(),
            encoding: None,
            len: meta.len(),
            modified,
        },
        has_variants,
    ))
}

/// Whether `Accept-Encoding` admits `coding` with a non-zero quality (directly or through `*`).
fn accepts_encoding(headers: &HeaderMap, coding: &str) -> bool {
    let mut wildcard = None;
    for (name, quality) in weighted(headers.get_all(header::ACCEPT_ENCODING)) {
        if name == coding || (coding == "gzip" && name == "x-gzip") {
            return quality > 0.0;
        }
        if name == "*" {
            wildcard = Some(quality > 0.0);
        }
    }
    wildcard.unwrap_or(false)
}

/// RFC 9110 §13.2.2: `If-None-Match` decides when present (weak comparison); otherwise `If-Modified-Since`.
fn not_modified(headers: &HeaderMap, etag: &str, modified: SystemTime) -> bool {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        let Ok(value) = value.to_str() else {
            return false;
        };
        return value
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || weak_eq(tag, etag));
    }
    let Some(since) = headers.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Ok(since) = httpdate::parse_http_date(since) else {
        return false;
    };
    // HTTP dates have whole seconds; the file's time is finer.
    let modified_secs = modified.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let since_secs = since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    modified_secs <= since_secs
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

/// The single byte range to send, if the request asks for one that applies to this representation.
///
/// A malformed `Range`, several ranges, or a stale `If-Range` get the whole file (RFC 9110 lets a server ignore
/// `Range`); a range that starts past the end is 416.
fn requested_range(
    headers: &HeaderMap,
    etag: &str,
    last_modified: &str,
    len: u64,
) -> Result<Option<(u64, u64)>, Error> {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        // A strong validator is required: an entity tag compared strongly, or the exact date.
        let current = if if_range.starts_with('"') {
            if_range == etag
        } else {
            if_range == last_modified
        };
        if !current {
            return Ok(None);
        }
    }
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return Ok(None);
    };
    match parsed.validate(len) {
        Ok(ranges) if ranges.len() == 1 => Ok(Some((*ranges[0].start(), *ranges[0].end()))),
        Ok(_) => Ok(None),
        Err(_) => Err(Error::RangeNotSatisfiable { len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_decoded_one_by_one_and_escapes_are_refused() {
        assert_eq!(decode_segments("/a/b%20c/./d/").unwrap(), ["a", "b c", "d"]);
        assert_eq!(decode_segments("/").unwrap(), Vec::<String>::new());
        assert_eq!(decode_segments("/.well-known/x").unwrap(), [".well-known", "x"]);
        for hostile in [
            "//etc/passwd",
            "/a//b",
            "/../x",
            "/a/%2e%2e/x",
            "/a/%2E%2E",
            "/..%2fx",
            "/a%2f..%2f..",
            "/a%5c..%5cb",
            "/a%00",
            "/.env",
            "/%ff",
        ] {
            assert_eq!(decode_segments(hostile), None, "{hostile}");
        }
    }

    #[test]
    fn accept_encoding_honours_quality_and_wildcards() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(accepts_encoding(&with("gzip, deflate, br"), "br"));
        assert!(!accepts_encoding(&with("gzip, br;q=0"), "br"));
        assert!(accepts_encoding(&with("*"), "br"));
        assert!(!accepts_encoding(&with("*;q=0"), "gzip"));
        assert!(accepts_encoding(&with("x-gzip"), "gzip"));
        assert!(!accepts_encoding(&HeaderMap::new(), "gzip"));
    }
}
