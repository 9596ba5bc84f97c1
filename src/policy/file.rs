//! The YAML schema of a rule file. Unknown fields are errors, so a misspelt key never silently
//! changes what a rule does.
//!
//! ```yaml
//! rules:
//!   - id: risk-high-revokes
//!     description: A HIGH risk level from any source revokes every grant of the principal.
//!     on: [risk-level-change, risk-signal]
//!     when: context.risk.level == 'HIGH'
//!     effect: revoke
//!     reason: "risk HIGH ({{ context.risk.reason }}) from {{ context.risk.source }}"
//!     mode: enforce        # or shadow: evaluated and reported, never enforced
//! ```

use serde::{Deserialize, Serialize};

use super::{Effect, Mode};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across the whole set.
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// Signal types (event short names such as `session-revoked`, `risk-signal` for Kafka risk
    /// signals, `unknown`, or `*`) that trigger this rule.
    pub on: Vec<String>,
    /// CEL condition over `grant`, `context`, `signal`, `subject`, `now`.
    pub when: String,
    pub effect: Effect,
    /// Reason template; `{{ cel }}` placeholders are evaluated over the same variables.
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub mode: Mode,
}
