//! The layering of `src/` (ARCHITECTURE.md, "Layers"): which top-level module may import
//! which, and no import cycles between top-level modules.
//!
//! Reads every `crate::…` path of `src/**/*.rs` (`use` trees and paths written inline; comments
//! and string literals removed) and of the code `build.rs` generates into `OUT_DIR`, builds the
//! graph of top-level modules, and fails naming the import that goes up a layer, or the cycle
//! with one import per step. The generated `rpc` modules (`proto::<service>::rpc`,
//! `proto::METHODS`, `proto::method_index`: method descriptors made of `net::method` types,
//! stubs over `net::Channel`) count as part of `net`, which they are generated for; the
//! generated messages are `proto` and import nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import modules of its own layer (the cycle check
/// keeps those imports one-way) and of lower layers, never of a higher one. Keep this list
/// and ARCHITECTURE.md's "Layers" section the same.
const LAYERS: &[&[&str]] = &[
    // Nothing of the crate above them; pure (no IO, no threads) but for `timer::service`,
    // the one thread that imports nothing of the product.
    &["util", "proto", "lincheck", "timer"],
    &["wire", "gossip", "netdb", "health", "secrets"],
    &["ca"],
    &["net"],
    &["raft", "store"],
    &[
        "replication",
        "kv",
        "ca_rpc",
        "state_dir",
        "dns",
        "networkdb",
    ],
    &["control", "dispatcher", "orchestrator", "agent"],
    &["manager"],
    &["cli"],
];

/// The known exceptions: imports that go up a layer. None today: the last ones (the
/// components proposing through `manager::state` and borrowing `kv`'s read barrier) went
/// when `replication` took both below them (issue 13 §3). Nothing may join this list
/// without a reason written beside it; an entry no longer imported fails the test, so the
/// list only shrinks.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

/// One `crate::…` path found in a file.
#[derive(Clone, Debug)]
struct Import {
    /// The top-level module whose code holds it.
    from: String,
    /// The path after `crate::`.
    path: String,
    file: PathBuf,
}

impl Import {
    /// The top-level module it names (the generated RPC glue counts as `net`).
    fn to(&self) -> String {
        let segments: Vec<&str> = self.path.split("::").collect();
        let generated_rpc = segments[0] == "proto"
            && (matches!(segments.get(1), Some(&"METHODS" | &"method_index"))
                || segments.get(2) == Some(&"rpc"));
        if generated_rpc {
            "net".to_string()
        } else {
            segments[0].to_string()
        }
    }

    fn is_known_exception(&self) -> bool {
        KNOWN_UPWARD
            .iter()
            .any(|(from, path)| self.from == *from && self.path == *path)
    }

    fn describe(&self) -> String {
        format!(
            "{} → {}: crate::{} in {}",
            self.from,
            self.to(),
            self.path,
            self.file.display()
        )
    }
}

/// `text` without comments, and with every string and character literal emptied.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i = skip_block_comment(&chars, i);
        } else if c == 'r' && matches!(next, Some('"' | '#')) && !ident_before(&chars, i) {
            i = skip_raw_string(&chars, i);
            out.push_str("\"\"");
        } else if c == '"' {
            i = skip_string(&chars, i);
            out.push_str("\"\"");
        } else if c == '\'' && is_char_literal(&chars, i) {
            i = skip_char_literal(&chars, i);
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

fn skip_block_comment(chars: &[char], start: usize) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i + 1 < chars.len() {
        if chars[i] == '/' && chars[i + 1] == '*' {
            depth += 1;
            i += 2;
        } else if chars[i] == '*' && chars[i + 1] == '/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    chars.len()
}

fn skip_raw_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if chars.get(i) != Some(&'"') {
        return start + 1; // `r#ident`, not a string
    }
    i += 1;
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    chars.len()
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    chars.len()
}

/// `'x'` or `'\…'` (a lifetime or a label is not one).
fn is_char_literal(chars: &[char], i: usize) -> bool {
    match chars.get(i + 1) {
        Some('\\') => true,
        Some(_) => chars.get(i + 2) == Some(&'\''),
        None => false,
    }
}

fn skip_char_literal(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '\'' => return i + 1,
            _ => i += 1,
        }
    }
    chars.len()
}

/// Every path `code` names through `crate::` (use trees expanded), and through `super::`
/// chains that climb out of `module` (its path from the crate root; inline `mod x { … }`
/// blocks add to it) to the crate root.
fn crate_paths(code: &str, module: &[String]) -> Vec<String> {
    let bytes = code.as_bytes();
    let mut paths = Vec::new();
    // Brace depth, and the depths at which the inline modules around `i` opened.
    let mut depth = 0usize;
    let mut inline_modules: Vec<usize> = Vec::new();
    let mut module_opens = false;
    let mut i = 0;
    while i < bytes.len() {
        if is_ident_byte(bytes[i]) && i > 0 && (is_ident_byte(bytes[i - 1]) || bytes[i - 1] == b'$')
        {
            i += 1;
            continue;
        }
        if code[i..].starts_with("crate::") {
            i += "crate::".len();
            parse_tree(bytes, &mut i, "", &mut paths);
        } else if code[i..].starts_with("super::") {
            let mut supers = 0;
            while code[i..].starts_with("super::") {
                supers += 1;
                i += "super::".len();
            }
            let mut found = Vec::new();
            parse_tree(bytes, &mut i, "", &mut found);
            if supers >= module.len() + inline_modules.len() {
                paths.extend(found);
            }
        } else if code[i..].starts_with("mod ") {
            i += "mod ".len();
            skip_space(bytes, &mut i);
            while i < bytes.len() && is_ident_byte(bytes[i]) {
                i += 1;
            }
            skip_space(bytes, &mut i);
            module_opens = bytes.get(i) == Some(&b'{');
        } else {
            match bytes[i] {
                b'{' => {
                    depth += 1;
                    if module_opens {
                        inline_modules.push(depth);
                        module_opens = false;
                    }
                }
                b'}' => {
                    if inline_modules.last() == Some(&depth) {
                        inline_modules.pop();
                    }
                    depth = depth.saturating_sub(1);
                }
                _ => {}
            }
            i += 1;
        }
    }
    paths.retain(|p| !p.is_empty() && p != "self");
    paths
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn skip_space(bytes: &[u8], i: &mut usize) {
    while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

/// Parses a use tree (or a plain path) at `i`, pushing `prefix` + each full path.
fn parse_tree(bytes: &[u8], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
    skip_space(bytes, i);
    if bytes.get(*i) == Some(&b'{') {
        *i += 1;
        loop {
            skip_space(bytes, i);
            match bytes.get(*i) {
                Some(b'}') => {
                    *i += 1;
                    return;
                }
                Some(b',') => *i += 1,
                Some(_) => {
                    let before = *i;
                    parse_tree(bytes, i, prefix, out);
                    if *i == before {
                        *i += 1; // not a path: step over it
                    }
                }
                None => return,
            }
        }
    }
    let mut path = prefix.to_string();
    loop {
        let start = *i;
        if bytes.get(*i) == Some(&b'*') {
            *i += 1;
        } else {
            while *i < bytes.len() && is_ident_byte(bytes[*i]) {
                *i += 1;
            }
        }
        if *i == start {
            break;
        }
        if !path.is_empty() {
            path.push_str("::");
        }
        path.push_str(std::str::from_utf8(&bytes[start..*i]).expect("ASCII identifier"));
        if bytes[*i..].starts_with(b"::") {
            *i += 2;
            if bytes.get(*i) == Some(&b'{') {
                parse_tree(bytes, i, &path, out);
                return;
            }
        } else {
            break;
        }
    }
    if path.len() > prefix.len() {
        out.push(path);
    }
    // `path as alias`: the alias is no path.
    let mut after = *i;
    skip_space(bytes, &mut after);
    if bytes[after..].starts_with(b"as")
        && bytes.get(after + 2).is_some_and(u8::is_ascii_whitespace)
    {
        *i = after + 2;
        skip_space(bytes, i);
        while *i < bytes.len() && is_ident_byte(bytes[*i]) {
            *i += 1;
        }
    }
}

/// The module path of a file under `src/` (`agent/session.rs` → `agent::session`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut segments: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    segments
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The imports of the crate's own sources.
fn source_imports(src: &Path) -> Vec<Import> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut imports = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src/");
        let module = module_of(relative);
        // The crate root and the binary declare modules; they are not one.
        if module.len() == 1 && (module[0] == "lib" || module[0] == "main") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        for path in crate_paths(&code_only(&text), &module) {
            imports.push(Import {
                from: module[0].clone(),
                path,
                file: file.clone(),
            });
        }
    }
    imports
}

/// The imports of the code `build.rs` generated: messages are `proto`, `rpc` modules `net`.
fn generated_imports(out_dir: &Path) -> Vec<Import> {
    let mut files = Vec::new();
    rust_files(out_dir, &mut files);
    assert!(
        !files.is_empty(),
        "no generated code in {}",
        out_dir.display()
    );
    let mut imports = Vec::new();
    for file in files {
        let code = code_only(&std::fs::read_to_string(&file).expect("readable generated code"));
        let (messages, rpc) = split_rpc_module(&code, &file);
        // `flotilla.<package>.rs` is included as `proto::<package>`.
        let name = file.file_stem().map(|s| s.to_string_lossy().into_owned());
        let package = name
            .as_deref()
            .and_then(|n| n.rsplit('.').next())
            .unwrap_or("");
        let module = vec!["proto".to_string(), package.to_string()];
        for (from, part) in [("proto", messages), ("net", rpc)] {
            for path in crate_paths(&part, &module) {
                imports.push(Import {
                    from: from.to_string(),
                    path,
                    file: file.clone(),
                });
            }
        }
    }
    imports
}

/// A generated file's code outside its `pub mod rpc { … }`, and inside it. The method table
/// (`rpc_methods.rs`) is RPC glue as a whole.
fn split_rpc_module(code: &str, file: &Path) -> (String, String) {
    if file.file_name().is_some_and(|n| n == "rpc_methods.rs") {
        return (String::new(), code.to_string());
    }
    let Some(start) = code.find("pub mod rpc {") else {
        return (code.to_string(), String::new());
    };
    let mut depth = 0usize;
    let mut end = code.len();
    for (offset, c) in code[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = start + offset + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    let messages = format!("{}{}", &code[..start], &code[end..]);
    (messages, code[start..end].to_string())
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The import graph between top-level modules: each edge with the imports behind it.
type Graph = BTreeMap<String, BTreeMap<String, Vec<Import>>>;

fn graph(imports: &[Import]) -> Graph {
    let mut graph = Graph::new();
    for import in imports {
        let to = import.to();
        graph.entry(import.from.clone()).or_default();
        if to != import.from {
            graph
                .entry(import.from.clone())
                .or_default()
                .entry(to)
                .or_default()
                .push(import.clone());
        }
    }
    graph
}

/// Imports that go to a higher layer, or from or to a module in no layer.
fn layer_violations(imports: &[Import]) -> Vec<String> {
    let mut violations = BTreeSet::new();
    for import in imports.iter().filter(|i| !i.is_known_exception()) {
        let to = import.to();
        match (layer_of(&import.from), layer_of(&to)) {
            (Some(from_layer), Some(to_layer)) if to_layer > from_layer => {
                violations.insert(format!(
                    "an import goes up from layer {from_layer} to layer {to_layer}: {}",
                    import.describe()
                ));
            }
            (Some(_), Some(_)) => {}
            (None, _) => {
                violations.insert(format!("`{}` is in no layer", import.from));
            }
            (_, None) => {
                violations.insert(format!("`{to}` is in no layer ({})", import.describe()));
            }
        }
    }
    violations.into_iter().collect()
}

/// A cycle of the graph without the known exceptions, as the imports that make it.
fn find_cycle(graph: &Graph) -> Option<Vec<Import>> {
    let edges: BTreeMap<&str, Vec<(&str, &Import)>> = graph
        .iter()
        .map(|(from, targets)| {
            let kept = targets
                .iter()
                .filter_map(|(to, imports)| {
                    let import = imports.iter().find(|i| !i.is_known_exception())?;
                    Some((to.as_str(), import))
                })
                .collect();
            (from.as_str(), kept)
        })
        .collect();
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = cycle_from(start, &edges, &mut path, &mut done) {
            return Some(cycle);
        }
    }
    None
}

/// Depth-first search: `path` is the chain of imports from the search's root.
fn cycle_from<'a>(
    node: &'a str,
    edges: &BTreeMap<&'a str, Vec<(&'a str, &'a Import)>>,
    path: &mut Vec<&'a Import>,
    done: &mut BTreeSet<&'a str>,
) -> Option<Vec<Import>> {
    if done.contains(node) {
        return None;
    }
    if let Some(position) = path.iter().position(|import| import.from == node) {
        return Some(path[position..].iter().map(|i| (*i).clone()).collect());
    }
    for (to, import) in edges.get(node).into_iter().flatten() {
        path.push(import);
        if let Some(cycle) = cycle_from(to, edges, path, done) {
            return Some(cycle);
        }
        path.pop();
    }
    done.insert(node);
    None
}

fn crate_imports() -> Vec<Import> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut imports = source_imports(&src);
    imports.extend(generated_imports(Path::new(env!("OUT_DIR"))));
    imports
}

#[test]
fn imports_never_go_up_a_layer() {
    let violations = layer_violations(&crate_imports());
    assert!(
        violations.is_empty(),
        "imports against the layers (ARCHITECTURE.md, \"Layers\"): move what the lower \
         module needs down, or change the layers here and there:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    if let Some(cycle) = find_cycle(&graph(&crate_imports())) {
        let steps: Vec<String> = cycle.iter().map(Import::describe).collect();
        panic!(
            "an import cycle between top-level modules:\n  {}",
            steps.join("\n  ")
        );
    }
}

#[test]
fn every_known_exception_is_still_imported() {
    let imports = crate_imports();
    for (from, path) in KNOWN_UPWARD {
        assert!(
            imports.iter().any(|i| i.from == *from && i.path == *path),
            "{from} no longer imports crate::{path}: remove it from KNOWN_UPWARD here and from \
             ARCHITECTURE.md"
        );
    }
}

#[test]
fn every_top_level_module_is_in_exactly_one_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f.strip_prefix(&src).expect("under src/"))[0].clone())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    for module in &modules {
        let layers = LAYERS
            .iter()
            .filter(|l| l.contains(&module.as_str()))
            .count();
        assert_eq!(layers, 1, "`{module}` must be in exactly one layer");
    }
    for module in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            modules.contains(*module),
            "`{module}` is in LAYERS but src/ has no such module"
        );
    }
}

// The checker itself: it must see what it is meant to catch.

fn parse(code: &str, file: &str) -> Vec<String> {
    let module = module_of(Path::new(file));
    crate_paths(&code_only(code), &module)
}

#[test]
fn use_trees_inline_paths_and_escaping_supers_are_read() {
    let code = r##"
        use crate::{a::b, c::{d, e::{self as f, g}}};
        use crate::h::*; // crate::commented
        /* crate::block /* nested crate::x */ */
        let s = "crate::in_string"; let c = '"'; let r = r#"crate::raw"#;
        fn k<'a>(x: &'a str) { crate::i::j(x); super::super::l::m(); super::n::o(); }
        mod tests { use super::super::p; fn t() { {} super::super::super::u::v(); } }
        fn w() { super::super::y::z(); }
    "##;
    let paths = parse(code, "p/q.rs");
    assert_eq!(
        paths,
        vec![
            "a::b",
            "c::d",
            "c::e::self",
            "c::e::g",
            "h::*",
            "i::j",
            "l::m",
            "u::v",
            "y::z"
        ],
        "super::n from p::q, and super::super from p::q::tests, stay inside p"
    );
}

#[test]
fn generated_rpc_glue_counts_as_net() {
    let import = |path: &str| Import {
        from: "x".into(),
        path: path.into(),
        file: PathBuf::new(),
    };
    assert_eq!(import("proto::ca::rpc::GET_ROOT_CA").to(), "net");
    assert_eq!(import("proto::method_index").to(), "net");
    assert_eq!(import("proto::ca::GetRootCaRequest").to(), "proto");
    let code = "pub struct M { x: crate::proto::wire::Envelope }\n\
                pub mod rpc { use crate::net::Channel; fn f() { if true { } } }\n\
                pub struct After;";
    let (messages, rpc) = split_rpc_module(code, Path::new("flotilla.x.rs"));
    assert!(messages.contains("Envelope") && messages.contains("After"));
    assert!(rpc.contains("crate::net::Channel") && !rpc.contains("After"));
}

#[test]
fn an_upward_import_and_a_cycle_are_reported() {
    let import = |from: &str, path: &str| Import {
        from: from.into(),
        path: path.into(),
        file: PathBuf::from(format!("src/{from}/x.rs")),
    };
    let upward = vec![import("wire", "cli::run")];
    assert_eq!(
        layer_violations(&upward).len(),
        1,
        "wire must not import cli"
    );
    let retired_exception = vec![import("control", "manager::state::propose_transaction")];
    assert_eq!(
        layer_violations(&retired_exception).len(),
        1,
        "control must propose through replication, not manager"
    );
    let cyclic = vec![
        import("control", "dispatcher::x"),
        import("dispatcher", "orchestrator::y"),
        import("orchestrator", "control::z"),
        import("orchestrator", "store::w"),
    ];
    let cycle = find_cycle(&graph(&cyclic)).expect("a three-module cycle");
    let steps: Vec<(String, String)> = cycle.iter().map(|i| (i.from.clone(), i.to())).collect();
    assert_eq!(
        steps,
        vec![
            ("control".into(), "dispatcher".into()),
            ("dispatcher".into(), "orchestrator".into()),
            ("orchestrator".into(), "control".into()),
        ]
    );
    let through_manager = vec![
        import("control", "manager::state::propose_transaction"),
        import("manager", "control::ControlApi"),
    ];
    assert!(
        find_cycle(&graph(&through_manager)).is_some(),
        "no exception hides the control ↔ manager cycle any more"
    );
}
