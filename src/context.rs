//! The live context of one principal (or one device), folded from signals.
//!
//! Every fact carries the time the event happened (`event_timestamp`, else `toe`, else `iat`), its
//! source and the intake sequence number. **An older signal never overwrites a newer one**, whatever the
//! order of arrival (RFC 8417 §5.3–5.4); equal times are broken by sequence number, so the fold is
//! deterministic. Facts may decay: a configured TTL per kind hides a fact once its event time is older
//! than the TTL (it is kept, so a later, older signal still cannot take its place).
//!
//! [`PrincipalContext::view`] renders what policy sees as `context`, for one grant: per-grant facts
//! (the latest session revocation that covers this grant, the compliance of this grant's device) are
//! derived here so that rules stay simple comparisons.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::compact_map::CompactMap;
use crate::events::{
    ChangeDirection, ChangeType, ComplianceStatus, Event, RiskLevel, RiskPrincipal,
};
use crate::grant::{Grant, Registrant};
use crate::principal::{filter_matches, Target};
use crate::signal::Signal;

/// How many session revocations a context remembers (the newest are kept).
const MAX_SESSION_REVOCATIONS: usize = 128;
/// How many recent signals a context keeps for "explain".
const RECENT_SIGNALS: usize = 20;
/// Most facts of one kind a context holds (risk per source, compliance per device, assurance per
/// namespace, attributes, a token's claims, token scopes of claims, …): the keys come from what
/// transmitters and feeds send, so without a bound one subject's context would grow with every
/// new key. Beyond it a fact goes, as a session revocation does past its own bound: the oldest
/// (by event time) of the party holding the most facts of the kind ([`fair_victim`]). So a party
/// sending ever new keys — a feed naming a new `source` in every message, say — evicts its own
/// facts, never another party's (an identity provider's high risk level, a session revocation).
pub const MAX_FACTS_PER_KIND: usize = 256;

/// A fact with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub value: T,
    /// Event time, seconds.
    pub time: f64,
    pub source: String,
    /// Intake sequence number of the signal (0 for facts not from intake).
    pub seq: u64,
    /// This fact's own lifetime (a risk feed's per-message TTL), overriding the kind's decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// The configured party that said it (its transmitter, or its risk feed's topic; `NONE` for
    /// facts stored before parties were recorded): a kind's bound is shared fairly between
    /// parties ([`MAX_FACTS_PER_KIND`]). Two bytes, an index into the names of parties.
    #[serde(default, skip_serializing_if = "Registrant::is_none")]
    pub party: Registrant,
}

impl<T> Stamped<T> {
    /// Whether `self` should replace `old`: strictly newer event time, or equal time and later signal.
    fn supersedes(&self, old: &Stamped<T>) -> bool {
        self.time > old.time || (self.time == old.time && self.seq > old.seq)
    }
}

/// Whether `new` changes a fact that is `old`: it supersedes it and says something different.
fn changes<T: PartialEq>(old: &Stamped<T>, new: &Stamped<T>) -> bool {
    new.supersedes(old) && !(old.value == new.value && old.time == new.time)
}

fn upsert<T: PartialEq>(slot: &mut Option<Stamped<T>>, new: Stamped<T>) -> bool {
    match slot {
        Some(old) if !changes(old, &new) => false,
        _ => {
            *slot = Some(new);
            true
        }
    }
}

fn upsert_map<T: PartialEq>(
    map: &mut CompactMap<String, Stamped<T>>,
    key: String,
    new: Stamped<T>,
) -> bool {
    // In place when the key is known (the common case: a feed updating a subject's existing
    // fact): no remove and re-insert.
    match map.get_mut(&key) {
        Some(old) if !changes(old, &new) => false,
        Some(old) => {
            *old = new;
            true
        }
        None => {
            if map.len() >= MAX_FACTS_PER_KIND {
                match fair_victim(map, new.party, 1) {
                    // The new fact would be its own party's oldest: it is the one that goes.
                    Some((_, party, time)) if party == new.party && new.time < time => {
                        metrics::counter!(crate::telemetry::CONTEXT_FACTS_EVICTED).increment(1);
                        return false;
                    }
                    Some((k, _, _)) => {
                        map.remove(&k);
                        metrics::counter!(crate::telemetry::CONTEXT_FACTS_EVICTED).increment(1);
                    }
                    None => {}
                }
            }
            map.insert(key, new);
            true
        }
    }
}

/// The fact to evict from a full `map` (its key, party and event time): the oldest of the party
/// holding the most facts of the kind, counting `extra` more for `party` (a new fact of its not
/// yet held). On a tie the one arriving (`party`) gives way, else the lower party.
fn fair_victim<T>(
    map: &CompactMap<String, Stamped<T>>,
    party: Registrant,
    extra: usize,
) -> Option<(String, Registrant, f64)> {
    fair_pick(
        map.iter().map(|(k, f)| (k.as_str(), f.party, f.time, true)),
        party,
        extra,
    )
}

/// [`fair_victim`] over `items` — every fact of a full kind as (key, party, event time, whether
/// it may go) — returning the oldest that may go of the party holding the most; a party none of
/// whose facts may go is passed over for the next.
fn fair_pick<'a>(
    items: impl Iterator<Item = (&'a str, Registrant, f64, bool)>,
    party: Registrant,
    extra: usize,
) -> Option<(String, Registrant, f64)> {
    let items: Vec<_> = items.collect();
    let mut held: Vec<(Registrant, usize)> = vec![(party, extra)];
    for (_, p, _, _) in &items {
        match held.iter_mut().find(|(q, _)| q == p) {
            Some((_, n)) => *n += 1,
            None => held.push((*p, 1)),
        }
    }
    // Most held first; on a tie the arriving party, then by name.
    held.sort_by_cached_key(|(p, n)| (std::cmp::Reverse(*n), *p != party, p.name()));
    held.iter().find_map(|(loser, _)| {
        items
            .iter()
            .filter(|(_, p, _, may_go)| p == loser && *may_go)
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|(k, p, t, _)| ((*k).to_owned(), *p, *t))
    })
}

/// The party and event time of a token scope's newest claim (the scope is that party's).
fn newest_claim(claims: &CompactMap<String, Stamped<Value>>) -> (Registrant, f64) {
    claims
        .values()
        .max_by(|a, b| a.time.total_cmp(&b.time))
        .map_or((Registrant::NONE, f64::NEG_INFINITY), |c| (c.party, c.time))
}

/// Per-kind decay (seconds). Absent = never decays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decay {
    #[serde(default)]
    pub risk: Option<u64>,
    #[serde(default)]
    pub device_compliance: Option<u64>,
    #[serde(default)]
    pub assurance: Option<u64>,
    #[serde(default)]
    pub claims: Option<u64>,
    #[serde(default)]
    pub attributes: Option<u64>,
}

fn live<T>(fact: &Stamped<T>, ttl: Option<u64>, now: f64) -> bool {
    fact.ttl
        .or(ttl)
        .is_none_or(|ttl| now - fact.time <= ttl as f64)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountState {
    /// `enabled`, `disabled` or `purged`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RiskFact {
    pub level: RiskLevel,
    pub principal: RiskPrincipal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An assurance level's name with its rank ([`crate::events::assurance_rank`]), ranked once when
/// the fact is made or loaded rather than at every evaluation. Stored as the name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssuranceLevel {
    name: String,
    rank: i64,
}

impl AssuranceLevel {
    pub fn new(name: String) -> AssuranceLevel {
        let rank = crate::events::assurance_rank(&name);
        AssuranceLevel { name, rank }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn rank(&self) -> i64 {
        self.rank
    }
}

impl Serialize for AssuranceLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.name.serialize(s)
    }
}

impl<'de> Deserialize<'de> for AssuranceLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AssuranceLevel, D::Error> {
        String::deserialize(d).map(AssuranceLevel::new)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssuranceFact {
    pub level: AssuranceLevel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<ChangeDirection>,
}

/// A summary of a signal that touched this context, for "explain".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalSummary {
    pub seq: u64,
    pub event_type: String,
    pub event_time: f64,
    pub source: String,
    pub jti: String,
    pub changed: bool,
}

/// The folded state of one principal or device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrincipalContext {
    pub key: String,
    /// Incremented on every change.
    pub version: u64,
    pub account: Option<Stamped<AccountState>>,
    /// Latest change per credential type (CAEP credential-change).
    pub credential_changes: CompactMap<String, Stamped<String>>,
    /// Latest compromise per credential type (RISC credential-compromise).
    pub credential_compromises: CompactMap<String, Stamped<()>>,
    pub credential_change_required: Option<Stamped<()>>,
    /// Session revocations keyed by their narrowing filter (`""` = all sessions of the principal).
    /// Stored as rows of their own (`engine/persist.rs`), so absent from a stored context's JSON.
    #[serde(default)]
    pub session_revocations: CompactMap<String, Stamped<BTreeMap<String, String>>>,
    /// Risk per `PRINCIPAL/source` (CAEP risk-level-change, Kafka risk signals).
    pub risk: CompactMap<String, Stamped<RiskFact>>,
    /// Compliance per device key.
    pub device_compliance: CompactMap<String, Stamped<ComplianceStatus>>,
    /// Assurance per namespace.
    pub assurance: CompactMap<String, Stamped<AssuranceFact>>,
    /// Token claims changed by CAEP token-claims-change: scope (`""` for the principal, or the token's
    /// `jwt_id:` / `saml_assertion_id:` key when the event named one token) → claim name → value.
    pub claims: CompactMap<String, CompactMap<String, Stamped<Value>>>,
    /// RISC identifier, recovery and opt-out events, by event name.
    pub lifecycle: CompactMap<String, Stamped<Value>>,
    /// Free-form attributes (Kafka risk feeds).
    pub attributes: CompactMap<String, Stamped<Value>>,
    /// The last signals that touched this context, newest first, for "explain". A live window
    /// since start, not persisted: rewriting it with every change would multiply the bytes each
    /// signal costs the store, and every fact keeps its own provenance (time, source, seq).
    /// Shared summaries: the context is copied on every change, the summaries never are.
    #[serde(skip)]
    pub recent_signals: VecDeque<Arc<SignalSummary>>,
}

impl PrincipalContext {
    pub fn new(key: &str) -> PrincipalContext {
        PrincipalContext {
            key: key.to_owned(),
            ..PrincipalContext::default()
        }
    }

    /// This context as it stood before the signal with sequence number `seq` was applied, as far
    /// as it can be told (a replay's starting point): the facts that signal or a later one set are
    /// dropped. The value each of them replaced is not kept anywhere, so the answer also counts
    /// them — facts whose earlier value is unknown.
    pub fn before_seq(&self, seq: u64) -> (PrincipalContext, usize) {
        let mut ctx = self.clone();
        let mut dropped = 0;
        macro_rules! keep_option {
            ($field:ident) => {
                if ctx.$field.as_ref().is_some_and(|f| f.seq >= seq) {
                    ctx.$field = None;
                    dropped += 1;
                }
            };
        }
        macro_rules! keep_map {
            ($map:expr) => {{
                let before = $map.len();
                $map.retain(|_, f| f.seq < seq);
                dropped += before - $map.len();
            }};
        }
        keep_option!(account);
        keep_option!(credential_change_required);
        keep_map!(ctx.credential_changes);
        keep_map!(ctx.credential_compromises);
        keep_map!(ctx.session_revocations);
        keep_map!(ctx.risk);
        keep_map!(ctx.device_compliance);
        keep_map!(ctx.assurance);
        keep_map!(ctx.lifecycle);
        keep_map!(ctx.attributes);
        for claims in ctx.claims.values_mut() {
            keep_map!(claims);
        }
        ctx.claims.retain(|_, claims| !claims.is_empty());
        ctx.recent_signals.retain(|s| s.seq < seq);
        (ctx, dropped)
    }

    /// The sequence number of every fact held (the signal that set it).
    pub fn fact_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.fact_stamps().map(|(seq, _)| seq)
    }

    /// Whether the IdP said the account is disabled or purged (and has not enabled it since).
    pub fn account_closed(&self) -> bool {
        self.account
            .as_ref()
            .is_some_and(|a| matches!(a.value.state.as_str(), "disabled" | "purged"))
    }

    /// The event time of the newest fact held, `None` for a context holding none: how long ago
    /// anything was said about the subject (context retention, `engine.context_retention_secs`).
    pub fn last_event_time(&self) -> Option<f64> {
        self.fact_stamps().map(|(_, time)| time).reduce(f64::max)
    }

    /// Every fact's sequence number and event time.
    fn fact_stamps(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        fn stamp<T>(f: &Stamped<T>) -> (u64, f64) {
            (f.seq, f.time)
        }
        let options = [
            self.account.as_ref().map(stamp),
            self.credential_change_required.as_ref().map(stamp),
        ];
        options
            .into_iter()
            .flatten()
            .chain(self.credential_changes.values().map(stamp))
            .chain(self.credential_compromises.values().map(stamp))
            .chain(self.session_revocations.values().map(stamp))
            .chain(self.risk.values().map(stamp))
            .chain(self.device_compliance.values().map(stamp))
            .chain(self.assurance.values().map(stamp))
            .chain(self.lifecycle.values().map(stamp))
            .chain(self.attributes.values().map(stamp))
            .chain(self.claims.values().flat_map(|c| c.values().map(stamp)))
    }

    /// Folds one signal in. `target` is the signal's subject resolved against this context (its
    /// narrowing members). Returns whether any fact changed.
    pub fn apply(&mut self, signal: &Signal, target: &Target) -> bool {
        self.apply_noting(signal, target, &mut Vec::new())
    }

    /// [`PrincipalContext::apply`], also noting in `revocations` the keys of the session
    /// revocations it added, replaced or evicted — so the store can write those entries alone
    /// instead of the whole (up to 128 entries) map with every revocation.
    pub fn apply_noting(
        &mut self,
        signal: &Signal,
        target: &Target,
        revocations: &mut Vec<String>,
    ) -> bool {
        let source = signal.source.label();
        let party = signal.source.party();
        // A macro, not a closure: facts have different value types.
        macro_rules! stamp {
            ($value:expr) => {
                Stamped {
                    value: $value,
                    time: signal.event_time,
                    source: source.clone(),
                    seq: signal.seq,
                    ttl: signal.ttl_secs,
                    party,
                }
            };
        }
        let changed = match &signal.event {
            Event::AccountDisabled(e) => upsert(
                &mut self.account,
                stamp!(AccountState {
                    state: "disabled".into(),
                    reason: e.reason.as_ref().map(|r| r.as_str().to_owned()),
                }),
            ),
            Event::AccountPurged(_) => upsert(
                &mut self.account,
                stamp!(AccountState {
                    state: "purged".into(),
                    reason: None,
                }),
            ),
            Event::AccountEnabled(_) => upsert(
                &mut self.account,
                stamp!(AccountState {
                    state: "enabled".into(),
                    reason: None,
                }),
            ),
            Event::CredentialChange(e) => upsert_map(
                &mut self.credential_changes,
                e.credential_type.as_str().to_owned(),
                stamp!(e.change_type.as_str().to_owned()),
            ),
            Event::CredentialCompromise(e) => upsert_map(
                &mut self.credential_compromises,
                e.credential_type.as_str().to_owned(),
                stamp!(()),
            ),
            Event::AccountCredentialChangeRequired(_) => {
                upsert(&mut self.credential_change_required, stamp!(()))
            }
            Event::SessionRevoked(_) | Event::SessionsRevoked(_) => {
                let filter = target.members.clone();
                let key = serde_json::to_string(&filter).unwrap_or_default();
                let changed =
                    upsert_map(&mut self.session_revocations, key.clone(), stamp!(filter));
                if changed {
                    revocations.push(key);
                }
                while self.session_revocations.len() > MAX_SESSION_REVOCATIONS {
                    match fair_victim(&self.session_revocations, party, 0) {
                        Some((k, _, _)) => {
                            self.session_revocations.remove(&k);
                            revocations.push(k);
                        }
                        None => break,
                    };
                }
                changed
            }
            Event::RiskLevelChange(e) => upsert_map(
                &mut self.risk,
                format!("{}/{}", e.principal.as_str(), source),
                stamp!(RiskFact {
                    level: e.current_level.clone(),
                    principal: e.principal.clone(),
                    reason: e.risk_reason.clone(),
                }),
            ),
            Event::DeviceComplianceChange(e) => match target.members.get("device") {
                Some(device) => upsert_map(
                    &mut self.device_compliance,
                    device.clone(),
                    stamp!(e.current_status.clone()),
                ),
                // A simple subject naming the device itself: this context *is* the device's.
                None => upsert_map(
                    &mut self.device_compliance,
                    self.key.clone(),
                    stamp!(e.current_status.clone()),
                ),
            },
            Event::AssuranceLevelChange(e) => upsert_map(
                &mut self.assurance,
                e.namespace.as_str().to_owned(),
                stamp!(AssuranceFact {
                    level: AssuranceLevel::new(e.current_level.clone()),
                    previous: e.previous_level.clone(),
                    direction: e.change_direction.clone(),
                }),
            ),
            Event::TokenClaimsChange(e) => {
                let scope = target
                    .identifiers
                    .iter()
                    .find(|k| k.starts_with("jwt_id:") || k.starts_with("saml_assertion_id:"))
                    .cloned()
                    .unwrap_or_default();
                let claims = self
                    .claims
                    .get_or_insert_with(scope.clone(), CompactMap::new);
                let mut changed = false;
                for (name, value) in &e.claims {
                    changed |= upsert_map(claims, name.clone(), stamp!(value.clone()));
                }
                // Scopes are tokens: as many as the subject was issued, so bounded as facts are,
                // fairly (a scope is its newest claim's party's; the party holding the most loses
                // the scope whose newest claim is its oldest; never the one just written).
                while self.claims.len() > MAX_FACTS_PER_KIND {
                    let scopes = self.claims.iter().map(|(k, claims)| {
                        let (owner, time) = newest_claim(claims);
                        (k.as_str(), owner, time, *k != scope)
                    });
                    let Some((oldest, _, _)) = fair_pick(scopes, party, 0) else {
                        break;
                    };
                    self.claims.remove(&oldest);
                    metrics::counter!(crate::telemetry::CONTEXT_FACTS_EVICTED).increment(1);
                }
                if self.claims.get(&scope).is_some_and(CompactMap::is_empty) {
                    self.claims.remove(&scope);
                }
                changed
            }
            Event::IdentifierChanged(e) => upsert_map(
                &mut self.lifecycle,
                "identifier-changed".into(),
                stamp!(json!({ "new_value": e.new_value })),
            ),
            e @ (Event::IdentifierRecycled(_)
            | Event::RecoveryActivated(_)
            | Event::RecoveryInformationChanged(_)
            | Event::OptIn(_)
            | Event::OptOutInitiated(_)
            | Event::OptOutCancelled(_)
            | Event::OptOutEffective(_)
            | Event::GlobalTokenRevocation(_)) => {
                let name = e.kind().map(|k| k.name()).unwrap_or("unknown");
                upsert_map(&mut self.lifecycle, name.into(), stamp!(Value::Null))
            }
            Event::SessionEstablished(_)
            | Event::SessionPresented(_)
            | Event::Verification(_)
            | Event::StreamUpdated(_)
            | Event::Unknown { .. } => false,
        };
        let mut changed = changed;
        for (name, value) in &signal.attributes {
            changed |= upsert_map(&mut self.attributes, name.clone(), stamp!(value.clone()));
        }
        if changed {
            self.version += 1;
        }
        self.recent_signals.push_front(Arc::new(SignalSummary {
            seq: signal.seq,
            event_type: signal.event_type_name().to_owned(),
            event_time: signal.event_time,
            source,
            jti: signal.jti.clone(),
            changed,
        }));
        self.recent_signals.truncate(RECENT_SIGNALS);
        changed
    }

    /// Sets a free-form attribute (Kafka feeds); same ordering rule as every fact.
    pub fn set_attribute(&mut self, name: &str, value: Stamped<Value>) -> bool {
        let changed = upsert_map(&mut self.attributes, name.to_owned(), value);
        if changed {
            self.version += 1;
        }
        changed
    }

    /// Whether [`PrincipalContext::view`] is the same for every grant that has no device or session
    /// context of its own: the only grant-dependent facts (session revocations, device compliance,
    /// token-scoped claims) are absent.
    pub fn view_is_grant_independent(&self) -> bool {
        self.session_revocations.is_empty()
            && self.device_compliance.is_empty()
            && self.claims.is_empty()
    }

    /// The `context` policy sees when evaluating `grant`. `entities` are the contexts of the grant's
    /// device and session, which hold facts that arrived about the device or session alone.
    pub fn view(
        &self,
        grant: &Grant,
        entities: &[&PrincipalContext],
        decay: &Decay,
        now: f64,
    ) -> Value {
        let latest = |map: &CompactMap<String, Stamped<String>>, pred: &dyn Fn(&str) -> bool| {
            map.values()
                .filter(|s| pred(&s.value))
                .map(|s| s.time)
                .fold(None, |acc: Option<f64>, t| {
                    Some(acc.map_or(t, |a| a.max(t)))
                })
        };
        let changed_at = latest(&self.credential_changes, &|c| {
            matches!(
                ChangeType::parse(c),
                Ok(ChangeType::Revoke | ChangeType::Update | ChangeType::Delete)
            )
        });
        let compromised_at = self
            .credential_compromises
            .values()
            .map(|s| s.time)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });

        let all: Vec<&PrincipalContext> = std::iter::once(self)
            .chain(entities.iter().copied())
            .collect();
        let session_revoked_at = all
            .iter()
            .flat_map(|c| c.session_revocations.values())
            .filter(|r| filter_matches(&r.value, &grant.members))
            .map(|r| r.time)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });

        let risks: Vec<&Stamped<RiskFact>> = self
            .risk
            .values()
            .filter(|r| live(r, decay.risk, now))
            .collect();
        let top = risks
            .iter()
            .max_by_key(|r| (r.value.level.rank(), (r.time * 1000.0) as i64));
        let mut by_source = Map::new();
        for (k, r) in &self.risk {
            if live(r, decay.risk, now) {
                by_source.insert(
                    k.clone(),
                    object([
                        ("level", json!(r.value.level)),
                        ("time", json!(r.time)),
                        ("source", json!(r.source)),
                    ]),
                );
            }
        }

        let device_fact = grant.members.get("device").and_then(|d| {
            all.iter()
                .filter_map(|c| c.device_compliance.get(d))
                .reduce(|a, b| if b.supersedes(a) { b } else { a })
                .filter(|f| live(f, decay.device_compliance, now))
        });

        let mut assurance = Map::new();
        for (ns, a) in &self.assurance {
            if live(a, decay.assurance, now) {
                assurance.insert(
                    ns.clone(),
                    object([
                        ("level", json!(a.value.level.name())),
                        ("rank", json!(a.value.level.rank())),
                        ("previous", json!(a.value.previous)),
                        ("direction", json!(a.value.direction)),
                        ("time", json!(a.time)),
                    ]),
                );
            }
        }
        let decreased_at = self
            .assurance
            .values()
            .filter(|a| a.value.direction == Some(ChangeDirection::Decrease))
            .map(|a| a.time)
            .fold(None, |acc: Option<f64>, t| {
                Some(acc.map_or(t, |a| a.max(t)))
            });

        let live_map = |m: &CompactMap<String, Stamped<Value>>, ttl| {
            m.iter()
                .filter(|(_, v)| live(v, ttl, now))
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect::<Map<String, Value>>()
        };
        // Principal-wide claims, overlaid by those changed for this grant's own token.
        let mut claims = Map::new();
        let mut claims_changed_at: Option<f64> = None;
        let scopes = [Some(""), grant.token.as_deref()];
        for scope in scopes.iter().flatten() {
            for (name, c) in self.claims.get(*scope).into_iter().flatten() {
                if live(c, decay.claims, now) {
                    claims.insert(name.clone(), c.value.clone());
                    claims_changed_at = Some(claims_changed_at.map_or(c.time, |t| t.max(c.time)));
                }
            }
        }
        let lifecycle: Map<String, Value> = self
            .lifecycle
            .iter()
            .map(|(k, v)| {
                let fact = object([("time", json!(v.time)), ("value", v.value.clone())]);
                (k.clone(), fact)
            })
            .collect();

        let account = self.account.as_ref();
        object([
            ("key", json!(self.key)),
            ("version", json!(self.version)),
            (
                "account",
                object([
                    (
                        "state",
                        json!(account.map_or("unknown", |a| a.value.state.as_str())),
                    ),
                    (
                        "reason",
                        json!(account.and_then(|a| a.value.reason.clone())),
                    ),
                    ("time", json!(account.map(|a| a.time))),
                ]),
            ),
            (
                "credentials",
                object([
                    ("changed_at", json!(changed_at.unwrap_or(0.0))),
                    ("compromised_at", json!(compromised_at.unwrap_or(0.0))),
                    (
                        "change_required",
                        json!(self.credential_change_required.is_some()),
                    ),
                    (
                        "change_required_at",
                        json!(self
                            .credential_change_required
                            .as_ref()
                            .map_or(0.0, |c| c.time)),
                    ),
                    (
                        "by_type",
                        Value::Object(
                            self.credential_changes
                                .iter()
                                .map(|(k, v)| {
                                    let change = object([
                                        ("change_type", json!(v.value)),
                                        ("time", json!(v.time)),
                                    ]);
                                    (k.clone(), change)
                                })
                                .collect(),
                        ),
                    ),
                ]),
            ),
            (
                "session_revoked_at",
                json!(session_revoked_at.unwrap_or(0.0)),
            ),
            // OAuth Global Token Revocation: every grant issued before it is revoked.
            (
                "tokens_revoked_at",
                json!(self
                    .lifecycle
                    .get(crate::events::EventKind::GlobalTokenRevocation.name())
                    .map_or(0.0, |r| r.time)),
            ),
            (
                "risk",
                object([
                    (
                        "level",
                        json!(top.map_or("NONE", |r| r.value.level.as_str())),
                    ),
                    ("rank", json!(top.map_or(0, |r| r.value.level.rank()))),
                    ("principal", json!(top.map(|r| r.value.principal.as_str()))),
                    ("reason", json!(top.and_then(|r| r.value.reason.clone()))),
                    ("source", json!(top.map(|r| r.source.clone()))),
                    ("time", json!(top.map_or(0.0, |r| r.time))),
                    ("by_source", Value::Object(by_source)),
                ]),
            ),
            (
                "device",
                object([
                    (
                        "status",
                        json!(device_fact.map_or("unknown", |f| f.value.as_str())),
                    ),
                    ("time", json!(device_fact.map_or(0.0, |f| f.time))),
                ]),
            ),
            ("assurance", Value::Object(assurance)),
            ("assurance_decreased_at", json!(decreased_at.unwrap_or(0.0))),
            ("claims", Value::Object(claims)),
            ("claims_changed_at", json!(claims_changed_at.unwrap_or(0.0))),
            ("lifecycle", Value::Object(lifecycle)),
            (
                "attributes",
                Value::Object(live_map(&self.attributes, decay.attributes)),
            ),
        ])
    }
}

/// A JSON object of `entries` in their order, its map allocated once at its size: `json!` grows
/// the map an entry at a time, and the policy views — a context's, of about forty entries, for
/// each grant evaluation; a signal's for each signal — are built on the hot path
/// (benches/RESULTS.md).
pub(crate) fn object<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut map = Map::with_capacity(N);
    for (key, value) in entries {
        map.insert(key.to_owned(), value);
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::grant::GrantRequest;
    use crate::signal::SignalSource;
    use crate::subject::SubjectId;

    fn signal(seq: u64, time: f64, kind: EventKind, payload: Value) -> Signal {
        Signal {
            seq,
            source: SignalSource::SsfPush {
                transmitter: "idp".into(),
                stream: "idp".into(),
            },
            iss: "https://idp.example.com/".into(),
            jti: format!("j{seq}"),
            txn: None,
            event_uri: kind.uri(),
            event: Event::parse(&kind.uri(), &payload).unwrap(),
            subject: SubjectId::Email {
                email: "u@example.com".into(),
            },
            event_time: time,
            iat: time,
            received_at_ms: 0,
            attributes: Default::default(),
            ttl_secs: None,
        }
    }

    fn grant(issued_at: f64, session: Option<&str>) -> Grant {
        let mut v = json!({"id": "g", "kind": "session", "subject": {"format":"email","email":"u@example.com"},
                           "issued_at": issued_at, "expires_at": issued_at + 3600.0});
        if let Some(s) = session {
            v["session"] = json!(s);
        }
        serde_json::from_value::<GrantRequest>(v)
            .unwrap()
            .into_grant("email:u@example.com".into(), issued_at)
            .unwrap()
    }

    /// A signal's target narrowed to the session `opaque:s{i}` (what the grants of
    /// [`grant`]`(_, Some("s{i}"))` name).
    fn session(i: usize) -> Target {
        Target {
            identifiers: vec![],
            members: [("session".to_owned(), format!("opaque:s{i}"))].into(),
        }
    }

    fn risk(level: &str) -> Value {
        json!({"principal": "USER", "current_level": level})
    }

    /// What `view_is_grant_independent` promises, on which a policy swap builds one view for all
    /// of a principal's grants (`engine::inputs::shared_view`): while it holds, grants narrowed
    /// to different sessions see the same view; once a session is revoked they no longer do,
    /// and it no longer holds.
    #[test]
    fn a_grant_independent_view_is_the_same_for_every_grant() {
        let mut ctx = PrincipalContext::new("email:u@example.com");
        let t = Target::default();
        ctx.apply(
            &signal(1, 100.0, EventKind::RiskLevelChange, risk("HIGH")),
            &t,
        );
        ctx.apply(
            &signal(
                2,
                110.0,
                EventKind::CredentialChange,
                json!({"credential_type": "password", "change_type": "update"}),
            ),
            &t,
        );
        let (one, other) = (grant(50.0, Some("s1")), grant(50.0, Some("s2")));
        let decay = Decay::default();
        assert!(ctx.view_is_grant_independent());
        assert_eq!(
            ctx.view(&one, &[], &decay, 200.0),
            ctx.view(&other, &[], &decay, 200.0)
        );
        ctx.apply(
            &signal(3, 120.0, EventKind::SessionRevoked, json!({})),
            &session(1),
        );
        assert!(!ctx.view_is_grant_independent());
        assert_ne!(
            ctx.view(&one, &[], &decay, 200.0)["session_revoked_at"],
            ctx.view(&other, &[], &decay, 200.0)["session_revoked_at"]
        );
    }

    /// A kind's bound is shared fairly between parties: a feed naming a new `source` in every
    /// message, past the bound, evicts its own oldest facts, never the identity provider's older
    /// high risk level; a transmitter revoking ever new sessions, or changing claims of ever new
    /// tokens, evicts its own revocations or token scopes, never another's. Parties are the
    /// configured transmitter or topic, not the message's `source`.
    #[test]
    fn one_party_past_a_kinds_bound_evicts_its_own_facts_not_anothers() {
        let mut ctx = PrincipalContext::new("email:u@example.com");
        let t = Target::default();
        ctx.apply(
            &signal(1, 100.0, EventKind::RiskLevelChange, risk("HIGH")),
            &t,
        );
        for i in 0..MAX_FACTS_PER_KIND + 50 {
            let mut s = signal(
                i as u64 + 2,
                200.0 + i as f64,
                EventKind::RiskLevelChange,
                risk("LOW"),
            );
            s.source = SignalSource::RiskFeed {
                topic: "vigil.risk".into(),
                source: format!("engine-{i}"),
            };
            ctx.apply(&s, &t);
        }
        assert_eq!(ctx.risk.len(), MAX_FACTS_PER_KIND);
        let idp = ctx.risk.get("USER/ssf:idp").expect("the idp's fact stays");
        assert_eq!(idp.value.level, RiskLevel::High);
        assert_eq!(idp.party, Registrant::transmitter("idp"));
        let feed = Registrant::risk_feed("vigil.risk");
        assert!(ctx
            .risk
            .values()
            .filter(|f| f.party != idp.party)
            .all(|f| f.party == feed));
        assert!(
            !ctx.risk.contains_key("USER/feed:engine-0"),
            "the feed's oldest went"
        );
        assert!(ctx
            .risk
            .contains_key(&format!("USER/feed:engine-{}", MAX_FACTS_PER_KIND + 49)));
        // The party is kept through the store's encoding.
        let stored: PrincipalContext =
            serde_json::from_str(&serde_json::to_string(&ctx).unwrap()).unwrap();
        assert_eq!(stored.risk.get("USER/ssf:idp").unwrap().party, idp.party);

        // Session revocations: one by the idp, then ever new ones by another transmitter.
        ctx.apply(
            &signal(1000, 300.0, EventKind::SessionRevoked, json!({})),
            &session(0),
        );
        for i in 1..=MAX_SESSION_REVOCATIONS + 20 {
            let mut s = signal(
                1000 + i as u64,
                400.0 + i as f64,
                EventKind::SessionRevoked,
                json!({}),
            );
            s.source = SignalSource::SsfPush {
                transmitter: "noisy".into(),
                stream: "noisy".into(),
            };
            ctx.apply(&s, &session(i));
        }
        assert_eq!(ctx.session_revocations.len(), MAX_SESSION_REVOCATIONS);
        let key = |i: usize| serde_json::to_string(&session(i).members).unwrap();
        assert!(
            ctx.session_revocations.contains_key(&key(0)),
            "the idp's revocation stays"
        );
        assert!(
            !ctx.session_revocations.contains_key(&key(1)),
            "the noisy one's oldest went"
        );

        // Token claims: the idp's token, then ever new tokens by the other transmitter.
        let token = |i: usize| Target {
            identifiers: vec![format!("jwt_id:t{i}")],
            ..Target::default()
        };
        let claims = |seq: u64, time: f64| {
            signal(
                seq,
                time,
                EventKind::TokenClaimsChange,
                json!({"claims": {"role": "ro"}}),
            )
        };
        ctx.apply(&claims(2000, 500.0), &token(0));
        for i in 1..=MAX_FACTS_PER_KIND + 20 {
            let mut s = claims(2000 + i as u64, 600.0 + i as f64);
            s.source = SignalSource::SsfPush {
                transmitter: "noisy".into(),
                stream: "noisy".into(),
            };
            ctx.apply(&s, &token(i));
        }
        assert_eq!(ctx.claims.len(), MAX_FACTS_PER_KIND);
        assert!(
            ctx.claims.contains_key("jwt_id:t0"),
            "the idp's token stays"
        );
        assert!(
            !ctx.claims.contains_key("jwt_id:t1"),
            "the noisy one's oldest went"
        );
    }

    /// Facts of one kind are bounded per context: past [`MAX_FACTS_PER_KIND`] keys the oldest by
    /// event time goes (a fact older than all held is not taken), and token scopes of claims are
    /// bounded the same way — so a feed or transmitter sending ever new keys about one subject
    /// cannot grow its context without end.
    #[test]
    fn facts_of_one_kind_are_bounded_and_the_oldest_goes() {
        let mut ctx = PrincipalContext::new("email:u@example.com");
        let t = Target::default();
        let with_attributes = |seq: u64, time: f64, names: std::ops::Range<usize>| {
            let mut s = signal(seq, time, EventKind::RiskLevelChange, risk("LOW"));
            s.attributes = names.map(|i| (format!("a{i}"), json!(i))).collect();
            s
        };
        for i in 0..MAX_FACTS_PER_KIND {
            ctx.apply(
                &with_attributes(i as u64 + 1, 1000.0 + i as f64, i..i + 1),
                &t,
            );
        }
        assert_eq!(ctx.attributes.len(), MAX_FACTS_PER_KIND);
        // One more, newer: the oldest (a0) goes.
        ctx.apply(&with_attributes(1000, 5000.0, 1000..1001), &t);
        assert_eq!(ctx.attributes.len(), MAX_FACTS_PER_KIND);
        assert!(!ctx.attributes.contains_key("a0"));
        assert!(ctx.attributes.contains_key("a1000"));
        // One older than every fact held is not taken.
        let changed = ctx.set_attribute(
            "ancient",
            Stamped {
                value: json!(1),
                time: 1.0,
                source: "feed:x".into(),
                seq: 1001,
                ttl: None,
                party: Registrant::transmitter("idp"),
            },
        );
        assert!(!changed);
        assert!(!ctx.attributes.contains_key("ancient"));
        // An existing key still updates at the bound.
        ctx.apply(&with_attributes(1002, 6000.0, 5..6), &t);
        assert_eq!(ctx.attributes.get("a5").map(|f| f.time), Some(6000.0));

        // Claims of ever new tokens: the scopes are bounded, the newest kept.
        let mut ctx = PrincipalContext::new("email:u@example.com");
        for i in 0..MAX_FACTS_PER_KIND + 10 {
            let target = Target {
                identifiers: vec![format!("jwt_id:t{i}")],
                ..Target::default()
            };
            ctx.apply(
                &signal(
                    i as u64 + 1,
                    100.0 + i as f64,
                    EventKind::TokenClaimsChange,
                    json!({"claims": {"role": "ro"}}),
                ),
                &target,
            );
        }
        assert_eq!(ctx.claims.len(), MAX_FACTS_PER_KIND);
        assert!(!ctx.claims.contains_key("jwt_id:t0"));
        assert!(ctx
            .claims
            .contains_key(format!("jwt_id:t{}", MAX_FACTS_PER_KIND + 9).as_str()));
    }

    /// A replay's starting point: the facts the window's signals set are dropped and counted
    /// (the value each replaced is unknown); earlier facts stay.
    #[test]
    fn before_a_sequence_number_only_earlier_facts_stay() {
        let mut ctx = PrincipalContext::new("email:u@example.com");
        let t = Target::default();
        ctx.apply(
            &signal(1, 100.0, EventKind::RiskLevelChange, risk("LOW")),
            &t,
        );
        let disabled = signal(2, 110.0, EventKind::AccountDisabled, json!({}));
        ctx.apply(&disabled, &t);
        ctx.apply(
            &signal(5, 120.0, EventKind::RiskLevelChange, risk("HIGH")),
            &t,
        );
        let (before, dropped) = ctx.before_seq(5);
        assert_eq!(dropped, 1);
        let g = grant(50.0, None);
        let view = before.view(&g, &[], &Decay::default(), 130.0);
        assert!(before.risk.values().all(|f| f.seq < 5), "{view}");
        assert!(before.account.is_some());
        assert_eq!(before.recent_signals.len(), 2);
        assert_eq!(ctx.fact_seqs().filter(|s| *s >= 5).count(), 1);
        let (empty, dropped) = ctx.before_seq(1);
        assert_eq!((dropped, empty.fact_seqs().count()), (2, 0));
    }

    #[test]
    fn an_older_signal_never_overwrites_a_newer_one() {
        let mut ctx = PrincipalContext::new("email:u@example.com");
        let t = Target::default();
        assert!(ctx.apply(
            &signal(1, 200.0, EventKind::RiskLevelChange, risk("HIGH")),
            &t
        ));
        // LOW with an older event time, arriving later.
        assert!(!ctx.apply(
            &signal(2, 100.0, EventKind::RiskLevelChange, risk("LOW")),
            &t
        ));
        let g = grant(50.0, None);
        let view = ctx.view(&g, &[], &Decay::default(), 300.0);
        assert_eq!(view["risk"]["level"], "HIGH");
        // A newer LOW does lower it.
        assert!(ctx.apply(
            &signal(3, 300.0, EventKind::RiskLevelChange, risk("LOW")),
            &t
        ));
        assert_eq!(
            ctx.view(&g, &[], &Decay::default(), 300.0)["risk"]["level"],
            "LOW"
        );
        assert_eq!(ctx.recent_signals.len(), 3);
        assert!(!ctx.recent_signals[1].changed);
    }

    #[test]
    fn fold_is_independent_of_arrival_order() {
        let signals = [
            signal(1, 100.0, EventKind::RiskLevelChange, risk("HIGH")),
            signal(2, 300.0, EventKind::RiskLevelChange, risk("LOW")),
            signal(3, 200.0, EventKind::RiskLevelChange, risk("MEDIUM")),
            signal(
                4,
                150.0,
                EventKind::AccountDisabled,
                json!({"reason": "hijacking"}),
            ),
            signal(5, 250.0, EventKind::AccountEnabled, json!({})),
        ];
        let g = grant(10.0, None);
        let mut reference = None;
        // Every rotation and the reverse order fold to the same facts.
        let mut orders: Vec<Vec<usize>> = (0..signals.len())
            .map(|r| {
                (0..signals.len())
                    .map(|i| (i + r) % signals.len())
                    .collect()
            })
            .collect();
        orders.push((0..signals.len()).rev().collect());
        for order in orders {
            let mut ctx = PrincipalContext::new("k");
            for i in order {
                ctx.apply(&signals[i], &Target::default());
            }
            let mut view = ctx.view(&g, &[], &Decay::default(), 400.0);
            view["version"] = Value::Null;
            match &reference {
                None => reference = Some(view),
                Some(r) => assert_eq!(&view, r),
            }
        }
        let r = reference.unwrap();
        assert_eq!(r["risk"]["level"], "LOW");
        assert_eq!(r["account"]["state"], "enabled");
    }

    /// The store writes only the revocation entries `apply_noting` names: the one added and, past
    /// the bound, the one evicted.
    #[test]
    fn apply_notes_the_session_revocations_it_adds_and_evicts() {
        let mut ctx = PrincipalContext::new("k");
        let revoke = |i: usize| {
            signal(
                i as u64 + 1,
                100.0 + i as f64,
                EventKind::SessionRevoked,
                json!({}),
            )
        };
        for i in 0..MAX_SESSION_REVOCATIONS {
            let mut noted = Vec::new();
            assert!(ctx.apply_noting(&revoke(i), &session(i), &mut noted));
            assert_eq!(
                noted,
                vec![serde_json::to_string(&session(i).members).unwrap()]
            );
        }
        let mut noted = Vec::new();
        ctx.apply_noting(
            &revoke(MAX_SESSION_REVOCATIONS),
            &session(MAX_SESSION_REVOCATIONS),
            &mut noted,
        );
        let key = |i: usize| serde_json::to_string(&session(i).members).unwrap();
        assert_eq!(
            noted,
            vec![key(MAX_SESSION_REVOCATIONS), key(0)],
            "added, then the oldest evicted"
        );
        assert!(!ctx.session_revocations.contains_key(&key(0)));
        // The same revocation again changes nothing and notes nothing.
        let mut noted = Vec::new();
        assert!(!ctx.apply_noting(&revoke(5), &session(5), &mut noted));
        assert!(noted.is_empty());
    }

    #[test]
    fn session_revocations_cover_only_matching_sessions() {
        let mut ctx = PrincipalContext::new("k");
        let target = Target {
            identifiers: vec![],
            members: [("session".to_owned(), "opaque:s1".to_owned())].into(),
        };
        ctx.apply(
            &signal(1, 100.0, EventKind::SessionRevoked, json!({})),
            &target,
        );
        let d = Decay::default();
        assert_eq!(
            ctx.view(&grant(50.0, Some("s1")), &[], &d, 200.0)["session_revoked_at"],
            100.0
        );
        assert_eq!(
            ctx.view(&grant(50.0, Some("s2")), &[], &d, 200.0)["session_revoked_at"],
            0.0
        );
        assert_eq!(
            ctx.view(&grant(50.0, None), &[], &d, 200.0)["session_revoked_at"],
            0.0
        );
        // A revocation of all sessions covers every grant.
        ctx.apply(
            &signal(2, 120.0, EventKind::SessionRevoked, json!({})),
            &Target::default(),
        );
        assert_eq!(
            ctx.view(&grant(50.0, Some("s2")), &[], &d, 200.0)["session_revoked_at"],
            120.0
        );
    }

    #[test]
    fn facts_decay_after_their_ttl() {
        let mut ctx = PrincipalContext::new("k");
        ctx.apply(
            &signal(1, 100.0, EventKind::RiskLevelChange, risk("HIGH")),
            &Target::default(),
        );
        let decay = Decay {
            risk: Some(60),
            ..Decay::default()
        };
        let g = grant(50.0, None);
        assert_eq!(ctx.view(&g, &[], &decay, 150.0)["risk"]["level"], "HIGH");
        assert_eq!(ctx.view(&g, &[], &decay, 161.0)["risk"]["level"], "NONE");
        // The decayed fact still blocks an older signal.
        assert!(!ctx.apply(
            &signal(2, 90.0, EventKind::RiskLevelChange, risk("LOW")),
            &Target::default()
        ));
    }

    /// An assurance level is ranked once and stored as its bare name, as before.
    #[test]
    fn an_assurance_level_keeps_its_rank_and_stores_as_its_name() {
        let level = AssuranceLevel::new("nist-aal2".into());
        assert_eq!(level.rank(), 2);
        assert_eq!(serde_json::to_value(&level).unwrap(), json!("nist-aal2"));
        let back: AssuranceLevel = serde_json::from_value(json!("AAL3")).unwrap();
        assert_eq!((back.name(), back.rank()), ("AAL3", 3));
    }
}
