//! Impact preview: what a candidate policy set would do to every live grant if it were swapped in
//! now — the same evaluation a swap runs ([`super::shard`]'s re-evaluate-all: each grant neither
//! revoked nor expired, on its current contexts, triggered by state) with nothing changed.
//!
//! It reads the shared snapshots (grants and contexts are `Arc`s) on threads of its own, one per
//! core, so the shards go on applying signals meanwhile; a grant that changes during the preview
//! is counted as it was when read. Revoked grants are counted apart: revocation is final, so no
//! set can change them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::decide::status_after;
use super::inputs::{shared_view, Inputs};
use super::shard::none_can_match;
use super::{EngineError, Shared};
use crate::evaluate::Trigger;
use crate::grant::{Grant, GrantStatus};
use crate::policy::{Evaluation, PolicySet};

/// What a candidate set would change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Impact {
    pub live_version: String,
    pub candidate_version: String,
    /// Grants evaluated: every grant neither revoked nor expired.
    pub evaluated: u64,
    /// Of those, the grants whose status the candidate leaves as it is.
    pub unchanged: u64,
    /// Of those, the grants whose status the candidate changes.
    #[serde(flatten)]
    pub changes: Changes,
    /// Revoked grants (final: not evaluated).
    pub revoked: u64,
    /// Changed grants the candidate leaves *less* restricted than they are (the dangerous
    /// direction: a step-up or restriction lifted).
    pub loosening: u64,
    /// Grants for which a candidate rule failed to evaluate (and failed closed).
    pub errors: u64,
    /// The rules that failed, with the grants each failed on.
    pub errors_by_rule: Vec<RuleCount>,
    /// Up to `samples` grants of each bucket, with why.
    pub samples: Samples,
    pub elapsed_ms: u64,
}

/// Status changes: how many, by status before and after, and by deciding rule. What an impact
/// preview predicts and what a policy swap reports having done, in one shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub changed: u64,
    pub transitions: Vec<Transition>,
    /// By deciding rule (a change decided by two rules counts for each; a change to `active`
    /// has no deciding rule and counts for `(none)`).
    pub by_rule: Vec<RuleCount>,
}

/// [`Changes`] being counted.
#[derive(Debug, Default)]
pub(crate) struct ChangeCounts {
    transitions: BTreeMap<(GrantStatus, GrantStatus), u64>,
    by_rule: BTreeMap<String, u64>,
}

impl ChangeCounts {
    pub fn count<'a>(
        &mut self,
        from: GrantStatus,
        to: GrantStatus,
        rules: impl Iterator<Item = &'a str>,
    ) {
        *self.transitions.entry((from, to)).or_default() += 1;
        let mut any = false;
        if to != GrantStatus::Active {
            for rule in rules {
                any = true;
                *self.by_rule.entry(rule.to_owned()).or_default() += 1;
            }
        }
        if !any {
            *self.by_rule.entry("(none)".to_owned()).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: ChangeCounts) {
        for (k, n) in other.transitions {
            *self.transitions.entry(k).or_default() += n;
        }
        for (k, n) in other.by_rule {
            *self.by_rule.entry(k).or_default() += n;
        }
    }

    pub fn finish(self) -> Changes {
        Changes {
            changed: self.transitions.values().sum(),
            transitions: self
                .transitions
                .into_iter()
                .map(|((from, to), count)| Transition { from, to, count })
                .collect(),
            by_rule: by_count(self.by_rule),
        }
    }
}

/// Counts per rule, most first.
fn by_count(counts: BTreeMap<String, u64>) -> Vec<RuleCount> {
    let mut v: Vec<RuleCount> = counts
        .into_iter()
        .map(|(rule, count)| RuleCount { rule, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.rule.cmp(&b.rule)));
    v
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub from: GrantStatus,
    pub to: GrantStatus,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCount {
    pub rule: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    pub changed: Vec<Sample>,
    pub loosening: Vec<Sample>,
    pub errors: Vec<Sample>,
}

/// One grant the candidate would change (or fails on), and why.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub grant_id: String,
    pub subject: String,
    pub from: GrantStatus,
    pub to: GrantStatus,
    /// The candidate's evaluation: each matched rule with its effect, reason and any error.
    pub evaluation: Evaluation,
    /// The subject explained as `GET /v1/subjects/{key}` would (context facts with provenance,
    /// grants, recent signals and decisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Value>,
}

/// One thread's share of the counting.
#[derive(Default)]
struct Tally {
    evaluated: u64,
    revoked: u64,
    changes: ChangeCounts,
    loosening: u64,
    errors: u64,
    errors_by_rule: BTreeMap<String, u64>,
    changed: Vec<Sample>,
    loosened: Vec<Sample>,
    failed: Vec<Sample>,
}

impl Tally {
    /// Counts one principal's grants: those the screen proves no enforced rule can match are
    /// left as they are when active (exactly what a swap's re-evaluation skips); every other one
    /// is evaluated.
    fn principal(
        &mut self,
        shared: &Shared,
        candidate: &PolicySet,
        grants: &[Arc<Grant>],
        now: f64,
        samples: usize,
    ) {
        let mut live: Vec<&Grant> = Vec::with_capacity(grants.len());
        for grant in grants {
            if grant.status == GrantStatus::Revoked {
                self.revoked += 1;
            } else if !grant.is_expired(now) {
                live.push(grant);
            }
        }
        let Some(first) = live.first() else {
            return;
        };
        let view = shared_view(
            &shared.contexts,
            &first.principal,
            &live,
            &shared.settings.decay,
            now,
        );
        let screened = none_can_match(candidate, view.as_ref(), &live, now);
        for grant in live {
            if screened && grant.status == GrantStatus::Active {
                self.evaluated += 1;
                continue;
            }
            let inputs = Inputs::gather(&shared.contexts, grant).sharing(view.as_ref());
            let outcome = inputs.evaluate(
                candidate,
                grant,
                Trigger::State,
                &shared.settings.decay,
                now,
            );
            self.count(grant, outcome, samples);
        }
    }

    fn add(&mut self, other: Tally, samples: usize) {
        self.evaluated += other.evaluated;
        self.revoked += other.revoked;
        self.changes.merge(other.changes);
        self.loosening += other.loosening;
        self.errors += other.errors;
        for (k, n) in other.errors_by_rule {
            *self.errors_by_rule.entry(k).or_default() += n;
        }
        for (mine, theirs) in [
            (&mut self.changed, other.changed),
            (&mut self.loosened, other.loosened),
            (&mut self.failed, other.failed),
        ] {
            mine.extend(theirs);
            mine.truncate(samples);
        }
    }

    fn count(&mut self, grant: &Grant, outcome: Evaluation, samples: usize) {
        self.evaluated += 1;
        let to = status_after(&outcome);
        let mut failed = false;
        for m in outcome.matched.iter().filter(|m| m.error.is_some()) {
            failed = true;
            *self.errors_by_rule.entry(m.id.clone()).or_default() += 1;
        }
        if failed {
            self.errors += 1;
        }
        let changed = to != grant.status;
        if changed {
            let deciding = outcome.deciding_rules();
            self.changes
                .count(grant.status, to, deciding.iter().map(|m| m.id.as_str()));
        }
        let loosened = changed && to < grant.status;
        if loosened {
            self.loosening += 1;
        }
        let wanted = (changed && self.changed.len() < samples)
            || (loosened && self.loosened.len() < samples)
            || (failed && self.failed.len() < samples);
        if !wanted {
            return;
        }
        let sample = Sample {
            grant_id: grant.id.to_string(),
            subject: grant.principal.to_string(),
            from: grant.status,
            to,
            evaluation: outcome,
            explain: None,
        };
        if failed && self.failed.len() < samples {
            self.failed.push(sample.clone());
        }
        if loosened && self.loosened.len() < samples {
            self.loosened.push(sample.clone());
        }
        if changed && self.changed.len() < samples {
            self.changed.push(sample);
        }
    }
}

/// `grants` (sorted by principal) in up to `n` runs of about equal length, none splitting a
/// principal's grants.
fn split_at_principals(grants: &[Arc<Grant>], n: usize) -> Vec<&[Arc<Grant>]> {
    let target = grants.len().div_ceil(n.max(1)).max(1);
    let mut parts = Vec::new();
    let mut rest = grants;
    while !rest.is_empty() {
        let mut end = target.min(rest.len());
        while end < rest.len() && rest[end].principal == rest[end - 1].principal {
            end += 1;
        }
        let (part, tail) = rest.split_at(end);
        parts.push(part);
        rest = tail;
    }
    parts
}

/// Evaluates `candidate` on every grant of `shared` (see the module docs); `samples` grants of
/// each bucket are kept, without their explain (the caller adds it).
pub(super) fn preview(
    shared: &Shared,
    candidate: &PolicySet,
    samples: usize,
) -> Result<Impact, EngineError> {
    let started = Instant::now();
    let live_version = shared.policy().version.clone();
    let now = shared.settings.clock.now();
    // By principal, so each principal's grants are screened together, as a swap does.
    let mut grants: Vec<Arc<Grant>> = shared.grants.iter().map(|g| g.value().clone()).collect();
    grants.sort_unstable_by(|a, b| a.principal.cmp(&b.principal));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = split_at_principals(&grants, threads);
    let mut total = Tally::default();
    let mut panicked = false;
    std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    let mut tally = Tally::default();
                    for one in part.chunk_by(|a, b| a.principal == b.principal) {
                        tally.principal(shared, candidate, one, now, samples);
                    }
                    tally
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok(tally) => total.add(tally, samples),
                Err(_) => panicked = true,
            }
        }
    });
    // An evaluation that panicked is a bug; the preview answers nothing rather than undercount.
    if panicked {
        return Err(EngineError::Thread(
            "an impact preview thread panicked".into(),
        ));
    }
    let changes = total.changes.finish();
    Ok(Impact {
        live_version,
        candidate_version: candidate.version.clone(),
        evaluated: total.evaluated,
        unchanged: total.evaluated - changes.changed,
        changes,
        revoked: total.revoked,
        loosening: total.loosening,
        errors: total.errors,
        errors_by_rule: by_count(total.errors_by_rule),
        samples: Samples {
            changed: total.changed,
            loosening: total.loosened,
            errors: total.failed,
        },
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
