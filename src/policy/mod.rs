//! Policy as code: YAML rule files in `policies/`, each rule a CEL condition over `grant`, `context`,
//! `signal`, `subject` and `now`, with an effect.
//!
//! - Rules are compiled once at load; a set that fails to load is refused whole (the running one
//!   stays). The set's version is a hash of its files' names and contents.
//! - Precedence is deterministic: `revoke` > `step_up` > `restrict` > `notify`; matched rules are
//!   reported in file order.
//! - **Fail closed**: a rule whose condition errors (or is not a boolean) counts as matched, with its
//!   effect, and the error is reported; an error never permits.
//! - `on` lists the signal types that trigger a rule. A signal that no rule lists re-evaluates nothing.
//!   When a grant *is* evaluated, its status is computed from every enforced rule — so a rule's effect
//!   does not vanish because a different signal arrived — while `notify` rules and shadow rules report
//!   only when their own `on` matches the trigger.
//! - `mode: shadow` rules are evaluated and reported, never enforced.

mod eval;
mod file;
mod json_val;
pub mod lint;
pub mod screen;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use eval::{no_request, EvalInput, Evaluation, RuleMatch};
pub use file::{PolicyFile, RuleSpec};

use crate::events::EventKind;

/// A rule's effect, ordered by precedence (a higher one wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Notify,
    Restrict,
    StepUp,
    Revoke,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Notify => "notify",
            Effect::Restrict => "restrict",
            Effect::StepUp => "step_up",
            Effect::Revoke => "revoke",
        }
    }
}

/// Whether a rule is enforced or only observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// The default policy set, built into the binary for when no policy directory exists.
pub const BUILTIN: &str = include_str!("../../policies/default.yaml");

/// Signal-type names a rule's `on` may use besides the event kinds' short names.
pub const EXTRA_TRIGGERS: [&str; 4] = ["*", "unknown", "risk-signal", ACCESS_REQUEST];

/// The `on` of a **request-time rule**: evaluated for each access request (AuthZEN), over
/// `request` (`subject`, `resource`, `action`, `context` as the request gave them), the live
/// `context` and the matching `grant`; a match denies that request and changes no grant. It is
/// never evaluated on a signal or on state, and a state rule never sees `request`.
pub const ACCESS_REQUEST: &str = "access-request";

/// One compiled rule.
pub struct Rule {
    pub spec: RuleSpec,
    /// The file it came from.
    pub file: String,
    pub(crate) condition: cel::Program,
    pub(crate) reason: eval::Template,
    /// A request-time rule (`on: [access-request]`), read once at load: every evaluation asks.
    request: bool,
}

impl Rule {
    /// Whether a signal of this type triggers the rule.
    pub fn triggered_by(&self, signal_type: &str) -> bool {
        !self.is_request() && self.spec.on.iter().any(|t| t == "*" || t == signal_type)
    }

    /// Whether this is a request-time rule ([`ACCESS_REQUEST`]).
    pub fn is_request(&self) -> bool {
        self.request
    }
}

/// A compiled, versioned set of rules.
pub struct PolicySet {
    pub version: String,
    pub rules: Vec<Rule>,
    /// The files the set was loaded from, in load order.
    pub files: Vec<String>,
    /// Their text, as (file name, YAML), in the same order: what an operator edits, and what a
    /// shadow set's promotion writes.
    pub sources: Arc<[(String, String)]>,
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl PolicySet {
    /// An empty set (no rule ever matches). Used when no policy directory exists.
    pub fn empty() -> PolicySet {
        PolicySet::from_sources(&[]).unwrap_or_else(|_| PolicySet {
            version: "empty".into(),
            rules: Vec::new(),
            files: Vec::new(),
            sources: Arc::from([]),
            env: Arc::new(cel::Env::stdlib()),
        })
    }

    /// Loads `dir`, or the built-in default set when `dir` does not exist.
    pub fn load_dir_or_builtin(dir: &Path) -> Result<PolicySet, PolicyError> {
        if dir.is_dir() {
            PolicySet::load_dir(dir)
        } else {
            PolicySet::from_sources(&[("builtin:default.yaml".to_owned(), BUILTIN.to_owned())])
        }
    }

    /// A hash of `dir`'s rule files and their tests, without compiling them: the policy watcher
    /// reloads when it changes (a test fixed alone lets a refused set through).
    pub fn fingerprint_of_dir(dir: &Path) -> Result<String, PolicyError> {
        if dir.is_dir() {
            Ok(version_of(&read_dir_sources(dir, |n| {
                is_rule_file(n) || is_test_file(n)
            })?))
        } else {
            Ok(version_of(&[(
                "builtin:default.yaml".to_owned(),
                BUILTIN.to_owned(),
            )]))
        }
    }

    /// Loads every `*.yaml` rule file of `dir` (not `*.test.yaml`), in file-name order.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let sources = read_dir_sources(dir, is_rule_file)?;
        PolicySet::from_sources(&sources)
    }

    /// Compiles rule files given as (file name, YAML text).
    pub fn from_sources(sources: &[(String, String)]) -> Result<PolicySet, PolicyError> {
        let env = Arc::new(cel::Env::stdlib());
        let mut rules = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for (name, text) in sources {
            let invalid = |message: String| PolicyError::Invalid {
                file: name.clone(),
                message,
            };
            let file: PolicyFile =
                serde_norway::from_str(text).map_err(|e| invalid(e.to_string()))?;
            for spec in file.rules {
                if spec.id.is_empty() || !ids.insert(spec.id.clone()) {
                    return Err(invalid(format!(
                        "rule id `{}` is empty or not unique",
                        spec.id
                    )));
                }
                if spec.on.is_empty() {
                    return Err(invalid(format!(
                        "rule `{}`: `on` lists no signal type",
                        spec.id
                    )));
                }
                for t in &spec.on {
                    let known = EXTRA_TRIGGERS.contains(&t.as_str())
                        || EventKind::ALL.iter().any(|k| k.name() == t);
                    if !known {
                        return Err(invalid(format!(
                            "rule `{}`: `on` names unknown signal type `{t}`",
                            spec.id
                        )));
                    }
                }
                let request_rule = spec.on.iter().any(|t| t == ACCESS_REQUEST);
                if request_rule && spec.on.len() > 1 {
                    return Err(invalid(format!(
                        "rule `{}`: `on: [{ACCESS_REQUEST}]` stands alone (a request-time rule is \
                         not also a signal rule)",
                        spec.id
                    )));
                }
                let condition = env
                    .compile(&spec.when)
                    .map_err(|e| invalid(format!("rule `{}`: `when`: {e}", spec.id)))?;
                eval::check_references(&condition, request_rule)
                    .map_err(|e| invalid(format!("rule `{}`: `when`: {e}", spec.id)))?;
                let reason = eval::Template::compile(&env, &spec.reason, request_rule)
                    .map_err(|e| invalid(format!("rule `{}`: `reason`: {e}", spec.id)))?;
                rules.push(Rule {
                    spec,
                    file: name.clone(),
                    condition,
                    reason,
                    request: request_rule,
                });
            }
        }
        Ok(PolicySet {
            version: version_of(sources),
            rules,
            files: sources.iter().map(|(n, _)| n.clone()).collect(),
            sources: sources.into(),
            env,
        })
    }

    /// Whether any rule is triggered by this signal type (else the signal re-evaluates nothing).
    pub fn triggered_by(&self, signal_type: &str) -> bool {
        self.rules.iter().any(|r| r.triggered_by(signal_type))
    }
}

/// Rule files are `*.yaml` / `*.yml`, except the tests beside them (`*.test.yaml`).
pub fn is_rule_file(name: &str) -> bool {
    (name.ends_with(".yaml") || name.ends_with(".yml")) && !is_test_file(name)
}

/// Policy test files: `*.test.yaml` / `*.test.yml`.
pub fn is_test_file(name: &str) -> bool {
    name.ends_with(".test.yaml") || name.ends_with(".test.yml")
}

/// Reads the files of `dir` whose names pass `keep`, sorted by name.
pub fn read_dir_sources(
    dir: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, String)>, PolicyError> {
    let io = |source| PolicyError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| keep(n))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            std::fs::read_to_string(&path)
                .map(|text| (name, text))
                .map_err(|source| PolicyError::Io { path, source })
        })
        .collect()
}

/// Content hash of a set of files: the first 16 hex digits of SHA-256 over names and contents.
fn version_of(sources: &[(String, String)]) -> String {
    let mut hasher = openssl::sha::Sha256::new();
    for (name, text) in sources {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(text.as_bytes());
        hasher.update(&[0]);
    }
    hasher
        .finish()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
