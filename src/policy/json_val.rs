//! Binding JSON policy inputs to CEL without copying them.
//!
//! `cel::to_value` goes through serde into `cel::Value` (every string and key copied into an `Arc`),
//! and the context then converts that again into `Box<dyn Val>`. Evaluation did this for four
//! inputs per grant, which dominated the cost of evaluating one grant. Here the JSON tree is walked
//! once and strings are borrowed for the evaluation's lifetime; evaluation converts only the values
//! a rule reads (`eval.rs`, `EvalInput`'s variable resolver). The CEL types are exactly those of
//! `cel::to_value` (non-negative integers `uint`, negative ones `int`, other numbers `double`), so a
//! condition means the same thing either way; a test below holds the two side by side.

use std::collections::HashMap;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use serde_json::Value;

/// `value` as a CEL value borrowing its strings.
pub fn to_val(value: &Value) -> Box<dyn Val + '_> {
    match value {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(items) => Box::new(CelList::from(
            items.iter().map(to_val).collect::<Vec<Box<dyn Val + '_>>>(),
        )),
        Value::Object(map) => {
            let mut out: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> =
                HashMap::with_capacity(map.len());
            for (k, v) in map {
                out.insert(CelMapKey::String(CelString::from(k.as_str())), to_val(v));
            }
            Box::new(CelMap::from(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    /// Each expression gives the same answer over the borrowed binding and over `cel::to_value`.
    #[test]
    fn same_results_as_the_serde_binding() {
        let input = json!({
            "level": "HIGH", "score": 97, "neg": -3, "ratio": 0.25, "none": null, "on": true,
            "list": ["a", "b"], "nested": {"x": {"y": 1}}, "empty": {}
        });
        let env = Arc::new(cel::Env::stdlib());
        for expr in [
            "v.level == 'HIGH'",
            "v.score > 90u",
            "v.score == 97",
            "v.neg < 0",
            "v.ratio * 4.0 == 1.0",
            "v.none == null",
            "v.on",
            "'b' in v.list",
            "size(v.list) == 2",
            "v.nested.x.y == 1",
            "has(v.nested.x) && !has(v.nested.z)",
            "v.list.exists(x, x == 'a')",
            "'level' in v",
            "size(v.empty) == 0",
            "type(v.score) == uint",
            "v.missing == 1",
        ] {
            let program = env.compile(expr).unwrap();
            let mut borrowed = cel::Context::with_env(env.clone());
            borrowed.add_variable_as_val("v", to_val(&input));
            let mut copied = cel::Context::with_env(env.clone());
            copied.add_variable_from_value("v", cel::to_value(&input).unwrap());
            let a = program.execute(&borrowed).map_err(|e| e.to_string());
            let b = program.execute(&copied).map_err(|e| e.to_string());
            assert_eq!(a, b, "{expr}");
        }
    }
}
