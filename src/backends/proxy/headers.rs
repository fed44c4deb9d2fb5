//! What a proxy does to headers on the way through: hop-by-hop headers stop here, `X-Forwarded-*` and `Via` say
//! who forwarded what, and redirects that point at the upstream are turned back into the client's URLs.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use crate::deploy::rules::Target;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Proxy-Connection`, which old
/// clients still send. Names, not strings: a string would be parsed into a name on every request. A `static`, not
/// a `const`: a `const` array is built afresh (and dropped) wherever it is used.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers, and every header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them. One pass over the names they do carry says so, where removing each of the
    // nine would look every one of them up.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends `value` to a list-valued header (`a, b` + `c` -> `a, b, c`), or sets it.
fn append_to_list(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    let mut entry = match headers.entry(name) {
        Entry::Vacant(entry) => {
            entry.insert(value);
            return;
        }
        Entry::Occupied(entry) => entry,
    };
    let existing: Vec<&str> = entry.iter().filter_map(|v| v.to_str().ok()).collect();
    if existing.is_empty() {
        entry.insert(value);
        return;
    }
    // A value that is not visible ASCII (a client's odd `Host`) cannot be joined into a list: leave the list be.
    let Ok(value) = value.to_str() else { return };
    let joined = format!("{}, {value}", existing.join(", "));
    if let Ok(joined) = HeaderValue::from_str(&joined) {
        entry.insert(joined);
    }
}

/// This hop's entry in `Via`, for a message that arrived as `version`.
fn via_entry(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 marina",
        Version::HTTP_10 => "1.0 marina",
        Version::HTTP_2 => "2 marina",
        Version::HTTP_3 => "3 marina",
        _ => "1.1 marina",
    })
}

/// Adds this hop to `Via`, for a message that arrived as `version`.
pub(crate) fn add_via(headers: &mut HeaderMap, version: Version) {
    append_to_list(headers, header::VIA, via_entry(version));
}

/// What the forwarded request says about the client.
pub(crate) struct Forwarded<'a> {
    /// The client's IP as a header value, or `None` when the connection has none (in-process tests).
    pub(crate) client_ip: Option<HeaderValue>,
    /// `http` or `https`: how the client reached this host.
    pub(crate) proto: &'static str,
    /// The `Host` the client asked for.
    pub(crate) host: Option<&'a HeaderValue>,
}

/// Appends the client to `X-Forwarded-For`, `-Proto` and `-Host`.
pub(crate) fn add_forwarded(headers: &mut HeaderMap, forwarded: &Forwarded<'_>) {
    // Room for these three and `Via` at once: the map the server parsed has just enough for what arrived, and
    // would otherwise grow (and rehash) more than once.
    headers.reserve(4);
    if let Some(ip) = &forwarded.client_ip {
        append_to_list(headers, X_FORWARDED_FOR, ip.clone());
    }
    let proto = HeaderValue::from_static(forwarded.proto);
    append_to_list(headers, X_FORWARDED_PROTO, proto);
    if let Some(host) = forwarded.host {
        append_to_list(headers, X_FORWARDED_HOST, host.clone());
    }
}

/// Turns a `Location` that points at the upstream into the URL the client would use for the same thing.
///
/// `client_prefix` is what stands in front of a forwarded path on the client's side: the app's mount
/// (`/app@1`) plus whatever part of the path the rule's rewrite cut off (`/api` for `^/api(/.*)` -> `$1`).
/// Absolute URLs on the target's origin and absolute paths under the target's own path are rewritten; anything
/// else (another host, a relative path) is left as it is.
pub(crate) fn rewrite_location(headers: &mut HeaderMap, target: &Target, client_prefix: &str) {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let path = if location.starts_with('/') && !location.starts_with("//") {
        Some(location)
    } else {
        let origin = target.origin();
        location
            .get(..origin.len())
            .filter(|head| head.eq_ignore_ascii_case(&origin))
            .map(|_| &location[origin.len()..])
            .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
    };
    let Some(path) = path else { return };
    let Some(rest) = path.strip_prefix(target.prefix.as_str()) else {
        return;
    };
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return;
    }
    let rest = if rest.is_empty() || !rest.starts_with('/') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{client_prefix}{rest}")) {
        headers.insert(header::LOCATION, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Target {
        let uri: http::Uri = url.parse().unwrap();
        Target::new(
            uri.scheme().unwrap().clone(),
            uri.authority().unwrap().clone(),
            uri.path().trim_end_matches('/').to_owned(),
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 1, "{map:?}");
        assert_eq!(map["x-kept"], "yes");
    }

    #[test]
    fn forwarded_headers_and_via_are_appended_to_what_came_in() {
        let mut map = headers(&[("x-forwarded-for", "10.0.0.1"), ("via", "1.0 edge")]);
        add_forwarded(
            &mut map,
            &Forwarded {
                client_ip: Some(HeaderValue::from_static("127.0.0.1")),
                proto: "http",
                host: Some(&HeaderValue::from_static("example.test")),
            },
        );
        add_via(&mut map, Version::HTTP_11);
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "example.test");
        assert_eq!(map["via"], "1.0 edge, 1.1 marina");
    }

    #[test]
    fn redirects_to_the_upstream_come_back_under_the_client_prefix() {
        let cases = [
            (
                "http://up:8080/base",
                "http://up:8080/base/login?x=1",
                "/app@1/login?x=1",
            ),
            ("http://up:8080/base", "/base/login", "/app@1/login"),
            ("http://up:8080/base", "http://UP:8080/base", "/app@1/"),
            ("http://up:8080", "/login", "/app@1/login"),
            ("http://up:8080/base", "/elsewhere", "/elsewhere"),
            ("http://up:8080/base", "/basement", "/basement"),
            ("http://up:8080", "http://other/login", "http://other/login"),
            ("http://up:8080", "https://up:8080/login", "https://up:8080/login"),
            ("http://up:8080", "//up:8080/x", "//up:8080/x"),
            ("http://up:8080", "relative", "relative"),
        ];
        for (url, location, expected) in cases {
            let mut map = headers(&[("location", location)]);
            rewrite_location(&mut map, &target(url), "/app@1");
            assert_eq!(map["location"], expected, "{url} {location}");
        }
    }
}
