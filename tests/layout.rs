//! The source trees have no import cycle: the graph "module A names module B" over the modules of
//! `src/` (and of `model/src/`) (one per file; `crate::x::y` and `super::y` paths in code outside `#[cfg(test)]`
//! blocks) is acyclic. A module naming one of its own ancestors (a child using its parent's
//! `mod.rs` items) is not an edge: the parent declares the child, that is the tree itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path of a file under `src/`: `src/sft/data.rs` -> `sft::data`, `src/sft/mod.rs` -> `sft`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

fn collect(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.insert(module_of(p.strip_prefix(root).unwrap()), text);
        }
    }
}

/// Code lines before the first `#[cfg(test)]`, comments removed.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The longest known module that `path` (a `::`-separated path from the crate root) starts with.
fn resolve(path: &[&str], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// Every `a::b::c` path (idents and `::`) following `prefix` in `code`, expanding one level of
/// `{..}` groups (`use crate::{a::X, b}`).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let take = |s: &str| -> Vec<String> {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(s.len());
            s[..end]
                .split("::")
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        let head = take(rest);
        let after = &rest[head
            .iter()
            .map(|h| h.len() + 2)
            .sum::<usize>()
            .min(rest.len())..];
        if after.starts_with('{') || (head.is_empty() && rest.starts_with('{')) {
            let body = &rest[rest.find('{').unwrap() + 1..];
            let body = &body[..body.find('}').unwrap_or(body.len())];
            for item in body.split(',') {
                let mut p = head.clone();
                p.extend(take(item.trim()));
                out.push(p);
            }
        } else {
            out.push(head);
        }
    }
    out
}

/// The modules of the crate whose sources are under `root`; panics naming a cycle if the
/// graph "module A names module B" has one.
fn assert_no_import_cycle(root: &Path) -> BTreeSet<String> {
    let mut files = BTreeMap::new();
    collect(root, root, &mut files);
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &files {
        let code = code(text);
        let parent: Vec<&str> = if m.is_empty() {
            vec![]
        } else {
            m.split("::").collect()
        };
        let mut targets = vec![];
        for p in paths_after(&code, "crate::") {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            targets.extend(resolve(&p, &modules));
        }
        // `super::x` in module `a::b` (file a/b.rs or a/b/mod.rs) is `a::x`.
        let base: Vec<&str> = parent[..parent.len().saturating_sub(1)].to_vec();
        for p in paths_after(&code, "super::") {
            let mut full: Vec<&str> = base.clone();
            full.extend(p.iter().map(String::as_str));
            targets.extend(resolve(&full, &modules));
        }
        for t in targets {
            let ancestor = t.is_empty() || *m == t || m.starts_with(&format!("{t}::"));
            let descendant = m.is_empty() || t.starts_with(&format!("{m}::"));
            if !ancestor && !descendant {
                edges.entry(m.clone()).or_default().insert(t);
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let start = stack.iter().position(|x| x == m).unwrap();
                let mut cycle = stack[start..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for t in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(t, edges, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in &modules {
        if let Some(cycle) = visit(m, &edges, &mut state, &mut vec![]) {
            panic!("import cycle in {}: {}", root.display(), cycle.join(" -> "));
        }
    }
    modules
}

#[test]
fn model_src_has_no_import_cycle() {
    let modules = assert_no_import_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("model/src"));
    // The backend glue (custom ops and their autodiff) has a module of its own.
    assert!(
        modules.contains("backend"),
        "model/src has no module backend"
    );
}

#[test]
fn src_has_no_import_cycle() {
    let modules = assert_no_import_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The layout the README describes: both learners in the same shape beside `learn/`.
    for m in [
        "learn::run",
        "learn::trainer",
        "learn::optim",
        "learn::schedule",
        "learn::checkpoint",
        "sft::recipe",
        "sft::plan",
        "sft::step",
        "sft::learner",
        "grpo::recipe",
        "grpo::plan",
        "grpo::step",
        "grpo::learner",
    ] {
        assert!(modules.contains(m), "src/ has no module {m}");
    }
}
