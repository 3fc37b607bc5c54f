//! The layering that ARCHITECTURE.md states, checked against the code: its "Layers" list is read
//! from the document itself (one map, kept in one place), and every `crate::…` path in the
//! non-test code of `src/` must name a module on a lower line than its own module's.
//! `a_forbidden_use_is_reported` shows the check failing on a `use` that breaks the order.

use std::collections::BTreeMap;
use std::path::Path;

/// Module → its line in the list (0 is the top).
type Layers = BTreeMap<String, usize>;

fn read_layers(architecture: &str) -> Layers {
    let section = architecture
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layers` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut layers = Layers::new();
    let mut line_no = 0;
    for line in section.lines() {
        let Some((number, rest)) = line.split_once(". ") else {
            continue;
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let names = rest.split(':').next().unwrap_or(rest);
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            assert!(!name.is_empty(), "an empty module name in: {line}");
            assert!(
                layers.insert(name.to_string(), line_no).is_none(),
                "{name} is listed twice"
            );
        }
        line_no += 1;
    }
    assert!(!layers.is_empty(), "the Layers section lists no module");
    layers
}

/// The crate modules `source` names (`crate::x`, `crate::{x, y::z}`), outside its test module
/// and its comments.
fn used_modules(source: &str) -> Vec<String> {
    let code = source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or(source);
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    used.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            used.push(name);
        }
    }
    used
}

/// The breaches of `layers` by the source of `module`.
fn violations(layers: &Layers, module: &str, source: &str) -> Vec<String> {
    let Some(&own) = layers.get(module) else {
        return vec![format!(
            "module `{module}` is not in ARCHITECTURE.md's Layers list"
        )];
    };
    used_modules(source)
        .into_iter()
        .filter(|used| used != module)
        .filter_map(|used| match layers.get(&used) {
            None => Some(format!(
                "`{module}` uses `{used}`, which is not in the Layers list"
            )),
            Some(&layer) if layer <= own => Some(format!(
                "`{module}` (line {}) uses `{used}` (line {}): only lower lines may be used",
                own + 1,
                layer + 1
            )),
            Some(_) => None,
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn architecture() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
        .expect("read ARCHITECTURE.md")
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let layers = read_layers(&architecture());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        // The binaries and the crate root sit above every layer.
        if first == "bin" || rel == Path::new("lib.rs") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let source = std::fs::read_to_string(&file).unwrap();
        for v in violations(&layers, &module, &source) {
            problems.push(format!("{}: {v}", rel.display()));
        }
        checked += 1;
    }
    assert!(checked > 20, "only {checked} files checked");
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_forbidden_use_is_reported() {
    let layers = read_layers(&architecture());
    // The HTTP layer reaching up into the worker that owns it, or the model reaching into the
    // engine that runs it: both break the stated order.
    let upward = "use crate::worker::Worker;\nfn f() {}\n";
    assert_eq!(violations(&layers, "http", upward).len(), 1);
    let grouped = "use crate::{engine::SeqId, kernels};\n";
    let found = violations(&layers, "model", grouped);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("`model`") && found[0].contains("`engine`"));
    // Downward uses, comments and the test module are fine.
    let fine = "use crate::jobs::JobRegistry; // crate::worker in a comment\n\
                #[cfg(test)]\nmod tests {\n    use crate::worker::Worker;\n}\n";
    assert!(violations(&layers, "http", fine).is_empty());
    // A module the list does not know is reported, so new modules get placed.
    assert_eq!(violations(&layers, "newcomer", "").len(), 1);
}
