//! Gathering one grant's evaluation inputs from the shared contexts: the principal's context (an
//! empty one when it has none yet), the contexts of the device and session it is narrowed to, and
//! the delegating user's for an agent's delegation. Snapshots (`Arc`s): the evaluation reads them
//! while the shards go on updating.

use std::sync::Arc;

use dashmap::DashMap;

use crate::context::{Decay, PrincipalContext};
use crate::evaluate::{evaluate_grant_under, Contexts, Trigger};
use crate::grant::Grant;
use crate::policy::{Evaluation, PolicySet};

/// The contexts one grant is evaluated on.
pub(super) struct Inputs {
    principal: Arc<PrincipalContext>,
    entities: Vec<Arc<PrincipalContext>>,
    delegator: Option<Arc<PrincipalContext>>,
    /// The principal's view, when the caller built it once for all of its grants
    /// ([`shared_view`]).
    view: Option<Arc<serde_json::Value>>,
}

impl Inputs {
    pub fn gather(contexts: &DashMap<String, Arc<PrincipalContext>>, grant: &Grant) -> Inputs {
        let principal = contexts
            .get(&*grant.principal)
            .map(|c| c.clone())
            .unwrap_or_else(|| Arc::new(PrincipalContext::new(&grant.principal)));
        let entities = ["device", "session"]
            .iter()
            .filter_map(|m| grant.members.get(m))
            .filter_map(|k| contexts.get(k).map(|c| c.clone()))
            .collect();
        let delegator = grant
            .on_behalf_of
            .as_ref()
            .and_then(|u| contexts.get(&**u).map(|c| c.clone()));
        Inputs {
            principal,
            entities,
            delegator,
            view: None,
        }
    }

    /// Evaluates on `view` as the principal's context view (from [`shared_view`] for this
    /// grant's principal) instead of building it again.
    pub fn sharing(mut self, view: Option<&Arc<serde_json::Value>>) -> Inputs {
        self.view = view.cloned();
        self
    }

    /// The principal context's version, recorded with a decision.
    pub fn context_version(&self) -> u64 {
        self.principal.version
    }

    pub fn evaluate(
        &self,
        policy: &PolicySet,
        grant: &Grant,
        trigger: Trigger<'_>,
        decay: &Decay,
        now: f64,
    ) -> Evaluation {
        let [outcome] = self.evaluate_under([policy], grant, trigger, decay, now);
        outcome
    }

    /// The request-time rules on an access `request` for `grant` (see
    /// [`crate::evaluate::evaluate_request`]).
    pub fn evaluate_request(
        &self,
        policy: &PolicySet,
        grant: &Grant,
        request: std::sync::Arc<serde_json::Value>,
        decay: &Decay,
        now: f64,
    ) -> (Evaluation, Vec<crate::decision::Hop>) {
        let entities: Vec<&PrincipalContext> = self.entities.iter().map(|c| &**c).collect();
        crate::evaluate::evaluate_request(
            policy,
            grant,
            Contexts {
                principal: &self.principal,
                entities: &entities,
                delegator: self.delegator.as_deref(),
                view: None,
            },
            request,
            decay,
            now,
        )
    }

    /// [`Inputs::evaluate`] under each of `policies`, on inputs built once.
    pub fn evaluate_under<const N: usize>(
        &self,
        policies: [&PolicySet; N],
        grant: &Grant,
        trigger: Trigger<'_>,
        decay: &Decay,
        now: f64,
    ) -> [Evaluation; N] {
        let entities: Vec<&PrincipalContext> = self.entities.iter().map(|c| &**c).collect();
        evaluate_grant_under(
            policies,
            grant,
            Contexts {
                principal: &self.principal,
                entities: &entities,
                delegator: self.delegator.as_deref(),
                view: self.view.as_ref(),
            },
            trigger,
            decay,
            now,
        )
    }
}

/// The view of `principal`'s context that every one of `grants` (all of them its grants) would
/// be evaluated on, when it is the same for each: none has a device or session context or a
/// delegating user, and the context holds no fact that depends on the grant
/// ([`PrincipalContext::view_is_grant_independent`]). `None` otherwise: each builds its own.
pub(super) fn shared_view(
    contexts: &DashMap<String, Arc<PrincipalContext>>,
    principal: &str,
    grants: &[&Grant],
    decay: &Decay,
    now: f64,
) -> Option<Arc<serde_json::Value>> {
    let first = grants.first()?;
    let context = contexts
        .get(principal)
        .map(|c| c.clone())
        .unwrap_or_else(|| Arc::new(PrincipalContext::new(principal)));
    let own_inputs_only = grants.iter().all(|g| {
        g.on_behalf_of.is_none()
            && ["device", "session"]
                .iter()
                .all(|m| g.members.get(m).is_none_or(|k| !contexts.contains_key(k)))
    });
    (own_inputs_only && context.view_is_grant_independent())
        .then(|| Arc::new(context.view(first, &[], decay, now)))
}
