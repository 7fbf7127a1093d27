//! The crate's module structure: no module imports in a circle, neither file by file nor
//! between top-level modules (front-ends depend on the datapath, never on one another; the
//! sidecar and the relay compose, nothing below them imports them back).
//!
//! Read from the sources: every `crate::a::b` and `super::x` path outside comments and test
//! modules is an edge to the longest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`relay::bind`) → its source without comment lines and test modules.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("below src");
        let name = rel.with_extension("").to_string_lossy().replace('/', "::");
        let name = name.strip_suffix("::mod").unwrap_or(&name).to_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(name, code);
    }
    out
}

/// Every `prefix` path in `code`, as its segments (`crate::relay::bind::X` → relay, bind, X).
fn paths<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    code.match_indices(prefix)
        .filter(|(at, _)| {
            // A whole word: not `my_crate::`.
            !code[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            code[at + prefix.len()..]
                .split("::")
                .map(|s| {
                    let end = s
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(s.len());
                    &s[..end]
                })
                .take_while(|s| !s.is_empty())
                .collect()
        })
        .collect()
}

fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, code) in mods {
        let parent = name.rsplit_once("::").map(|(p, _)| p.to_owned());
        let mut targets: Vec<Vec<String>> = paths(code, "crate::")
            .into_iter()
            .map(|p| p.into_iter().map(str::to_owned).collect())
            .collect();
        if let Some(parent) = &parent {
            for p in paths(code, "super::") {
                let mut full: Vec<String> = parent.split("::").map(str::to_owned).collect();
                full.extend(p.into_iter().map(str::to_owned));
                targets.push(full);
            }
        }
        for t in targets {
            let found = (1..=t.len())
                .rev()
                .map(|k| t[..k].join("::"))
                .find(|m| mods.contains_key(m));
            if let Some(m) = found.filter(|m| m != name) {
                out.entry(name.clone()).or_default().insert(m);
            }
        }
    }
    out
}

/// The cycles of `graph` (its strongly connected components of more than one node).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two nodes are in one cycle if each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let nodes: BTreeSet<&String> = graph.keys().chain(graph.values().flatten()).collect();
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for n in &nodes {
        let cycle: Vec<String> = nodes
            .iter()
            .filter(|m| reachable[*n].contains(**m) && reachable[**m].contains(*n))
            .map(|m| (*m).clone())
            .collect();
        if cycle.len() > 1 && !out.contains(&cycle) {
            out.push(cycle);
        }
    }
    out
}

#[test]
fn no_module_imports_in_a_circle() {
    let mods = modules();
    assert!(mods.len() > 40, "read the sources: {:?}", mods.keys());
    let files = edges(&mods);
    // The oracle sees a circle where there is one: the composition root importing a front-end
    // and that front-end importing it back.
    let mut positive = files.clone();
    positive
        .entry("socks5::server".into())
        .or_default()
        .insert("sidecar::service".into());
    assert!(
        !cycles(&positive).is_empty(),
        "the check cannot see a circle: {:?}",
        files.get("sidecar::service")
    );
    assert_eq!(
        cycles(&files),
        Vec::<Vec<String>>::new(),
        "modules in a circle"
    );
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_owned();
    let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in &files {
        for t in to {
            if top(from) != top(t) {
                tops.entry(top(from)).or_default().insert(top(t));
            }
        }
    }
    assert_eq!(
        cycles(&tops),
        Vec::<Vec<String>>::new(),
        "top-level modules in a circle"
    );
    // The front-ends share the datapath and know nothing of each other or of the sidecar.
    for front in ["socks5", "intercept"] {
        let deps = tops.get(front).cloned().unwrap_or_default();
        assert!(deps.contains("datapath"), "{front} -> {deps:?}");
        for other in ["socks5", "intercept", "sidecar", "relay"] {
            assert!(!deps.contains(other), "{front} imports {other}");
        }
    }
}
