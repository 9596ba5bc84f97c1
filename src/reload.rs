//! Policy hot reload: one path for every trigger (directory change, SIGHUP, `POST
//! /v1/policies/reload`). A set that fails to load or lint, or fails its own tests, is refused
//! and the running one stays; a valid, different set is swapped in atomically and every grant is
//! re-evaluated under it, and the answer counts what changed. With `policy.require_preview`, a
//! set that would change more grants than that is refused with its impact unless forced.
//! Start-up loads its set through the same [`load_checked`], and re-evaluates every grant under
//! it, so a set changed while Vigil was stopped is applied exactly as a reload would apply it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config::PolicyConfig;
use crate::engine::shadow::ShadowSet;
use crate::engine::{Changes, Engine, History, Impact, Replay};
use crate::evaluate::testing;
use crate::policy::{is_rule_file, lint, PolicySet};

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReloadOutcome {
    Swapped {
        version: String,
        previous_version: String,
        /// The set's own tests that ran (and passed).
        tests_passed: usize,
        /// The grants the swap changed, by status and rule.
        #[serde(flatten)]
        changes: Changes,
    },
    Unchanged {
        version: String,
    },
    Refused {
        /// The running set's version (it stays).
        version: String,
        error: String,
        /// The set's own tests that failed.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        failed_tests: Vec<FailedTest>,
        /// What the set would have changed (a swap refused by `policy.require_preview`).
        #[serde(skip_serializing_if = "Option::is_none")]
        impact: Option<Box<Impact>>,
    },
}

/// A policy test that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedTest {
    pub file: String,
    pub name: String,
    pub failure: String,
}

/// Why a policy set is refused: at start-up, on reload, by `vigil check-config`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    pub error: String,
    pub failed_tests: Vec<FailedTest>,
}

impl From<String> for Refusal {
    fn from(error: String) -> Refusal {
        Refusal {
            error,
            failed_tests: Vec::new(),
        }
    }
}

/// A set that passed every check, and how many of its own tests ran.
pub struct Checked {
    pub set: PolicySet,
    pub tests_passed: usize,
}

/// The one way a policy set is loaded, for start-up and every reload: the directory's rule
/// files — or, when the directory is the default `policies` and does not exist, the built-in
/// set — compiled and linted, and the directory's own tests (`*.test.yaml`) run against it. A set
/// that lints with errors, or fails one of its tests, is refused. A configured directory that
/// does not exist is an error, never a silent fall-back.
pub fn load_checked(policy: &PolicyConfig) -> Result<Checked, Refusal> {
    let dir = policy.dir.as_path();
    if !dir.is_dir() && dir != Path::new(crate::config::DEFAULT_POLICY_DIR) {
        return Err(format!(
            "policy directory {} does not exist (resolved from the working directory {})",
            dir.display(),
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into())
        )
        .into());
    }
    let set = PolicySet::load_dir_or_builtin(dir).map_err(|e| e.to_string())?;
    refuse_lint_errors(&set)?;
    if !dir.is_dir() {
        return Ok(Checked {
            set,
            tests_passed: 0,
        });
    }
    let report = testing::run_set(&set, dir, policy.examples_dir.as_deref())
        .map_err(|e| format!("policy tests: {e}"))?;
    let failed_tests: Vec<FailedTest> = report
        .results
        .iter()
        .filter_map(|r| {
            Some(FailedTest {
                file: r.file.clone(),
                name: r.name.clone(),
                failure: r.failure.clone()?,
            })
        })
        .collect();
    if !failed_tests.is_empty() {
        return Err(Refusal {
            error: format!(
                "{} of {} policy tests failed: {}",
                failed_tests.len(),
                report.results.len(),
                failed_tests
                    .iter()
                    .map(|t| format!("{} :: {}: {}", t.file, t.name, t.failure))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            failed_tests,
        });
    }
    Ok(Checked {
        set,
        tests_passed: report.passed(),
    })
}

/// Replaces the rule files of `dir` (created if absent) with `files`, each written to a
/// temporary name and renamed over, and answers the rule files it held before (to put back).
/// Test files stay.
fn replace_rule_files(
    dir: &Path,
    files: &[(String, String)],
) -> std::io::Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir)?;
    let mut previous = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_rule_file(&name) && entry.file_type()?.is_file() {
            previous.push((name, std::fs::read_to_string(entry.path())?));
        }
    }
    for (name, text) in files {
        let staged = dir.join(format!(".{name}.promoting"));
        std::fs::write(&staged, text)?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    for (name, _) in &previous {
        if !files.iter().any(|(n, _)| n == name) {
            std::fs::remove_file(dir.join(name))?;
        }
    }
    Ok(previous)
}

/// A set whose rules lint with errors is refused (warnings pass).
fn refuse_lint_errors(set: &PolicySet) -> Result<(), Refusal> {
    let errors: Vec<String> = lint::lint(set)
        .into_iter()
        .filter(|f| f.error)
        .map(|f| format!("rule `{}`: {}", f.rule, f.message))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; ").into())
    }
}

/// Why an impact preview did not run.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The candidate set does not compile, or lints with errors.
    #[error("{0}")]
    Invalid(Refusal),
    /// Another preview or replay is running (one at a time: each uses every core for its length).
    #[error("an impact preview or replay is already running; retry when it is done")]
    Busy,
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// Grants sampled per bucket in the impact a refused reload answers with.
const REFUSAL_SAMPLES: usize = 3;

pub struct PolicyReloader {
    policy: PolicyConfig,
    engine: Arc<Engine>,
    /// Serializes reloads so two triggers never race.
    lock: Mutex<()>,
    /// Held while an impact preview runs.
    previewing: Mutex<()>,
}

impl PolicyReloader {
    pub fn new(policy: PolicyConfig, engine: Arc<Engine>) -> PolicyReloader {
        PolicyReloader {
            policy,
            engine,
            lock: Mutex::new(()),
            previewing: Mutex::new(()),
        }
    }

    /// What the candidate set of rule files `sources` (name, YAML) would change if swapped in
    /// now, with `samples` grants of each bucket (see [`Engine::impact_blocking`]). Changes
    /// nothing. The candidate's own tests are the caller's to run (`vigil policy impact` runs
    /// them before it asks).
    pub fn impact(
        &self,
        sources: &[(String, String)],
        samples: usize,
    ) -> Result<Impact, PreviewError> {
        self.previewing(sources, |set| {
            Ok(self.engine.impact_blocking(set, samples)?)
        })
    }

    /// Replays the signals received since `since` (seconds since the epoch) through the live set
    /// and the candidate set of rule files `sources` (see [`Engine::replay_blocking`]), reading
    /// the window from `history` (`None`: intake's record). Changes nothing; shares the
    /// preview's one-at-a-time door.
    pub fn replay(
        &self,
        sources: &[(String, String)],
        since: f64,
        samples: usize,
        history: Option<&dyn History>,
    ) -> Result<Replay, PreviewError> {
        self.previewing(sources, |set| {
            Ok(match history {
                Some(history) => self.engine.replay_from(history, set, since, samples)?,
                None => self.engine.replay_blocking(set, since, samples)?,
            })
        })
    }

    /// Runs `look` on the candidate set of rule files `sources`, compiled and linted, while no
    /// other preview or replay runs (each uses every core for its length).
    fn previewing<T>(
        &self,
        sources: &[(String, String)],
        look: impl FnOnce(&PolicySet) -> Result<T, PreviewError>,
    ) -> Result<T, PreviewError> {
        let _running = match self.previewing.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(PreviewError::Busy),
        };
        let set = PolicySet::from_sources(sources)
            .map_err(|e| PreviewError::Invalid(e.to_string().into()))?;
        refuse_lint_errors(&set).map_err(PreviewError::Invalid)?;
        look(&set)
    }

    /// Loads the candidate set of rule files `sources` (name, YAML) as the shadow set, replacing
    /// any: compiled and linted like a preview's candidate. Its tests run when it is promoted.
    pub fn load_shadow(&self, sources: Vec<(String, String)>) -> Result<Arc<PolicySet>, Refusal> {
        let set = PolicySet::from_sources(&sources).map_err(|e| Refusal::from(e.to_string()))?;
        refuse_lint_errors(&set)?;
        let set = Arc::new(set);
        self.engine.set_shadow(Some(ShadowSet {
            set: set.clone(),
            loaded_at: self.engine.clock().now(),
        }));
        tracing::info!(version = %set.version, "shadow policy set loaded");
        Ok(set)
    }

    /// Drops the shadow set; `false` when none was loaded.
    pub fn discard_shadow(&self) -> bool {
        let dropped = self.engine.set_shadow(None);
        if let Some(shadow) = &dropped {
            tracing::info!(version = %shadow.set.version, "shadow policy set discarded");
        }
        dropped.is_some()
    }

    /// Makes the shadow set live through the one reload path: its rule files replace the policy
    /// directory's (tests stay, and run against it), and the directory is reloaded. A refused
    /// reload puts the directory's files back and keeps the shadow set; a swap drops it. `None`
    /// when no shadow set is loaded.
    pub fn promote_shadow(&self, force: bool) -> Option<ReloadOutcome> {
        let _guard = self.lock.lock();
        let shadow = self.engine.shadow()?;
        let dir = self.policy.dir.as_path();
        let previous = match replace_rule_files(dir, &shadow.set.sources) {
            Ok(previous) => previous,
            Err(e) => {
                return Some(self.refused(
                    format!("writing the shadow set to {}: {e}", dir.display()).into(),
                    None,
                ))
            }
        };
        let outcome = self.reload_locked(force);
        match &outcome {
            ReloadOutcome::Refused { .. } => {
                if let Err(e) = replace_rule_files(dir, &previous) {
                    tracing::error!(error = %e, dir = %dir.display(),
                        "putting the policy directory's files back after a refused promotion");
                }
            }
            _ => {
                self.engine.set_shadow(None);
                tracing::info!(version = %shadow.set.version, "shadow policy set promoted");
            }
        }
        Some(outcome)
    }

    fn refused(&self, refusal: Refusal, impact: Option<Box<Impact>>) -> ReloadOutcome {
        let current = self.engine.policy_version();
        metrics::counter!(crate::telemetry::POLICY_RELOADS, "outcome" => "refused").increment(1);
        tracing::error!(error = %refusal.error, running = %current,
            "policy reload refused; the running set stays");
        ReloadOutcome::Refused {
            version: current,
            error: refusal.error,
            failed_tests: refusal.failed_tests,
            impact,
        }
    }

    /// Loads, checks (lint and the set's own tests) and, if valid and different, swaps the
    /// policy set, waiting until every grant is re-evaluated under it. With
    /// `policy.require_preview`, a swap that would change more grants than that is refused
    /// unless `force`.
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let _guard = self.lock.lock();
        self.reload_locked(force)
    }

    fn reload_locked(&self, force: bool) -> ReloadOutcome {
        let current = self.engine.policy_version();
        let refused = |refusal: Refusal, impact: Option<Box<Impact>>| self.refused(refusal, impact);
        let checked = match load_checked(&self.policy) {
            Ok(checked) => checked,
            Err(refusal) => return refused(refusal, None),
        };
        if checked.set.version == current {
            return ReloadOutcome::Unchanged { version: current };
        }
        if let (Some(limit), false) = (self.policy.require_preview, force) {
            match self.engine.impact_blocking(&checked.set, REFUSAL_SAMPLES) {
                Ok(impact) if impact.changes.changed > limit => {
                    let error = format!(
                        "the set would change {} grants, more than policy.require_preview ({limit}): \
                         preview it (vigil policy impact), then force the reload",
                        impact.changes.changed
                    );
                    return refused(error.into(), Some(Box::new(impact)));
                }
                Ok(_) => {}
                Err(e) => return refused(format!("impact preview: {e}").into(), None),
            }
        }
        let version = checked.set.version.clone();
        let changes = match self.engine.swap_policy(checked.set) {
            Ok(swap) => swap.wait_blocking(),
            Err(e) => return refused(e.to_string().into(), None),
        };
        metrics::counter!(crate::telemetry::POLICY_RELOADS, "outcome" => "swapped").increment(1);
        tracing::info!(%version, previous = %current, changed = changes.changed, "policy set swapped");
        ReloadOutcome::Swapped {
            version,
            previous_version: current,
            tests_passed: checked.tests_passed,
            changes,
        }
    }

    /// Polls the directory every `interval` and reloads when its content changes.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_seen = PolicySet::fingerprint_of_dir(&self.policy.dir).ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let now = PolicySet::fingerprint_of_dir(&self.policy.dir).ok();
            if now != last_seen {
                last_seen = now;
                let me = self.clone();
                let outcome = tokio::task::spawn_blocking(move || me.reload(false)).await;
                tracing::info!(?outcome, "policy directory changed");
            }
        }
    }
}
