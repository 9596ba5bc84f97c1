//! The shadow set: a whole candidate policy set loaded beside the live one. Every live evaluation
//! also runs it on the same inputs; where the two would leave the grant in different statuses
//! the difference is a [`Divergence`], held (the newest `policy.shadow_divergences_max`) for
//! operators to query and counted in `vigil_shadow_divergences_total` by rule and direction. The
//! shadow set never decides anything: no decision, no grant change, no SET.
//!
//! It lives in memory: a restart discards it (loading one is an operator's experiment; making it
//! live is `promote`, which writes its files to the policy directory and reloads through the one
//! reload path). In cluster mode every instance holds it and records the divergences of its own
//! partitions' grants (`policy_api` passes the calls on and merges the listings).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::decision::Cause;
use crate::grant::{Grant, GrantStatus};
use crate::policy::{Evaluation, PolicySet};

/// A candidate set running beside the live one.
pub struct ShadowSet {
    /// Its rule files (`set.sources`) are what `promote` writes to the policy directory.
    pub set: Arc<PolicySet>,
    /// When it was loaded (seconds since the epoch).
    pub loaded_at: f64,
}

/// Which way the shadow set would have moved a grant, relative to the live set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The shadow set would leave the grant more restricted (up to revoked).
    Stricter,
    /// The shadow set would leave it less restricted than the live set does: the dangerous way.
    Looser,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Stricter => "stricter",
            Direction::Looser => "looser",
        }
    }
}

/// One set's outcome for a grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub version: String,
    pub status: GrantStatus,
    /// The rules deciding that status (none for active).
    pub rules: Vec<String>,
    pub reason: String,
    /// Deciding rules that failed (and so matched: fail closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Outcome {
    fn of(evaluation: &Evaluation, version: &str) -> Outcome {
        let deciding = evaluation.deciding_rules();
        Outcome {
            version: version.to_owned(),
            status: super::decide::status_after(evaluation),
            rules: deciding.iter().map(|m| m.id.clone()).collect(),
            reason: deciding
                .iter()
                .map(|m| m.reason.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            errors: deciding
                .iter()
                .filter(|m| m.error.is_some())
                .map(|m| m.id.clone())
                .collect(),
        }
    }
}

/// An evaluation where the shadow set and the live set disagreed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Divergence {
    /// Increasing: the cursor of the divergence listing.
    pub id: u64,
    /// When (seconds since the epoch).
    pub time: f64,
    pub grant_id: String,
    pub subject: String,
    pub enforcement_points: Vec<String>,
    /// What the evaluation was for: the signal (with its `jti`), or registration.
    pub cause: Cause,
    pub direction: Direction,
    /// The rule the difference hangs on: the stricter side's first deciding rule.
    pub rule: String,
    pub live: Outcome,
    pub shadow: Outcome,
}

/// Which divergences to list, newest first.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DivergenceQuery {
    pub grant: Option<String>,
    /// A principal key (`email:…`).
    pub subject: Option<String>,
    pub rule: Option<String>,
    pub direction: Option<Direction>,
    /// Only divergences older than this id (the previous page's `next`).
    pub before: Option<u64>,
    pub limit: Option<usize>,
}

/// Most divergences one listing returns.
pub const MAX_LIMIT: usize = 1000;

/// The held divergences (a ring of the newest) and their counts since the shadow set was loaded.
pub struct Divergences {
    inner: Mutex<Held>,
    cap: usize,
}

#[derive(Default)]
struct Held {
    ring: VecDeque<Divergence>,
    next_id: u64,
    /// Every divergence since the shadow set was loaded, by (rule, direction).
    counts: BTreeMap<(String, Direction), u64>,
}

/// Divergence counts since the shadow set was loaded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DivergenceCounts {
    pub total: u64,
    pub stricter: u64,
    pub looser: u64,
    /// `{rule: {stricter, looser}}`.
    pub by_rule: BTreeMap<String, BTreeMap<String, u64>>,
    /// Divergences held for listing (the newest ones).
    pub held: usize,
}

impl DivergenceCounts {
    /// Adds another instance's counts (cluster mode: each holds its own partitions').
    pub fn add(&mut self, other: &DivergenceCounts) {
        self.total += other.total;
        self.stricter += other.stricter;
        self.looser += other.looser;
        self.held += other.held;
        for (rule, by) in &other.by_rule {
            let mine = self.by_rule.entry(rule.clone()).or_default();
            for (direction, n) in by {
                *mine.entry(direction.clone()).or_default() += n;
            }
        }
    }
}

impl Divergences {
    pub fn new(cap: usize) -> Divergences {
        Divergences {
            inner: Mutex::new(Held::default()),
            cap: cap.max(1),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every divergence (a new shadow set, or none).
    pub fn clear(&self) {
        let mut held = self.held();
        held.ring.clear();
        held.counts.clear();
        metrics::gauge!(crate::telemetry::SHADOW_DIVERGENCES_HELD).set(0.0);
    }

    /// Compares one grant's live and shadow evaluations; records a divergence when they would
    /// leave it in different statuses.
    #[allow(clippy::too_many_arguments)]
    pub fn compare(
        &self,
        grant: &Grant,
        cause: &Cause,
        live: &Evaluation,
        live_version: &str,
        shadow: &Evaluation,
        shadow_version: &str,
        now: f64,
    ) {
        let (live, shadow) = (
            Outcome::of(live, live_version),
            Outcome::of(shadow, shadow_version),
        );
        if live.status == shadow.status {
            return;
        }
        let (direction, stricter) = if shadow.status > live.status {
            (Direction::Stricter, &shadow)
        } else {
            (Direction::Looser, &live)
        };
        let rule = stricter.rules.first().cloned().unwrap_or_default();
        metrics::counter!(crate::telemetry::SHADOW_DIVERGENCES,
            "rule" => rule.clone(), "direction" => direction.label())
        .increment(1);
        let mut held = self.held();
        *held.counts.entry((rule.clone(), direction)).or_default() += 1;
        held.next_id += 1;
        let id = held.next_id;
        if held.ring.len() >= self.cap {
            held.ring.pop_front();
        }
        held.ring.push_back(Divergence {
            id,
            time: now,
            grant_id: grant.id.to_string(),
            subject: grant.principal.to_string(),
            enforcement_points: grant.enforcement_points.to_vec(),
            cause: cause.clone(),
            direction,
            rule,
            live,
            shadow,
        });
        metrics::gauge!(crate::telemetry::SHADOW_DIVERGENCES_HELD).set(held.ring.len() as f64);
    }

    /// The held divergences `query` selects, newest first, and the cursor of the next page.
    pub fn list(&self, query: &DivergenceQuery) -> (Vec<Divergence>, Option<u64>) {
        let limit = query.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
        let held = self.held();
        let mut page: Vec<Divergence> = held
            .ring
            .iter()
            .rev()
            .filter(|d| query.before.is_none_or(|b| d.id < b))
            .filter(|d| query.grant.as_deref().is_none_or(|g| d.grant_id == g))
            .filter(|d| query.subject.as_deref().is_none_or(|s| d.subject == s))
            .filter(|d| query.rule.as_deref().is_none_or(|r| d.rule == r))
            .filter(|d| query.direction.is_none_or(|w| d.direction == w))
            .take(limit + 1)
            .cloned()
            .collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page.last().map_or(0, |d| d.id)
        });
        (page, next)
    }

    pub fn counts(&self) -> DivergenceCounts {
        let held = self.held();
        let mut counts = DivergenceCounts {
            held: held.ring.len(),
            ..DivergenceCounts::default()
        };
        for ((rule, direction), n) in &held.counts {
            counts.total += n;
            match direction {
                Direction::Stricter => counts.stricter += n,
                Direction::Looser => counts.looser += n,
            }
            *counts
                .by_rule
                .entry(rule.clone())
                .or_default()
                .entry(direction.label().to_owned())
                .or_default() += n;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::grant::GrantRequest;
    use crate::policy::{Effect, RuleMatch};

    fn grant(id: &str) -> Grant {
        let v = json!({"id": id, "kind": "session",
            "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0});
        serde_json::from_value::<GrantRequest>(v)
            .unwrap()
            .into_grant("email:u@example.com".into(), 10.0)
            .unwrap()
    }

    fn outcome(effect: Option<(Effect, &str)>) -> Evaluation {
        Evaluation {
            effect: effect.map(|(e, _)| e),
            matched: effect
                .into_iter()
                .map(|(effect, id)| RuleMatch {
                    id: id.into(),
                    effect,
                    reason: format!("{id} matched"),
                    error: None,
                    shadow: false,
                })
                .collect(),
            shadow: Vec::new(),
        }
    }

    #[test]
    fn only_different_statuses_diverge_and_the_ring_keeps_the_newest() {
        let divergences = Divergences::new(2);
        let cause = Cause::of_state("registration");
        let step_up = outcome(Some((Effect::StepUp, "medium")));
        let revoke = outcome(Some((Effect::Revoke, "medium-revokes")));
        let none = outcome(None);
        divergences.compare(&grant("same"), &cause, &step_up, "a", &step_up, "b", 1.0);
        assert_eq!(divergences.counts().total, 0);
        for (i, id) in ["g1", "g2", "g3"].iter().enumerate() {
            divergences.compare(&grant(id), &cause, &step_up, "a", &revoke, "b", i as f64);
        }
        divergences.compare(&grant("g4"), &cause, &step_up, "a", &none, "b", 9.0);
        let counts = divergences.counts();
        assert_eq!((counts.total, counts.stricter, counts.looser), (4, 3, 1));
        assert_eq!(counts.by_rule["medium-revokes"]["stricter"], 3);
        // Looser: the rule is the live set's, which the shadow set would no longer apply.
        assert_eq!(counts.by_rule["medium"]["looser"], 1);
        assert_eq!(counts.held, 2);
        let (all, next) = divergences.list(&DivergenceQuery::default());
        let ids: Vec<&str> = all.iter().map(|d| d.grant_id.as_str()).collect();
        assert_eq!((ids, next), (vec!["g4", "g3"], None));
        assert_eq!(all[1].live.status, GrantStatus::StepUp);
        assert_eq!(all[1].shadow.status, GrantStatus::Revoked);
        let (stricter, _) = divergences.list(&DivergenceQuery {
            direction: Some(Direction::Stricter),
            ..DivergenceQuery::default()
        });
        assert_eq!(stricter.len(), 1);
        let (page, next) = divergences.list(&DivergenceQuery {
            limit: Some(1),
            ..DivergenceQuery::default()
        });
        assert_eq!((page[0].grant_id.as_str(), next), ("g4", Some(page[0].id)));
        divergences.clear();
        assert_eq!(divergences.counts().total, 0);
    }
}
