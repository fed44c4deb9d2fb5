//! `worker.config.json`: the settings an app author writes beside each version.
//!
//! The field names and defaults are Buntime's, so a Buntime app's config reads the same here. The types are the
//! single source of truth: serde parses them (rejecting unknown fields), and `worker.config.schema.json` is
//! generated from them with schemars, never written by hand.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The file name Marina looks for in every version directory.
pub(crate) const CONFIG_FILE: &str = "worker.config.json";

/// Default request deadline, in seconds.
pub(crate) const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Default worker lifetime, in seconds; 0 means a fresh worker per request.
pub(crate) const DEFAULT_TTL_SECS: u64 = 0;
/// Default time an idle worker is kept, in seconds.
pub(crate) const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default number of requests a worker serves before it is recycled.
pub(crate) const DEFAULT_MAX_REQUESTS: u64 = 1000;
/// Default `maxConcurrentRequests`: requests one instance of a WASI 0.3 handler serves at once, as `wasmtime serve`
/// does by default.
pub(crate) const DEFAULT_MAX_CONCURRENT_REQUESTS: u64 = 16;
/// The largest `maxConcurrentRequests` accepted.
pub const MAX_CONCURRENT_REQUESTS_LIMIT: u64 = 1024;
/// Default cap on one worker's linear memory, in MiB.
pub(crate) const DEFAULT_MAX_MEMORY_MB: u64 = 128;
/// The memory cap, in MiB, of a `lowMemory` app that sets no `maxMemoryMb`.
pub(crate) const LOW_MEMORY_MAX_MEMORY_MB: u64 = 32;
/// The largest `maxMemoryMb` accepted: a 32-bit linear memory cannot grow past 4 GiB anyway.
pub const MAX_MEMORY_MB_LIMIT: u64 = 4096;
/// Default limit on a request body sent to a worker, in bytes (32 MiB).
pub(crate) const DEFAULT_MAX_BODY_SIZE: u64 = 32 * 1024 * 1024;
/// The longest `timeout` accepted (an app's or a proxy rule's), in seconds: a year. A deadline is an instant, and
/// one too far ahead cannot be represented (`arrived + timeout` would overflow and panic); `0` means none.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 60 * 60;
/// A config file larger than this is rejected unread: no honest config comes near it.
pub(crate) const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The settings of one app version, as written in its `worker.config.json`.
///
/// Every field is optional; a missing file means every default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Marina worker config")]
pub struct WorkerConfig {
    /// The JSON schema this file follows; ignored by Marina, useful to editors.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,

    /// The file to run, relative to the version directory. Without it Marina takes the first of `app.wasm`,
    /// `index.wasm`, `index.html` and `public/index.html` that exists. A `.wasm` file runs in the worker pool;
    /// an `.html` file makes a static app served from that file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,

    /// Request deadline in seconds. 0 means no deadline.
    #[serde(default = "default_timeout")]
    pub timeout: u64,

    /// How long a worker lives, in seconds. 0 means a fresh worker for every request.
    #[serde(default = "default_ttl")]
    pub ttl: u64,

    /// How long an idle worker is kept before it is dropped, in seconds. 0 drops it as soon as it is idle.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,

    /// Requests a worker serves before it is recycled. 0 means no limit (the `ttl` still applies).
    #[serde(default = "default_max_requests")]
    pub max_requests: u64,

    /// Requests one instance serves at once, for a WASI 0.3 handler (`wasi:http/handler@0.3`), whose calls are
    /// async: 1 serves them one after another, as for a WASI 0.2 handler, which ignores the setting. Requests
    /// sharing an instance share its failures: a trap or a timeout ends every request on it. At most 1024.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u64,

    /// Run with a smaller memory cap and give idle memory back eagerly.
    #[serde(default)]
    pub low_memory: bool,

    /// Cap on each worker's linear memory, in MiB: growing past it fails inside the app, never in the host.
    /// Default 128, or 32 with `lowMemory`; at most 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,

    /// Largest request body passed to a worker, in bytes; a larger one answers 413. Default 32 MiB.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: u64,

    /// Hosts the app may call through `wasi:http/outgoing-handler`, as `host` or `host:port` (`*` allows any
    /// host). Every other outbound request is denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_outbound_hosts: Vec<String>,

    /// Environment variables given to the app. The host's own environment is never passed through.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,

    /// Rules that forward matching requests to an upstream instead of a worker; the first match wins.
    #[serde(default, skip_serializing_if = "ProxyRules::is_empty")]
    pub proxy: ProxyRules,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}
fn default_ttl() -> u64 {
    DEFAULT_TTL_SECS
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_max_requests() -> u64 {
    DEFAULT_MAX_REQUESTS
}
fn default_max_concurrent_requests() -> u64 {
    DEFAULT_MAX_CONCURRENT_REQUESTS
}
fn default_max_body_size() -> u64 {
    DEFAULT_MAX_BODY_SIZE
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            schema: None,
            entrypoint: None,
            timeout: DEFAULT_TIMEOUT_SECS,
            ttl: DEFAULT_TTL_SECS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT_SECS,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            low_memory: false,
            max_memory_mb: None,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            allowed_outbound_hosts: Vec::new(),
            env: BTreeMap::new(),
            proxy: ProxyRules::default(),
        }
    }
}

/// One proxy rule: requests whose path matches `pattern` go to `target`. This is the array form of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyRule {
    /// A regular expression matched against the path the app sees.
    pub pattern: String,
    /// The upstream `http` or `https` URL; `${NAME}` is replaced from the host environment.
    pub target: String,
    /// The forwarded path, with `$1`, `${1}` or `$name` capture references. Without it the path is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
    /// Send the target's authority as `Host` (and `Origin`) instead of the client's.
    #[serde(default)]
    pub change_origin: bool,
    /// Verify the target's TLS certificate.
    #[serde(default = "default_secure")]
    pub secure: bool,
    /// Extra request headers, applied last.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Seconds the upstream has to answer before the client gets 504. Default: the app's `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// A rule in Buntime's keyed form, `{"<pattern>": {...}}`: every field of [`ProxyRule`] but the pattern.
///
/// A separate type rather than a flattened one, because serde loses the field path through `flatten` and
/// config errors must name the field.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeyedRule {
    /// The upstream `http` or `https` URL; `${NAME}` is replaced from the host environment.
    target: String,
    /// The forwarded path, with `$1`, `${1}` or `$name` capture references. Without it the path is unchanged.
    #[serde(default)]
    rewrite: Option<String>,
    /// Send the target's authority as `Host` (and `Origin`) instead of the client's.
    #[serde(default)]
    change_origin: bool,
    /// Verify the target's TLS certificate.
    #[serde(default = "default_secure")]
    secure: bool,
    /// Extra request headers, applied last.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Seconds the upstream has to answer before the client gets 504. Default: the app's `timeout`.
    #[serde(default)]
    timeout: Option<u64>,
}

impl KeyedRule {
    fn with_pattern(self, pattern: String) -> ProxyRule {
        let KeyedRule {
            target,
            rewrite,
            change_origin,
            secure,
            headers,
            timeout,
        } = self;
        ProxyRule {
            pattern,
            target,
            rewrite,
            change_origin,
            secure,
            headers,
            timeout,
        }
    }
}

fn default_secure() -> bool {
    true
}

/// The `proxy` rules in the order they are tried.
///
/// Written either as an object keyed by pattern (Buntime's form, tried in file order) or as an array of rules
/// with a `pattern` field; both parse to this one type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ProxyRules(pub Vec<ProxyRule>);

impl ProxyRules {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for ProxyRules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RulesVisitor;

        impl<'de> Visitor<'de> for RulesVisitor {
            type Value = ProxyRules;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object keyed by pattern, or an array of rules with a `pattern` field")
            }

            // A visitor sees the object's entries in file order, which is the order rules are tried in.
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ProxyRules, A::Error> {
                let mut rules = Vec::new();
                while let Some(pattern) = map.next_key::<String>()? {
                    if rules.iter().any(|r: &ProxyRule| r.pattern == pattern) {
                        return Err(de::Error::custom(format!("pattern {pattern:?} appears twice")));
                    }
                    let rule = map.next_value::<KeyedRule>()?;
                    rules.push(rule.with_pattern(pattern));
                }
                Ok(ProxyRules(rules))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ProxyRules, A::Error> {
                let mut rules = Vec::new();
                while let Some(rule) = seq.next_element::<ProxyRule>()? {
                    rules.push(rule);
                }
                Ok(ProxyRules(rules))
            }
        }

        deserializer.deserialize_any(RulesVisitor)
    }
}

impl JsonSchema for ProxyRules {
    fn schema_name() -> Cow<'static, str> {
        "ProxyRules".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let options = generator.subschema_for::<KeyedRule>();
        let rule = generator.subschema_for::<ProxyRule>();
        schemars::json_schema!({
            "description": "Proxy rules, tried in order: an object keyed by pattern, or an array of rules.",
            "anyOf": [
                { "type": "object", "additionalProperties": options },
                { "type": "array", "items": rule }
            ]
        })
    }
}

/// Why a `worker.config.json` was rejected: which field, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    fn at(field: &str, message: impl fmt::Display) -> Self {
        ConfigError {
            message: format!("field `{field}`: {message}"),
        }
    }
}

impl WorkerConfig {
    /// Reads a version's config file; a missing file means the defaults.
    pub(crate) fn load(version_dir: &Path) -> Result<WorkerConfig, ConfigError> {
        let path = version_dir.join(CONFIG_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(WorkerConfig::default()),
            Err(e) => {
                return Err(ConfigError {
                    message: format!("cannot read {CONFIG_FILE}: {e}"),
                })
            }
        };
        if !meta.is_file() {
            return Err(ConfigError {
                message: format!("{CONFIG_FILE} is not a regular file"),
            });
        }
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError {
                message: format!(
                    "{CONFIG_FILE} is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit",
                    meta.len()
                ),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| ConfigError {
            message: format!("cannot read {CONFIG_FILE}: {e}"),
        })?;
        WorkerConfig::parse(&bytes)
    }

    /// Parses and validates the text of a config file.
    pub fn parse(bytes: &[u8]) -> Result<WorkerConfig, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: WorkerConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // serde_json names the line and column; the path names the field. For an unknown field the path
            // ends with that field, which the message names already, so the object holding it is reported.
            let mut path = e.path().to_string();
            let inner = e.into_inner();
            if inner.to_string().starts_with("unknown field") {
                path = path
                    .rsplit_once('.')
                    .map(|(parent, _)| parent.to_owned())
                    .unwrap_or_default();
            }
            match path.as_str() {
                "" | "." | "?" => ConfigError {
                    message: inner.to_string(),
                },
                _ => ConfigError::at(&path, inner),
            }
        })?;
        de.end().map_err(|e| ConfigError { message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// The cap on one worker's linear memory, in bytes.
    pub(crate) fn memory_cap_bytes(&self) -> u64 {
        let mb = self.max_memory_mb.unwrap_or(if self.low_memory {
            LOW_MEMORY_MAX_MEMORY_MB
        } else {
            DEFAULT_MAX_MEMORY_MB
        });
        mb * 1024 * 1024
    }

    /// Checks what serde cannot: that numbers are in range and that names are usable where they go.
    fn validate(&self) -> Result<(), ConfigError> {
        let timeouts = std::iter::once(("timeout".to_owned(), Some(self.timeout))).chain(
            self.proxy
                .0
                .iter()
                .enumerate()
                .map(|(i, rule)| (format!("proxy[{i}].timeout"), rule.timeout)),
        );
        for (field, secs) in timeouts {
            if let Some(secs) = secs.filter(|&secs| secs > MAX_TIMEOUT_SECS) {
                return Err(ConfigError::at(
                    &field,
                    format!("{secs} is over {MAX_TIMEOUT_SECS} seconds (a year); 0 means no timeout"),
                ));
            }
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests > MAX_CONCURRENT_REQUESTS_LIMIT {
            return Err(ConfigError::at(
                "maxConcurrentRequests",
                format!(
                    "{} is outside 1..={MAX_CONCURRENT_REQUESTS_LIMIT}",
                    self.max_concurrent_requests
                ),
            ));
        }
        if let Some(mb) = self.max_memory_mb {
            if mb == 0 || mb > MAX_MEMORY_MB_LIMIT {
                return Err(ConfigError::at(
                    "maxMemoryMb",
                    format!("{mb} is outside 1..={MAX_MEMORY_MB_LIMIT}"),
                ));
            }
        }
        for (i, host) in self.allowed_outbound_hosts.iter().enumerate() {
            let valid = host == "*" || (!host.is_empty() && http::uri::Authority::try_from(host.as_str()).is_ok());
            if !valid || host.contains(['@', '/']) {
                return Err(ConfigError::at(
                    &format!("allowedOutboundHosts[{i}]"),
                    format!("{host:?} is not a host or host:port"),
                ));
            }
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(ConfigError::at("env", format!("{name:?} is not a valid variable name")));
            }
            if value.contains('\0') {
                return Err(ConfigError::at(&format!("env.{name}"), "values cannot contain NUL"));
            }
        }
        // Proxy rules are checked where they are compiled, once per load, with the host's environment for their
        // targets: see `proxy::Rules::compile`.
        Ok(())
    }
}

/// The JSON schema of `worker.config.json`, pretty-printed with a trailing newline, as committed at the repo root.
pub(crate) fn schema_json() -> String {
    let schema = schemars::schema_for!(WorkerConfig);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        WorkerConfig::parse(text.as_bytes()).unwrap_err().message
    }

    #[test]
    fn an_empty_object_means_every_default() {
        assert_eq!(WorkerConfig::parse(b"{}").unwrap(), WorkerConfig::default());
    }

    #[test]
    fn every_field_parses_with_buntime_names() {
        let config = WorkerConfig::parse(
            br#"{"$schema": "x", "entrypoint": "dist/app.wasm", "timeout": 5, "ttl": 60, "idleTimeout": 0,
                "maxRequests": 0, "lowMemory": true, "env": {"MODE": "prod"},
                "proxy": {"^/api/(.*)$": {"target": "http://127.0.0.1:9", "rewrite": "/$1", "changeOrigin": true}}}"#,
        )
        .unwrap();
        assert_eq!(config.entrypoint.as_deref(), Some("dist/app.wasm"));
        assert_eq!(
            (config.timeout, config.ttl, config.idle_timeout, config.max_requests),
            (5, 60, 0, 0)
        );
        assert!(config.low_memory);
        assert_eq!(config.env["MODE"], "prod");
        let rule = &config.proxy.0[0];
        assert_eq!(rule.pattern, "^/api/(.*)$");
        assert_eq!(rule.rewrite.as_deref(), Some("/$1"));
        assert!(rule.change_origin);
        assert!(rule.secure, "secure defaults to true");
    }

    #[test]
    fn keyed_proxy_rules_keep_file_order() {
        let config = WorkerConfig::parse(
            br#"{"proxy": {"^/z": {"target": "http://a"}, "^/a": {"target": "http://b"}, "^/m": {"target": "http://c"}}}"#,
        )
        .unwrap();
        let patterns: Vec<_> = config.proxy.0.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(patterns, ["^/z", "^/a", "^/m"]);
    }

    #[test]
    fn array_and_keyed_proxy_rules_parse_to_the_same_rules() {
        let keyed = WorkerConfig::parse(br#"{"proxy": {"^/a": {"target": "http://x", "secure": false}}}"#).unwrap();
        let array =
            WorkerConfig::parse(br#"{"proxy": [{"pattern": "^/a", "target": "http://x", "secure": false}]}"#).unwrap();
        assert_eq!(keyed, array);
    }

    #[test]
    fn an_unknown_field_is_named_with_the_expected_ones() {
        let message = error_of(r#"{"timeOut": 5}"#);
        assert!(message.contains("unknown field `timeOut`"), "{message}");
        assert!(message.contains("timeout"), "{message}");
    }

    #[test]
    fn a_wrong_type_names_the_field_and_the_expected_type() {
        let message = error_of(r#"{"timeout": "5s"}"#);
        assert!(message.starts_with("field `timeout`:"), "{message}");
        assert!(message.contains("expected u64"), "{message}");
    }

    #[test]
    fn negative_numbers_are_rejected() {
        assert!(error_of(r#"{"ttl": -1}"#).starts_with("field `ttl`"));
    }

    #[test]
    fn a_nested_error_names_the_full_path() {
        let message = error_of(r#"{"proxy": [{"pattern": "^/a", "target": "http://x", "secure": "no"}]}"#);
        assert!(message.starts_with("field `proxy[0].secure`"), "{message}");
        let message = error_of(r#"{"proxy": {"^/a": {"target": "http://x", "bogus": 1}}}"#);
        assert!(message.contains("proxy.^/a"), "{message}");
        assert!(message.contains("unknown field `bogus`"), "{message}");
    }

    #[test]
    fn a_duplicate_keyed_pattern_is_rejected() {
        let message = error_of(r#"{"proxy": {"^/a": {"target": "http://x"}, "^/a": {"target": "http://y"}}}"#);
        assert!(message.contains("appears twice"), "{message}");
    }

    #[test]
    fn a_missing_target_is_reported() {
        assert!(error_of(r#"{"proxy": [{"pattern": "^/a"}]}"#).contains("missing field `target`"));
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let message = error_of("{\n  \"timeout\": 5,\n}");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        assert!(error_of(r#"{} {}"#).contains("trailing characters"));
    }

    #[test]
    fn invalid_env_names_are_rejected() {
        assert!(error_of(r#"{"env": {"A=B": "v"}}"#).contains("not a valid variable name"));
    }

    #[test]
    fn memory_caps_and_outbound_hosts_are_checked() {
        assert!(error_of(r#"{"maxMemoryMb": 0}"#).contains("field `maxMemoryMb`"));
        assert!(error_of(r#"{"maxMemoryMb": 5000}"#).contains("outside 1..=4096"));
        assert!(error_of(r#"{"maxConcurrentRequests": 0}"#).contains("field `maxConcurrentRequests`"));
        assert!(error_of(r#"{"maxConcurrentRequests": 1025}"#).contains("outside 1..=1024"));
        assert!(error_of(r#"{"allowedOutboundHosts": ["http://x.com"]}"#).contains("allowedOutboundHosts[0]"));
        assert!(error_of(r#"{"allowedOutboundHosts": ["a.com", "user@b.com"]}"#).contains("allowedOutboundHosts[1]"));
        let config = WorkerConfig::parse(br#"{"allowedOutboundHosts": ["a.com", "127.0.0.1:8080", "*"]}"#).unwrap();
        assert_eq!(config.allowed_outbound_hosts.len(), 3);
        assert_eq!(
            WorkerConfig::default().memory_cap_bytes(),
            DEFAULT_MAX_MEMORY_MB * 1024 * 1024
        );
        let low = WorkerConfig::parse(br#"{"lowMemory": true}"#).unwrap();
        assert_eq!(low.memory_cap_bytes(), LOW_MEMORY_MAX_MEMORY_MB * 1024 * 1024);
        let set = WorkerConfig::parse(br#"{"lowMemory": true, "maxMemoryMb": 64}"#).unwrap();
        assert_eq!(set.memory_cap_bytes(), 64 * 1024 * 1024);
    }

    #[test]
    fn a_timeout_too_long_for_a_deadline_is_rejected() {
        // `{"timeout": 18446744073709551615}` was accepted, then every request panicked computing its deadline
        // (`Instant + Duration` overflows); found while writing tests/properties.rs.
        let message = error_of(r#"{"timeout": 18446744073709551615}"#);
        assert!(
            message.starts_with("field `timeout`: 18446744073709551615 is over"),
            "{message}"
        );
        let message = error_of(r#"{"proxy": [{"pattern": "^/", "target": "http://a", "timeout": 31536001}]}"#);
        assert!(message.starts_with("field `proxy[0].timeout`"), "{message}");
        let message = error_of(
            r#"{"proxy": {"^/a": {"target": "http://a"}, "^/b": {"target": "http://a", "timeout": 31536001}}}"#,
        );
        assert!(message.starts_with("field `proxy[1].timeout`"), "{message}");
        let config = WorkerConfig::parse(format!(r#"{{"timeout": {MAX_TIMEOUT_SECS}}}"#).as_bytes()).unwrap();
        assert_eq!(config.timeout, MAX_TIMEOUT_SECS);
    }

    #[test]
    fn the_effective_config_serializes_with_defaults_filled_in() {
        let value = serde_json::to_value(WorkerConfig::default()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"timeout": 30, "ttl": 0, "idleTimeout": 60, "maxRequests": 1000,
                               "maxConcurrentRequests": 16, "lowMemory": false, "maxBodySize": 33554432})
        );
    }

    #[test]
    fn an_unknown_field_in_an_array_rule_is_rejected() {
        let message = error_of(r#"{"proxy": [{"pattern": "^/a", "target": "http://x", "bogus": 1}]}"#);
        assert!(message.contains("unknown field `bogus`"), "{message}");
    }
}
