//! What a `.wasm` file offers, read from its bytes before anything is compiled: whether it is a component that
//! exports one of the two interfaces Marina calls (a WASI 0.2 or a WASI 0.3 HTTP handler), which one, and if
//! neither, what it is instead.
//!
//! Linking a component that is not an HTTP handler fails too, but only after a compile that can take seconds for
//! a JavaScript or Python app, and with an error about whichever import or export the linker met first: a command
//! reads as a missing export. Which handler a component is also decides which engine compiles it (see
//! [`super`]), so it must be known before the compile. Reading the top-level export section instead
//! takes a scan of section headers (nested modules are skipped unread) and names what the file does export, so the
//! version's `503` and `marina check` can say what was deployed and what would be served.

use wasmparser::{Encoding, Parser, Payload};

/// The export a wasi:http 0.2 handler has (the `wasi:http/proxy` world that `wasmtime serve` and Spin run),
/// without its version, which may be any 0.2.x.
const HTTP_HANDLER_0_2: &str = "wasi:http/incoming-handler@0.2";
/// The WASI 0.3 handler's export (the `wasi:http/service` world), likewise: the release wasmtime 48 implements is
/// 0.3.0, and a component built against a release candidate fails to link, saying so.
const HTTP_HANDLER_0_3: &str = "wasi:http/handler@0.3";
/// What Marina serves, for the messages.
const ACCEPTED: &str = "components that export wasi:http/incoming-handler@0.2.x (WASI 0.2, the wasi:http/proxy \
                        world) or wasi:http/handler@0.3.0 (WASI 0.3)";
/// A command's export: a program with a `main`, run by `wasmtime run`.
const CLI_RUN: &str = "wasi:cli/run@";
/// The most export names an error lists.
const LISTED_EXPORTS: usize = 8;

/// Which `wasi:http` handler a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handler {
    /// `wasi:http/incoming-handler@0.2.x`: one call per request, the body written before or while it returns.
    Wasi02,
    /// `wasi:http/handler@0.3.x`: an async export whose response body may be written after it returns.
    Wasi03,
}

/// Why a `.wasm` file cannot be served, told from its exports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotServable {
    #[error("not a WebAssembly component: {0}")]
    Unreadable(String),
    #[error(
        "it is a core WebAssembly module, not a component; Marina serves {ACCEPTED} (build for the wasm32-wasip2 \
         target, or wrap the module with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("it is a command (it exports {exports}), not an HTTP handler; Marina serves {ACCEPTED}")]
    Command { exports: String },
    #[error("it exports {exports}, not an HTTP handler; Marina serves {ACCEPTED}")]
    NotAHandler { exports: String },
}

/// Reads `bytes` far enough to tell whether Marina can serve them, and as which handler: a component exporting
/// `wasi:http/incoming-handler@0.2.x` or `wasi:http/handler@0.3.x`, which may still fail to compile or link (the
/// engine says why then). One exporting both is served as a 0.2 handler, the cheaper call.
pub(crate) fn check(bytes: &[u8]) -> Result<Handler, NotServable> {
    let exports = top_level_exports(bytes)?;
    if exports.iter().any(|name| name.starts_with(HTTP_HANDLER_0_2)) {
        return Ok(Handler::Wasi02);
    }
    if exports.iter().any(|name| name.starts_with(HTTP_HANDLER_0_3)) {
        return Ok(Handler::Wasi03);
    }
    let listed = list(&exports);
    if exports.iter().any(|name| name.starts_with(CLI_RUN)) {
        return Err(NotServable::Command { exports: listed });
    }
    Err(NotServable::NotAHandler { exports: listed })
}

/// The names a component exports at its top level (not those of the components and modules inside it).
fn top_level_exports(bytes: &[u8]) -> Result<Vec<String>, NotServable> {
    let unreadable = |error: wasmparser::BinaryReaderError| NotServable::Unreadable(error.message().to_owned());
    let mut parser = Parser::new(0);
    let mut at = 0;
    let mut exports = Vec::new();
    loop {
        let Some(rest) = bytes.get(at..) else {
            return Err(NotServable::Unreadable(
                "a section runs past the end of the file".into(),
            ));
        };
        let (consumed, payload) = match parser.parse(rest, true).map_err(unreadable)? {
            wasmparser::Chunk::Parsed { consumed, payload } => (consumed, payload),
            // With the whole file given as the end, the parser never waits for more.
            wasmparser::Chunk::NeedMoreData(_) => {
                return Err(NotServable::Unreadable("the file ends inside a section".into()))
            }
        };
        at += consumed;
        match payload {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } => return Err(NotServable::CoreModule),
            Payload::ComponentExportSection(section) => {
                for export in section {
                    exports.push(export.map_err(unreadable)?.name.name.to_owned());
                }
            }
            // The parser has stepped over the nested module or component; so do the bytes read.
            Payload::ModuleSection { unchecked_range, .. } | Payload::ComponentSection { unchecked_range, .. } => {
                at = unchecked_range.end
            }
            Payload::End(_) => return Ok(exports),
            _ => {}
        }
    }
}

/// `names` for a message: the first few, then how many more.
fn list(names: &[String]) -> String {
    match names.len() {
        0 => "nothing".into(),
        count if count <= LISTED_EXPORTS => names.join(", "),
        count => format!(
            "{} and {} more",
            names[..LISTED_EXPORTS].join(", "),
            count - LISTED_EXPORTS
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component with one empty instance exported under each of `names`.
    fn component_exporting(names: &[&str]) -> Vec<u8> {
        use wasm_encoder::{
            Component, ComponentExportKind, ComponentExportSection, ComponentInstanceSection, Module, ModuleSection,
        };
        let mut component = Component::new();
        // A nested module, whose own (core) exports must not be mistaken for the component's.
        component.section(&ModuleSection(&Module::new()));
        let mut instances = ComponentInstanceSection::new();
        for _ in names {
            instances.export_items(Vec::<(&str, ComponentExportKind, u32)>::new());
        }
        component.section(&instances);
        let mut exports = ComponentExportSection::new();
        for (index, name) in names.iter().enumerate() {
            exports.export(*name, ComponentExportKind::Instance, index as u32, None);
        }
        component.section(&exports);
        component.finish()
    }

    #[test]
    fn a_wasi_http_0_2_handler_is_served_whatever_its_patch_version() {
        for name in ["wasi:http/incoming-handler@0.2.0", "wasi:http/incoming-handler@0.2.6"] {
            assert_eq!(
                check(&component_exporting(&["wasi:cli/run@0.2.0", name])),
                Ok(Handler::Wasi02)
            );
        }
    }

    #[test]
    fn a_wasi_0_3_handler_is_told_apart_and_one_exporting_both_is_served_as_0_2() {
        assert_eq!(
            check(&component_exporting(&["wasi:http/handler@0.3.0"])),
            Ok(Handler::Wasi03)
        );
        assert_eq!(
            check(&component_exporting(&[
                "wasi:http/handler@0.3.0",
                "wasi:http/incoming-handler@0.2.6"
            ])),
            Ok(Handler::Wasi02)
        );
    }

    #[test]
    fn anything_else_is_named_with_what_it_exports() {
        let command = check(&component_exporting(&["wasi:cli/run@0.2.3"])).unwrap_err();
        assert!(
            command
                .to_string()
                .starts_with("it is a command (it exports wasi:cli/run@0.2.3), not an HTTP handler"),
            "{command}"
        );
        let library = check(&component_exporting(&["add", "sub"])).unwrap_err();
        assert!(
            library.to_string().starts_with(
                "it exports add, sub, not an HTTP handler; Marina serves components that export \
                 wasi:http/incoming-handler@0.2.x (WASI 0.2, the wasi:http/proxy world) or \
                 wasi:http/handler@0.3.0 (WASI 0.3)"
            ),
            "{library}"
        );
        let nothing = check(&component_exporting(&[])).unwrap_err();
        assert!(nothing.to_string().starts_with("it exports nothing, not "), "{nothing}");
        let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
        let many = check(&component_exporting(
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .unwrap_err();
        assert!(
            many.to_string()
                .starts_with("it exports f0, f1, f2, f3, f4, f5, f6, f7 and 2 more, not "),
            "{many}"
        );
    }

    #[test]
    fn a_core_module_or_a_broken_file_is_not_a_component() {
        let module = wasm_encoder::Module::new().finish();
        assert_eq!(check(&module), Err(NotServable::CoreModule));
        for broken in [
            &b""[..],
            b"\0asm",
            b"not wasm at all",
            &component_exporting(&["x"])[..20],
        ] {
            let error = check(broken).unwrap_err();
            assert!(matches!(error, NotServable::Unreadable(_)), "{broken:?}: {error:?}");
        }
    }
}
