//! Screening a subject's grants at once: proving, from the subject's context alone, that no enforced
//! rule can match any of its grants, so a re-evaluation of current state (a policy swap) need not
//! build each grant's inputs and run every condition for it.
//!
//! Each condition is interpreted abstractly over its AST: `context`, `subject`, `signal` and `now`
//! are the concrete values they will be bound to; a `grant.<field>` stands for the values that field
//! takes over the subject's grants (one value, a numeric range, or a set of strings). An operator the
//! screen does not model, a type it is unsure of, a missing field: the answer is *unknown*, and an
//! unknown rule is evaluated per grant as usual. Only a definite `false` skips anything, and `false`
//! is what CEL gives for the whole condition whatever the other operands do (`false && error` is
//! `false`), so the screen can only save work, never change a decision — in particular it can never
//! turn a failing (fail-closed) rule into a non-match: every comparison it decides is between values
//! of one CEL type, the only case where CEL cannot fail.

use std::borrow::Cow;
use std::collections::HashMap;

use cel::common::ast::{operators, Expr, IdedExpr, LiteralValue};
use serde_json::Value;

use crate::grant::Grant;

/// CEL's numeric type for a JSON number, as `json_val::to_val` binds it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NumKind {
    Uint,
    Int,
    Double,
}

fn num(v: &Value) -> Option<(f64, NumKind)> {
    let n = v.as_number()?;
    if let Some(u) = n.as_u64() {
        Some((u as f64, NumKind::Uint))
    } else if let Some(i) = n.as_i64() {
        Some((i as f64, NumKind::Int))
    } else {
        n.as_f64().map(|f| (f, NumKind::Double))
    }
}

/// What the screen knows of an expression's value. Inputs are borrowed: a condition reads a few
/// fields of the context, and copying the context for each reference cost more than the rules.
#[derive(Debug, Clone, PartialEq)]
enum Abs<'v> {
    Known(Cow<'v, Value>),
    /// A number between `lo` and `hi` (inclusive), of one CEL type.
    Range(f64, f64, NumKind),
    /// One of these strings.
    OneOf(Vec<String>),
    /// `grant` itself (only its fields are modelled).
    GrantRoot,
    Unknown,
}

/// The fixed inputs of one screening, and the grants it covers.
pub struct Screen<'a> {
    context: &'a Value,
    subject: &'a Value,
    signal: &'a Value,
    now: f64,
    grants: Grants<'a>,
    fields: HashMap<String, Abs<'static>>,
}

/// What `grant` stands for in a screening.
enum Grants<'a> {
    /// Any of these grants: each field the set of values it takes over them.
    Many(&'a [&'a Grant]),
    /// One grant, by the policy view a condition is evaluated on: known outright, like the
    /// context, and read in place rather than each field built again for each rule.
    View(&'a Value),
}

impl<'a> Screen<'a> {
    pub fn new(
        context: &'a Value,
        subject: &'a Value,
        signal: &'a Value,
        now: f64,
        grants: &'a [&'a Grant],
    ) -> Screen<'a> {
        Screen {
            context,
            subject,
            signal,
            now,
            grants: Grants::Many(grants),
            fields: HashMap::new(),
        }
    }

    /// A screening of the one grant whose policy view ([`Grant::policy_view`]) is `grant`.
    pub fn of_view(
        context: &'a Value,
        subject: &'a Value,
        signal: &'a Value,
        now: f64,
        grant: &'a Value,
    ) -> Screen<'a> {
        Screen {
            grants: Grants::View(grant),
            ..Screen::new(context, subject, signal, now, &[])
        }
    }

    /// Whether `condition` is `false` for every grant screened.
    pub fn never_matches(&mut self, condition: &IdedExpr) -> bool {
        matches!(self.eval(condition), Abs::Known(v) if *v == Value::Bool(false))
    }

    /// A grant field over all the grants: the values it takes, as precisely as the screen models.
    fn grant_field(&mut self, name: &str) -> Abs<'static> {
        if let Some(a) = self.fields.get(name) {
            return a.clone();
        }
        // A name the view lacks is an error in CEL (fail closed): not modelled.
        let abs = match self.grants {
            Grants::Many(grants) if crate::grant::POLICY_FIELDS.contains(&name) => {
                let values: Vec<Value> = grants.iter().map(|g| g.policy_field(name)).collect();
                summarize(&values)
            }
            _ => Abs::Unknown,
        };
        self.fields.insert(name.to_owned(), abs.clone());
        abs
    }

    fn eval(&mut self, e: &IdedExpr) -> Abs<'a> {
        match &e.expr {
            Expr::Literal(l) => literal(l),
            Expr::Ident(name) => match name.as_str() {
                "context" => Abs::Known(Cow::Borrowed(self.context)),
                "subject" => Abs::Known(Cow::Borrowed(self.subject)),
                "signal" => Abs::Known(Cow::Borrowed(self.signal)),
                "now" => Abs::Known(Cow::Owned(Value::from(self.now))),
                "grant" => match self.grants {
                    Grants::Many(_) => Abs::GrantRoot,
                    Grants::View(view) => Abs::Known(Cow::Borrowed(view)),
                },
                _ => Abs::Unknown,
            },
            // `has(x.f)` (test) is not modelled.
            Expr::Select(s) if s.test => Abs::Unknown,
            Expr::Select(s) => match self.eval(&s.operand) {
                Abs::GrantRoot => self.grant_field(&s.field),
                Abs::Known(v) => field(v, &s.field),
                _ => Abs::Unknown,
            },
            Expr::List(list) if list.optional_indices.is_empty() => {
                let mut items = Vec::with_capacity(list.elements.len());
                for el in &list.elements {
                    match self.eval(el) {
                        Abs::Known(v) => items.push(v.into_owned()),
                        _ => return Abs::Unknown,
                    }
                }
                Abs::Known(Cow::Owned(Value::Array(items)))
            }
            Expr::Call(call) if call.target.is_none() => self.call(&call.func_name, &call.args),
            _ => Abs::Unknown,
        }
    }

    fn call(&mut self, func: &str, args: &[IdedExpr]) -> Abs<'a> {
        let bool_of = |a: &Abs| match a {
            Abs::Known(v) => v.as_bool(),
            _ => None,
        };
        let known = |b: bool| Abs::Known(Cow::Owned(Value::Bool(b)));
        match (func, args) {
            (operators::LOGICAL_AND, [a, b]) => {
                let (a, b) = (self.eval(a), self.eval(b));
                match (bool_of(&a), bool_of(&b)) {
                    (Some(false), _) | (_, Some(false)) => known(false),
                    (Some(true), Some(true)) => known(true),
                    _ => Abs::Unknown,
                }
            }
            (operators::LOGICAL_OR, [a, b]) => {
                let (a, b) = (self.eval(a), self.eval(b));
                match (bool_of(&a), bool_of(&b)) {
                    (Some(true), _) | (_, Some(true)) => known(true),
                    (Some(false), Some(false)) => known(false),
                    _ => Abs::Unknown,
                }
            }
            (operators::LOGICAL_NOT, [a]) => match bool_of(&self.eval(a)) {
                Some(b) => known(!b),
                None => Abs::Unknown,
            },
            (operators::EQUALS | operators::NOT_EQUALS, [a, b]) => {
                let (a, b) = (self.eval(a), self.eval(b));
                let eq = equals(&a, &b);
                let result = if func == operators::EQUALS {
                    eq
                } else {
                    eq.map(|e| !e)
                };
                result.map_or(Abs::Unknown, known)
            }
            (
                operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS,
                [a, b],
            ) => {
                let (a, b) = (self.eval(a), self.eval(b));
                order(func, &a, &b).map_or(Abs::Unknown, known)
            }
            (operators::IN, [item, list]) => {
                let (item, list) = (self.eval(item), self.eval(list));
                contains(&item, &list).map_or(Abs::Unknown, known)
            }
            (operators::INDEX, [obj, key]) => match (self.eval(obj), self.eval(key)) {
                (Abs::Known(obj), Abs::Known(key)) => match key.as_str() {
                    Some(k) => field(obj, k),
                    None => Abs::Unknown,
                },
                _ => Abs::Unknown,
            },
            _ => Abs::Unknown,
        }
    }
}

/// `obj.name` (or `obj['name']`): unknown unless `obj` is a map that has it (CEL errors otherwise).
fn field<'v>(obj: Cow<'v, Value>, name: &str) -> Abs<'v> {
    match obj {
        Cow::Borrowed(Value::Object(map)) => map
            .get(name)
            .map_or(Abs::Unknown, |v| Abs::Known(Cow::Borrowed(v))),
        Cow::Owned(Value::Object(mut map)) => map
            .remove(name)
            .map_or(Abs::Unknown, |v| Abs::Known(Cow::Owned(v))),
        _ => Abs::Unknown,
    }
}

fn literal(l: &LiteralValue) -> Abs<'static> {
    match l {
        LiteralValue::Boolean(b) => Abs::Known(Cow::Owned(Value::Bool(*b.inner()))),
        LiteralValue::String(s) => Abs::Known(Cow::Owned(Value::String(s.inner().to_owned()))),
        LiteralValue::Null => Abs::Known(Cow::Owned(Value::Null)),
        LiteralValue::UInt(u) => Abs::Known(Cow::Owned(Value::from(*u.inner()))),
        // A negative int is the only int JSON keeps as one (`num` reads non-negative ones as
        // uint, as the binding does); a non-negative int literal is not modelled.
        LiteralValue::Int(i) if *i.inner() < 0 => Abs::Known(Cow::Owned(Value::from(*i.inner()))),
        // Held as a JSON float, so `num` reads it back as a double.
        LiteralValue::Double(d) => serde_json::Number::from_f64(*d.inner())
            .map_or(Abs::Unknown, |n| Abs::Known(Cow::Owned(n.into()))),
        _ => Abs::Unknown,
    }
}

/// The values of one grant field over many grants.
fn summarize(values: &[Value]) -> Abs<'static> {
    let Some(first) = values.first() else {
        return Abs::Unknown;
    };
    if values.iter().all(|v| v == first) {
        return Abs::Known(Cow::Owned(first.clone()));
    }
    if let Some((_, kind)) = num(first) {
        let mut lo = f64::INFINITY;
        let mut hi = f64::NEG_INFINITY;
        for v in values {
            match num(v) {
                Some((x, k)) if k == kind => {
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                _ => return Abs::Unknown,
            }
        }
        return Abs::Range(lo, hi, kind);
    }
    let mut strings: Vec<String> = Vec::new();
    for v in values {
        match v {
            Value::String(s) => {
                if !strings.contains(s) {
                    strings.push(s.clone());
                }
            }
            _ => return Abs::Unknown,
        }
    }
    Abs::OneOf(strings)
}

/// Whether `a == b` for every value each stands for; `None` when it may differ or CEL's types differ.
fn equals(a: &Abs, b: &Abs) -> Option<bool> {
    match (a, b) {
        (Abs::Known(x), Abs::Known(y)) => same_type(x, y).then(|| x == y),
        (Abs::Known(x), Abs::OneOf(set)) | (Abs::OneOf(set), Abs::Known(x)) => {
            let s = x.as_str()?;
            (!set.iter().any(|v| v == s)).then_some(false)
        }
        (Abs::Known(x), Abs::Range(lo, hi, kind)) | (Abs::Range(lo, hi, kind), Abs::Known(x)) => {
            let (v, k) = num(x)?;
            (k == *kind && (v < *lo || v > *hi)).then_some(false)
        }
        _ => None,
    }
}

/// Whether two JSON values bind to the same CEL type (numbers: the same numeric type).
fn same_type(x: &Value, y: &Value) -> bool {
    match (x, y) {
        (Value::Number(_), Value::Number(_)) => {
            matches!((num(x), num(y)), (Some((_, a)), Some((_, b))) if a == b)
        }
        (Value::Null, Value::Null)
        | (Value::Bool(_), Value::Bool(_))
        | (Value::String(_), Value::String(_)) => true,
        _ => false,
    }
}

/// `a <op> b` for every value each stands for, numbers of one CEL type only.
fn order(op: &str, a: &Abs, b: &Abs) -> Option<bool> {
    let range = |x: &Abs| match x {
        Abs::Known(v) => num(v).map(|(n, k)| (n, n, k)),
        Abs::Range(lo, hi, k) => Some((*lo, *hi, *k)),
        _ => None,
    };
    let (alo, ahi, ak) = range(a)?;
    let (blo, bhi, bk) = range(b)?;
    if ak != bk || [alo, ahi, blo, bhi].iter().any(|v| v.is_nan()) {
        return None;
    }
    let (always, never) = match op {
        operators::LESS => (ahi < blo, alo >= bhi),
        operators::LESS_EQUALS => (ahi <= blo, alo > bhi),
        operators::GREATER => (alo > bhi, ahi <= blo),
        operators::GREATER_EQUALS => (alo >= bhi, ahi < blo),
        _ => return None,
    };
    if always {
        Some(true)
    } else if never {
        Some(false)
    } else {
        None
    }
}

/// `item in list` (a list, or a map's keys) for every value `item` stands for.
fn contains(item: &Abs, list: &Abs) -> Option<bool> {
    match (item, list) {
        (Abs::Known(x), Abs::Known(container)) => match (&**x, &**container) {
            (Value::String(s), Value::Object(map)) => Some(map.contains_key(s)),
            (x, Value::Array(items)) if items.iter().all(|i| same_type(x, i)) => {
                Some(items.contains(x))
            }
            _ => None,
        },
        (Abs::OneOf(set), Abs::Known(container)) => {
            let Value::Array(items) = &**container else {
                return None;
            };
            if !items.iter().all(|i| i.is_string()) {
                return None;
            }
            let inside = set
                .iter()
                .filter(|s| items.iter().any(|i| i.as_str() == Some(s.as_str())))
                .count();
            if inside == 0 {
                Some(false)
            } else if inside == set.len() {
                Some(true)
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::GrantRequest;
    use serde_json::json;

    fn grant(id: &str, issued_at: f64, principal_type: &str, kind: &str) -> Grant {
        let req: GrantRequest = serde_json::from_value(json!({
            "id": id, "kind": kind, "principal_type": principal_type,
            "subject": {"format": "email", "email": "a@example.com"},
            "issued_at": issued_at, "expires_at": 4_000_000_000.0
        }))
        .unwrap();
        req.into_grant("email:a@example.com".into(), 1_700_000_000.0)
            .unwrap()
    }

    fn never(condition: &str, context: Value, grants: &[&Grant]) -> bool {
        let env = cel::Env::stdlib();
        let program = env.compile(condition).unwrap();
        let (subject, signal) = (json!({}), json!({"type": "none"}));
        let mut screen = Screen::new(&context, &subject, &signal, 1_800_000_000.0, grants);
        screen.never_matches(program.expression())
    }

    #[test]
    fn decides_false_only_when_every_grant_gives_false() {
        let (a, b) = (
            grant("a", 1_700_000_100.5, "human", "session"),
            grant("b", 1_700_000_200.5, "human", "access_token"),
        );
        let gs = [&a, &b];
        let quiet = json!({"session_revoked_at": 0.0, "risk": {"level": "NONE"},
                           "account": {"state": "unknown"}, "lifecycle": {}});
        // A time before every grant's issue: false for all.
        assert!(never(
            "context.session_revoked_at > grant.issued_at",
            quiet.clone(),
            &gs
        ));
        assert!(never("context.risk.level == 'HIGH'", quiet.clone(), &gs));
        assert!(never(
            "context.account.state == 'disabled' || context.account.state == 'purged'",
            quiet.clone(),
            &gs
        ));
        assert!(never(
            "'identifier-recycled' in context.lifecycle && context.lifecycle['identifier-recycled'].time > grant.issued_at",
            quiet.clone(),
            &gs
        ));
        assert!(never(
            "grant.principal_type in ['agent', 'workload']",
            quiet.clone(),
            &gs
        ));
        // Between the two issue times: one grant matches, so no conclusion.
        let between = json!({"session_revoked_at": 1_700_000_150.5});
        assert!(!never(
            "context.session_revoked_at > grant.issued_at",
            between,
            &gs
        ));
        // A matching context, an unmodelled function, a missing field: no conclusion.
        let high = json!({"risk": {"level": "HIGH"}});
        assert!(!never("context.risk.level == 'HIGH'", high, &gs));
        assert!(!never(
            "context.risk.level.startsWith('H')",
            quiet.clone(),
            &gs
        ));
        assert!(!never("context.nope == 'x'", quiet.clone(), &gs));
        assert!(!never("!(grant.nope == null)", quiet.clone(), &gs));
        // Mixed kinds: one grant's kind matches.
        assert!(!never("grant.kind == 'session'", quiet, &gs));
    }

    #[test]
    fn a_comparison_cel_would_fail_is_never_decided() {
        let a = grant("a", 1_700_000_100.5, "human", "session");
        let gs = [&a];
        // double against int, string against number: CEL errors (fail closed), the screen abstains.
        assert!(!never(
            "context.session_revoked_at > 5",
            json!({"session_revoked_at": 0.5}),
            &gs
        ));
        assert!(!never(
            "context.risk.level > 1u",
            json!({"risk": {"level": "HIGH"}}),
            &gs
        ));
        assert!(!never("context.flag == 'x'", json!({"flag": 1}), &gs));
    }

    /// Screening one grant by its policy view decides what screening it among others does, and
    /// abstains where CEL would fail on the view (a field it lacks).
    #[test]
    fn one_grant_is_screened_on_its_policy_view() {
        let a = grant("a", 1_700_000_100.5, "human", "session");
        let view = a.policy_view();
        let never_on_view = |condition: &str, context: Value| {
            let program = cel::Env::stdlib().compile(condition).unwrap();
            let (subject, signal) = (json!({}), json!({"type": "none"}));
            Screen::of_view(&context, &subject, &signal, 1_800_000_000.0, &view)
                .never_matches(program.expression())
        };
        let before = json!({"session_revoked_at": 1_700_000_000.5});
        let after = json!({"session_revoked_at": 1_700_000_200.5});
        for (condition, context) in [
            ("context.session_revoked_at > grant.issued_at", &before),
            ("context.session_revoked_at > grant.issued_at", &after),
            ("grant.kind == 'access_token'", &before),
            ("grant.principal_type in ['agent', 'workload']", &before),
            ("grant.nope == 'x'", &before),
            ("!('kind' in grant)", &before),
        ] {
            assert_eq!(
                never_on_view(condition, context.clone()),
                never(condition, context.clone(), &[&a]) || condition == "!('kind' in grant)",
                "{condition}"
            );
        }
        assert!(never_on_view(
            "context.session_revoked_at > grant.issued_at",
            before
        ));
        assert!(!never_on_view(
            "context.session_revoked_at > grant.issued_at",
            after.clone()
        ));
        assert!(!never_on_view("grant.nope == 'x'", after));
    }
}
