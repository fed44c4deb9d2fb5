//! The dependency rule of `lib.rs`, checked: every `crate::` path in `src/` points to a lower layer than the file
//! it is written in, or into the file's own module. A module is placed on the most specific layer that names it
//! (`backends::wasm` before `backends`), so one rule covers the top-level folders and the peers inside
//! `backends`. Paths are read from the source text, `use` lines and inline paths alike, after comments are
//! stripped; `super::super::` is refused, since it could climb out of a module unseen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// From the top down. Modules on one line are peers: neither may import the other.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["server"],
    &["routes"],
    &["metrics"],
    &["backends::static_files", "backends::proxy", "backends::wasm"],
    &["backends"],
    &["error"],
    &["deploy"],
    &["negotiate", "log_fields", "guarded_body", "core_local"],
];

/// The layer and the module that `path` (`a::b::c`, without `crate::`) belongs to.
fn place(path: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (rank, modules) in LAYERS.iter().enumerate() {
        for module in modules.iter() {
            let inside = path == *module || path.starts_with(&format!("{module}::"));
            if inside && best.is_none_or(|(_, m)| module.len() > m.len()) {
                best = Some((rank, module));
            }
        }
    }
    best
}

/// `src/backends/wasm/pool.rs` -> `backends::wasm::pool`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("the file is under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The text with `//` comments removed (doc comments included), so that prose naming a module does not count.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string literal (a URL) cuts the rest of that line too, which only hides paths.
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path that follows `crate::`, with braces expanded one level at a time:
/// `crate::{a::b, c::{d, e}}` gives `a::b`, `c::d` and `c::e`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `mycrate::`
        }
        expand("", rest, &mut paths);
    }
    paths
}

fn expand(prefix: &str, text: &str, out: &mut Vec<String>) {
    if let Some(inner) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(prefix, inner[start..i].trim(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(prefix, inner[start..i].trim(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let name: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let name = name.trim_end_matches(':');
    let path = if prefix.is_empty() {
        name.to_owned()
    } else if name.is_empty() || name == "self" {
        prefix.to_owned()
    } else {
        format!("{prefix}::{name}")
    };
    let after = &text[name.len()..];
    if let Some(group) = after.strip_prefix("::") {
        if group.starts_with('{') {
            expand(&path, group, out);
            return;
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("src is readable").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every import in `src/` that breaks the rule, as `file: path (why)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = BTreeSet::new();
    for file in files {
        let module = module_of(src, &file);
        let shown = file.strip_prefix(src).unwrap().display().to_string();
        let Some((rank, home)) = place(&module) else {
            // `lib.rs`, `main.rs` and this file sit above every layer.
            continue;
        };
        let code = code_of(&std::fs::read_to_string(&file).expect("a source file is readable"));
        if code.contains("super::super::") {
            found.insert(format!("{shown}: `super::super::` (name the module with `crate::`)"));
        }
        for path in crate_paths(&code) {
            let Some((target_rank, target)) = place(&path) else {
                found.insert(format!("{shown}: crate::{path} (on no layer; add it to LAYERS)"));
                continue;
            };
            if target == home || target_rank > rank {
                continue;
            }
            let why = if target_rank == rank {
                "a peer"
            } else {
                "a higher layer"
            };
            found.insert(format!("{shown}: crate::{path} ({why})"));
        }
    }
    found.into_iter().collect()
}

#[test]
fn imports_only_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "imports against lib.rs's layers:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_reads_grouped_and_inline_paths() {
    let code =
        code_of("use crate::{a::b, c::{d, self}};\n// crate::not_this\nlet x = crate::e::f(1);\nuse mycrate::g;");
    assert_eq!(crate_paths(&code), ["a::b", "c::d", "c", "e::f"]);
}

#[test]
fn a_module_is_placed_on_its_most_specific_layer() {
    assert_eq!(place("backends::wasm::pool::Pool"), Some((4, "backends::wasm")));
    assert_eq!(place("backends::stall"), Some((5, "backends")));
    assert_eq!(place("deploy::registry"), Some((7, "deploy")));
    assert_eq!(place("backendsx"), None);
}
