//! Helpers shared by unit tests.

use serde_json::Value;

/// A verbatim spec example from `tests/fixtures/spec-examples/`, parsed.
pub fn spec_example(file: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/spec-examples/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}
