use std::path::Path;

use serde_json::json;

use super::*;

fn set(yaml: &str) -> Result<PolicySet, PolicyError> {
    PolicySet::from_sources(&[("t.yaml".to_owned(), yaml.to_owned())])
}

fn input(trigger: Option<&str>) -> EvalInput {
    EvalInput {
        grant: json!({"kind": "session", "issued_at": 10.0, "attributes": {}}),
        context: std::sync::Arc::new(json!({"risk": {"level": "HIGH"}})),
        signal: std::sync::Arc::new(json!({"type": trigger.unwrap_or("none")})),
        subject: json!({"matches_grant": true}),
        now: 20.0,
        trigger: trigger.map(str::to_owned),
        request: crate::policy::no_request(),
    }
}

#[test]
fn the_shipped_policy_set_loads_and_its_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = PolicySet::load_dir(&dir).unwrap();
    assert!(set.rules.len() >= 10);
    assert_eq!(set.version.len(), 16);
    let findings = lint::lint(&set);
    assert!(findings.iter().all(|f| !f.error), "{findings:?}");
}

#[test]
fn load_errors_name_the_problem() {
    let cases = [
        ("rules: [{id: a, on: [risk-level-change], when: 'true', effect: revoke, colour: red}]", "colour"),
        ("rules: [{id: a, on: [risk-level-change], when: 'true ==', effect: revoke}]", "when"),
        ("rules: [{id: a, on: [risk-level-change], when: 'contxt.risk == 1', effect: revoke}]", "contxt"),
        ("rules: [{id: a, on: [no-such-event], when: 'true', effect: revoke}]", "no-such-event"),
        ("rules: [{id: a, on: [], when: 'true', effect: revoke}]", "`on`"),
        ("rules: [{id: a, on: ['*'], when: 'true', effect: ban}]", "ban"),
        ("rules: [{id: a, on: ['*'], when: 'true', effect: revoke}, {id: a, on: ['*'], when: 'true', effect: notify}]", "unique"),
        ("rules: [{id: a, on: ['*'], when: 'true', effect: revoke, reason: 'x {{ oops'}]", "unclosed"),
    ];
    for (yaml, needle) in cases {
        let err = set(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(needle), "{yaml}: {err}");
    }
}

#[test]
fn comprehension_variables_are_not_unknown() {
    assert!(set("rules: [{id: a, on: ['*'], when: \"grant.scopes.exists(s, s == 'admin')\", effect: revoke}]").is_ok());
}

#[test]
fn precedence_and_reasons() {
    let s = set(r#"
rules:
  - {id: n, on: ['*'], when: 'true', effect: notify, reason: 'note'}
  - {id: r, on: ['*'], when: 'true', effect: restrict}
  - {id: v, on: ['*'], when: "context.risk.level == 'HIGH'", effect: revoke, reason: "risk {{ context.risk.level }} at {{ now }}"}
  - {id: s, on: ['*'], when: 'true', effect: step_up}
"#)
    .unwrap();
    let out = s.evaluate(&input(Some("risk-level-change")));
    assert_eq!(out.effect, Some(Effect::Revoke));
    let deciding: Vec<_> = out
        .deciding_rules()
        .iter()
        .map(|m| (m.id.clone(), m.reason.clone()))
        .collect();
    assert_eq!(
        deciding,
        vec![("v".to_owned(), "risk HIGH at 20.0".to_owned())]
    );
    assert_eq!(out.notifications().len(), 1);
    // Without a trigger, notify rules do not report.
    assert!(s.evaluate(&input(None)).notifications().is_empty());
}

#[test]
fn errors_fail_closed_and_never_permit() {
    let s = set(r#"
rules:
  - {id: broken, on: ['*'], when: "context.no_such_field.level == 'HIGH'", effect: revoke}
  - {id: not-bool, on: ['*'], when: "grant.kind", effect: step_up}
"#)
    .unwrap();
    let out = s.evaluate(&input(Some("risk-level-change")));
    assert_eq!(out.effect, Some(Effect::Revoke));
    assert!(out.matched.iter().all(|m| m.error.is_some()), "{out:?}");
    let findings = lint::lint(&s);
    assert!(
        findings.iter().any(|f| f.error && f.rule == "broken"),
        "{findings:?}"
    );
}

#[test]
fn shadow_rules_report_but_never_enforce() {
    let s =
        set("rules: [{id: sh, on: ['*'], when: 'true', effect: revoke, mode: shadow}]").unwrap();
    let out = s.evaluate(&input(Some("risk-level-change")));
    assert_eq!(out.effect, None);
    assert_eq!(out.shadow.len(), 1);
}

#[test]
fn version_is_a_content_hash() {
    let a = set("rules: []").unwrap().version;
    let b = set("rules: []\n").unwrap().version;
    assert_ne!(a, b);
    assert_eq!(a, set("rules: []").unwrap().version);
}

#[test]
fn lint_finds_unreachable_rules() {
    let s = set(r#"
rules:
  - {id: a, on: [risk-level-change], when: "context.risk.level == 'HIGH'", effect: revoke}
  - {id: b, on: [risk-level-change], when: "context.risk.level == 'HIGH'", effect: step_up}
  - {id: c, on: ['*'], when: 'false', effect: revoke}
"#)
    .unwrap();
    let f = lint::lint(&s);
    assert!(f.iter().any(|f| f.rule == "b" && !f.error), "{f:?}");
    assert!(f.iter().any(|f| f.rule == "c" && !f.error), "{f:?}");
}

/// Evaluating outside the engine (policy tests, lint, previews) counts nothing in the live
/// metrics; the engine records what its own evaluations matched.
#[test]
fn only_a_recorded_evaluation_counts_shadow_matches_and_errors() {
    let s = set(r#"
rules:
  - {id: evaluation-only-shadow, on: ['*'], when: 'true', effect: revoke, mode: shadow}
  - {id: evaluation-only-error, on: ['*'], when: 'context.nope.deeper == 1', effect: revoke}
"#)
    .unwrap();
    let handle = crate::telemetry::metrics_handle().unwrap();
    let out = s.evaluate(&input(Some("risk-level-change")));
    assert_eq!(out.shadow.len(), 1);
    assert!(out.matched.iter().any(|m| m.error.is_some()));
    lint::lint(&s);
    let text = handle.render();
    assert!(!text.contains("evaluation-only-shadow"), "{text}");
    assert!(!text.contains("evaluation-only-error"), "{text}");
    out.record("g1");
    let text = handle.render();
    assert!(
        text.contains(r#"vigil_policy_shadow_matches_total{rule="evaluation-only-shadow"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vigil_policy_errors_total{rule="evaluation-only-error"} 1"#),
        "{text}"
    );
}

/// Request-time rules see `request` and are evaluated on access requests alone: never on a
/// signal or on state, so they never change a grant; one that errors denies (fail closed) and is
/// a lint error; a state rule naming `request` and a request rule mixed with signals are refused.
#[test]
fn request_time_rules_decide_requests_only() {
    let s = set(r#"
rules:
  - {id: pay-under-risk, on: [access-request], when: "request.action.name == 'pay' && context.risk.level == 'HIGH'", effect: step_up}
  - {id: broken-request, on: [access-request], when: "request.action.properties.nope == 1", effect: revoke}
"#)
    .unwrap();
    let state = s.evaluate(&input(Some("risk-level-change")));
    assert_eq!(state.effect, None, "{state:?}");
    let asked = |action: serde_json::Value| {
        s.evaluate_request(&EvalInput {
            request: std::sync::Arc::new(json!({"action": action})),
            ..input(None)
        })
    };
    let pay = asked(json!({"name": "pay", "properties": {"nope": 0}}));
    assert_eq!(pay.effect, Some(Effect::StepUp), "{pay:?}");
    let read = asked(json!({"name": "read", "properties": {}}));
    assert_eq!(read.effect, Some(Effect::Revoke), "fails closed: {read:?}");
    assert!(read.matched.iter().all(|m| m.error.is_some()));
    assert!(lint::lint(&s)
        .iter()
        .any(|f| f.error && f.rule == "broken-request"));
    for refused in [
        "rules: [{id: x, on: ['*'], when: \"request.action.name == 'pay'\", effect: revoke}]",
        "rules: [{id: x, on: [access-request, risk-level-change], when: 'true', effect: revoke}]",
        "rules: [{id: x, on: [access-request], when: \"signal.type == 'x'\", effect: revoke}]",
    ] {
        assert!(set(refused).is_err(), "{refused}");
    }
}

/// A rule sees every input it reads, in its condition and in its reason, and a comprehension
/// variable named like an input shadows the input inside the comprehension.
#[test]
fn a_rule_sees_every_input_it_reads() {
    let s = set(r#"
rules:
  - {id: a, on: ['*'], when: "subject.matches_grant", effect: notify, reason: "kind {{ grant.kind }} at {{ now }}"}
  - {id: b, on: ['*'], when: "context.risk.level == 'HIGH' && signal.type == 'x'", effect: revoke, reason: "{{ context.risk.level }}"}
  - {id: c, on: ['*'], when: "grant.scopes.exists(context, context == 'admin') || subject.matches_grant", effect: step_up}
"#)
    .unwrap();
    let mut inputs = input(Some("x"));
    inputs.grant = json!({"kind": "session", "scopes": ["read"]});
    let out = s.evaluate(&inputs);
    assert_eq!(out.effect, Some(Effect::Revoke));
    let reasons: Vec<(&str, &str)> = out
        .matched
        .iter()
        .map(|m| (m.id.as_str(), m.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [("a", "kind session at 20.0"), ("b", "HIGH"), ("c", "")]
    );
    assert!(out.matched.iter().all(|m| m.error.is_none()), "{out:?}");
}

/// A condition gives the same answer, errors included, with its inputs resolved path by path
/// as it reads them as with each input converted whole and bound ahead (how they used to be).
#[test]
fn inputs_resolved_as_read_mean_what_inputs_bound_whole_meant() {
    let input = EvalInput {
        grant: json!({"kind": "session", "issued_at": 10.0, "scopes": ["read", "admin"]}),
        context: std::sync::Arc::new(json!({
            "risk": {"level": "HIGH", "rank": 3, "reason": null,
                     "by_source": {"a": {"level": "LOW", "time": 1.5}}},
            "claims": {"a.b": "dotted", "a": {"b": "nested"}},
            "neg": -3, "ratio": 0.25, "on": true, "empty": {}, "list": [{"x": 1}, "s"]
        })),
        signal: std::sync::Arc::new(json!({"type": "x"})),
        subject: json!({"matches_grant": true}),
        now: 20.0,
        trigger: None,
        request: std::sync::Arc::new(json!({"action": {"properties": {"sensitive": true}}})),
    };
    let env = std::sync::Arc::new(cel::Env::stdlib());
    let resolved = eval::context_for(&env, &input);
    let mut whole = cel::Context::with_env(env.clone());
    for (name, value) in [
        ("grant", &input.grant),
        ("context", &*input.context),
        ("signal", &*input.signal),
        ("subject", &input.subject),
        ("request", &*input.request),
    ] {
        whole.add_variable_from_value(name, cel::to_value(value).unwrap());
    }
    whole.add_variable_from_value("now", input.now);
    for expr in [
        "context.risk.level == 'HIGH'",
        "context.risk.rank >= 1u && context.risk.rank == 3",
        "context.risk.reason == null",
        "context.risk.by_source.a.level == 'LOW' && context.risk.by_source.a.time < 2.0",
        "context.risk.by_source == {'a': {'level': 'LOW', 'time': 1.5}}",
        "size(context.risk) == 4 && 'by_source' in context.risk",
        "context.risk.by_source.exists(k, context.risk.by_source[k].level == 'LOW')",
        "context['risk'].level",
        "context.claims['a.b'] == 'dotted' && context.claims.a.b == 'nested'",
        "context.neg < 0 && context.ratio * 4.0 == 1.0 && context.on",
        "context.empty == {} && size(context.empty) == 0",
        "context.list[0].x == 1 && context.list[1] == 's'",
        "has(context.risk.level) && !has(context.risk.none) && has(context.risk.by_source.a)",
        "has(context.missing.x)",
        "context.missing",
        "context.missing.level",
        "context.risk.missing",
        "context.risk.level.x",
        "has(context.risk.level.x)",
        "context.risk.rank.x.y",
        "context == context",
        "context.risk",
        "context",
        "type(context.risk) == map && type(context.risk.rank) == uint",
        "grant.scopes.exists(context, context == 'admin')",
        "[1, 2].all(context, context > 0) && context.risk.level == 'HIGH'",
        "grant.issued_at < now && now == 20.0",
        "now.x",
        "signal.type == 'x' && subject.matches_grant",
        "request.action.properties.sensitive == true",
        "has(request.action.properties) && !has(request.action.kind)",
    ] {
        let program = env.compile(expr).unwrap();
        let a = program.execute(&resolved).map_err(|e| e.to_string());
        let b = program.execute(&whole).map_err(|e| e.to_string());
        assert_eq!(a, b, "{expr}");
    }
}
