//! Evaluating a policy set against one grant. Pure: no I/O, no clock (the caller passes `now`).

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::{Effect, Mode, PolicySet};

/// The variables a condition sees.
pub const VARIABLES: [&str; 5] = ["grant", "context", "signal", "subject", "now"];
/// The variables a request-time rule's condition sees (`request` instead of `signal`).
pub const REQUEST_VARIABLES: [&str; 5] = ["grant", "context", "request", "subject", "now"];

/// Everything one evaluation sees.
#[derive(Debug, Clone)]
pub struct EvalInput {
    pub grant: Value,
    /// Shared: one principal's view serves each of its grants a policy swap re-evaluates, when
    /// it is the same for all of them.
    pub context: std::sync::Arc<Value>,
    /// Shared: one signal's view serves every grant it re-evaluates.
    pub signal: std::sync::Arc<Value>,
    pub subject: Value,
    /// Seconds since the epoch.
    pub now: f64,
    /// The signal type that triggered this evaluation, or `None` for a registration, a policy swap
    /// or any other re-evaluation of current state.
    pub trigger: Option<String>,
    /// An access request's `{subject, resource, action, context}` (request-time rules only;
    /// `null` otherwise).
    pub request: std::sync::Arc<Value>,
}

/// The `request` of every evaluation that is not an access request: one shared `null` (grant
/// evaluations are the hot path; this costs them a reference count, not an allocation).
pub fn no_request() -> std::sync::Arc<Value> {
    static NULL: std::sync::OnceLock<std::sync::Arc<Value>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| std::sync::Arc::new(Value::Null))
        .clone()
}

/// One rule that matched (or errored, which counts as matched).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleMatch {
    pub id: String,
    pub effect: Effect,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub shadow: bool,
}

/// The result of evaluating a grant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Evaluation {
    /// The strongest enforced effect among matched rules other than `notify`.
    pub effect: Option<Effect>,
    /// Enforced rules that matched and decide `effect` (plus `notify` rules triggered now).
    pub matched: Vec<RuleMatch>,
    /// Shadow rules triggered now that matched: reported, never enforced.
    pub shadow: Vec<RuleMatch>,
}

impl Evaluation {
    /// The matched rules with the winning effect.
    pub fn deciding_rules(&self) -> Vec<&RuleMatch> {
        self.matched
            .iter()
            .filter(|m| Some(m.effect) == self.effect)
            .collect()
    }
    /// Records a live evaluation: rules that errored (and failed closed) and shadow matches.
    pub fn record(&self, grant: &str) {
        for m in self.matched.iter().chain(&self.shadow) {
            if let Some(err) = &m.error {
                metrics::counter!(crate::telemetry::POLICY_ERRORS, "rule" => m.id.clone())
                    .increment(1);
                tracing::warn!(rule = %m.id, grant, error = %err, "policy rule failed; failing closed");
            }
        }
        for m in &self.shadow {
            metrics::counter!(crate::telemetry::POLICY_SHADOW_MATCHES, "rule" => m.id.clone())
                .increment(1);
        }
    }

    /// `notify` rules that matched.
    pub fn notifications(&self) -> Vec<&RuleMatch> {
        self.matched
            .iter()
            .filter(|m| m.effect == Effect::Notify)
            .collect()
    }
}

impl PolicySet {
    /// Evaluates every rule that applies to `input` and returns the outcome. Pure: it records no
    /// metric and logs nothing, since policy tests, lint and previews evaluate too; the engine
    /// records what a live evaluation matched ([`Evaluation::record`]).
    pub fn evaluate(&self, input: &EvalInput) -> Evaluation {
        self.run_rules(input, None)
    }

    /// [`PolicySet::evaluate`], where a rule whose condition the screen ([`super::screen`])
    /// proves `false` on these inputs is not run, and the inputs are converted to CEL values only
    /// as a rule left to run reads them. The outcome is the same — the screen answers `false`
    /// only where CEL would, never for a rule that could fail — and most state rules read a fact
    /// the context does not hold, so a signal's evaluation ran sixteen conditions to find the one
    /// or none that matches: binding the inputs and running them was more than half of a
    /// revoking signal's evaluation (benches/RESULTS.md).
    pub fn evaluate_screened(&self, input: &EvalInput) -> Evaluation {
        let mut screen = super::screen::Screen::of_view(
            &input.context,
            &input.subject,
            &input.signal,
            input.now,
            &input.grant,
        );
        self.run_rules(input, Some(&mut screen))
    }

    /// The rules that apply to `input` (all but request-time ones; `notify` and shadow rules
    /// only when the trigger names them), each skipped where `screen` proves it false.
    fn run_rules(
        &self,
        input: &EvalInput,
        mut screen: Option<&mut super::screen::Screen<'_>>,
    ) -> Evaluation {
        let ctx = context_for(&self.env, input);
        let mut out = Evaluation::default();
        for rule in self.rules.iter().filter(|r| !r.is_request()) {
            let triggered = input
                .trigger
                .as_deref()
                .is_some_and(|t| rule.triggered_by(t));
            let shadow = rule.spec.mode == Mode::Shadow;
            let notify = rule.spec.effect == Effect::Notify;
            // Status comes from every enforced state rule; notify and shadow report only on trigger.
            if (shadow || notify) && !triggered {
                continue;
            }
            if let Some(screen) = screen.as_deref_mut() {
                if screen.never_matches(rule.condition.expression()) {
                    continue;
                }
            }
            out.add(run(rule, &ctx));
        }
        out
    }
}

impl PolicySet {
    /// Evaluates the request-time rules ([`super::ACCESS_REQUEST`]) on `input` (its `request`
    /// set): an enforced match with any effect but `notify` denies the request. Fail closed: a
    /// rule that errors matches. Pure, like [`PolicySet::evaluate`].
    pub fn evaluate_request(&self, input: &EvalInput) -> Evaluation {
        let ctx = context_for(&self.env, input);
        let mut out = Evaluation::default();
        for rule in self.rules.iter().filter(|r| r.is_request()) {
            out.add(run(rule, &ctx));
        }
        out
    }

    /// Whether no rule that decides a grant's status on current state (enforced, not `notify`)
    /// can match any grant `screen` covers: then evaluating them without a signal matches nothing.
    pub fn never_matches_state(&self, screen: &mut super::screen::Screen<'_>) -> bool {
        self.rules
            .iter()
            .filter(|r| {
                r.spec.mode != Mode::Shadow && r.spec.effect != Effect::Notify && !r.is_request()
            })
            .all(|r| screen.never_matches(r.condition.expression()))
    }
}

/// One rule's condition on `ctx`: its match (an error matches: fail closed), or `None`.
fn run(rule: &super::Rule, ctx: &cel::Context<'_, '_>) -> Option<RuleMatch> {
    let (matched, error) = match rule.condition.execute(ctx) {
        Ok(cel::Value::Bool(b)) => (b, None),
        Ok(other) => (
            true,
            Some(format!("condition returned {other:?}, not a boolean")),
        ),
        Err(e) => (true, Some(e.to_string())),
    };
    if !matched {
        return None;
    }
    let reason = match &error {
        Some(err) => format!("rule failed closed: {err}"),
        None => rule.reason.render(ctx),
    };
    Some(RuleMatch {
        id: rule.spec.id.clone(),
        effect: rule.spec.effect,
        reason,
        error,
        shadow: rule.spec.mode == Mode::Shadow,
    })
}

impl Evaluation {
    /// Adds a rule's match: a shadow one reported apart; an enforced one deciding the effect
    /// unless it only notifies.
    fn add(&mut self, m: Option<RuleMatch>) {
        let Some(m) = m else { return };
        if m.shadow {
            self.shadow.push(m);
        } else {
            if m.effect != Effect::Notify {
                self.effect = self.effect.max(Some(m.effect));
            }
            self.matched.push(m);
        }
    }
}

/// The CEL context rules run in: every input is resolved by name from the [`EvalInput`] as a
/// rule reads it ([`EvalInput::resolve`]), none bound ahead.
pub(super) fn context_for<'a>(env: &Arc<cel::Env>, input: &'a EvalInput) -> cel::Context<'a, 'a> {
    let mut ctx = cel::Context::with_env(env.clone());
    ctx.set_variable_resolver(input);
    ctx
}

/// Resolving an input, or a field path into one, as a condition names it.
///
/// The interpreter asks for a qualified name such as `context.risk.level` before its prefixes
/// (`context.risk`, then `context`), so the value at the end of the longest path that exists is
/// converted and no more: a condition reads a field or two of a context view of forty, and
/// converting every input whole to bind it (then dropping it) was most of what binding cost
/// (benches/RESULTS.md). The value at a path is the one selecting its fields on the whole input
/// gives, so conditions mean what they did: where a path's field is missing, the shorter path is
/// resolved and the interpreter's select reports the missing key as before. The interpreter
/// looks in a comprehension's scope before the root's, so a comprehension variable named like an
/// input still shadows it.
impl cel::context::VariableResolver for EvalInput {
    fn resolve<'b>(&'b self, name: &str) -> Option<cel::common::value::CowVal<'b, 'b>> {
        let mut path = name.split('.');
        let root = path.next()?;
        if root == "now" {
            let whole = path.next().is_none();
            return whole.then(|| {
                cel::common::value::CowVal::owned(cel::common::types::CelDouble::from(self.now))
            });
        }
        let mut value = self.json(root)?;
        for field in path {
            value = value.as_object()?.get(field)?;
        }
        Some(cel::common::value::CowVal::Owned(super::json_val::to_val(
            value,
        )))
    }
}

impl EvalInput {
    /// The JSON input named `name` (`None` for `now`, a number, and any other name).
    fn json(&self, name: &str) -> Option<&Value> {
        match name {
            "grant" => Some(&self.grant),
            "context" => Some(&self.context),
            "signal" => Some(&self.signal),
            "subject" => Some(&self.subject),
            "request" => Some(&self.request),
            _ => None,
        }
    }
}

/// Rejects conditions that reference variables Vigil never binds (a typo would otherwise fail closed
/// at run time, on every evaluation).
pub fn check_references(program: &cel::Program, request_rule: bool) -> Result<(), String> {
    let refs = program.references();
    let known = if request_rule {
        &REQUEST_VARIABLES
    } else {
        &VARIABLES
    };
    let unknown: Vec<&str> = refs
        .variables()
        .into_iter()
        .filter(|v| !known.contains(v) && !is_comprehension_variable(program, v))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown variable(s) {}; {} conditions see only {}",
            unknown.join(", "),
            if request_rule {
                "request-time"
            } else {
                "signal and state"
            },
            known.join(", ")
        ))
    }
}

/// Macro iteration variables (`exists(x, …)`) show up as references; accept names bound by a macro.
fn is_comprehension_variable(program: &cel::Program, name: &str) -> bool {
    let mut bound = Vec::new();
    bound_names(program.expression(), &mut bound);
    bound.iter().any(|b| b == name)
}

/// Collects the names comprehension macros bind anywhere in `e`.
fn bound_names(e: &cel::IdedExpr, out: &mut Vec<String>) {
    use cel::common::ast::{EntryExpr, Expr};
    match &e.expr {
        Expr::Comprehension(c) => {
            out.push(c.iter_var.clone());
            out.extend(c.iter_var2.clone());
            for part in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                bound_names(part, out);
            }
        }
        Expr::Call(call) => {
            if let Some(t) = &call.target {
                bound_names(t, out);
            }
            call.args.iter().for_each(|a| bound_names(a, out));
        }
        Expr::List(list) => list.elements.iter().for_each(|a| bound_names(a, out)),
        Expr::Select(select) => bound_names(&select.operand, out),
        Expr::Map(map) => map.entries.iter().for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => {
                bound_names(&m.key, out);
                bound_names(&m.value, out);
            }
            EntryExpr::StructField(f) => bound_names(&f.value, out),
        }),
        Expr::Struct(st) => st.entries.iter().for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(m) => {
                bound_names(&m.key, out);
                bound_names(&m.value, out);
            }
            EntryExpr::StructField(f) => bound_names(&f.value, out),
        }),
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
    }
}

/// A reason template: text with `{{ cel }}` placeholders.
pub struct Template {
    parts: Vec<Part>,
}

enum Part {
    Text(String),
    Expr(cel::Program),
}

impl Template {
    /// Compiles `source`; its placeholders see what the rule's condition sees
    /// (`request_rule`: a request-time rule's variables).
    pub fn compile(env: &cel::Env, source: &str, request_rule: bool) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            parts.push(Part::Text(rest[..start].to_owned()));
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| "unclosed `{{` placeholder".to_owned())?;
            let program = env
                .compile(after[..end].trim())
                .map_err(|e| e.to_string())?;
            check_references(&program, request_rule)?;
            parts.push(Part::Expr(program));
            rest = &after[end + 2..];
        }
        parts.push(Part::Text(rest.to_owned()));
        Ok(Template { parts })
    }

    /// Renders the template; a placeholder that fails renders as `?`.
    pub fn render(&self, ctx: &cel::Context<'_, '_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Expr(p) => match p.execute(ctx) {
                    Ok(cel::Value::String(s)) => out.push_str(&s),
                    Ok(cel::Value::Null) => out.push_str("none"),
                    Ok(v) => match v.json() {
                        Ok(j) => out.push_str(&j.to_string()),
                        Err(_) => out.push('?'),
                    },
                    Err(_) => out.push('?'),
                },
            }
        }
        out
    }
}
