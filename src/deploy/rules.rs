//! A version's `proxy` rules, compiled once when its config loads: patterns, targets with `${NAME}` filled in
//! from the host's environment, rewrite templates checked against the pattern's groups.

use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use regex::Regex;

use crate::deploy::config::ProxyRule;

/// Rules in the order they are tried.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

/// One compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// Its position in the file, for messages.
    pub(crate) index: usize,
    pub(crate) pattern: Regex,
    pub(crate) target: Target,
    pub(crate) rewrite: Option<String>,
    pub(crate) change_origin: bool,
    pub(crate) secure: bool,
    pub(crate) headers: HeaderMap,
    /// How long the upstream may take to answer; `None` waits as long as it takes.
    pub(crate) timeout: Option<Duration>,
}

/// Where a rule forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `http` or `https`.
    pub(crate) scheme: http::uri::Scheme,
    pub(crate) authority: http::uri::Authority,
    /// The target URL's path without its trailing `/` (empty for a bare origin): prefixed to every forwarded path.
    pub(crate) prefix: String,
    /// The authority as a `Host` value, made once rather than on every `changeOrigin` request.
    pub(crate) host: HeaderValue,
}

impl Target {
    pub(crate) fn new(scheme: http::uri::Scheme, authority: http::uri::Authority, prefix: String) -> Target {
        let host = HeaderValue::from_str(authority.as_str()).expect("an authority is a valid header value");
        Target {
            scheme,
            authority,
            prefix,
            host,
        }
    }

    /// The origin as a browser writes it, for `Origin` with `changeOrigin`.
    pub(crate) fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// What is forwarded for `path` (which starts with `/`) and `query`: the target's path prefix, then both. A
    /// plain-HTTP upstream is sent only this (origin-form), so no absolute URL is built for it, nor the target's
    /// authority cloned: its reference count is shared by every core.
    pub(crate) fn path_and_query(&self, path: &str, query: Option<&str>) -> Result<PathAndQuery, http::Error> {
        let query_len = query.map_or(0, |query| query.len() + 1);
        let mut path_and_query = String::with_capacity(self.prefix.len() + path.len() + query_len);
        path_and_query.push_str(&self.prefix);
        path_and_query.push_str(path);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Ok(PathAndQuery::try_from(path_and_query)?)
    }

    /// `path_and_query` on this target, as an absolute URL.
    pub(crate) fn absolute(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Ok(Uri::from_parts(parts)?)
    }
}

/// A request a rule took: the rule, and the path to forward (before the target's prefix, without the query).
#[derive(Debug)]
pub struct Matched<'a> {
    pub(crate) rule: &'a Rule,
    pub path: String,
}

impl Rule {
    /// How the rule is named in errors: its position and pattern.
    pub(crate) fn describe(&self) -> String {
        format!("proxy[{}] ({:?})", self.index, self.pattern.as_str())
    }
}

impl Rules {
    /// Compiles `rules`; `env` looks up the host's environment for `${NAME}` in targets. `app_timeout` (seconds, 0
    /// for none) is the default upstream timeout. Errors name the field, as config errors do.
    pub fn compile(
        rules: &[ProxyRule],
        app_timeout: u64,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Rules, String> {
        rules
            .iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(index, rule, app_timeout, env))
            .collect::<Result<Vec<_>, _>>()
            .map(Rules)
    }

    /// The first rule whose pattern matches `path` (the path the app sees, without the query), and the path to
    /// forward: the matched part replaced by the rule's `rewrite`, or `path` unchanged without one.
    pub fn find(&self, path: &str) -> Option<Matched<'_>> {
        self.0.iter().find_map(|rule| {
            let captures = rule.pattern.captures(path)?;
            let path = match &rule.rewrite {
                None => path.to_owned(),
                Some(template) => {
                    let whole = captures.get(0).expect("group 0 is the whole match");
                    let mut out = String::with_capacity(path.len() + template.len());
                    out.push_str(&path[..whole.start()]);
                    captures.expand(template, &mut out);
                    out.push_str(&path[whole.end()..]);
                    if !out.starts_with('/') {
                        out.insert(0, '/');
                    }
                    out
                }
            };
            Some(Matched { rule, path })
        })
    }
}

fn compile_rule(
    index: usize,
    rule: &ProxyRule,
    app_timeout: u64,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Rule, String> {
    let field = format!("proxy[{index}]");
    let at = |sub: &str, message: String| format!("field `{field}{sub}` (pattern {:?}): {message}", rule.pattern);
    let pattern = Regex::new(&rule.pattern).map_err(|e| at("", format!("not a valid regex: {e}")))?;
    if let Some(template) = &rule.rewrite {
        check_references(template, &pattern).map_err(|message| at(".rewrite", message))?;
    }
    let target = substitute_env(&rule.target, env).map_err(|message| at(".target", message))?;
    let target = parse_target(&target).map_err(|message| at(".target", message))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &rule.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| at(".headers", format!("{name:?} is not a header name")))?;
        let value = HeaderValue::from_str(value).map_err(|_| {
            at(
                &format!(".headers.{name}"),
                format!("{value:?} is not a valid header value"),
            )
        })?;
        headers.append(name, value);
    }
    let secs = rule.timeout.unwrap_or(app_timeout);
    Ok(Rule {
        index,
        pattern,
        target,
        rewrite: rule.rewrite.clone(),
        change_origin: rule.change_origin,
        secure: rule.secure,
        headers,
        timeout: (secs > 0).then(|| Duration::from_secs(secs)),
    })
}

/// Replaces every `${NAME}` with the variable's value; an unset variable is an error, never an empty string.
fn substitute_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{text:?} has a `${{` without its closing `}}`"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{name}}}` is not an environment variable name"));
        }
        let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_target(text: &str) -> Result<Target, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") | Some("https") => uri.scheme().expect("checked above").clone(),
        _ => return Err(format!("{text:?} is not an http:// or https:// URL")),
    };
    let authority = uri
        .authority()
        .filter(|authority| !authority.host().is_empty())
        .ok_or_else(|| format!("{text:?} names no host"))?
        .clone();
    if authority.as_str().contains('@') {
        return Err(format!("{text:?} has credentials in it; send them with `headers`"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{text:?} has a query string; the client's query is what is forwarded"
        ));
    }
    Ok(Target::new(
        scheme,
        authority,
        uri.path().trim_end_matches('/').to_owned(),
    ))
}

/// Checks that every `$name`, `${name}` and `$1` in `template` names a group of `pattern`, so that a typo (or
/// `$1abc`, which the regex crate reads as the group named `1abc`) is a config error, not an empty string in
/// every forwarded path.
fn check_references(template: &str, pattern: &Regex) -> Result<(), String> {
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let (name, next) = match bytes.get(i + 1) {
            Some(b'$') => {
                i += 2;
                continue;
            }
            Some(b'{') => match template[i + 2..].find('}') {
                Some(end) => (&template[i + 2..i + 2 + end], i + 3 + end),
                None => return Err(format!("{template:?} has a `${{` without its closing `}}`")),
            },
            _ => {
                let len = template[i + 1..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                (&template[i + 1..i + 1 + len], i + 1 + len)
            }
        };
        if name.is_empty() {
            return Err(format!(
                "{template:?} has a `$` that names no group; write `$$` for a literal `$`"
            ));
        }
        let exists = match name.parse::<usize>() {
            Ok(number) => number < pattern.captures_len(),
            Err(_) => pattern.capture_names().flatten().any(|group| group == name),
        };
        if !exists {
            let hint = match name.find(|c: char| !c.is_ascii_digit()) {
                Some(split) if split > 0 => format!(
                    "; `${}` followed by text is written `${{{}}}{}`",
                    &name[..split],
                    &name[..split],
                    &name[split..]
                ),
                _ => String::new(),
            };
            return Err(format!(
                "{template:?} refers to group `{name}`, which the pattern does not have{hint}"
            ));
        }
        i = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, target: &str, rewrite: Option<&str>) -> ProxyRule {
        ProxyRule {
            pattern: pattern.into(),
            target: target.into(),
            rewrite: rewrite.map(Into::into),
            change_origin: false,
            secure: true,
            headers: Default::default(),
            timeout: None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn compile(rules: &[ProxyRule]) -> Result<Rules, String> {
        Rules::compile(rules, 30, &no_env)
    }

    #[test]
    fn the_first_matching_rule_wins_in_file_order() {
        let rules = compile(&[
            rule("^/api/special", "http://a", None),
            rule("^/api/", "http://b", None),
            rule("^/", "http://c", None),
        ])
        .unwrap();
        let host = |path: &str| rules.find(path).unwrap().rule.target.authority.to_string();
        assert_eq!(host("/api/special/x"), "a");
        assert_eq!(host("/api/other"), "b");
        assert_eq!(host("/else"), "c");
    }

    #[test]
    fn a_rewrite_replaces_the_matched_part_with_captures_expanded() {
        let rules = compile(&[
            rule("^/api/(?P<rest>.*)$", "http://a", Some("/v2/$rest")),
            rule("^/old", "http://a", Some("/new")),
            rule("^/n/(\\d+)/(\\w+)$", "http://a", Some("/${2}/${1}x")),
            rule("^/strip", "http://a", Some("")),
        ])
        .unwrap();
        assert_eq!(rules.find("/api/users/1").unwrap().path, "/v2/users/1");
        assert_eq!(rules.find("/old/page").unwrap().path, "/new/page");
        assert_eq!(rules.find("/n/42/abc").unwrap().path, "/abc/42x");
        assert_eq!(rules.find("/strip/me").unwrap().path, "/me");
        assert_eq!(rules.find("/strip").unwrap().path, "/");
    }

    #[test]
    fn without_a_rewrite_the_path_is_forwarded_unchanged() {
        let rules = compile(&[rule("users", "http://a/base/", None)]).unwrap();
        let matched = rules.find("/x/users").unwrap();
        assert_eq!(matched.path, "/x/users");
        assert_eq!(
            matched
                .rule
                .target
                .absolute(matched.rule.target.path_and_query(&matched.path, Some("q=1")).unwrap())
                .unwrap(),
            "http://a/base/x/users?q=1"
        );
        assert!(rules.find("/other").is_none());
    }

    #[test]
    fn a_reference_to_a_missing_group_is_a_config_error_with_a_hint() {
        let error = compile(&[rule("^/(a)", "http://a", Some("/$1abc"))]).unwrap_err();
        assert!(
            error.starts_with("field `proxy[0].rewrite` (pattern \"^/(a)\")"),
            "{error}"
        );
        assert!(error.contains("group `1abc`") && error.contains("`${1}abc`"), "{error}");
        let error = compile(&[rule("^/(a)", "http://a", Some("/$2"))]).unwrap_err();
        assert!(error.contains("group `2`"), "{error}");
        let error = compile(&[rule("^/(a)", "http://a", Some("/$name"))]).unwrap_err();
        assert!(error.contains("group `name`"), "{error}");
        assert!(compile(&[rule("^/(a)", "http://a", Some("/$$1/${1}"))]).is_ok());
    }

    #[test]
    fn targets_take_variables_from_the_host_environment() {
        let env = |name: &str| (name == "UPSTREAM").then(|| "127.0.0.1:9000".to_owned());
        let rules = Rules::compile(&[rule("^/", "http://${UPSTREAM}/p", None)], 30, &env).unwrap();
        assert_eq!(rules.0[0].target.authority, "127.0.0.1:9000");
        assert_eq!(rules.0[0].target.prefix, "/p");
        let error = Rules::compile(&[rule("^/", "http://${MISSING}/", None)], 30, &env).unwrap_err();
        assert!(error.contains("environment variable MISSING is not set"), "{error}");
        assert!(error.starts_with("field `proxy[0].target`"), "{error}");
    }

    #[test]
    fn bad_targets_and_patterns_are_config_errors_naming_the_rule() {
        for (target, expected) in [
            ("ftp://a", "not an http:// or https:// URL"),
            ("/relative", "not an http:// or https:// URL"),
            ("http://user:pw@a", "credentials"),
            ("http://a/?x=1", "query string"),
            ("http://a/${", "without its closing"),
        ] {
            let error = compile(&[rule("^/", "http://ok", None), rule("^/x", target, None)]).unwrap_err();
            assert!(error.starts_with("field `proxy[1].target`"), "{error}");
            assert!(error.contains(expected), "{target}: {error}");
        }
        let error = compile(&[rule("^/(a", "http://a", None)]).unwrap_err();
        assert!(
            error.starts_with("field `proxy[0]` (pattern \"^/(a\"): not a valid regex"),
            "{error}"
        );
    }

    #[test]
    fn the_timeout_defaults_to_the_apps_and_zero_means_none() {
        let mut with_own = rule("^/", "http://a", None);
        with_own.timeout = Some(2);
        let rules = compile(&[with_own, rule("^/", "http://a", None)]).unwrap();
        assert_eq!(rules.0[0].timeout, Some(Duration::from_secs(2)));
        assert_eq!(rules.0[1].timeout, Some(Duration::from_secs(30)));
        let rules = Rules::compile(&[rule("^/", "http://a", None)], 0, &no_env).unwrap();
        assert_eq!(rules.0[0].timeout, None);
    }
}
