//! The module layering of ARCHITECTURE.md stays true: no two of `src/`'s top-level modules depend
//! on each other, directly or around a loop (a cycle is where a name sits on the wrong floor).
//! Dependencies are read from the code (`crate::<module>` paths), not from comments or unit tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

/// Each top-level module's dependencies on the others.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in files {
        let rel = path.strip_prefix(&format!("{}/", src.display())).unwrap();
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if ["main", "lib", "test_support"].contains(&module) {
            continue;
        }
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let entry = deps.entry(module.to_owned()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                if !name.is_empty() && name != module {
                    entry.insert(name);
                }
            }
        }
    }
    deps
}

/// Whether `to` is reachable from `from`.
fn reaches(deps: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(m) = stack.pop() {
        for next in deps.get(&m).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn top_level_modules_depend_on_each_other_without_cycles() {
    let deps = graph();
    assert!(deps.len() > 30, "the source tree was not read: {deps:?}");
    let mut cycles = Vec::new();
    for (module, uses) in &deps {
        for used in uses {
            if reaches(&deps, used, module) {
                cycles.push(format!("{module} → {used} → … → {module}"));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
    // The model sits below what uses it.
    for (low, high) in [
        ("grant", "context"),
        ("principal", "grant"),
        ("policy", "evaluate"),
        ("config", "auth"),
        ("liveness", "ssf_client"),
        ("receiver", "ssf_client"),
    ] {
        assert!(
            !reaches(&deps, low, high),
            "{low} must not depend on {high}"
        );
    }
}
