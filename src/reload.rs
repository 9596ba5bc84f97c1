//! Policy hot reload: one path for every trigger (directory change, SIGHUP, `POST
//! /v1/policies/reload`). A set that fails to load or lint is refused and the running one stays; a
//! valid, different set is swapped in atomically and every grant is re-evaluated under it.
//! Start-up loads its set through the same [`load_checked`], and re-evaluates every grant under
//! it, so a set changed while Vigil was stopped is applied exactly as a reload would apply it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::engine::Engine;
use crate::policy::{lint, PolicySet};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReloadOutcome {
    Swapped {
        version: String,
        previous_version: String,
    },
    Unchanged {
        version: String,
    },
    Refused {
        version: String,
        error: String,
    },
}

/// The one way a policy set is loaded, for start-up and every reload: the directory's rule
/// files — or, when `dir` is the default `policies` and does not exist, the built-in set — compiled
/// and linted; a set that lints with errors is refused. A configured directory that does not
/// exist is an error, never a silent fall-back.
pub fn load_checked(dir: &Path) -> Result<PolicySet, String> {
    if !dir.is_dir() && dir != Path::new(crate::config::DEFAULT_POLICY_DIR) {
        return Err(format!(
            "policy directory {} does not exist (resolved from the working directory {})",
            dir.display(),
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into())
        ));
    }
    let set = PolicySet::load_dir_or_builtin(dir).map_err(|e| e.to_string())?;
    let errors: Vec<String> = lint::lint(&set)
        .into_iter()
        .filter(|f| f.error)
        .map(|f| format!("rule `{}`: {}", f.rule, f.message))
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(set)
}

pub struct PolicyReloader {
    dir: PathBuf,
    engine: Arc<Engine>,
    /// Serializes reloads so two triggers never race.
    lock: Mutex<()>,
}

impl PolicyReloader {
    pub fn new(dir: PathBuf, engine: Arc<Engine>) -> PolicyReloader {
        PolicyReloader {
            dir,
            engine,
            lock: Mutex::new(()),
        }
    }

    /// Loads, lints and, if valid and different, swaps the policy set.
    pub fn reload(&self) -> ReloadOutcome {
        let _guard = self.lock.lock();
        let current = self.engine.policy_version();
        let refused = |error: String| {
            metrics::counter!(crate::telemetry::POLICY_RELOADS, "outcome" => "refused")
                .increment(1);
            tracing::error!(%error, running = %current, "policy reload refused; the running set stays");
            ReloadOutcome::Refused {
                version: current.clone(),
                error,
            }
        };
        let set = match load_checked(&self.dir) {
            Ok(set) => set,
            Err(e) => return refused(e),
        };
        if set.version == current {
            return ReloadOutcome::Unchanged { version: current };
        }
        let version = set.version.clone();
        if let Err(e) = self.engine.swap_policy(set) {
            return refused(e.to_string());
        }
        metrics::counter!(crate::telemetry::POLICY_RELOADS, "outcome" => "swapped").increment(1);
        ReloadOutcome::Swapped {
            version,
            previous_version: current,
        }
    }

    /// Polls the directory every `interval` and reloads when its content changes.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last_seen = PolicySet::version_of_dir(&self.dir).ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let now = PolicySet::version_of_dir(&self.dir).ok();
            if now != last_seen {
                last_seen = now;
                let me = self.clone();
                let outcome = tokio::task::spawn_blocking(move || me.reload()).await;
                tracing::info!(?outcome, "policy directory changed");
            }
        }
    }
}
