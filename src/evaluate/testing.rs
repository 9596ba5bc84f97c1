//! Policy tests: `*.test.yaml` files beside the rules. Each test gives a grant, the signals (SET
//! claims, inline or a spec example with a JSON merge patch) folded into the principal's context, and
//! the expected effect and deciding rules. `vigil policy test` runs them through the same
//! [`crate::evaluate::evaluate_grant`] the engine uses.
//!
//! ```yaml
//! examples: ../tests/fixtures/spec-examples   # where `example:` files are found (default)
//! tests:
//!   - name: risk HIGH revokes a session
//!     grant: {id: g1, kind: session, subject: {format: email, email: jane@example.com},
//!             issued_at: 1615300000, expires_at: 1915300000}
//!     signals:
//!       - example: caep-risk-level-change.json
//!         patch: {events: {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change": {current_level: HIGH}}}
//!     expect: {effect: revoke, rules: [risk-high]}
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{evaluate_grant, Contexts, Trigger, Triggered};
use crate::context::{Decay, PrincipalContext};
use crate::grant::GrantRequest;
use crate::policy::{is_test_file, read_dir_sources, Effect, PolicyError, PolicySet};
use crate::principal::Target;
use crate::set::{self, SetRules};
use crate::signal::{Signal, SignalSource};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    examples: Option<String>,
    tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestCase {
    name: String,
    grant: Value,
    #[serde(default)]
    signals: Vec<SignalSpec>,
    /// Signals about the delegating user (agent delegations).
    #[serde(default)]
    delegator_signals: Vec<SignalSpec>,
    /// Evaluation time; defaults to one second after the last signal (or the grant's issue time).
    #[serde(default)]
    now: Option<f64>,
    /// An access request (`{subject, action, resource, context}`, AuthZEN's shape) made under the
    /// grant once the signals are applied: the request-time rules decide it, and `expect.effect`
    /// is the effect of the rules that deny it (`none`: allowed).
    #[serde(default)]
    request: Option<Value>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalSpec {
    #[serde(default)]
    example: Option<String>,
    #[serde(default)]
    set: Option<Value>,
    #[serde(default)]
    patch: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `revoke`, `step_up`, `restrict`, `notify` or `none`.
    effect: String,
    /// The deciding rules, if given, must be exactly these.
    #[serde(default)]
    rules: Option<Vec<String>>,
}

/// The outcome of one test.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub file: String,
    pub name: String,
    pub failure: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Default)]
pub struct TestReport {
    pub results: Vec<TestResult>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
    /// A readable report, one line per test.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            match &r.failure {
                None => out.push_str(&format!("ok    {} :: {}\n", r.file, r.name)),
                Some(why) => {
                    out.push_str(&format!("FAIL  {} :: {}\n      {why}\n", r.file, r.name))
                }
            }
        }
        out.push_str(&format!(
            "policy tests: {} passed, {} failed\n",
            self.passed(),
            self.failed()
        ));
        out
    }
}

/// Loads the policy set of `dir` and runs every `*.test.yaml` in it (see [`run_set`]).
pub fn run_dir(dir: &Path, examples: Option<&Path>) -> Result<TestReport, PolicyError> {
    let policy = PolicySet::load_dir(dir)?;
    run_set(&policy, dir, examples)
}

/// Runs every `*.test.yaml` of `dir` against `policy`. A test file's `example:` events are read
/// from the `examples:` directory it names (relative to the test file), else from `examples`
/// (`policy.examples_dir`), else from `../tests/fixtures/spec-examples` beside `dir`.
pub fn run_set(
    policy: &PolicySet,
    dir: &Path,
    examples: Option<&Path>,
) -> Result<TestReport, PolicyError> {
    let mut report = TestReport::default();
    for (file, text) in read_dir_sources(dir, is_test_file)? {
        let parsed: TestFile = serde_norway::from_str(&text).map_err(|e| PolicyError::Invalid {
            file: file.clone(),
            message: e.to_string(),
        })?;
        let examples = match (&parsed.examples, examples) {
            (Some(named), _) => dir.join(named),
            (None, Some(configured)) => configured.to_owned(),
            (None, None) => dir.join(DEFAULT_EXAMPLES),
        };
        for case in parsed.tests {
            let failure = run_case(policy, &examples, &case).err();
            report.results.push(TestResult {
                file: file.clone(),
                name: case.name,
                failure,
            });
        }
    }
    Ok(report)
}

/// Where `example:` events are read from when neither the test file nor the configuration says.
const DEFAULT_EXAMPLES: &str = "../tests/fixtures/spec-examples";

fn run_case(policy: &PolicySet, examples: &Path, case: &TestCase) -> Result<(), String> {
    let request: GrantRequest =
        serde_json::from_value(case.grant.clone()).map_err(|e| format!("grant: {e}"))?;
    let principal = request
        .identifier_keys()
        .map_err(|e| e.to_string())?
        .remove(0);
    let grant = request
        .into_grant(principal.clone(), 0.0)
        .map_err(|e| e.to_string())?;

    let signals = build_signals(examples, &case.signals, 1)?;
    let delegator_signals = build_signals(examples, &case.delegator_signals, 1000)?;
    let mut ctx = PrincipalContext::new(&principal);
    let mut targets = Vec::new();
    for s in &signals {
        let target = Target::of(&s.subject);
        ctx.apply(s, &target);
        targets.push(target);
    }
    let delegator = (!delegator_signals.is_empty()).then(|| {
        let mut d = PrincipalContext::new(grant.on_behalf_of.as_deref().unwrap_or("delegator"));
        for s in &delegator_signals {
            d.apply(s, &Target::of(&s.subject));
        }
        d
    });
    let last_time = signals
        .iter()
        .chain(&delegator_signals)
        .map(|s| s.event_time)
        .fold(grant.issued_at, f64::max);
    let now = case.now.unwrap_or(last_time + 1.0);
    let triggered = signals
        .last()
        .zip(targets.last())
        .map(|(s, t)| Triggered::new(s, t));
    let trigger = match &triggered {
        Some(t) => Trigger::Signal(t),
        None => Trigger::State,
    };
    let contexts = Contexts {
        principal: &ctx,
        entities: &[],
        delegator: delegator.as_ref(),
        view: None,
    };
    let outcome = match &case.request {
        Some(request) => {
            super::evaluate_request(
                policy,
                &grant,
                contexts,
                std::sync::Arc::new(request.clone()),
                &Decay::default(),
                now,
            )
            .0
        }
        None => evaluate_grant(policy, &grant, contexts, trigger, &Decay::default(), now),
    };

    let got = match outcome.effect {
        Some(e) => e.as_str(),
        None if !outcome.notifications().is_empty() => Effect::Notify.as_str(),
        None => "none",
    };
    let got_rules: Vec<String> = match outcome.effect {
        Some(_) => outcome
            .deciding_rules()
            .iter()
            .map(|m| m.id.clone())
            .collect(),
        None => outcome
            .notifications()
            .iter()
            .map(|m| m.id.clone())
            .collect(),
    };
    if got != case.expect.effect {
        return Err(format!(
            "expected effect {}, got {got} (rules: {got_rules:?}; matched: {:?})",
            case.expect.effect,
            outcome
                .matched
                .iter()
                .map(|m| (&m.id, &m.reason))
                .collect::<Vec<_>>()
        ));
    }
    if let Some(expected) = &case.expect.rules {
        let mut a = expected.clone();
        let mut b = got_rules.clone();
        a.sort();
        b.sort();
        if a != b {
            return Err(format!("expected rules {expected:?}, got {got_rules:?}"));
        }
    }
    if let Some(err) = outcome.matched.iter().find_map(|m| m.error.as_ref()) {
        return Err(format!("a rule errored (failed closed): {err}"));
    }
    Ok(())
}

fn build_signals(
    examples: &Path,
    specs: &[SignalSpec],
    first_seq: u64,
) -> Result<Vec<Signal>, String> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut claims = match (&spec.example, &spec.set) {
                (Some(file), None) => {
                    let path: PathBuf = examples.join(file);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
                }
                (None, Some(set)) => set.clone(),
                _ => return Err("each signal needs exactly one of `example` and `set`".into()),
            };
            if let Some(patch) = &spec.patch {
                merge_patch(&mut claims, patch);
            }
            signal_from_claims(&claims, first_seq + i as u64)
        })
        .collect()
}

/// Validates SET claims as the receiver would (issuer and audience taken from the claims) and
/// normalizes them.
pub fn signal_from_claims(claims: &Value, seq: u64) -> Result<Signal, String> {
    let issuer = claims["iss"].as_str().unwrap_or_default().to_owned();
    let audiences: Vec<String> = match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let bytes = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
    let rules = SetRules {
        issuer: &issuer,
        audiences: &audiences,
        legacy_subjects: true,
        tolerate: crate::config::Tolerate::default(),
    };
    let validated = set::validate_claims(&bytes, rules).map_err(|e| e.to_string())?;
    let source = SignalSource::SsfPush {
        transmitter: "policy-test".into(),
        stream: "policy-test".into(),
    };
    let mut signal = Signal::from_set(validated, source, 0);
    signal.seq = seq;
    Ok(signal)
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }

    #[test]
    fn the_shipped_policy_tests_pass() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let report = run_dir(&dir, None).unwrap();
        assert!(report.failed() == 0, "{}", report.render());
        assert!(report.passed() >= 20);
    }
}
