//! `vigil policy impact DIR`: what a candidate policy directory would change on the running
//! Vigil, before it goes live. The candidate is compiled, linted and its own tests run here
//! first (a set that fails them would be refused on reload anyway); then its rule files are sent
//! to `POST /v1/policies/impact`, which evaluates them against every live grant and changes
//! nothing. `vigil policy replay DIR --since 24h` asks `POST /v1/policies/replay` what the
//! candidate would have decided over the signals recorded since. `vigil policy shadow …` loads (checked the same way), shows, lists the divergences
//! of, promotes and discards the running Vigil's shadow set (`/v1/policies/shadow`).

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
    let Some((files, tests_passed)) = checked_candidate(dir, examples)? else {
        return Ok(false);
    };
    let base = operator.base.trim_end_matches('/');
    let body = call(operator, |client| {
        client
            .post(format!("{base}/v1/policies/impact"))
            .json(&json!({"files": files, "samples": samples}))
    })?;
    let text = if json {
        serde_json::to_string_pretty(&body)? + "\n"
    } else {
        render(&body, tests_passed)
    };
    print_out(&text);
    Ok(true)
}

/// Runs the replay and prints it (`json`: the answer as it came). `Ok(false)` when the
/// candidate is refused before it is sent.
pub fn replay(
    operator: &Operator<'_>,
    dir: &Path,
    examples: Option<&Path>,
    since: &str,
    samples: usize,
    json: bool,
) -> anyhow::Result<bool> {
    let Some((files, tests_passed)) = checked_candidate(dir, examples)? else {
        return Ok(false);
    };
    let base = operator.base.trim_end_matches('/');
    let body = call(operator, |client| {
        client
            .post(format!("{base}/v1/policies/replay"))
            .json(&json!({"files": files, "since": since, "samples": samples}))
    })?;
    let text = if json {
        serde_json::to_string_pretty(&body)? + "\n"
    } else {
        render_replay(&body, tests_passed)
    };
    print_out(&text);
    Ok(true)
}

/// A replay for a person.
fn render_replay(replay: &Value, tests_passed: usize) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let missing = &replay["not_reconstructed"];
    let mut out = format!(
        "candidate {} (its {tests_passed} tests pass) against running {}: {} signals replayed \
         in {} ms\n",
        s(&replay["candidate_version"]),
        s(&replay["live_version"]),
        n(&replay["signals"]),
        n(&replay["elapsed_ms"]),
    );
    out += &format!(
        "  decisions  live {}, candidate {}\n  added      {}\n  removed    {}\n  changed    {}\n",
        n(&replay["live_decisions"]),
        n(&replay["candidate_decisions"]),
        n(&replay["added"]),
        n(&replay["removed"]),
        n(&replay["changed"]),
    );
    for (rule, c) in replay["by_rule"].as_object().into_iter().flatten() {
        out += &format!(
            "    rule {rule}: +{} -{} ~{}\n",
            n(&c["added"]),
            n(&c["removed"]),
            n(&c["changed"])
        );
    }
    out += &format!(
        "  not reconstructed: {} of {} recorded decisions not made again by the live set; {} facts \
         unknown at the window's start; {} facts from unrecorded (Kafka) signals; {} decisions on \
         grants no longer held\n",
        n(&missing["unreproduced"]),
        n(&missing["recorded"]),
        n(&missing["facts_unknown_at_start"]),
        n(&missing["unrecorded_signal_facts"]),
        n(&missing["grants_gone"]),
    );
    let step = |v: &Value| {
        if v.is_null() {
            "nothing".to_owned()
        } else {
            format!("{} [{}]", s(&v["to"]), {
                let rules: Vec<String> = v["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(&s)
                    .collect();
                rules.join(", ")
            })
        }
    };
    for bucket in ["added", "removed", "changed"] {
        let samples = replay["samples"][bucket]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if samples.is_empty() {
            continue;
        }
        out += &format!("  samples ({bucket}):\n");
        for sample in samples {
            out += &format!(
                "    {} ({}) on {}: live {} / candidate {}\n",
                s(&sample["grant_id"]),
                s(&sample["subject"]),
                sample["signal"]["jti"].as_str().unwrap_or("registration"),
                step(&sample["live"]),
                step(&sample["candidate"]),
            );
        }
    }
    out
}

/// What `vigil policy shadow` does.
pub enum Shadow<'a> {
    Load {
        dir: &'a Path,
        examples: Option<&'a Path>,
    },
    Show,
    Divergences {
        rule: Option<&'a str>,
        direction: Option<&'a str>,
        grant: Option<&'a str>,
        limit: usize,
    },
    Promote {
        force: bool,
    },
    Discard,
}

/// Runs one shadow-set command and prints its answer. `Ok(false)` when a candidate is refused
/// before it is sent.
pub fn shadow(operator: &Operator<'_>, action: Shadow<'_>, json: bool) -> anyhow::Result<bool> {
    let base = operator.base.trim_end_matches('/');
    let url = format!("{base}/v1/policies/shadow");
    let body = match action {
        Shadow::Load { dir, examples } => {
            let Some((files, tests_passed)) = checked_candidate(dir, examples)? else {
                return Ok(false);
            };
            eprintln!("the candidate's {tests_passed} tests pass");
            call(operator, |c| c.put(&url).json(&json!({ "files": files })))?
        }
        Shadow::Show => call(operator, |c| c.get(&url))?,
        Shadow::Divergences {
            rule,
            direction,
            grant,
            limit,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            for (key, value) in [("rule", rule), ("direction", direction), ("grant", grant)] {
                if let Some(v) = value {
                    query.push((key, v.to_owned()));
                }
            }
            call(operator, |c| {
                c.get(format!("{url}/divergences")).query(&query)
            })?
        }
        Shadow::Promote { force } => call(operator, |c| {
            c.post(format!("{url}/promote"))
                .query(&[("force", force.to_string())])
        })?,
        Shadow::Discard => {
            call(operator, |c| c.delete(&url))?;
            json!({"status": "discarded"})
        }
    };
    let text = if json {
        serde_json::to_string_pretty(&body)? + "\n"
    } else {
        render_shadow(&body)
    };
    print_out(&text);
    Ok(true)
}

/// The shadow set, a promotion or a divergence listing, for a person.
fn render_shadow(body: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    if let Some(list) = body["divergences"].as_array() {
        let mut out = format!(
            "shadow {}: {} divergences ({} stricter, {} looser), {} held\n",
            s(&body["shadow_version"]),
            body["counts"]["total"],
            body["counts"]["stricter"],
            body["counts"]["looser"],
            body["counts"]["held"],
        );
        for d in list {
            out += &format!(
                "  {} {} ({}) {}: live {} -> shadow {} [{}] on {}\n",
                d["time"],
                s(&d["grant_id"]),
                s(&d["subject"]),
                s(&d["direction"]),
                s(&d["live"]["status"]),
                s(&d["shadow"]["status"]),
                s(&d["rule"]),
                d["cause"]["jti"]
                    .as_str()
                    .unwrap_or(d["cause"]["kind"].as_str().unwrap_or("?")),
            );
        }
        return out;
    }
    if body.get("status").is_some() {
        // A promotion's reload answer, or a discard.
        return format!(
            "{}: {}\n",
            s(&body["status"]),
            serde_json::to_string(body).unwrap_or_default()
        );
    }
    let divergences = &body["divergences"];
    let mut out = format!(
        "shadow {} ({} rules from {}): {} divergences ({} stricter, {} looser)\n",
        s(&body["version"]),
        body["rules"].as_array().map_or(0, Vec::len),
        body["files"]
            .as_array()
            .map(|f| f.iter().map(&s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        divergences["total"],
        divergences["stricter"],
        divergences["looser"],
    );
    for (rule, by) in divergences["by_rule"].as_object().into_iter().flatten() {
        out += &format!("  rule {rule}: {by}\n");
    }
    out
}

/// A candidate directory's rule files, once it lints clean and passes its own tests (printed
/// otherwise: `None`), and how many tests passed.
fn checked_candidate(
    dir: &Path,
    examples: Option<&Path>,
) -> anyhow::Result<Option<(serde_json::Map<String, Value>, usize)>> {
    let set = PolicySet::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
    let errors: Vec<String> = lint::lint(&set)
        .into_iter()
        .filter(|f| f.error)
        .map(|f| format!("error: rule `{}`: {}", f.rule, f.message))
        .collect();
    if !errors.is_empty() {
        eprintln!("{}", errors.join("\n"));
        return Ok(None);
    }
    let tests = testing::run_set(&set, dir, examples)?;
    if tests.failed() > 0 {
        eprint!("{}", tests.render());
        eprintln!("the candidate fails its own tests: Vigil would refuse it on reload");
        return Ok(None);
    }
    let files: serde_json::Map<String, Value> = read_dir_sources(dir, is_rule_file)?
        .into_iter()
        .map(|(name, text)| (name, Value::String(text)))
        .collect();
    Ok(Some((files, tests.passed())))
}

/// One call to the running Vigil as the operator, built by `request` on a client.
fn call(
    operator: &Operator<'_>,
    request: impl FnOnce(&reqwest::Client) -> reqwest::RequestBuilder,
) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let base = operator.base.trim_end_matches('/');
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            // A preview or a promotion evaluates every grant: minutes at the most for millions.
            .timeout(std::time::Duration::from_secs(600))
            .build()?;
        crate::streams_cmd::operator_call(
            request(&client),
            base,
            operator.token,
            operator.token_source,
        )
        .await
    })
}

/// A reader that stops early (`| head`) is not an error.
fn print_out(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
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
