//! The agent's modules form no import circle: each top-level module of `agent/src` may use
//! the ones below it, never one that (through others) uses it back. Checked by a test, so a
//! circle fails `cargo xtask test` the day it is written.
//!
//! A module's uses are every `crate::NAME` path in its files, comments and `#[cfg(test)]`
//! modules left out, and the names inside `use crate::{...}` groups.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Top-level module → the top-level modules it uses.
pub fn uses(src: &Path) -> std::io::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(rel) = path.strip_prefix(src) else {
                continue;
            };
            let rel = rel.to_string_lossy();
            let Some(rel) = rel.strip_suffix(".rs") else {
                continue;
            };
            let top = rel.split('/').next().unwrap_or(rel);
            // The crate roots and test files are not layers.
            if matches!(top, "lib" | "main") || rel.split('/').any(|p| p.starts_with("tests")) {
                continue;
            }
            let text = strip(&fs::read_to_string(&path)?);
            let used = graph.entry(top.to_owned()).or_default();
            for name in crate_paths(&text) {
                if name != top {
                    used.insert(name);
                }
            }
        }
    }
    Ok(graph)
}

/// The text without comments and without a trailing `#[cfg(test)] mod tests { ... }`.
fn strip(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path, and of every name in a `use crate::{...}` group.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: depth 0 items.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let name = ident(&group[j..]);
                        if !name.is_empty() {
                            names.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The circles of `graph` (strongly connected components of more than one module).
pub fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm, iterative enough for a graph of a few dozen nodes.
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !graph.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_modules_form_no_circle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let graph = uses(&src).unwrap();
        assert!(graph.len() > 20, "modules found: {:?}", graph.keys());
        let circles = circles(&graph);
        assert!(circles.is_empty(), "import circles: {circles:?}");
    }

    #[test]
    fn a_circle_is_found_and_group_imports_count() {
        let text = "use crate::{a::X, b::{c, d}};\nfn f() { crate::e::g(); } // crate::z";
        let names = crate_paths(&strip(text));
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["a", "b", "e"].map(String::from)
        );
        let mut graph = BTreeMap::new();
        for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            graph
                .entry(from.to_owned())
                .or_insert_with(BTreeSet::new)
                .insert(to.to_owned());
        }
        graph.insert("d".to_owned(), BTreeSet::new());
        assert_eq!(circles(&graph), vec![vec!["a", "b", "c"]]);
    }
}
