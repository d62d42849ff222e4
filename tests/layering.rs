//! The tree's layering, checked from the source (see ARCHITECTURE.md): every import between
//! top-level modules is one ARCHITECTURE.md's module table lists in its "may import" column,
//! and every one listed is used (the map is exact); the modules import each other without a
//! cycle, nothing but `app` (and `main`) imports `app`, nothing below `api` imports `api`, and
//! only `main.rs`, `app.rs`, `telemetry.rs` and `src/api/` mention actix-web; a function over
//! 60 lines says why in its doc comment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`main` and `lib` for the crate roots).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Top-level modules a file's text refers to through `crate::…` (paths and `use` groups), or
/// through `token_broker::…` (how `main.rs`, the binary, names the library).
fn references(text: &str) -> BTreeSet<String> {
    let mut out = references_after(text, "crate::");
    out.extend(references_after(text, "token_broker::"));
    out
}

fn references_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut end = group.len();
            let mut level = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => level += 1,
                    '}' if level == 0 => {
                        end = i;
                        break;
                    }
                    '}' => level -= 1,
                    _ => {}
                }
            }
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let name = ident(item.trim());
                        if !name.is_empty() && name != "self" {
                            out.insert(name);
                        }
                        item.clear();
                    }
                    _ => item.push(c),
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let m = module_of(&f);
        let text = std::fs::read_to_string(&f).unwrap();
        let refs = g.entry(m.clone()).or_default();
        for r in references(&text) {
            if r != m {
                refs.insert(r);
            }
        }
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_reference_scanner_reads_paths_and_groups() {
    let refs =
        references("use crate::a::b;\nuse crate::{c, d::{e, f}, self};\nlet x = crate::g::h();");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["a", "c", "d", "g"].map(String::from)
    );
    let mut g = BTreeMap::new();
    g.insert("x".to_owned(), BTreeSet::from(["y".to_owned()]));
    g.insert("y".to_owned(), BTreeSet::from(["x".to_owned()]));
    assert!(find_cycle(&g).is_some(), "the cycle finder finds a cycle");
}

/// The "may import" column of ARCHITECTURE.md's module table: each module (first column,
/// `main.rs` → `main`, `cli/` → `cli`) with the names in backticks outside parentheses
/// (`—` lists none).
fn map_in_architecture_md() -> BTreeMap<String, BTreeSet<String>> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .unwrap();
    let mut map = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let module = cells[1]
            .trim_matches('`')
            .trim_end_matches('/')
            .trim_end_matches(".rs")
            .to_owned();
        let may = cells[cells.len() - 2];
        let (mut names, mut depth, mut inside, mut name) =
            (BTreeSet::new(), 0, false, String::new());
        for c in may.chars() {
            match c {
                '(' if !inside => depth += 1,
                ')' if !inside => depth -= 1,
                '`' if depth == 0 => {
                    if inside {
                        names.insert(std::mem::take(&mut name));
                    }
                    inside = !inside;
                }
                _ if inside && depth == 0 => name.push(c),
                _ => {}
            }
        }
        map.insert(module, names);
    }
    map
}

#[test]
fn every_import_is_on_the_map_and_the_map_is_exact() {
    let g = graph();
    let map = map_in_architecture_md();
    assert!(
        map.len() > 10,
        "ARCHITECTURE.md's module table not found: {map:?}"
    );
    for (m, deps) in &g {
        if m == "lib" {
            continue;
        }
        let may = map
            .get(m)
            .unwrap_or_else(|| panic!("{m} is not in ARCHITECTURE.md's module table"));
        for d in deps {
            assert!(
                may.contains(d),
                "{m} imports {d}, which ARCHITECTURE.md's \"may import\" column does not list"
            );
        }
        for d in may {
            assert!(
                deps.contains(d),
                "ARCHITECTURE.md says {m} may import {d}, but it does not: keep the map exact"
            );
        }
    }
    for m in map.keys() {
        assert!(
            g.contains_key(m),
            "ARCHITECTURE.md lists {m}, which is not a module"
        );
    }
}

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let g = graph();
    assert!(g.len() > 10, "expected the whole tree, got {:?}", g.keys());
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
    for (m, deps) in &g {
        if !matches!(m.as_str(), "main" | "lib") && m != "app" {
            assert!(!deps.contains("app"), "{m} imports app");
        }
        if !matches!(m.as_str(), "main" | "lib" | "app" | "api") {
            assert!(!deps.contains("api"), "{m} imports api (only app may)");
        }
    }
}

#[test]
fn only_the_http_edge_mentions_actix_web() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let allowed = |f: &Path| {
        let rel = f
            .strip_prefix(src())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        matches!(rel.as_str(), "main.rs" | "app.rs" | "telemetry.rs") || rel.starts_with("api/")
    };
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !allowed(f))
        .filter(|f| {
            let t = std::fs::read_to_string(f).unwrap();
            t.contains("actix_web") || t.contains("actix-web")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "actix-web outside the HTTP edge: {offenders:?}"
    );
}

/// Where a function starting at `lines[start]` (its signature) ends: the line holding its
/// closing brace at the signature's indent (rustfmt's layout); `None` for a declaration.
fn function_end(lines: &[&str], start: usize) -> Option<usize> {
    let indent = lines[start].len() - lines[start].trim_start().len();
    let open = (start..lines.len()).find(|&i| {
        let l = lines[i].trim_end();
        l.ends_with('{') || l.ends_with(';')
    })?;
    if lines[open].trim_end().ends_with(';') {
        return None;
    }
    let close = format!("{}}}", " ".repeat(indent));
    (open + 1..lines.len()).find(|&i| lines[i] == close)
}

/// The doc comment above `lines[start]` (attributes skipped), its lines joined.
fn doc_above(lines: &[&str], start: usize) -> String {
    let mut doc = Vec::new();
    for line in lines[..start].iter().rev().map(|l| l.trim_start()) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
        } else if !line.starts_with("#[") {
            break;
        }
    }
    doc.reverse();
    doc.join(" ")
}

/// No function over 60 lines without the reason in its doc comment ("Long because …"):
/// a long function is a choice that is written down, not an accident.
#[test]
fn long_functions_say_why() {
    const MAX_LINES: usize = 60;
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut unexplained = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let words: Vec<&str> = lines[i].split_whitespace().take(4).collect();
            let fn_at = words.iter().position(|w| *w == "fn");
            let is_fn = fn_at.is_some_and(|p| {
                words[..p].iter().all(|w| {
                    matches!(*w, "pub" | "async" | "const" | "unsafe") || w.starts_with("pub(")
                })
            });
            match is_fn.then(|| function_end(&lines, i)).flatten() {
                Some(end) => {
                    let len = end - i + 1;
                    if len > MAX_LINES && !doc_above(&lines, i).contains("Long because") {
                        let rel = file.strip_prefix(src()).unwrap().display().to_string();
                        unexplained.push(format!("src/{rel}:{} ({len} lines)", i + 1));
                    }
                    i = end + 1;
                }
                None => i += 1,
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "functions over {MAX_LINES} lines without \"Long because …\" in their doc comment: {unexplained:#?}"
    );
}
