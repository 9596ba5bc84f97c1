//! `vigil policy impact DIR`: what a candidate policy directory would change on the running
//! Vigil, before it goes live. The candidate is compiled, linted and its own tests run here
//! first (a set that fails them would be refused on reload anyway); then its rule files are sent
//! to `POST /v1/policies/impact`, which evaluates them against every live grant and changes
//! nothing.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

use vigil::evaluate::testing;
use vigil::policy::{is_rule_file, lint, read_dir_sources, PolicySet};

/// Where the running Vigil is, and the operator credential to ask it with.
pub struct Operator<'a> {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub base: &'a str,
    pub token: &'a str,
    /// Where the token came from (named when Vigil refuses it).
    pub token_source: &'a str,
}

/// Runs the preview and prints it (`json`: the answer as it came). `Ok(false)` when the
/// candidate is refused before it is sent (lint errors or failing tests, printed).
pub fn impact(
    operator: &Operator<'_>,
    dir: &Path,
    examples: Option<&Path>,
    samples: usize,
    json: bool,
) -> anyhow::Result<bool> {
    let set = PolicySet::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
    let errors: Vec<String> = lint::lint(&set)
        .into_iter()
        .filter(|f| f.error)
        .map(|f| format!("error: rule `{}`: {}", f.rule, f.message))
        .collect();
    if !errors.is_empty() {
        eprintln!("{}", errors.join("\n"));
        return Ok(false);
    }
    let tests = testing::run_set(&set, dir, examples)?;
    if tests.failed() > 0 {
        eprint!("{}", tests.render());
        eprintln!("the candidate fails its own tests: Vigil would refuse it on reload");
        return Ok(false);
    }
    let files: serde_json::Map<String, Value> = read_dir_sources(dir, is_rule_file)?
        .into_iter()
        .map(|(name, text)| (name, Value::String(text)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let base = operator.base.trim_end_matches('/');
    let body = runtime.block_on(async {
        let client = reqwest::Client::builder()
            // A preview evaluates every grant: minutes at the most for millions.
            .timeout(std::time::Duration::from_secs(600))
            .build()?;
        let request = client
            .post(format!("{base}/v1/policies/impact"))
            .json(&json!({"files": files, "samples": samples}));
        crate::streams_cmd::operator_call(request, base, operator.token, operator.token_source)
            .await
    })?;
    let text = if json {
        serde_json::to_string_pretty(&body)? + "\n"
    } else {
        render(&body, tests.passed())
    };
    // A reader that stops early (`| head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(true)
}

/// The preview for a person.
fn render(impact: &Value, tests_passed: usize) -> String {
    let n = |key: &str| impact[key].as_u64().unwrap_or(0);
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let mut out = format!(
        "candidate {} (its {tests_passed} tests pass) against running {}: {} grants evaluated in {} ms\n",
        s(&impact["candidate_version"]),
        s(&impact["live_version"]),
        n("evaluated"),
        n("elapsed_ms"),
    );
    out += &format!("  unchanged  {}\n", n("unchanged"));
    out += &format!(
        "  changed    {}   (loosening: {})\n",
        n("changed"),
        n("loosening")
    );
    for t in impact["transitions"].as_array().into_iter().flatten() {
        out += &format!("    {} -> {}: {}\n", s(&t["from"]), s(&t["to"]), t["count"]);
    }
    for r in impact["by_rule"].as_array().into_iter().flatten() {
        out += &format!("    by rule {}: {}\n", s(&r["rule"]), r["count"]);
    }
    out += &format!("  errors     {} (rules failing closed)\n", n("errors"));
    for r in impact["errors_by_rule"].as_array().into_iter().flatten() {
        out += &format!("    rule {}: {}\n", s(&r["rule"]), r["count"]);
    }
    out += &format!("  revoked    {} (final: not evaluated)\n", n("revoked"));
    for bucket in ["loosening", "changed", "errors"] {
        let samples = impact["samples"][bucket]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if samples.is_empty() {
            continue;
        }
        out += &format!("  samples ({bucket}):\n");
        for sample in samples {
            let rules: Vec<String> = sample["evaluation"]["matched"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| match (m["error"].as_str(), m["reason"].as_str()) {
                    (Some(e), _) => format!("{} (error: {e})", s(&m["id"])),
                    (None, Some(reason)) if !reason.is_empty() => {
                        format!("{}: {reason}", s(&m["id"]))
                    }
                    _ => s(&m["id"]),
                })
                .collect();
            out += &format!(
                "    {} ({}): {} -> {}  {}\n",
                s(&sample["grant_id"]),
                s(&sample["subject"]),
                s(&sample["from"]),
                s(&sample["to"]),
                rules.join("; ")
            );
        }
    }
    out
}
