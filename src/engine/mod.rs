//! The evaluation engine: per-principal context, active grants, policy evaluation and decisions.
//!
//! State is partitioned into shards by principal key (a device or session that signals arrive about
//! alone is its own key). **Each key is written by exactly one shard**, which applies its messages in
//! arrival order — so signals for one subject are applied deterministically — while different shards
//! run in parallel on their own threads. Shared maps (`DashMap`) publish the state for reads (the HTTP
//! API, and a shard reading a device's or a delegating user's context owned by another shard).
//!
//! A shard processes its inbox in batches: it folds signals, evaluates the affected grants, appends
//! the resulting decisions to the audit log, then commits grants, aliases and the decisions' hand-off
//! in one store transaction (group commit); contexts wait for the shard's checkpoint, and intake's
//! "processed" marks for that. Only after the batch's commit are registration replies sent and
//! decisions handed on: nothing is announced before it is durable.
//!
//! Work that crosses shards (a device's change reaching grants of several principals, a user's change
//! reaching the agents acting for them) is forwarded as re-evaluation messages, never by writing
//! another shard's state.

mod access;
mod changelog;
mod commit;
mod decide;
mod handed;
mod handover;
mod impact;
mod inbox;
mod inputs;
mod journal;
mod persist;
mod quota;
mod replay;
mod retention;
mod rewrite;
mod session_grant;
pub mod shadow;

pub use access::{Access, AccessLog, AccessRequest, GrantRef};
pub use changelog::{ChangeRecord, Changelog, Row, Table};
pub use handed::{Durable, Handed, HandoffMark, JournalPlace};
pub use handover::{lanes, HandOver, Handoffs, Lane, LaneReceiver, BULK_BOUND};
pub use impact::{Changes, Impact, RuleCount, Sample, Samples, Transition};
pub use persist::{handoff_done_in, handoff_key, pending_handoff};
pub use quota::GrantCounts;
pub use replay::{History, IntakeHistory, Replay, Window, MAX_RECORDED as REPLAY_MAX_RECORDED};
pub(crate) use retention::scan_interval;
mod shard;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::audit::{AuditLog, DecisionQuery};
use crate::context::{Decay, PrincipalContext};
use crate::decision::Decision;
use crate::grant::{Grant, GrantError, GrantId, GrantRequest, GrantStatus, Registrant};
use crate::intake::Intake;
use crate::policy::PolicySet;
use crate::principal::Target;
use crate::signal::Signal;
use crate::store::{BatchWriter, WriteError};

/// How long an API request waits for an in-flight slot before it is answered 503.
pub const API_PERMIT_WAIT: Duration = Duration::from_secs(2);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Number of shards (threads). Defaults to the number of cores.
    pub shards: usize,
    pub decay: Decay,
    /// Lifetime of a session grant created from CAEP session-established.
    pub session_ttl_secs: f64,
    /// How often expired grants are swept.
    pub sweep_interval: Duration,
    /// Most signals (and API requests) a shard handles per commit; a source's batch is handed
    /// to a shard in parts of at most this many signals.
    pub max_batch: usize,
    /// How long contexts changed by replayable signals may wait for their write.
    pub checkpoint_interval: Duration,
    /// Most signals and API requests in flight across all shards (backpressure).
    pub max_inflight: usize,
    /// Most grants held; a new one beyond is refused ([`EngineError::Full`]).
    pub max_grants: usize,
    /// Most grants one party ([`Registrant`]) holds; a new one beyond is refused
    /// ([`EngineError::Quota`]), so that one party cannot take the bound all share.
    pub max_grants_per_registrant: usize,
    /// Registrants with a quota of their own, in place of `max_grants_per_registrant`.
    pub grant_quotas: HashMap<Registrant, usize>,
    /// How long a context no grant refers to outlives its newest fact ([`retention`]).
    pub context_retention: Duration,
    /// The same for a context whose account is disabled or purged, if longer.
    pub disabled_account_retention: Duration,
    /// How often the contexts are looked through for those past their retention
    /// ([`retention::scan_interval`] of the window, as the application sets it).
    pub context_scan_interval: Duration,
    /// What "now" is: grant expiry, decision and registration times.
    pub clock: crate::clock::Clock,
    /// Cluster mode: where every batch's rows are also appended, so the principals' next owner
    /// can take their state over. A batch is announced only once it has them.
    pub changelog: Option<Arc<dyn Changelog>>,
    /// Shadow divergences held for listing (the newest).
    pub shadow_divergences_max: usize,
    /// Keys a shard journals before a fold round writes them at their places, at the latest
    /// ([`journal`]); beyond twice as many waiting behind a round, it holds back the sources'
    /// backlogs.
    pub journal_fold_rows: usize,
    /// How long journaled keys wait for a fold round at most.
    pub journal_fold_interval: Duration,
    /// Bytes of journaled rows kept for the fold rounds that write them at their places, across
    /// the shards ([`journal::Journaled`]); a row that does not fit is encoded again by its round.
    pub journal_fold_cache_bytes: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            shards: std::thread::available_parallelism().map_or(2, |n| n.get()),
            decay: Decay::default(),
            session_ttl_secs: 8.0 * 3600.0,
            sweep_interval: Duration::from_secs(1),
            max_batch: 256,
            checkpoint_interval: Duration::from_secs(1),
            max_inflight: 8192,
            max_grants: 10_000_000,
            max_grants_per_registrant: 5_000_000,
            grant_quotas: HashMap::new(),
            context_retention: Duration::from_secs(30 * 24 * 3600),
            disabled_account_retention: Duration::from_secs(366 * 24 * 3600),
            context_scan_interval: Duration::from_secs(60),
            clock: crate::clock::Clock::system(),
            changelog: None,
            shadow_divergences_max: 10_000,
            journal_fold_rows: 32_768,
            journal_fold_interval: Duration::from_secs(10),
            journal_fold_cache_bytes: 64 << 20,
        }
    }
}

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Invalid(#[from] GrantError),
    #[error(
        "grant `{0}` was revoked; a revoked grant id cannot be registered again until it expires"
    )]
    Revoked(String),
    #[error("grant `{0}` is registered for another principal")]
    Conflict(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("the engine has stopped")]
    Stopped,
    /// Every in-flight slot stayed taken for the API's wait: the caller should retry later (503).
    #[error("the engine is overloaded; retry later")]
    Overloaded,
    /// A new grant beyond `engine.max_grants`: refused until grants expire or are deleted (503).
    #[error("Vigil holds its most grants ({0}, engine.max_grants); a new grant is refused until some expire or are deleted")]
    Full(usize),
    /// A new grant beyond its registrant's `engine.max_grants_per_registrant`: refused until some
    /// of the registrant's grants expire or are deleted (429).
    #[error("`{registrant}` holds its most grants ({max}: engine.max_grants_per_registrant, or its own max_grants); a new grant is refused until some of its grants expire or are deleted")]
    Quota { registrant: String, max: usize },
    #[error("cannot start a shard thread: {0}")]
    Thread(String),
    /// Cluster mode: the principal's partition is not this instance's (it is moving); the caller
    /// should retry, and will reach its owner.
    #[error("the principal `{0}` is not owned here (its partition is moving); retry")]
    NotOwned(String),
    /// Cluster mode: the state topic did not take the change, so it was not made durable for the
    /// cluster; the caller should retry (503).
    #[error("the cluster's brokers did not take the change: {0}")]
    Unreplicated(String),
    /// Cluster mode: the signals topic could not be read back, or partitions moved while it
    /// was (a replay); the caller should retry (503).
    #[error("{0}; retry")]
    Unavailable(String),
}

impl From<WriteError> for EngineError {
    fn from(e: WriteError) -> Self {
        EngineError::Storage(e.to_string())
    }
}

/// The outcome of a registration.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub grant: Grant,
    pub decisions: Vec<Decision>,
}

/// Index keys: which grants an entity key reaches.
pub(crate) fn principal_index(key: &str) -> String {
    format!("p/{key}")
}
pub(crate) fn member_index(member: &str, key: &str) -> String {
    format!("m/{member}/{key}")
}
pub(crate) fn obo_index(key: &str) -> String {
    format!("obo/{key}")
}
pub(crate) fn token_index(key: &str) -> String {
    format!("t/{key}")
}

/// The grants one index key reaches. Most keys (a session, a token) reach exactly one grant, held
/// inline: the smallest hash set cost more than the grant's own id, once per grant at 1 M grants.
#[derive(Debug)]
pub(crate) enum GrantSet {
    One(GrantId),
    /// Boxed on purpose: inline, the 48-byte set would widen every index entry, most of which
    /// hold one grant.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<GrantId>>),
    /// Before the first insertion, and after the last removal until the key is dropped.
    Empty,
}

impl GrantSet {
    fn insert(&mut self, grant: &GrantId) {
        match self {
            GrantSet::Empty => *self = GrantSet::One(grant.clone()),
            GrantSet::One(only) if only == grant => {}
            GrantSet::One(only) => {
                let set: HashSet<GrantId> = [only.clone(), grant.clone()].into_iter().collect();
                *self = GrantSet::Many(Box::new(set));
            }
            GrantSet::Many(set) => {
                set.insert(grant.clone());
            }
        }
    }

    /// Removes `grant`; whether the set is now empty.
    fn remove(&mut self, grant: &str) -> bool {
        match self {
            GrantSet::One(only) if &**only == grant => *self = GrantSet::Empty,
            GrantSet::Many(set) => {
                set.remove(grant);
            }
            _ => {}
        }
        self.is_empty()
    }

    fn is_empty(&self) -> bool {
        match self {
            GrantSet::Empty => true,
            GrantSet::One(_) => false,
            GrantSet::Many(set) => set.is_empty(),
        }
    }

    fn to_vec(&self) -> Vec<GrantId> {
        match self {
            GrantSet::Empty => Vec::new(),
            GrantSet::One(only) => vec![only.clone()],
            GrantSet::Many(set) => set.iter().cloned().collect(),
        }
    }
}

/// Segments of the alias map, each a lock of its own. Context retention walks every link a
/// segment at a time, holding it, and a shard linking a new identifier in that segment waits for
/// the walk to leave it, which grows with the links (130 ms for 200 000). With dashmap's default
/// on two cores (8 segments) a link made during such a walk waited 16 ms at the median and up to
/// 38 ms; with 128, 0.6–1.0 ms and at most 9–16 ms (benches/RESULTS.md).
pub(crate) const ALIAS_SEGMENTS: usize = 128;

/// State visible to every shard and the API.
pub(crate) struct Shared {
    pub contexts: DashMap<String, Arc<PrincipalContext>>,
    pub grants: DashMap<GrantId, Arc<Grant>>,
    /// Grants held per registrant ([`Shared::hold_grant`], [`Shared::drop_grant`]), and on the
    /// cluster's other instances.
    pub counts: Arc<GrantCounts>,
    pub aliases: DashMap<String, String>,
    /// Held while new identifiers are linked to a principal, so two callers introducing the same
    /// identifier at once agree on its principal and only one of them records the link.
    pub linking: std::sync::Mutex<()>,
    pub index: DashMap<Box<str>, GrantSet>,
    pub policy: RwLock<Arc<PolicySet>>,
    /// The shadow set every evaluation also runs, when one is loaded.
    pub shadow: RwLock<Option<Arc<shadow::ShadowSet>>>,
    pub divergences: shadow::Divergences,
    pub writer: BatchWriter,
    /// Told which pushed signals are processed once their effects are committed here.
    pub intake: Intake,
    pub audit: Arc<AuditLog>,
    /// Decisions, with the grant they are about, for delivery.
    pub decisions: HandOver,
    pub settings: EngineSettings,
    /// Cluster mode: which principals this instance owns ([`Engine::fence`]).
    pub owns: std::sync::OnceLock<Released>,
    /// Signals of sources' batches ([`Engine::submit_batch`]) waiting in the shards' inboxes: a
    /// source bounds its backlog in memory by it ([`Engine::queued_signals`]). Single signals
    /// are bounded by the in-flight permits instead.
    pub queued_signals: std::sync::atomic::AtomicUsize,
    /// When a shard last took another party's live work ([`shard::LiveWork`]).
    pub live_work: shard::LiveWork,
    /// The sequence of the next journal row ([`journal`]): the start-up fold empties the
    /// journal, so it starts at zero.
    pub journal_seq: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn policy(&self) -> Arc<PolicySet> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn shadow(&self) -> Option<Arc<shadow::ShadowSet>> {
        match self.shadow.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn index_add(&self, key: String, grant: &GrantId) {
        self.index
            .entry(key.into_boxed_str())
            .or_insert(GrantSet::Empty)
            .insert(grant);
    }

    pub fn index_remove(&self, key: &str, grant: &str) {
        let empty = match self.index.get_mut(key) {
            Some(mut set) => set.remove(grant),
            None => false,
        };
        if empty {
            self.index.remove_if(key, |_, s| s.is_empty());
        }
    }

    pub fn indexed(&self, key: &str) -> Vec<GrantId> {
        self.index.get(key).map(|s| s.to_vec()).unwrap_or_default()
    }

    /// Every index key a grant is reachable by.
    pub fn index_keys(grant: &Grant) -> Vec<String> {
        let mut keys = vec![principal_index(&grant.principal)];
        for (member, key) in grant.members.iter() {
            keys.push(member_index(member, key));
        }
        if let Some(u) = &grant.on_behalf_of {
            keys.push(obo_index(u));
        }
        if let Some(t) = &grant.token {
            keys.push(token_index(t));
        }
        keys
    }

    /// Whether one more grant of `registrant`'s may be held (`max_grants` on this instance, and
    /// `max_grants_per_registrant` in the whole cluster, [`GrantCounts`]); refused ones are
    /// counted. Checked for a new grant id only: re-registering a held grant adds nothing.
    pub fn room_for_a_grant(&self, registrant: Registrant) -> Result<(), EngineError> {
        self.room_in_capacity()?;
        match self.quota_of(registrant) {
            Some(quota) if self.counts.held_in_cluster(registrant) >= quota => {
                Err(self.refused_for_quota(registrant, quota))
            }
            _ => Ok(()),
        }
    }

    /// [`Shared::room_for_a_grant`], and the place taken in the registrant's count in the same
    /// step (the new grant is then held with [`Shared::hold_new_grant`]).
    pub fn take_room_for_a_grant(&self, registrant: Registrant) -> Result<(), EngineError> {
        self.room_in_capacity()?;
        let quota = self.quota_of(registrant);
        if self.counts.take(registrant, quota) {
            return Ok(());
        }
        Err(self.refused_for_quota(registrant, quota.unwrap_or(0)))
    }

    fn room_in_capacity(&self) -> Result<(), EngineError> {
        let max = self.settings.max_grants;
        if self.grants.len() >= max {
            metrics::counter!(crate::telemetry::GRANTS_REFUSED, "reason" => "capacity")
                .increment(1);
            return Err(EngineError::Full(max));
        }
        Ok(())
    }

    /// A party's quota (none for grants no party registered).
    fn quota_of(&self, registrant: Registrant) -> Option<usize> {
        (!registrant.is_none()).then(|| {
            self.settings
                .grant_quotas
                .get(&registrant)
                .copied()
                .unwrap_or(self.settings.max_grants_per_registrant)
        })
    }

    fn refused_for_quota(&self, registrant: Registrant, quota: usize) -> EngineError {
        metrics::counter!(crate::telemetry::GRANTS_REFUSED, "reason" => "quota").increment(1);
        EngineError::Quota {
            registrant: registrant.name().to_string(),
            max: quota,
        }
    }

    /// Holds a new `grant` whose place in its registrant's count
    /// [`Shared::take_room_for_a_grant`] took (a grant of the same id held meanwhile leaves its
    /// own registrant's count).
    pub fn hold_new_grant(&self, grant: Arc<Grant>) {
        if let Some(before) = self.grants.insert(grant.id.clone(), grant) {
            self.counts.count(before.registered_by, false);
        }
    }

    /// Holds `grant` (new, or in place of the grant with its id), counted against its registrant.
    /// Every grant enters the grant map here, so the counts stay true.
    pub fn hold_grant(&self, grant: Arc<Grant>) {
        let registrant = grant.registered_by;
        let before = self.grants.insert(grant.id.clone(), grant);
        let left = before.map(|g| g.registered_by);
        if left != Some(registrant) {
            if let Some(left) = left {
                self.counts.count(left, false);
            }
            self.counts.count(registrant, true);
        }
    }

    /// Lets go of the grant `id`, if held. Every grant leaves the grant map here.
    pub fn drop_grant(&self, id: &str) -> Option<Arc<Grant>> {
        let (_, gone) = self.grants.remove(id)?;
        self.counts.count(gone.registered_by, false);
        Some(gone)
    }

    pub fn shard_of(&self, key: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.settings.shards as u64) as usize
    }
}

/// A signal with the context it is about.
pub(crate) struct Routed {
    /// The owning key: a principal, or a device or session signalled about alone.
    key: String,
    signal: Signal,
    target: Target,
    /// Identifier → principal links first seen with this signal.
    aliases: Vec<(String, String)>,
}

/// The member a target that names no principal is about: its device, session, … in that order.
fn member_key(target: &Target) -> Option<String> {
    [
        "device",
        "session",
        "tenant",
        "application",
        "group",
        "org_unit",
    ]
    .iter()
    .find_map(|m| target.members.get(*m).cloned())
    .or_else(|| target.members.values().next().cloned())
}

/// A message to a shard.
pub(crate) enum Msg {
    /// Fold a signal into `key`'s context and evaluate what it reaches.
    Signal {
        routed: Box<Routed>,
        permit: OwnedSemaphorePermit,
    },
    /// Several signals for this shard, in their order, holding one permit each.
    Signals {
        routed: Vec<Routed>,
        permit: OwnedSemaphorePermit,
    },
    /// Forget these principals' contexts and links if they are still past their retention
    /// ([`retention`]); `handled` hears once their deletions are stored, and the retention
    /// thread sends the shard its next chunk only then.
    Forget {
        due: Vec<retention::Due>,
        handled: std::sync::mpsc::Sender<()>,
    },
    /// Fold signals that intake did not record (their source replays them); `done` answers after
    /// the batch's commit, with the commit's error if it failed.
    Batch {
        items: Vec<Routed>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Re-evaluate grants owned by this shard (forwarded from another shard, or after a policy swap).
    Reevaluate {
        grants: Vec<GrantId>,
        trigger: Option<Box<(Signal, Target)>>,
    },
    ReevaluateAll {
        done: Option<oneshot::Sender<()>>,
        /// The status changes the re-evaluation made (sent before they are committed).
        counted: Option<oneshot::Sender<impact::ChangeCounts>>,
    },
    Register {
        grant: Box<Grant>,
        aliases: Vec<(String, String)>,
        reply: oneshot::Sender<Result<Registered, EngineError>>,
        permit: OwnedSemaphorePermit,
    },
    Delete {
        id: String,
        reply: oneshot::Sender<Result<bool, EngineError>>,
        permit: OwnedSemaphorePermit,
    },
    /// Cluster mode: drop the grants whose principal `released` names (their partition moved to
    /// another instance); answered once the batch is committed.
    Release {
        released: Released,
        done: oneshot::Sender<()>,
    },
    /// Cluster mode: hold grants taken over with a partition (already stored).
    Adopt {
        grants: Vec<Arc<Grant>>,
        done: oneshot::Sender<()>,
    },
    /// Finish what is queued before this message, then stop.
    Stop,
}

impl Msg {
    /// What the message counts for in a shard's batch ([`EngineSettings::max_batch`]): its
    /// signals for a source's batch, one for anything else.
    pub(crate) fn weight(&self) -> usize {
        match self {
            Msg::Batch { items, .. } => items.len().max(1),
            Msg::Signals { routed, .. } => routed.len().max(1),
            Msg::Forget { due, .. } => due.len().max(1),
            _ => 1,
        }
    }
}

/// Which principals (by routing key) an instance gives up.
pub type Released = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Completion of a policy swap's re-evaluation.
pub struct SwapDone {
    committed: Vec<oneshot::Receiver<()>>,
    counted: Vec<oneshot::Receiver<impact::ChangeCounts>>,
}

impl SwapDone {
    /// Waits until every shard has re-evaluated and committed its grants; returns the status
    /// changes made.
    pub async fn wait(self) -> Changes {
        let mut changes = impact::ChangeCounts::default();
        for rx in self.counted {
            if let Ok(counted) = rx.await {
                changes.merge(counted);
            }
        }
        for rx in self.committed {
            let _ = rx.await;
        }
        changes.finish()
    }

    /// [`SwapDone::wait`], from a thread outside the runtime.
    pub fn wait_blocking(self) -> Changes {
        let mut changes = impact::ChangeCounts::default();
        for rx in self.counted {
            if let Ok(counted) = rx.blocking_recv() {
                changes.merge(counted);
            }
        }
        for rx in self.committed {
            let _ = rx.blocking_recv();
        }
        changes.finish()
    }
}

/// What [`Engine::list_grants`] selects. Absent filters match everything.
#[derive(Debug, Clone, Default)]
pub struct GrantQuery {
    pub status: Option<GrantStatus>,
    /// Any identifier key of the principal.
    pub principal: Option<String>,
    pub enforcement_point: Option<String>,
    pub kind: Option<crate::grant::GrantKind>,
    /// A rule that decided the grant's status (revoked, stepped up or restricted it).
    pub rule: Option<String>,
    /// Grants whose id sorts after this one (the previous page's last).
    pub after: Option<String>,
    pub limit: usize,
}

/// Rows [`Engine::forget_stored_blocking`] visits per write.
const FORGET_CHUNK: usize = 5_000;

/// Completion of a submitted signal batch: one answer per shard involved.
pub struct BatchDone {
    waiting: Vec<oneshot::Receiver<Result<(), String>>>,
    failure: Option<EngineError>,
}

impl BatchDone {
    /// A batch answered by others than the shards (each receiver: one part's outcome).
    pub fn of(waiting: Vec<oneshot::Receiver<Result<(), String>>>) -> BatchDone {
        BatchDone {
            waiting,
            failure: None,
        }
    }

    /// Whether every shard has answered (so [`BatchDone::wait_blocking`] will not block).
    pub fn is_done(&mut self) -> bool {
        let failure = &mut self.failure;
        self.waiting.retain_mut(|rx| {
            let answer = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return true,
                Err(oneshot::error::TryRecvError::Closed) => Err(EngineError::Stopped),
                Ok(r) => r.map_err(EngineError::Storage),
            };
            if let (Err(e), None) = (answer, &*failure) {
                *failure = Some(e);
            }
            false
        });
        self.waiting.is_empty()
    }

    /// Waits until every shard has committed its part; the first failure, if any.
    pub fn wait_blocking(self) -> Result<(), EngineError> {
        let mut failure = self.failure;
        for rx in self.waiting {
            let answer = rx
                .blocking_recv()
                .map_err(|_| EngineError::Stopped)
                .and_then(|r| r.map_err(EngineError::Storage));
            if let (Err(e), None) = (answer, &failure) {
                failure = Some(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// The running engine.
pub struct Engine {
    shared: Arc<Shared>,
    inboxes: Vec<inbox::InboxSender>,
    permits: Arc<Semaphore>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Dropped at shutdown: ends the retention thread.
    retention_stop: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Engine {
    /// The clock the engine reads "now" from (the one every part of Vigil shares).
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.shared.settings.clock
    }

    /// Loads persisted state and starts the shard threads.
    pub fn start(
        db: &Arc<redb::Database>,
        writer: BatchWriter,
        intake: Intake,
        audit: Arc<AuditLog>,
        policy: PolicySet,
        decisions: HandOver,
        settings: EngineSettings,
    ) -> Result<Engine, EngineError> {
        let mut settings = settings;
        settings.shards = settings.shards.max(1);
        let loaded = persist::load(db)?;
        let shared = Arc::new(Shared {
            contexts: DashMap::new(),
            counts: Arc::new(GrantCounts::default()),
            grants: DashMap::new(),
            aliases: DashMap::with_shard_amount(ALIAS_SEGMENTS),
            linking: std::sync::Mutex::new(()),
            index: DashMap::new(),
            policy: RwLock::new(Arc::new(policy)),
            shadow: RwLock::new(None),
            divergences: shadow::Divergences::new(settings.shadow_divergences_max),
            writer,
            intake,
            audit,
            decisions,
            settings: settings.clone(),
            owns: std::sync::OnceLock::new(),
            queued_signals: std::sync::atomic::AtomicUsize::new(0),
            live_work: shard::LiveWork::default(),
            journal_seq: std::sync::atomic::AtomicU64::new(0),
        });
        for ctx in loaded.contexts {
            shared.contexts.insert(ctx.key.clone(), Arc::new(ctx));
        }
        for (k, v) in loaded.aliases {
            shared.aliases.insert(k, v);
        }
        metrics::gauge!(crate::telemetry::ALIASES).set(shared.aliases.len() as f64);
        let mut owned: Vec<Vec<Arc<Grant>>> = vec![Vec::new(); settings.shards];
        for grant in loaded.grants {
            let grant = Arc::new(grant);
            for key in Shared::index_keys(&grant) {
                shared.index_add(key, &grant.id);
            }
            owned[shared.shard_of(&grant.principal)].push(grant.clone());
            shared.hold_grant(grant);
        }
        metrics::gauge!(crate::telemetry::GRANTS).set(shared.grants.len() as f64);

        let mut inboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..settings.shards {
            let (tx, rx) = inbox::inbox();
            inboxes.push(tx);
            receivers.push(rx);
        }
        let mut threads = Vec::new();
        for (id, (rx, grants)) in receivers.into_iter().zip(owned).enumerate() {
            let shard = shard::Shard::new(id, shared.clone(), inboxes.clone(), grants);
            let handle = std::thread::Builder::new()
                .name(format!("vigil-shard-{id}"))
                .spawn(move || shard.run(rx))
                .map_err(|e| EngineError::Thread(e.to_string()))?;
            threads.push(handle);
        }
        let (retention_stop, stop) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("vigil-retention".into())
            .spawn({
                let shared = shared.clone();
                let inboxes = inboxes.clone();
                move || retention::run(shared, inboxes, stop)
            })
            .map_err(|e| EngineError::Thread(e.to_string()))?;
        threads.push(handle);
        Ok(Engine {
            shared,
            inboxes,
            permits: Arc::new(Semaphore::new(settings.max_inflight.max(1))),
            threads: std::sync::Mutex::new(threads),
            retention_stop: std::sync::Mutex::new(Some(retention_stop)),
        })
    }

    /// Cluster mode: from now on a registration is applied only for a principal `owns` names
    /// (else [`EngineError::NotOwned`]). Checked on the shard, in order with the release of a
    /// partition given up: a registration that passed the API's ownership check just before the
    /// partition moved is refused rather than applied after the state was handed on. Set once.
    pub fn fence(&self, owns: Released) {
        let _ = self.shared.owns.set(owns);
    }

    /// Cluster mode: forgets every principal `released` names — their contexts and grants — from
    /// memory, because their partition now belongs to another instance, whose answers must be the
    /// only ones. The in-memory alias table stays: it is the cluster's (read from the alias topic),
    /// by which this instance routes signals naming those identifiers to their new owner.
    ///
    /// Their rows in the store are left to [`Engine::forget_stored_blocking`]: in cluster mode the
    /// store is written and never read back (start-up drops it: the state topic is the truth), so
    /// a row there that outlives its partition answers nothing. Deleting them here used to hold
    /// the rebalance — and the store's writer, so every owned partition — for as long as one
    /// write deleting half a large store takes (73 s for 500 000 grants). Blocks: called from the
    /// Kafka consumer's rebalance callback, after its batches in flight finished.
    pub fn release_blocking(&self, released: Released) -> Result<(), EngineError> {
        let mut waits = Vec::new();
        for inbox in &self.inboxes {
            let (done, wait) = oneshot::channel();
            inbox
                .send(Msg::Release {
                    released: released.clone(),
                    done,
                })
                .map_err(|_| EngineError::Stopped)?;
            waits.push(wait);
        }
        for wait in waits {
            wait.blocking_recv().map_err(|_| EngineError::Stopped)?;
        }
        self.shared.contexts.retain(|key, _| !released(key));
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);
        Ok(())
    }

    /// Cluster mode: deletes the stored rows of every principal `released` names, a short write
    /// of at most [`FORGET_CHUNK`] rows visited at a time, so the writer goes on committing the
    /// shards' batches in between. Returns the rows deleted. Blocks for the whole walk: run it on
    /// a thread of its own (or at start-up, before anything is served).
    pub fn forget_stored_blocking(&self, released: Released) -> Result<usize, EngineError> {
        let mut cursor = Some(persist::ForgetCursor::default());
        let mut deleted = 0;
        while let Some(at) = cursor {
            let released = released.clone();
            let (n, next) = self.shared.writer.write_blocking(move |txn| {
                persist::forget_chunk(txn, &*released, at, FORGET_CHUNK)
            })?;
            deleted += n;
            cursor = next;
        }
        metrics::counter!(crate::telemetry::CLUSTER_RELEASED_ROWS).increment(deleted as u64);
        Ok(deleted)
    }

    /// Cluster mode: the cluster's alias table says `alias` names `principal` (read from the
    /// alias topic, in its order: the last link of an identifier wins on every instance).
    pub fn learn_alias(&self, alias: &str, principal: &str) {
        let _linking = self
            .shared
            .linking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared
            .aliases
            .insert(alias.to_owned(), principal.to_owned());
        metrics::gauge!(crate::telemetry::ALIASES).set(self.shared.aliases.len() as f64);
    }

    /// Cluster mode: the owner of `alias`'s principal forgot the link (a tombstone on the alias
    /// topic, in its order: a later link of the identifier is read after it and holds).
    pub fn unlearn_alias(&self, alias: &str) {
        let _linking = self
            .shared
            .linking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared.aliases.remove(alias);
        metrics::gauge!(crate::telemetry::ALIASES).set(self.shared.aliases.len() as f64);
    }

    /// Cluster mode: takes over the rows of a partition read back from the changelog (each row's
    /// latest value): stores them, then holds them as a start-up load would. Returns the rows
    /// taken. Blocks, as [`Engine::release_blocking`].
    pub fn adopt_blocking(&self, rows: Vec<(Row, Vec<u8>)>) -> Result<usize, EngineError> {
        let taken = rows.len();
        let loaded = self
            .shared
            .writer
            .write_blocking(move |txn| persist::adopt(txn, &rows))?;
        for ctx in loaded.contexts {
            self.shared.contexts.insert(ctx.key.clone(), Arc::new(ctx));
        }
        // The cluster's alias table (the alias topic, read before any partition is taken) has
        // the last word on an identifier two racing registrations linked differently: a restored
        // row fills in only a link not read from it yet.
        for (alias, principal) in loaded.aliases {
            self.shared.aliases.entry(alias).or_insert(principal);
        }
        let mut by_shard: Vec<Vec<Arc<Grant>>> = vec![Vec::new(); self.inboxes.len()];
        for grant in loaded.grants {
            by_shard[self.shared.shard_of(&grant.principal)].push(Arc::new(grant));
        }
        let mut waits = Vec::new();
        for (inbox, grants) in self.inboxes.iter().zip(by_shard) {
            if grants.is_empty() {
                continue;
            }
            let (done, wait) = oneshot::channel();
            inbox
                .send(Msg::Adopt { grants, done })
                .map_err(|_| EngineError::Stopped)?;
            waits.push(wait);
        }
        for wait in waits {
            wait.blocking_recv().map_err(|_| EngineError::Stopped)?;
        }
        metrics::gauge!(crate::telemetry::GRANTS).set(self.shared.grants.len() as f64);
        // Decisions the previous owner committed but had not queued for delivery: queued here
        // (their SETs keep their `jti`s, so one queued twice is a duplicate receivers recognise).
        if !loaded.handoff.is_empty() {
            tracing::info!(
                decisions = loaded.handoff.len(),
                "delivering decisions a previous owner had not handed over"
            );
        }
        for (decision, grant) in loaded.handoff {
            let item = Handed::restored(decision, grant);
            // With the partition's backlog: another party's new decisions go first.
            self.shared
                .decisions
                .blocking_send(item, Lane::Bulk)
                .map_err(|_| EngineError::Stopped)?;
        }
        Ok(taken)
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// A permit for an API request: waits at most [`API_PERMIT_WAIT`], so an overloaded engine
    /// answers "retry later" instead of piling up requests without bound.
    async fn api_permit(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        tokio::time::timeout(API_PERMIT_WAIT, self.permit())
            .await
            .map_err(|_| {
                metrics::counter!(crate::telemetry::ENGINE_OVERLOADED).increment(1);
                EngineError::Overloaded
            })?
    }

    fn send(&self, shard: usize, msg: Msg) -> Result<(), EngineError> {
        self.inboxes[shard]
            .send(msg)
            .map_err(|_| EngineError::Stopped)
    }

    /// Resolves identifier keys to a principal key, creating the principal if none is known, and
    /// returns the aliases to record (identifier → principal) for those not yet linked.
    ///
    /// Linking is atomic: without it, two registrations or signals introducing the same identifier
    /// at once could each choose a principal and each record a link for it — in memory one wins,
    /// in the store the other, and after a restart the identifier leads elsewhere. The common case
    /// (every identifier known) takes no lock.
    fn resolve(&self, identifiers: &[String]) -> Option<(String, Vec<(String, String)>)> {
        if let Some(first) = identifiers.first() {
            if identifiers
                .iter()
                .all(|k| self.shared.aliases.contains_key(k))
            {
                let principal = self.shared.aliases.get(first).map(|p| p.clone());
                if let Some(principal) = principal {
                    return Some((principal, Vec::new()));
                }
            }
        }
        let _linking = self
            .shared
            .linking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let principal = identifiers
            .iter()
            .find_map(|k| self.shared.aliases.get(k).map(|p| p.clone()))
            .or_else(|| identifiers.first().cloned())?;
        let mut new = Vec::new();
        for k in identifiers {
            if !self.shared.aliases.contains_key(k) {
                self.shared.aliases.insert(k.clone(), principal.clone());
                new.push((k.clone(), principal.clone()));
            }
        }
        if !new.is_empty() {
            metrics::gauge!(crate::telemetry::ALIASES).set(self.shared.aliases.len() as f64);
        }
        Some((principal, new))
    }

    /// Hands durably recorded signals to their shards, one message per shard: a shard thread
    /// woken for every pushed SET spent as much switching in and out as applying it. Each shard
    /// marks its signals processed in intake inside its own commit.
    pub async fn apply_signals(&self, signals: Vec<Signal>) -> Result<(), EngineError> {
        let mut per_shard: Vec<Vec<Routed>> = (0..self.inboxes.len()).map(|_| Vec::new()).collect();
        for signal in signals {
            let routed = self.route(signal);
            per_shard[self.shared.shard_of(&routed.key)].push(routed);
        }
        // A part never asks for more permits than there are.
        let part = self.shared.settings.max_inflight.max(1);
        for (shard, routed) in per_shard.into_iter().enumerate() {
            for routed in crate::parts::in_parts(routed, part) {
                let n = u32::try_from(routed.len()).map_err(|_| EngineError::Overloaded)?;
                let permit = self
                    .permits
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| EngineError::Stopped)?;
                self.send(shard, Msg::Signals { routed, permit })?;
            }
        }
        Ok(())
    }

    /// Hands a durably recorded signal to its shard. The shard marks it processed in intake inside
    /// its own commit.
    pub async fn apply_signal(&self, signal: Signal) -> Result<(), EngineError> {
        let permit = self.permit().await?;
        let routed = self.route(signal);
        self.send(
            self.shared.shard_of(&routed.key),
            Msg::Signal {
                routed: Box::new(routed),
                permit,
            },
        )
    }

    /// Hands over signals whose source is their own replay log (a Kafka partition: nothing is
    /// recorded in intake); the returned handle resolves once every shard involved has committed
    /// them. Signals of one key keep their order, also across batches; re-applying one is a no-op
    /// by the context's event-time ordering, which is what makes redelivery harmless.
    pub fn submit_batch(&self, signals: Vec<Signal>) -> Result<BatchDone, EngineError> {
        let expected = signals.len() / self.inboxes.len().max(1) + 1;
        let mut per_shard: Vec<Vec<Routed>> = (0..self.inboxes.len())
            .map(|_| Vec::with_capacity(expected))
            .collect();
        for signal in signals {
            let routed = self.route(signal);
            per_shard[self.shared.shard_of(&routed.key)].push(routed);
        }
        let mut waits = Vec::new();
        // Parts of a quarter batch: while other parties are active a shard takes a backlog that
        // much at a time (`shard::BACKLOG_SHARE`), and otherwise four parts a batch.
        let part = self
            .shared
            .settings
            .max_batch
            .div_ceil(shard::BACKLOG_SHARE)
            .max(1);
        for (shard, items) in per_shard.into_iter().enumerate() {
            let n = items.len();
            let mut parts = Vec::new();
            for items in crate::parts::in_parts(items, part) {
                let (done, rx) = oneshot::channel();
                parts.push(Msg::Batch { items, done });
                waits.push(rx);
            }
            self.shared
                .queued_signals
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            // All at once: a shard taking whole batches takes a source's batch whole, not its
            // first part alone.
            if self.inboxes[shard].send_all(parts).is_err() {
                self.shared
                    .queued_signals
                    .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
                return Err(EngineError::Stopped);
            }
        }
        Ok(BatchDone {
            waiting: waits,
            failure: None,
        })
    }

    /// The grants held per party: cluster mode announces this instance's and brings the others'.
    pub fn grant_counts(&self) -> Arc<GrantCounts> {
        self.shared.counts.clone()
    }

    /// Signals handed over by [`Engine::submit_batch`] that no shard has taken yet. A source
    /// submits no more while this is at its bound (`kafka.max_queued_signals`): a shard's
    /// inbox is otherwise unbounded, and a backlog read faster than the engine applies it
    /// would sit there in memory.
    pub fn queued_signals(&self) -> usize {
        self.shared
            .queued_signals
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What a subject targets, where a simple subject that names no known principal but a known
    /// session or device is taken as that session or device.
    fn target_of(&self, subject: &crate::subject::SubjectId) -> Target {
        let mut target = Target::of(subject);
        // A simple subject that names no known principal but a known session or device (the CAEP
        // examples name sessions by opaque id) targets that session or device.
        if target.members.is_empty() && target.identifiers.len() == 1 {
            let id = &target.identifiers[0];
            if !self.shared.aliases.contains_key(id) {
                for member in ["session", "device"] {
                    if self
                        .shared
                        .index
                        .contains_key(member_index(member, id).as_str())
                    {
                        target.members.insert(member.to_owned(), id.clone());
                        target.identifiers.clear();
                        break;
                    }
                }
            }
        }
        target
    }

    /// The key of the context a signal about `subject` goes to, linking nothing: the principal an
    /// identifier is known as, else the first identifier (the principal it would create), else
    /// the device, session, … it names. Cluster mode partitions signals by it.
    pub fn routing_key(&self, subject: &crate::subject::SubjectId) -> String {
        let target = self.target_of(subject);
        self.principal_key(&target.identifiers)
            .or_else(|| member_key(&target))
            .unwrap_or_else(|| format!("unresolved:{subject}"))
    }

    /// Whether any identifier of `subject` is one a registration linked to a principal (the
    /// cluster's alias table in cluster mode), or it names a session or device a grant holds.
    pub fn knows(&self, subject: &crate::subject::SubjectId) -> bool {
        let target = self.target_of(subject);
        target
            .identifiers
            .iter()
            .any(|k| self.shared.aliases.contains_key(k))
            || member_key(&target).is_some_and(|k| {
                ["session", "device"]
                    .iter()
                    .any(|m| self.shared.index.contains_key(member_index(m, &k).as_str()))
            })
    }

    /// The principal `identifiers` name, linking nothing: the one any of them is known as, else
    /// the first (the principal a registration or signal would create).
    pub fn principal_key(&self, identifiers: &[String]) -> Option<String> {
        identifiers
            .iter()
            .find_map(|k| self.shared.aliases.get(k).map(|p| p.clone()))
            .or_else(|| identifiers.first().cloned())
    }

    /// Finds the context a signal is about: its principal (created on first sight, with the aliases
    /// to record), else the session or device it names.
    fn route(&self, signal: Signal) -> Routed {
        let target = self.target_of(&signal.subject);
        let (key, aliases) = match self.resolve(&target.identifiers) {
            Some(resolved) => resolved,
            // Only members: the signal is about a device, session, … itself.
            None => match member_key(&target) {
                Some(k) => (k, Vec::new()),
                None => {
                    tracing::warn!(seq = signal.seq, "signal subject names nothing to act on");
                    (format!("unresolved:{}", signal.subject), Vec::new())
                }
            },
        };
        Routed {
            key,
            signal,
            target,
            aliases,
        }
    }

    /// Registers (or re-registers) a grant and evaluates it against the current context.
    pub async fn register(
        &self,
        request: GrantRequest,
        registrant: Registrant,
    ) -> Result<Registered, EngineError> {
        let mut identifiers = request.identifier_keys()?;
        if let Some(token) = &request.token {
            identifiers.push(format!("jwt_id:{}|{}", token.iss, token.jti));
        }
        // Before `resolve`, which links new aliases in memory: an overloaded answer, or one
        // refused for capacity, links nothing. (The shard checks capacity again, in order.)
        if !self.shared.grants.contains_key(request.id.as_str()) {
            self.shared.room_for_a_grant(registrant)?;
        }
        let permit = self.api_permit().await?;
        let (principal, aliases) = self
            .resolve(&identifiers)
            .ok_or_else(|| GrantError::Invalid("`subject` names no principal".into()))?;
        let mut grant = request.into_grant(principal.clone(), self.shared.settings.clock.now())?;
        grant.registered_by = registrant;
        let (reply, rx) = oneshot::channel();
        self.send(
            self.shared.shard_of(&principal),
            Msg::Register {
                grant: Box::new(grant),
                aliases,
                reply,
                permit,
            },
        )?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Ends a grant. A revoked grant stays as a tombstone until it expires (answered `false`).
    /// `None` if the grant is unknown.
    pub async fn delete(&self, id: &str) -> Result<Option<bool>, EngineError> {
        let Some(principal) = self.shared.grants.get(id).map(|g| g.principal.clone()) else {
            return Ok(None);
        };
        let permit = self.api_permit().await?;
        let (reply, rx) = oneshot::channel();
        self.send(
            self.shared.shard_of(&principal),
            Msg::Delete {
                id: id.to_owned(),
                reply,
                permit,
            },
        )?;
        rx.await.map_err(|_| EngineError::Stopped)?.map(Some)
    }

    /// The principal an identifier key is linked to (the key itself if it is not an alias).
    pub fn principal_of(&self, key: &str) -> String {
        self.shared
            .aliases
            .get(key)
            .map(|p| p.clone())
            .unwrap_or_else(|| key.to_owned())
    }

    pub fn grant(&self, id: &str) -> Option<Arc<Grant>> {
        self.shared.grants.get(id).map(|g| g.clone())
    }

    /// The grants `query` selects, in id order, after `query.after`: at most `query.limit`, and
    /// whether more follow. A principal's grants come from its index; otherwise every grant held
    /// is looked at (an operator's listing, not a request path).
    pub fn list_grants(&self, query: &GrantQuery) -> (Vec<Arc<Grant>>, bool) {
        let keep = |g: &Grant| {
            query.after.as_deref().is_none_or(|a| &*g.id > a)
                && query.status.is_none_or(|s| g.status == s)
                && query.kind.is_none_or(|k| g.kind == k)
                && query
                    .enforcement_point
                    .as_ref()
                    .is_none_or(|ep| g.enforcement_points.contains(ep))
                && query.rule.as_ref().is_none_or(|r| {
                    // Grants revoked before `status_rules` was kept name theirs in `revoked`.
                    g.status_rules
                        .as_ref()
                        .is_some_and(|rules| rules.contains(r))
                        || g.revoked.as_ref().is_some_and(|rev| rev.rules.contains(r))
                })
        };
        let mut found: Vec<Arc<Grant>> = match &query.principal {
            Some(key) => {
                let principal = self.principal_of(key);
                self.shared
                    .indexed(&principal_index(&principal))
                    .iter()
                    .filter_map(|id| self.grant(id))
                    .filter(|g| keep(g))
                    .collect()
            }
            None => self
                .shared
                .grants
                .iter()
                .filter(|g| keep(g.value()))
                .map(|g| g.value().clone())
                .collect(),
        };
        found.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let more = found.len() > query.limit;
        found.truncate(query.limit);
        (found, more)
    }

    /// The grants of a session (its member key, e.g. `opaque:<id>`) or of a token (`jwt_id:<iss>|<jti>`).
    pub fn grants_by(&self, session: Option<&str>, token: Option<&str>) -> Vec<Arc<Grant>> {
        let mut keys = Vec::new();
        if let Some(s) = session {
            keys.push(member_index("session", s));
        }
        if let Some(t) = token {
            keys.push(token_index(t));
        }
        let mut ids: Vec<GrantId> = keys.iter().flat_map(|k| self.shared.indexed(k)).collect();
        ids.sort();
        ids.dedup();
        ids.iter().filter_map(|id| self.grant(id)).collect()
    }

    pub fn grant_count(&self) -> usize {
        self.shared.grants.len()
    }

    /// The running policy set.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.shared.policy()
    }

    pub fn policy_version(&self) -> String {
        self.shared.policy().version.clone()
    }

    /// The shadow set, when one is loaded.
    pub fn shadow(&self) -> Option<Arc<shadow::ShadowSet>> {
        self.shared.shadow()
    }

    /// Loads `set` as the shadow set (replacing any), or discards it (`None`); either way the
    /// divergences held so far are forgotten (they were another set's).
    pub fn set_shadow(&self, set: Option<shadow::ShadowSet>) -> Option<Arc<shadow::ShadowSet>> {
        let mut held = match self.shared.shadow.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let previous = std::mem::replace(&mut *held, set.map(Arc::new));
        self.shared.divergences.clear();
        previous
    }

    /// The shadow set's divergences from the live one.
    pub fn divergences(&self) -> &shadow::Divergences {
        &self.shared.divergences
    }

    /// Swaps in a new policy set and re-evaluates every grant under it. The returned handle resolves
    /// when every shard has re-evaluated (and committed) all its grants.
    pub fn swap_policy(&self, policy: PolicySet) -> Result<SwapDone, EngineError> {
        let version = policy.version.clone();
        match self.shared.policy.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
        metrics::counter!(crate::telemetry::POLICY_SWAPS).increment(1);
        tracing::info!(%version, "policy set swapped; re-evaluating every grant");
        self.reevaluate_all()
    }

    /// What `candidate` would change if swapped in now, changing nothing (see [`impact`]):
    /// `samples` grants of each bucket, each with its subject explained. Blocks for as long as
    /// evaluating every grant takes, on threads of its own.
    pub fn impact_blocking(
        &self,
        candidate: &PolicySet,
        samples: usize,
    ) -> Result<Impact, EngineError> {
        let mut impact = impact::preview(&self.shared, candidate, samples)?;
        let samples = impact
            .samples
            .changed
            .iter_mut()
            .chain(&mut impact.samples.loosening)
            .chain(&mut impact.samples.errors);
        for sample in samples {
            sample.explain = self.explain(&sample.subject);
        }
        Ok(impact)
    }

    /// Re-evaluates every grant under the current policy set. Start-up does it once, so a set
    /// changed while Vigil was stopped is applied exactly as a reload would apply it.
    pub fn reevaluate_all(&self) -> Result<SwapDone, EngineError> {
        let mut swap = SwapDone {
            committed: Vec::new(),
            counted: Vec::new(),
        };
        for shard in 0..self.inboxes.len() {
            let (done, committed) = oneshot::channel();
            let (tally, counted) = oneshot::channel();
            self.send(
                shard,
                Msg::ReevaluateAll {
                    done: Some(done),
                    counted: Some(tally),
                },
            )?;
            swap.committed.push(committed);
            swap.counted.push(counted);
        }
        Ok(swap)
    }

    /// "Why": a subject's context (each fact with its time and source), its grants, recent signals and
    /// recent decisions. `key` may be any identifier key linked to the principal.
    /// Up to `limit` signals intake recorded after sequence number `after`, newest first.
    pub fn recorded_signals(&self, after: u64, limit: usize) -> Result<Vec<Signal>, EngineError> {
        self.shared
            .intake
            .newest(after, limit)
            .map_err(|e| EngineError::Storage(e.to_string()))
    }

    /// Subjects an operator's search text names, as `(identifier key, principal)`: the text as a
    /// key, as an email address, phone number or opaque id, then any identifier key containing
    /// it (case-insensitive), up to `limit`. Scans the alias table past the exact forms: an
    /// operator's search, not a request path.
    pub fn find_subjects(&self, text: &str, limit: usize) -> Vec<(String, String)> {
        let text = text.trim();
        if text.is_empty() {
            return Vec::new();
        }
        let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
        let mut exact = vec![
            text.to_owned(),
            format!("email:{}", text.to_lowercase()),
            format!("opaque:{text}"),
        ];
        if text.starts_with('+') && !digits.is_empty() {
            exact.push(format!("phone_number:+{digits}"));
        }
        let mut found: Vec<(String, String)> = Vec::new();
        for key in exact {
            let principal = self
                .shared
                .aliases
                .get(&key)
                .map(|p| p.clone())
                .or_else(|| {
                    (self.shared.contexts.contains_key(&key)
                        || !self.shared.indexed(&principal_index(&key)).is_empty())
                    .then(|| key.clone())
                });
            if let Some(principal) = principal {
                if !found.iter().any(|(k, _)| *k == key) {
                    found.push((key, principal));
                }
            }
        }
        let needle = text.to_lowercase();
        for alias in self.shared.aliases.iter() {
            if found.len() >= limit {
                break;
            }
            if alias.key().to_lowercase().contains(&needle)
                && !found.iter().any(|(k, _)| k == alias.key())
            {
                found.push((alias.key().clone(), alias.value().clone()));
            }
        }
        found.truncate(limit);
        found
    }

    pub fn explain(&self, key: &str) -> Option<Value> {
        let principal = self
            .shared
            .aliases
            .get(key)
            .map(|p| p.clone())
            .unwrap_or_else(|| key.to_owned());
        let context = self.shared.contexts.get(&principal).map(|c| c.clone());
        let grant_ids = self.shared.indexed(&principal_index(&principal));
        if context.is_none() && grant_ids.is_empty() {
            return None;
        }
        let mut active = Vec::new();
        let mut revoked = Vec::new();
        for id in grant_ids {
            if let Some(g) = self.shared.grants.get(&id) {
                if g.status == crate::grant::GrantStatus::Revoked {
                    revoked.push(json!(&**g));
                } else {
                    active.push(json!(&**g));
                }
            }
        }
        let decisions = self
            .shared
            .audit
            .query(&DecisionQuery {
                subject: Some(principal.clone()),
                limit: 50,
                ..DecisionQuery::default()
            })
            .unwrap_or_default();
        let aliases: Vec<String> = self
            .shared
            .aliases
            .iter()
            .filter(|e| e.value() == &principal)
            .map(|e| e.key().clone())
            .collect();
        Some(json!({
            "subject": principal,
            "identifiers": aliases,
            "context": context.as_deref(),
            "grants": {"active": active, "revoked": revoked},
            "recent_signals": context.as_ref().map(|c| c.recent_signals.clone()),
            "recent_decisions": decisions,
            "policy_version": self.policy_version(),
        }))
    }

    /// Stops the shards once nothing is in flight: waits until every signal and API request has been
    /// handled (their forwarded re-evaluations are queued by then), then stops each shard behind
    /// what it has queued. Later calls return at once.
    pub async fn shutdown(&self) {
        let all = u32::try_from(self.shared.settings.max_inflight.max(1)).unwrap_or(u32::MAX);
        let _quiet = self.permits.acquire_many(all).await;
        self.permits.close();
        drop(
            self.retention_stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        for inbox in &self.inboxes {
            let _ = inbox.send(Msg::Stop);
        }
        let threads: Vec<_> = match self.threads.lock() {
            Ok(mut t) => t.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        };
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a shard thread panicked");
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::GrantStatus;

    /// An engine with no rules on a fresh store, and what must live as long as it (the store's
    /// directory and writer, the decision channel's receiver).
    fn engine(settings: EngineSettings) -> (Engine, Box<dyn std::any::Any>) {
        let (engine, rx, held) = engine_with_decisions(settings);
        (engine, Box::new((held, rx)))
    }

    /// [`engine`], with the receiving end of its decisions.
    #[allow(clippy::type_complexity)]
    fn engine_with_decisions(
        settings: EngineSettings,
    ) -> (Engine, Handoffs, Box<dyn std::any::Any>) {
        let dir = tempfile::tempdir().unwrap();
        let (engine, rx, db, threads) = engine_in(dir.path(), settings);
        drop(db);
        (engine, rx, Box::new((dir, threads)))
    }

    /// The store's and intake's threads of an engine made by [`engine_in`].
    struct Threads(
        crate::store::BatchWriterThread,
        crate::intake::IntakeThreads,
    );

    impl Threads {
        /// Waits until the engine that used them is gone (dropped) and they have stopped, so
        /// its store can be opened again.
        async fn join(self) {
            tokio::task::spawn_blocking(move || {
                self.0.join();
                self.1.join();
            })
            .await
            .unwrap();
        }
    }

    /// An engine on `dir` whose contexts are kept an hour of `clock` after their newest fact
    /// (three for a disabled account), looked through every 5 ms (real time): the retention
    /// tests move the clock.
    fn retention_engine(
        dir: &std::path::Path,
        clock: &crate::clock::Clock,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads) {
        engine_in(dir, retention_settings(clock))
    }

    /// The settings of [`retention_engine`].
    fn retention_settings(clock: &crate::clock::Clock) -> EngineSettings {
        EngineSettings {
            clock: clock.clone(),
            sweep_interval: Duration::from_millis(5),
            context_retention: Duration::from_secs(3600),
            disabled_account_retention: Duration::from_secs(3 * 3600),
            context_scan_interval: Duration::from_millis(5),
            ..EngineSettings::default()
        }
    }

    /// An engine on `dir` whose journal is folded only when the test moves `clock` an hour on.
    fn journaling_engine(
        dir: &std::path::Path,
        clock: &crate::clock::Clock,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads) {
        engine_in(dir, journaling_settings(clock))
    }

    fn journaling_settings(clock: &crate::clock::Clock) -> EngineSettings {
        EngineSettings {
            clock: clock.clone(),
            sweep_interval: Duration::from_millis(5),
            journal_fold_interval: Duration::from_secs(3600),
            ..EngineSettings::default()
        }
    }

    /// Submits `signals` as a source's batch and waits for its answer, which comes at the
    /// checkpoint the clock (moved a second) calls.
    async fn apply_at_checkpoint(
        engine: &Engine,
        clock: &crate::clock::Clock,
        signals: Vec<Signal>,
    ) {
        apply_at_checkpoint_after(engine, clock, signals, Duration::from_secs(1)).await;
    }

    /// [`apply_at_checkpoint`] on an engine whose checkpoint interval is `interval`.
    async fn apply_at_checkpoint_after(
        engine: &Engine,
        clock: &crate::clock::Clock,
        signals: Vec<Signal>,
        interval: Duration,
    ) {
        let done = engine.submit_batch(signals).unwrap();
        clock.advance(interval);
        tokio::task::spawn_blocking(move || done.wait_blocking())
            .await
            .unwrap()
            .unwrap();
    }

    /// The spec's `example` SET as a signal about `subject`, its events at `at` (seconds).
    fn example_about(example: &str, subject: serde_json::Value, at: i64, seq: u64) -> Signal {
        let mut claims = crate::test_support::spec_example(example);
        claims["sub_id"] = subject;
        for (_, event) in claims["events"].as_object_mut().unwrap().iter_mut() {
            event["event_timestamp"] = at.into();
        }
        crate::evaluate::testing::signal_from_claims(&claims, seq).unwrap()
    }

    /// An engine whose checkpoints come only when the test moves `clock` an hour on.
    fn checkpoint_on_demand(
        dir: &std::path::Path,
        clock: &crate::clock::Clock,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads) {
        let (engine, decisions, db, threads, _writer) = checkpoint_on_demand_and_writer(dir, clock);
        (engine, decisions, db, threads)
    }

    /// [`checkpoint_on_demand`], and the state store's writer, which the test may break.
    #[allow(clippy::type_complexity)]
    fn checkpoint_on_demand_and_writer(
        dir: &std::path::Path,
        clock: &crate::clock::Clock,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads, BatchWriter) {
        engine_and_writer_in(
            dir,
            EngineSettings {
                sweep_interval: Duration::from_millis(5),
                checkpoint_interval: Duration::from_secs(3600),
                journal_fold_interval: Duration::from_secs(1000 * 3600),
                clock: clock.clone(),
                ..EngineSettings::default()
            },
        )
    }

    /// A subject of two identifiers: `who@example.com` and `phone`.
    fn two_ids(who: &str, phone: &str) -> serde_json::Value {
        serde_json::json!({"format": "aliases", "identifiers": [
            {"format": "email", "email": format!("{who}@example.com")},
            {"format": "phone_number", "phone_number": phone}]})
    }

    /// How many stored links lead to a principal whose key contains `who`.
    fn stored_links(db: &Arc<redb::Database>, who: &str) -> usize {
        persist::load(db)
            .unwrap()
            .aliases
            .iter()
            .filter(|(_, principal)| principal.contains(who))
            .count()
    }

    /// An engine on the store in `dir` (a second one after the first's shutdown is a restart),
    /// with its decisions' receiver, the store, and what must live as long as it.
    fn engine_in(
        dir: &std::path::Path,
        settings: EngineSettings,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads) {
        let (engine, decisions, db, threads, _writer) = engine_and_writer_in(dir, settings);
        (engine, decisions, db, threads)
    }

    /// [`engine_in`], and the state store's writer, which the test may slow down.
    #[allow(clippy::type_complexity)]
    fn engine_and_writer_in(
        dir: &std::path::Path,
        settings: EngineSettings,
    ) -> (Engine, Handoffs, Arc<redb::Database>, Threads, BatchWriter) {
        let db = crate::store::open(dir).unwrap();
        let (writer, writer_thread) = BatchWriter::start(db.clone(), "state", 16).unwrap();
        let kept = writer.clone();
        let (intake, intake_thread) = Intake::open_dir(dir, 16).unwrap();
        let audit = Arc::new(AuditLog::open(&dir.join("audit"), 1 << 20, 2).unwrap());
        let (decisions, rx) = lanes(1024);
        let engine = Engine::start(
            &db,
            writer,
            intake,
            audit,
            PolicySet::empty(),
            decisions,
            settings,
        )
        .unwrap();
        (engine, rx, db, Threads(writer_thread, intake_thread), kept)
    }

    /// The records a batch appends, kept in memory; appends are acknowledged at once.
    #[derive(Debug, Default)]
    struct Recorded(std::sync::Mutex<Vec<ChangeRecord>>);

    impl Changelog for Recorded {
        fn append(
            &self,
            records: Vec<ChangeRecord>,
            _decisions: &[Decision],
        ) -> oneshot::Receiver<Result<(), String>> {
            self.0.lock().unwrap().extend(records);
            let (tx, rx) = oneshot::channel();
            tx.send(Ok(())).unwrap();
            rx
        }
    }

    /// A changelog that refuses every append while `refusing` is set, and notes the ids of the
    /// decisions of each append it takes (the cluster's decision trail).
    #[derive(Debug, Default)]
    struct Refusing {
        refusing: std::sync::atomic::AtomicBool,
        trail: std::sync::Mutex<Vec<String>>,
    }

    impl Changelog for Refusing {
        fn append(
            &self,
            _records: Vec<ChangeRecord>,
            decisions: &[Decision],
        ) -> oneshot::Receiver<Result<(), String>> {
            let (tx, rx) = oneshot::channel();
            let answer = if self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
                Err("the brokers refused the append (a test said so)".to_owned())
            } else {
                let ids = decisions.iter().map(|d| d.id.clone());
                self.trail.lock().unwrap().extend(ids);
                Ok(())
            };
            tx.send(answer).unwrap();
            rx
        }
    }

    /// A decision whose batch's append the brokers refused is handed to delivery again with a
    /// later batch, and reaches the decision trail with that batch's append.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_handed_again_after_a_refused_append_reaches_the_trail() {
        let log = Arc::new(Refusing::default());
        let (engine, mut decisions, _held) = engine_with_decisions(EngineSettings {
            changelog: Some(log.clone()),
            ..EngineSettings::default()
        });
        register_json(
            &engine,
            serde_json::json!({
                "id": "t1", "kind": "access_token", "subject": {"format": "email", "email": "h@example.com"},
                "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64}),
        )
        .await;
        log.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        swap_rules(
            &engine,
            "rules:\n  - {id: tokens, on: ['*'], when: \"grant.kind == 'access_token'\", effect: revoke}\n",
        )
        .await;
        let first = next_interactive(&mut decisions).await;
        assert!(!first.durable.wait().await, "the append was refused");
        assert!(log.trail.lock().unwrap().is_empty());
        log.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // A later batch writes the failed one's rows again and hands its decision again.
        register_json(
            &engine,
            serde_json::json!({
                "id": "t2", "kind": "session", "subject": {"format": "email", "email": "i@example.com"},
                "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64}),
        )
        .await;
        let again = next_interactive(&mut decisions).await;
        assert_eq!(again.decision.id, first.decision.id);
        assert!(again.durable.wait().await);
        assert!(
            log.trail.lock().unwrap().contains(&first.decision.id),
            "the decision handed again is on the trail: {:?}",
            log.trail.lock().unwrap()
        );
        engine.shutdown().await;
    }

    /// The next decision handed to delivery's interactive lane (within 5 s).
    async fn next_interactive(decisions: &mut Handoffs) -> Handed {
        tokio::time::timeout(Duration::from_secs(5), decisions.interactive.recv())
            .await
            .expect("no decision was handed to delivery")
            .expect("delivery's lane closed")
    }

    /// Registers the access token `t1` and swaps in a policy that revokes every access token: one
    /// revocation, handed off to delivery.
    async fn revoke_a_token(engine: &Engine) {
        register_json(
            engine,
            serde_json::json!({
                "id": "t1", "kind": "access_token", "subject": {"format": "email", "email": "h@example.com"},
                "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64}),
        )
        .await;
        swap_rules(
            engine,
            "rules:\n  - {id: tokens, on: ['*'], when: \"grant.kind == 'access_token'\", effect: revoke}\n",
        )
        .await;
    }

    /// Registers the grant `request` (its JSON) as the API client `test`.
    async fn register_json(engine: &Engine, request: serde_json::Value) {
        let request: GrantRequest = serde_json::from_value(request).unwrap();
        engine
            .register(request, Registrant::client("test"))
            .await
            .unwrap();
    }

    /// Swaps in a policy set of one file holding `rules`, and waits for its re-evaluation.
    async fn swap_rules(engine: &Engine, rules: &str) {
        let policy =
            PolicySet::from_sources(&[("rules.yaml".to_owned(), rules.to_owned())]).unwrap();
        engine.swap_policy(policy).unwrap().wait().await;
    }

    /// A decision its owner committed but delivery had not yet taken over is in the changelog,
    /// and the instance that restores the partition hands it to its own delivery (same decision,
    /// so the same SET `jti`s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_not_yet_delivered_moves_with_its_partition() {
        let log = Arc::new(Recorded::default());
        let (first, _first_decisions, _held) = engine_with_decisions(EngineSettings {
            changelog: Some(log.clone()),
            ..EngineSettings::default()
        });
        revoke_a_token(&first).await;
        // The partition as the state topic holds it: each row's last record.
        let mut latest: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        for r in log.0.lock().unwrap().iter() {
            latest.insert(r.key.clone(), r.value.clone());
        }
        let rows: Vec<(Row, Vec<u8>)> = latest
            .into_iter()
            .filter_map(|(k, v)| Some((Row::parse(&k)?, v?)))
            .collect();
        let handoff: Vec<&Row> = rows
            .iter()
            .map(|(r, _)| r)
            .filter(|r| r.table == Table::Handoff)
            .collect();
        assert_eq!(handoff.len(), 1, "the revocation's hand-off row: {rows:?}");
        let decision_id = handoff[0].key.clone();
        first.shutdown().await;

        let (next, mut decisions, _held) = engine_with_decisions(EngineSettings::default());
        let next = Arc::new(next);
        let adopting = next.clone();
        tokio::task::spawn_blocking(move || adopting.adopt_blocking(rows))
            .await
            .unwrap()
            .unwrap();
        let Handed {
            decision,
            grant,
            durable,
            ..
        } = tokio::time::timeout(Duration::from_secs(5), decisions.bulk.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(durable.wait().await, "adopted from the store: durable");
        assert_eq!(decision.id, decision_id);
        assert_eq!(&*grant.id, "t1");
        assert_eq!(
            next.grant("t1").map(|g| g.status),
            Some(GrantStatus::Revoked)
        );
    }

    /// A batch's decisions are written to the audit log on the shard's thread and synced on the
    /// writer's, before the commit that makes them take effect: once a revocation is durable, its
    /// audit record is too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_is_synced_to_the_audit_log_before_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut decisions, _db, _held) = engine_in(dir.path(), EngineSettings::default());
        revoke_a_token(&engine).await;
        let handed = next_interactive(&mut decisions).await;
        assert!(handed.durable.wait().await);
        assert!(
            engine.shared.audit.synced_to_end(),
            "durable before its audit record"
        );
        let listed = engine
            .shared
            .audit
            .query(&crate::audit::DecisionQuery::default())
            .unwrap();
        assert!(listed.iter().any(|d| d.id == handed.decision.id));
        engine.shutdown().await;
    }

    /// Hand-off rows are keyed by the decision's time, so a revocation's row is appended at the
    /// table's end; a row an earlier release keyed by decision id is moved to its key at the next
    /// start, so delivery's taking it over (by that key) deletes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_off_rows_are_keyed_by_time_and_old_keys_are_moved_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut decisions, db, held) = engine_in(dir.path(), EngineSettings::default());
        revoke_a_token(&engine).await;
        let handed = next_interactive(&mut decisions).await;
        assert!(handed.durable.wait().await);
        assert!(handed.journaled.is_some(), "single node: in a journal row");
        let decision = handed.decision;
        let key = handoff_key(&decision);
        assert!(
            key.starts_with(&format!("{:016x}/", (decision.time * 1000.0) as u64)),
            "{key}"
        );
        let keys = |db: &Arc<redb::Database>| -> Vec<String> {
            use redb::ReadableTable;
            let txn = db.begin_read().unwrap();
            let t = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("engine_handoff"))
                .unwrap();
            t.iter()
                .unwrap()
                .map(|e| e.unwrap().0.value().to_owned())
                .collect()
        };
        assert!(keys(&db).is_empty(), "not in a row of its own");
        async fn restart(
            dir: &std::path::Path,
            engine: Engine,
            held: Threads,
            db: Arc<redb::Database>,
        ) -> (Engine, Handoffs, Arc<redb::Database>, Threads) {
            engine.shutdown().await;
            drop(engine);
            held.join().await;
            drop(db);
            engine_in(dir, EngineSettings::default())
        }
        // Never taken over: the start-up fold gives it a row of its own, under its key.
        let (engine, _decisions, db, held) = restart(dir.path(), engine, held, db).await;
        assert_eq!(
            keys(&db),
            std::slice::from_ref(&key),
            "moved out of the journal"
        );
        // As an earlier release stored it: under the decision id.
        {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn
                    .open_table(redb::TableDefinition::<&str, &[u8]>::new("engine_handoff"))
                    .unwrap();
                let bytes = t.remove(key.as_str()).unwrap().unwrap().value().to_vec();
                t.insert(decision.id.as_str(), bytes.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let (engine, _decisions, db, _held) = restart(dir.path(), engine, held, db).await;
        assert_eq!(
            keys(&db),
            std::slice::from_ref(&key),
            "moved to its key at start"
        );
        let pending = pending_handoff(&db).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0.id, decision.id);
        let txn = db.begin_write().unwrap();
        let mark = HandoffMark {
            key,
            journaled: None,
        };
        handoff_done_in(&txn, &[mark]).unwrap();
        txn.commit().unwrap();
        assert!(pending_handoff(&db).unwrap().is_empty(), "taken over");
        engine.shutdown().await;
    }

    /// Cluster mode: the in-memory alias table is the cluster's. Giving a principal's partition up
    /// keeps its identifiers' links (signals naming them are still routed to its new owner), and
    /// a partition taken over does not put back a link the cluster's table has since replaced (two
    /// registrations raced on the identifier, and the other one's link came later).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cluster_alias_table_survives_handovers() {
        let log = Arc::new(Recorded::default());
        let (engine, _decisions, _held) = engine_with_decisions(EngineSettings {
            changelog: Some(log.clone()),
            ..EngineSettings::default()
        });
        let engine = Arc::new(engine);
        let request: GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "r1", "kind": "session",
            "subject": {"format": "aliases", "identifiers": [
                {"format": "email", "email": "a@example.com"},
                {"format": "phone_number", "phone_number": "+12025550100"}]},
            "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64}))
        .unwrap();
        engine
            .register(request, Registrant::client("test"))
            .await
            .unwrap();
        let phone = "phone_number:+12025550100";
        assert_eq!(engine.principal_of(phone), "email:a@example.com");
        let rows: Vec<(Row, Vec<u8>)> = log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| Some((Row::parse(&r.key)?, r.value.clone()?)))
            .collect();
        assert!(rows.iter().any(|(r, _)| r.table == Table::Alias));

        let releasing = engine.clone();
        tokio::task::spawn_blocking(move || {
            releasing.release_blocking(Arc::new(|_: &str| true))?;
            releasing.forget_stored_blocking(Arc::new(|_: &str| true))
        })
        .await
        .unwrap()
        .unwrap();
        assert!(
            engine.grant("r1").is_none(),
            "the grant went with the partition"
        );
        assert_eq!(
            engine.principal_of(phone),
            "email:a@example.com",
            "the link stays: it routes the phone's signals to the new owner"
        );

        // Another registration's link of the phone, later in the alias topic, wins; taking the
        // first principal's partition back does not undo it.
        engine.learn_alias(phone, "email:b@example.com");
        let adopting = engine.clone();
        tokio::task::spawn_blocking(move || adopting.adopt_blocking(rows))
            .await
            .unwrap()
            .unwrap();
        assert!(engine.grant("r1").is_some(), "the grant came back with it");
        assert_eq!(engine.principal_of(phone), "email:b@example.com");
        assert_eq!(
            engine.principal_of("email:a@example.com"),
            "email:a@example.com"
        );
    }

    /// With every in-flight slot taken, an API registration is answered "overloaded" after the
    /// bounded wait, and changes nothing (no alias linked, no grant).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overloaded_engine_refuses_api_requests_instead_of_queueing_them() {
        let (engine, _held) = engine(EngineSettings {
            max_inflight: 1,
            ..EngineSettings::default()
        });
        let held = engine.permits.clone().acquire_owned().await.unwrap();
        let request: GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "g1", "kind": "session", "subject": {"format": "email", "email": "o@example.com"},
            "issued_at": 1_700_000_000, "expires_at": 4_000_000_000u64}))
        .unwrap();
        let answer = engine
            .register(request.clone(), Registrant::client("test"))
            .await;
        assert!(matches!(answer, Err(EngineError::Overloaded)), "{answer:?}");
        assert!(engine.grant("g1").is_none());
        assert!(engine.shared.aliases.is_empty(), "nothing linked");
        drop(held);
        assert!(engine
            .register(request, Registrant::client("test"))
            .await
            .is_ok());
        engine.shutdown().await;
    }

    /// Grants are bounded by `max_grants`: a new grant beyond is refused and changes nothing (no
    /// grant, no link), also when it comes as a session-established event; re-registering a held
    /// grant is not refused; once one is deleted or has expired, a new one is taken again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grants_beyond_the_bound_are_refused_and_change_nothing() {
        let clock = crate::clock::Clock::manual(1_700_000_000_000);
        let (engine, _held) = engine(EngineSettings {
            max_grants: 2,
            clock: clock.clone(),
            sweep_interval: Duration::from_millis(5),
            ..EngineSettings::default()
        });
        let request = |id: &str, email: &str| -> GrantRequest {
            serde_json::from_value(serde_json::json!({
                "id": id, "kind": "session", "subject": {"format": "email", "email": email},
                "issued_at": 1_699_999_990, "expires_at": 1_700_000_060}))
            .unwrap()
        };
        engine
            .register(request("g1", "a@example.com"), Registrant::client("test"))
            .await
            .unwrap();
        engine
            .register(request("g2", "b@example.com"), Registrant::client("test"))
            .await
            .unwrap();
        let refused = engine
            .register(request("g3", "c@example.com"), Registrant::client("test"))
            .await;
        assert!(matches!(refused, Err(EngineError::Full(2))), "{refused:?}");
        assert!(engine.grant("g3").is_none());
        assert!(
            !engine.shared.aliases.contains_key("email:c@example.com"),
            "nothing linked"
        );
        // A held grant registered again is an update, not a new grant.
        engine
            .register(request("g2", "b@example.com"), Registrant::client("test"))
            .await
            .unwrap();
        // A session-established event would make a session grant of its own: not past the bound.
        let session_established = |email: &str, seq: u64| {
            let signal = example_about(
                "caep-session-established.json",
                serde_json::json!({"format": "email", "email": email}),
                clock.now() as i64,
                seq,
            );
            apply_at_checkpoint(&engine, &clock, vec![signal])
        };
        session_established("d@example.com", 1).await;
        assert_eq!(
            engine.shared.grants.len(),
            2,
            "no session grant past the bound"
        );
        // g1 deleted: room for one more.
        engine.delete("g1").await.unwrap();
        engine
            .register(request("g3", "c@example.com"), Registrant::client("test"))
            .await
            .unwrap();
        // Every grant expired and swept: the same kind of event makes its session grant.
        clock.advance(Duration::from_secs(120));
        within_5s("the expired grants were not swept", || {
            engine.shared.grants.is_empty()
        })
        .await;
        session_established("e@example.com", 2).await;
        assert_eq!(
            engine.shared.grants.len(),
            1,
            "the session grant within the bound"
        );
        engine.shutdown().await;
    }

    /// Each party holds at most `max_grants_per_registrant` grants: past it, its new grant is
    /// refused and changes nothing, while another party registers as before; an update of a held
    /// grant (by anyone) stays counted against whoever made it; session grants count against their
    /// transmitter; a deleted or expired grant makes room; a restart counts the held grants again
    /// from the rows, which keep their registrant; the grants other instances announce count too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_party_past_its_grant_quota_is_refused_and_the_others_are_not() {
        let clock = crate::clock::Clock::manual(1_700_000_000_000);
        let settings = || EngineSettings {
            max_grants: 100,
            max_grants_per_registrant: 2,
            clock: clock.clone(),
            sweep_interval: Duration::from_millis(5),
            ..EngineSettings::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (engine, _decisions, db, held) = engine_in(dir.path(), settings());
        let request = |id: &str, email: &str, expires_at: u64| -> GrantRequest {
            serde_json::from_value(serde_json::json!({
                "id": id, "kind": "session", "subject": {"format": "email", "email": email},
                "issued_at": 1_699_999_990, "expires_at": expires_at}))
            .unwrap()
        };
        let (a, b) = (Registrant::client("quota-a"), Registrant::client("quota-b"));
        let far = 4_000_000_000;
        engine
            .register(request("a1", "a1@example.com", far), a)
            .await
            .unwrap();
        engine
            .register(request("a2", "a2@example.com", 1_700_000_060), a)
            .await
            .unwrap();
        let refused = engine
            .register(request("a3", "a3@example.com", far), a)
            .await;
        assert!(
            matches!(&refused, Err(EngineError::Quota { registrant, max: 2 }) if registrant == "client:quota-a"),
            "{refused:?}"
        );
        assert!(engine.grant("a3").is_none());
        assert!(
            !engine.shared.aliases.contains_key("email:a3@example.com"),
            "nothing linked"
        );
        // The other party is not held back; updates are not new grants, and stay a's.
        engine
            .register(request("b1", "b1@example.com", far), b)
            .await
            .unwrap();
        engine
            .register(request("a1", "a1@example.com", far), a)
            .await
            .unwrap();
        engine
            .register(request("a1", "a1@example.com", far), b)
            .await
            .unwrap();
        assert_eq!(engine.grant("a1").unwrap().registered_by, a);
        assert_eq!(
            (
                engine.shared.counts.held_here(a),
                engine.shared.counts.held_here(b)
            ),
            (2, 1)
        );
        // Session grants count against the transmitter that announced them.
        // Each names its own session: a grant each.
        let session_established = |email: &str, seq: u64| {
            let signal = example_about(
                "caep-session-established.json",
                serde_json::json!({
                    "user": {"format": "email", "email": email},
                    "session": {"format": "opaque", "id": format!("session-{seq}")}}),
                clock.now() as i64,
                seq,
            );
            apply_at_checkpoint(&engine, &clock, vec![signal])
        };
        for (i, email) in ["s1@example.com", "s2@example.com", "s3@example.com"]
            .into_iter()
            .enumerate()
        {
            session_established(email, i as u64 + 1).await;
        }
        let sessions: Vec<Registrant> = engine
            .shared
            .grants
            .iter()
            .filter(|g| g.id.starts_with("caep-session:"))
            .map(|g| g.registered_by)
            .collect();
        assert_eq!(
            sessions.len(),
            2,
            "the transmitter's third session grant refused"
        );
        assert!(
            sessions[0].name().starts_with("transmitter:"),
            "{}",
            sessions[0].name()
        );
        assert_eq!(engine.shared.counts.held_here(sessions[0]), 2);
        // Deleted, or expired: room again.
        engine.delete("a1").await.unwrap();
        engine
            .register(request("a3", "a3@example.com", far), a)
            .await
            .unwrap();
        clock.advance(Duration::from_secs(120));
        within_5s("a2 was not swept", || engine.grant("a2").is_none()).await;
        assert_eq!(engine.shared.counts.held_here(a), 1);
        // A restart counts the rows again, each against its registrant.
        engine.shutdown().await;
        drop(engine);
        held.join().await;
        drop(db);
        let (engine, _decisions, _db, _held) = engine_in(dir.path(), settings());
        assert_eq!(engine.grant("a3").unwrap().registered_by, a);
        assert_eq!(
            (
                engine.shared.counts.held_here(a),
                engine.shared.counts.held_here(b)
            ),
            (1, 1)
        );
        // Cluster mode: a grant of a's another instance announced counts against the quota too.
        let elsewhere = std::collections::BTreeMap::from([(a.name().to_string(), 1)]);
        engine.grant_counts().set_elsewhere([&elsewhere]);
        let refused = engine
            .register(request("a4", "a4@example.com", far), a)
            .await;
        assert!(
            matches!(refused, Err(EngineError::Quota { .. })),
            "{refused:?}"
        );
        assert!(engine.grant("a4").is_none());
        engine.grant_counts().set_elsewhere([]);
        engine
            .register(request("a4", "a4@example.com", far), a)
            .await
            .unwrap();
        let refused = engine
            .register(request("a5", "a5@example.com", far), a)
            .await;
        assert!(
            matches!(refused, Err(EngineError::Quota { .. })),
            "{refused:?}"
        );
        engine.shutdown().await;
    }

    /// A swap screens subjects whose context no rule can match (their grants keep their status
    /// without being evaluated one by one) and evaluates the rest exactly: the statuses are those
    /// a grant-by-grant evaluation gives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_swap_decides_as_grant_by_grant_evaluation_would() {
        let (engine, _held) = engine(EngineSettings::default());
        // u0: an access token and a session; u1: two sessions issued late; u2: an early session.
        let grants = [
            ("t0", "u0", "access_token", 1_700_000_300.5),
            ("s0", "u0", "session", 1_700_000_300.5),
            ("s1a", "u1", "session", 1_700_000_400.5),
            ("s1b", "u1", "session", 1_700_000_500.5),
            ("s2", "u2", "session", 1_700_000_100.5),
        ];
        for (id, user, kind, issued_at) in grants {
            let request: GrantRequest = serde_json::from_value(serde_json::json!({
                "id": id, "kind": kind, "subject": {"format": "email", "email": format!("{user}@example.com")},
                "issued_at": issued_at, "expires_at": 4_000_000_000u64}))
            .unwrap();
            engine
                .register(request, Registrant::client("test"))
                .await
                .unwrap();
        }
        let policy = PolicySet::from_sources(&[(
            "swap.yaml".to_owned(),
            "rules:
  - {id: tokens, on: ['*'], when: \"grant.kind == 'access_token'\", effect: revoke}
  - {id: early, on: ['*'], when: 'grant.issued_at < 1700000200.5', effect: restrict}
  - {id: risky, on: ['*'], when: \"context.risk.level == 'HIGH'\", effect: revoke}
"
            .to_owned(),
        )])
        .unwrap();
        engine.swap_policy(policy).unwrap().wait().await;
        let status = |id: &str| engine.grant(id).map(|g| g.status);
        assert_eq!(status("t0"), Some(GrantStatus::Revoked));
        assert_eq!(status("s0"), Some(GrantStatus::Active));
        assert_eq!(status("s1a"), Some(GrantStatus::Active));
        assert_eq!(status("s1b"), Some(GrantStatus::Active));
        assert_eq!(status("s2"), Some(GrantStatus::Restricted));
        // Swapping back to no rules lifts the restriction: a screened subject's non-active grant
        // is still evaluated.
        engine.swap_policy(PolicySet::empty()).unwrap().wait().await;
        assert_eq!(status("s2"), Some(GrantStatus::Active));
        assert_eq!(
            status("t0"),
            Some(GrantStatus::Revoked),
            "revoked stays revoked"
        );
        engine.shutdown().await;
    }

    /// Waits (in real time, at most 5 s) until `done`; fails with `what` otherwise.
    async fn within_5s(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What a shard holds until its checkpoint is a gauge per set: a signal's context is dirty
    /// (with the pushed signal it covers) until the checkpoint, then nothing is held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_shard_holds_until_its_checkpoint_is_measured() {
        // The gauges are bound to this recorder when the shards are made, whatever thread sets
        // them later: no other test's engine reports into it.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let rendered = recorder.handle();
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let settings = EngineSettings {
            sweep_interval: Duration::from_millis(5),
            clock: clock.clone(),
            ..EngineSettings::default()
        };
        let (engine, _rx, _db, _held) =
            metrics::with_local_recorder(&recorder, || engine_in(dir.path(), settings));
        // Summed over the shards.
        let held = |set: &str| -> f64 {
            let label = format!("set=\"{set}\"");
            rendered
                .render()
                .lines()
                .filter(|l| l.starts_with("vigil_engine_shard_held{") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let subject = serde_json::json!({"format": "email", "email": "x@example.com"});
        engine
            .apply_signals(vec![example_about(
                "caep-risk-level-change.json",
                subject,
                PROBED_T0,
                1,
            )])
            .await
            .unwrap();
        within_5s("the dirty context was not reported", || {
            held("dirty") == 1.0 && held("checkpoint_processed") == 1.0
        })
        .await;
        assert_eq!(held("unstored"), 0.0);
        assert_eq!(held("written_again"), 0.0);
        clock.advance(Duration::from_secs(60));
        within_5s("the checkpoint did not empty the sets", || {
            held("dirty") == 0.0 && held("checkpoint_processed") == 0.0
        })
        .await;
        engine.shutdown().await;
    }

    /// Expiry follows the injected clock: a grant lives until the clock passes its `expires_at`,
    /// however little real time goes by; then the sweep removes it, with no decision.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grants_expire_by_the_injected_clock() {
        let clock = crate::clock::Clock::manual(1_700_000_000_000);
        let (engine, _held) = engine(EngineSettings {
            sweep_interval: Duration::from_millis(5),
            clock: clock.clone(),
            ..EngineSettings::default()
        });
        let request: GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "short", "kind": "session", "subject": {"format": "email", "email": "e@example.com"},
            "issued_at": 1_699_999_990, "expires_at": 1_700_000_060}))
        .unwrap();
        let registered = engine
            .register(request, Registrant::client("test"))
            .await
            .unwrap();
        assert!(registered.decisions.is_empty());
        // Many sweeps later (in real time), the clock has not moved: the grant is still there.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(engine.grant("short").is_some());
        clock.advance(Duration::from_secs(61));
        within_5s("the sweep did not remove the expired grant", || {
            engine.grant("short").is_none()
        })
        .await;
        engine.shutdown().await;
    }

    /// Context retention: a context no grant refers to is forgotten once its newest fact is past
    /// the window — in memory and in the store, its session revocation rows with it (a leftover
    /// row would bring the context back at the next start). A subject with a grant keeps its
    /// context however old its facts are, and a newer fact keeps a context for another window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn contexts_no_grant_refers_to_are_forgotten_after_their_retention() {
        const T0: i64 = 1_700_000_000;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _decisions, db, _held) = retention_engine(dir.path(), &clock);
        let request: GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "kept-grant", "kind": "session",
            "subject": {"format": "email", "email": "kept@example.com"},
            "issued_at": T0 - 10, "expires_at": T0 + 86_400}))
        .unwrap();
        engine
            .register(request, Registrant::client("test"))
            .await
            .unwrap();
        let signal = |example: &str, email: &str, at: i64, seq: u64| {
            example_about(
                example,
                serde_json::json!({"format": "email", "email": email}),
                at,
                seq,
            )
        };
        let apply = |signals: Vec<Signal>| apply_at_checkpoint(&engine, &clock, signals);
        apply(vec![
            signal("caep-risk-level-change.json", "kept@example.com", T0, 1),
            signal("caep-session-revoked.json", "gone@example.com", T0, 2),
            signal("caep-risk-level-change.json", "renewed@example.com", T0, 3),
        ])
        .await;
        let held = |who: &str| engine.shared.contexts.iter().any(|c| c.key().contains(who));
        let stored = |who: &str| {
            persist::load(&db)
                .unwrap()
                .contexts
                .iter()
                .any(|c| c.key.contains(who))
        };
        for who in ["kept@", "gone@", "renewed@"] {
            assert!(held(who) && stored(who), "{who} has a stored context");
        }
        assert!(
            engine
                .shared
                .contexts
                .iter()
                .any(|c| !c.session_revocations.is_empty()),
            "the session revocation is part of the test"
        );
        // Half a window later a newer fact renews one of them.
        clock.advance(Duration::from_secs(1800));
        apply(vec![signal(
            "caep-risk-level-change.json",
            "renewed@example.com",
            T0 + 1800,
            4,
        )])
        .await;
        // Real time passes, many scans: nothing is due before the window ends.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(held("gone@"), "forgotten before its window ended");
        clock.advance(Duration::from_secs(1800));
        within_5s("the context past its window was not forgotten", || {
            !held("gone@")
        })
        .await;
        within_5s("its deletion was not written", || !stored("gone@")).await;
        assert!(
            held("kept@") && stored("kept@"),
            "a subject with a grant keeps its context"
        );
        assert!(
            held("renewed@") && stored("renewed@"),
            "a newer fact keeps a context for its own window"
        );
        // The renewed one goes a window after its newest fact.
        clock.advance(Duration::from_secs(1800));
        within_5s(
            "the renewed context was not forgotten after its window",
            || !held("renewed@"),
        )
        .await;
        assert!(held("kept@"));
        engine.shutdown().await;
    }

    /// A wave larger than a chunk a shard is forgotten whole, in memory and in the store: each
    /// shard answers for a chunk once its deletions are stored, and only then gets the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wave_of_many_chunks_is_forgotten_whole() {
        const T0: i64 = 1_700_000_000;
        const SUBJECTS: usize = 600;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _decisions, db, _held) = retention_engine(dir.path(), &clock);
        let signals = (0..SUBJECTS).map(|i| {
            example_about(
                "caep-risk-level-change.json",
                serde_json::json!({"format": "email", "email": format!("u{i}@example.com")}),
                T0,
                i as u64 + 1,
            )
        });
        // A batch a checkpoint: a shard's batch is at most 256 signals, and a batch handled after
        // the checkpoint began would wait for the next one.
        for part in crate::parts::in_parts(signals, 250) {
            apply_at_checkpoint(&engine, &clock, part).await;
        }
        let stored = || persist::load(&db).unwrap().contexts.len();
        assert_eq!(engine.shared.contexts.len(), SUBJECTS);
        assert_eq!(stored(), SUBJECTS);
        let per_shard = (0..engine.inboxes.len())
            .map(|s| {
                engine
                    .shared
                    .contexts
                    .iter()
                    .filter(|c| engine.shared.shard_of(c.key()) == s)
                    .count()
            })
            .min()
            .unwrap();
        assert!(
            per_shard > 2 * retention::FORGET_CHUNK,
            "every shard's wave is more than two chunks ({per_shard})"
        );
        clock.advance(Duration::from_secs(3600));
        within_5s("the wave was not forgotten whole", || {
            engine.shared.contexts.is_empty()
        })
        .await;
        within_5s("its deletions were not all written", || stored() == 0).await;
        engine.shutdown().await;
    }

    /// A disabled account's context is kept for the longer window of its own: forgotten with the
    /// others, a grant registered for the account later would be evaluated as if it were not
    /// disabled. An account enabled again goes with the ordinary window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disabled_accounts_context_outlives_the_ordinary_window() {
        const T0: i64 = 1_700_000_000;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _decisions, _db, _held) = retention_engine(dir.path(), &clock);
        let about = |email: &str| serde_json::json!({"format": "email", "email": email});
        apply_at_checkpoint(
            &engine,
            &clock,
            vec![
                example_about(
                    "risc-account-disabled.json",
                    about("closed@example.com"),
                    T0,
                    1,
                ),
                example_about(
                    "risc-account-disabled.json",
                    about("reopened@example.com"),
                    T0,
                    2,
                ),
                example_about(
                    "ssf-example-risc-account-enabled-simple-subject.json",
                    about("reopened@example.com"),
                    T0 + 1,
                    3,
                ),
            ],
        )
        .await;
        let held = |who: &str| engine.shared.contexts.iter().any(|c| c.key().contains(who));
        assert!(held("closed@") && held("reopened@"));
        clock.advance(Duration::from_secs(3600 + 5));
        within_5s("the re-enabled account was not forgotten", || {
            !held("reopened@")
        })
        .await;
        assert!(
            held("closed@"),
            "the disabled account forgotten with the others"
        );
        clock.advance(Duration::from_secs(2 * 3600));
        within_5s(
            "the disabled account was not forgotten after its window",
            || !held("closed@"),
        )
        .await;
        engine.shutdown().await;
    }

    /// Links (identifier → principal) are bounded with the contexts: a forgotten context's links
    /// go with it, in memory and in the store; a principal with links but neither context nor
    /// grant (its grant ended before any signal named it) loses them a window after the scans
    /// first saw it so; a subject with a grant keeps its links. A signal routed by links forgotten
    /// before its shard applied it links its identifiers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_are_forgotten_with_their_principal_and_signals_link_again() {
        const T0: i64 = 1_700_000_000;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _decisions, db, _held) = retention_engine(dir.path(), &clock);
        for (id, who, phone, lasts) in [
            ("ended", "ended", "+15550002", 60),
            ("kept", "kept", "+15550003", 86_400),
        ] {
            let request: GrantRequest = serde_json::from_value(serde_json::json!({
                "id": id, "kind": "session", "subject": two_ids(who, phone),
                "issued_at": T0 - 10, "expires_at": T0 + lasts}))
            .unwrap();
            engine
                .register(request, Registrant::client("test"))
                .await
                .unwrap();
        }
        let signal = |subject: serde_json::Value, at: i64, seq: u64| {
            example_about("caep-risk-level-change.json", subject, at, seq)
        };
        apply_at_checkpoint(
            &engine,
            &clock,
            vec![signal(two_ids("gone", "+15550001"), T0, 1)],
        )
        .await;
        let linked = |who: &str| {
            engine
                .shared
                .aliases
                .iter()
                .filter(|l| l.value().contains(who))
                .count()
        };
        let stored = |who: &str| stored_links(&db, who);
        for who in ["gone@", "ended@", "kept@"] {
            assert_eq!((linked(who), stored(who)), (2, 2), "{who}'s two links");
        }
        // The short grant ends; its principal never had a context.
        clock.advance(Duration::from_secs(120));
        within_5s("the ended grant was not swept", || {
            engine.grant("ended").is_none()
        })
        .await;
        assert!(!engine
            .shared
            .contexts
            .contains_key("email:ended@example.com"));
        // Many scans, no window over yet: every link stays.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(linked("gone@") + linked("ended@"), 4, "forgotten too early");
        clock.advance(Duration::from_secs(3601));
        within_5s("the stale context's links were not forgotten", || {
            linked("gone@") == 0 && stored("gone@") == 0
        })
        .await;
        within_5s("the grantless principal's links were not forgotten", || {
            linked("ended@") == 0 && stored("ended@") == 0
        })
        .await;
        assert_eq!(
            (linked("kept@"), stored("kept@")),
            (2, 2),
            "a grant's links stay"
        );
        // Routed while its links still held, applied after retention took them: linked again.
        let routed = engine.route(signal(two_ids("late", "+15550004"), T0 + 3700, 2));
        assert_eq!(routed.key, "email:late@example.com");
        engine
            .shared
            .aliases
            .retain(|_, principal| !principal.contains("late@"));
        let (done, wait) = oneshot::channel();
        engine
            .shared
            .queued_signals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        engine
            .send(
                engine.shared.shard_of(&routed.key),
                Msg::Batch {
                    items: vec![routed],
                    done,
                },
            )
            .unwrap();
        clock.advance(Duration::from_secs(1));
        wait.await.unwrap().unwrap();
        assert_eq!(
            engine
                .principal_key(&["phone_number:+15550004".to_owned()])
                .as_deref(),
            Some("email:late@example.com"),
            "the phone leads to the principal again"
        );
        assert_eq!(stored("late@"), 2, "and the links are stored");
        engine.shutdown().await;
    }

    /// Links a signal makes wait for its checkpoint (a signal naming a new session costs no
    /// commit of its own), and are on disk before the signal is answered; a registration's links
    /// are stored with the registration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_a_signal_makes_are_stored_with_its_checkpoint() {
        const T0: i64 = 1_700_000_000;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _threads) = checkpoint_on_demand(dir.path(), &clock);
        let stored = |who: &str| stored_links(&db, who);
        let request: GrantRequest = serde_json::from_value(serde_json::json!({
            "id": "g", "kind": "session", "subject": two_ids("holder", "+15550001"),
            "issued_at": T0 - 10, "expires_at": T0 + 86_400}))
        .unwrap();
        engine
            .register(request, Registrant::client("test"))
            .await
            .unwrap();
        assert_eq!(stored("holder@"), 2, "a registration's links, at once");

        let signal = example_about(
            "caep-risk-level-change.json",
            two_ids("signalled", "+15550002"),
            T0,
            1,
        );
        let mut done = engine.submit_batch(vec![signal]).unwrap();
        within_5s("the signal was not applied", || {
            engine.principal_key(&["phone_number:+15550002".to_owned()])
                == Some("email:signalled@example.com".to_owned())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!done.is_done(), "answered before its checkpoint");
        assert_eq!(
            stored("signalled@"),
            0,
            "a signal's links before its checkpoint"
        );
        clock.advance(Duration::from_secs(3600));
        within_5s("the checkpoint did not answer the batch", || done.is_done()).await;
        tokio::task::spawn_blocking(move || done.wait_blocking())
            .await
            .unwrap()
            .expect("the checkpoint committed");
        assert_eq!(stored("signalled@"), 2, "the links, with the checkpoint");
        engine.shutdown().await;
    }

    /// A checkpoint does not write a context its decision's commit stored (in the journal),
    /// while the context is still at that version; a context changed after its decision it
    /// writes at its place. Folds wait for the test's clock, which never calls one here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_skips_a_context_its_decision_stored() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _threads) = checkpoint_on_demand(dir.path(), &clock);
        register_json(&engine, probed_session("ga", "a@example.com")).await;
        register_json(&engine, probed_session("gb", "b@example.com")).await;
        swap_rules(
            &engine,
            "rules:\n  - {id: sessions, on: [session-revoked], when: 'context.session_revoked_at > grant.issued_at', effect: revoke}\n",
        )
        .await;
        let revoked = |who: &str| {
            example_about(
                "caep-session-revoked.json",
                serde_json::json!({"format": "email", "email": format!("{who}@example.com")}),
                PROBED_T0,
                if who == "a" { 1 } else { 2 },
            )
        };
        let decided = engine
            .submit_batch(vec![revoked("a"), revoked("b")])
            .unwrap();
        within_5s("the revocations were not decided", || {
            ["ga", "gb"].iter().all(|id| {
                engine
                    .grant(id)
                    .is_some_and(|g| g.status == GrantStatus::Revoked)
            })
        })
        .await;
        // b's context changes again, with no decision (its grant is revoked already).
        let mut risk = risk_feed(0, 1, PROBED_T0);
        risk[0].subject = revoked("b").subject;
        risk[0].seq = 3;
        let changed = engine.submit_batch(risk).unwrap();
        let (a, b) = ("email:a@example.com", "email:b@example.com");
        let version = |key: &str| engine.shared.contexts.get(key).map(|c| c.version);
        within_5s("b's risk was not applied", || version(b) == Some(2)).await;
        // A registration is answered once its batch is announced, so every batch before it is.
        register_json(&engine, probed_session("gc", "c@example.com")).await;
        let stored = |key: &str| persist::stored_context_version(&db, key);
        let journaled = |key: &str| journal::context_version(&db, key);
        assert_eq!(
            journaled(a),
            Some(1),
            "a's context, journaled with its decision"
        );
        assert_eq!(
            journaled(b),
            Some(1),
            "b's context, journaled with its decision"
        );
        assert_eq!(
            (stored(a), stored(b)),
            (None, None),
            "not at their places yet"
        );

        clock.advance(Duration::from_secs(3600));
        for done in [decided, changed] {
            tokio::task::spawn_blocking(move || done.wait_blocking())
                .await
                .unwrap()
                .expect("the checkpoint committed");
        }
        assert_eq!(
            stored(a),
            None,
            "the checkpoint wrote a context its decision's journal row holds"
        );
        assert_eq!(stored(b), Some(2), "the checkpoint wrote b's change");
        engine.shutdown().await;
    }

    /// A context made anew while the deletion of its forgotten predecessor is still in flight
    /// (the store's bulk lane held back) and written with a decision before that deletion
    /// commits is written again by the next checkpoint, behind the deletion: after both, it is
    /// in the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_context_made_anew_while_its_deletion_is_in_flight_is_stored_after_it() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _threads, writer) = engine_and_writer_in(
            dir.path(),
            EngineSettings {
                clock: clock.clone(),
                sweep_interval: Duration::from_millis(5),
                checkpoint_interval: Duration::from_secs(3600),
                context_retention: Duration::from_secs(3600),
                disabled_account_retention: Duration::from_secs(3 * 3600),
                context_scan_interval: Duration::from_millis(5),
                ..EngineSettings::default()
            },
        );
        swap_rules(
            &engine,
            "rules:\n  - {id: sessions, on: [session-revoked], when: 'context.session_revoked_at > grant.issued_at', effect: revoke}\n",
        )
        .await;
        let x = "email:x@example.com";
        let about_x = |example: &str, at: i64, seq: u64| {
            example_about(
                example,
                serde_json::json!({"format": "email", "email": "x@example.com"}),
                at,
                seq,
            )
        };
        let hour = Duration::from_secs(3600);
        let checkpointed =
            |signals: Vec<Signal>| apply_at_checkpoint_after(&engine, &clock, signals, hour);
        checkpointed(vec![about_x("caep-risk-level-change.json", PROBED_T0, 1)]).await;
        let stored = || persist::stored_context_version(&db, x);
        assert_eq!(stored(), Some(1));

        // Two windows later x is forgotten; its deletion waits in the held-back bulk lane.
        writer.pause_bulk(true);
        clock.advance(Duration::from_secs(7200));
        within_5s("x was not forgotten", || {
            !engine.shared.contexts.contains_key(x)
        })
        .await;
        // A checkpoint starts now (the interval has passed), so none starts with x's decision.
        let _behind = engine
            .submit_batch(risk_feed(100, 1, PROBED_T0 + 7200))
            .unwrap();
        register_json(&engine, probed_session("barrier", "barrier@example.com")).await;

        // x anew: a grant, and a session revocation decided on it.
        let mut grant = probed_session("gx", "x@example.com");
        grant["issued_at"] = (PROBED_T0 + 7000).into();
        register_json(&engine, grant).await;
        engine
            .apply_signals(vec![about_x(
                "caep-session-revoked.json",
                PROBED_T0 + 7200,
                2,
            )])
            .await
            .unwrap();
        within_5s("x's grant was not revoked", || {
            engine
                .grant("gx")
                .is_some_and(|g| g.status == GrantStatus::Revoked)
        })
        .await;
        within_5s("x's decided context was not stored", || stored() == Some(1)).await;
        register_json(&engine, probed_session("barrier2", "barrier2@example.com")).await;

        // The deletion commits after the decision's write, then the next checkpoint.
        writer.pause_bulk(false);
        checkpointed(risk_feed(200, 1, PROBED_T0 + 10_800)).await;
        assert_eq!(
            stored(),
            Some(1),
            "x's context is stored after its predecessor's deletion"
        );
        engine.shutdown().await;
    }

    /// A batch whose commit failed (a broken disk) is answered with a failure by the checkpoint
    /// that covers it, even when a retention deletion commits between them: its decisions are not
    /// stored, so its signals must be replayed. (The failure used to be taken by whichever
    /// checkpoint batch came next — here the deletion — and the covering checkpoint answered
    /// the batch as stored.) Once the disk takes writes again, a later batch writes the revoked
    /// grant from memory and hands its decision to delivery again, durable this time: a
    /// redelivered signal would change nothing in memory, so nothing else would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_whose_commit_failed_is_answered_failed_by_its_checkpoint() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let settings = || EngineSettings {
            clock: clock.clone(),
            sweep_interval: Duration::from_millis(5),
            checkpoint_interval: Duration::from_secs(10 * 3600),
            context_retention: Duration::from_secs(3600),
            disabled_account_retention: Duration::from_secs(3 * 3600),
            context_scan_interval: Duration::from_millis(5),
            ..EngineSettings::default()
        };
        let (x, y) = ("x@example.com", "y@example.com");
        let about = |who: &str, example: &str, seq: u64| {
            example_about(
                example,
                serde_json::json!({"format": "email", "email": who}),
                PROBED_T0,
                seq,
            )
        };
        // x's context, stored by the checkpoint at a stop: after the restart it is not dirty,
        // and retention may forget it.
        let (engine, _rx, db, held) = engine_in(dir.path(), settings());
        engine
            .apply_signals(vec![about(x, "caep-risk-level-change.json", 1)])
            .await
            .unwrap();
        register_json(&engine, probed_session("gy", y)).await;
        engine.shutdown().await;
        drop(engine);
        held.join().await;
        drop(db);

        let (engine, mut handed, db, _held, writer) = engine_and_writer_in(dir.path(), settings());
        assert_eq!(
            persist::stored_context_version(&db, "email:x@example.com"),
            Some(1)
        );
        swap_rules(
            &engine,
            "rules:\n  - {id: sessions, on: [session-revoked], when: 'context.session_revoked_at > grant.issued_at', effect: revoke}\n",
        )
        .await;
        writer.fail_ordinary(true);
        let failed = engine
            .submit_batch(vec![about(y, "caep-session-revoked.json", 2)])
            .unwrap();
        within_5s("y's grant was not revoked", || {
            engine
                .grant("gy")
                .is_some_and(|g| g.status == GrantStatus::Revoked)
        })
        .await;
        // A source's batch: its decisions go to delivery's bulk lane.
        let first = tokio::time::timeout(Duration::from_secs(5), handed.bulk.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !first.durable.wait().await,
            "the revocation's commit failed"
        );
        // Answered once its batch is announced, so every batch before it is: the failure is
        // known to the shard.
        let barrier: GrantRequest =
            serde_json::from_value(probed_session("barrier", "barrier@example.com")).unwrap();
        let refused = engine.register(barrier, Registrant::client("test")).await;
        assert!(
            matches!(refused, Err(EngineError::Storage(_))),
            "{refused:?}"
        );
        writer.fail_ordinary(false);

        // Two hours on, x is forgotten; its deletion commits in a batch of its own.
        clock.advance(Duration::from_secs(2 * 3600));
        within_5s("x was not forgotten", || {
            persist::stored_context_version(&db, "email:x@example.com").is_none()
        })
        .await;

        // The checkpoint that covers the failed batch.
        clock.advance(Duration::from_secs(10 * 3600));
        let answer = tokio::task::spawn_blocking(move || failed.wait_blocking())
            .await
            .unwrap();
        assert!(
            answer.is_err(),
            "a batch whose decisions were never stored was answered as stored"
        );
        // Written again from memory, and handed to delivery again: same decision, durable.
        let stored_status = || {
            persist::load(&db)
                .unwrap()
                .grants
                .into_iter()
                .find(|g| &*g.id == "gy")
                .map(|g| g.status)
        };
        assert_eq!(stored_status(), Some(GrantStatus::Revoked));
        // Handed again with every later batch until one is stored (the barrier's failed too).
        loop {
            let again = tokio::time::timeout(Duration::from_secs(5), handed.interactive.recv())
                .await
                .expect("the decision was not handed again")
                .unwrap();
            assert_eq!(again.decision.id, first.decision.id);
            if again.durable.wait().await {
                break;
            }
        }
        engine.shutdown().await;
    }

    /// A revocation's grant and the context it was decided on are stored as a journal row, not
    /// at their places; a restart folds the journal over what is at their places before it
    /// reads the tables, so the grant is revoked after it, stored so at its place, and the
    /// journal is empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journaled_revocation_is_read_back_after_a_restart() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, held) = journaling_engine(dir.path(), &clock);
        revoke_a_token(&engine).await;
        assert_eq!(
            engine.grant("t1").map(|g| g.status),
            Some(GrantStatus::Revoked)
        );
        assert!(journal::rows(&db) > 0);
        // At its place, the grant is as registered: registrations are not journaled.
        assert_eq!(
            persist::stored_grant_status(&db, "t1"),
            Some(GrantStatus::Active)
        );
        engine.shutdown().await;
        drop(engine);
        held.join().await;
        drop(db);

        let (engine, _rx, db, _held) = journaling_engine(dir.path(), &clock);
        assert_eq!(
            engine.grant("t1").map(|g| g.status),
            Some(GrantStatus::Revoked)
        );
        assert_eq!(journal::rows(&db), 0);
        assert_eq!(
            persist::stored_grant_status(&db, "t1"),
            Some(GrantStatus::Revoked)
        );
        engine.shutdown().await;
    }

    /// A fold round writes the journaled grant at its place — the row its batch journaled, kept
    /// for the round, or (with no room to keep it) its present state encoded again — and then
    /// deletes the journal rows it replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fold_round_stores_journaled_rows_at_their_places_and_deletes_them() {
        for kept in [64 << 20, 0] {
            fold_round_stores_and_deletes(kept).await;
        }
    }

    async fn fold_round_stores_and_deletes(kept: usize) {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _held) = engine_in(
            dir.path(),
            EngineSettings {
                journal_fold_cache_bytes: kept,
                ..journaling_settings(&clock)
            },
        );
        revoke_a_token(&engine).await;
        assert!(journal::rows(&db) > 0);
        // The interval, by the injected clock: the round stores the rows at their places.
        clock.advance(Duration::from_secs(3600));
        within_5s("the journal was not folded", || {
            persist::stored_grant_status(&db, "t1") == Some(GrantStatus::Revoked)
        })
        .await;
        assert_eq!(
            persist::stored_grant_at_place(&db, "t1").as_ref(),
            engine.grant("t1").as_deref(),
            "kept {kept} bytes"
        );
        // The journal rows are deleted once the hand-offs' grace is over, by the same clock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(journal::rows(&db) > 0, "deleted within the grace");
        within_5s("the journal rows were not deleted", || {
            clock.advance(Duration::from_millis(500));
            journal::rows(&db) == 0
        })
        .await;
        engine.shutdown().await;
    }

    /// A context whose decision is in the journal is not forgotten by retention until a fold
    /// round has stored it at its place: the start-up fold would bring it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journaled_context_is_forgotten_only_once_folded() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _held) = engine_in(
            dir.path(),
            EngineSettings {
                journal_fold_interval: Duration::from_secs(100 * 3600),
                ..retention_settings(&clock)
            },
        );
        let who = "j@example.com";
        register_json(&engine, probed_session("gj", who)).await;
        swap_rules(
            &engine,
            "rules:\n  - {id: sessions, on: [session-revoked], when: 'context.session_revoked_at > grant.issued_at', effect: revoke}\n",
        )
        .await;
        engine
            .apply_signals(vec![example_about(
                "caep-session-revoked.json",
                serde_json::json!({"format": "email", "email": who}),
                PROBED_T0,
                1,
            )])
            .await
            .unwrap();
        within_5s("the session was not revoked", || {
            engine
                .grant("gj")
                .is_some_and(|g| g.status == GrantStatus::Revoked)
        })
        .await;
        // Two days on, the grant has expired and is gone; past its retention, with no grant,
        // the context would go, but its journal row holds it.
        clock.advance(Duration::from_secs(48 * 3600));
        within_5s("the grant did not expire", || engine.grant("gj").is_none()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let key = "email:j@example.com";
        assert!(
            engine.shared.contexts.contains_key(key),
            "forgotten while journaled"
        );
        // Folded (and its rows deleted, past the hand-offs' grace), it is forgotten.
        clock.advance(Duration::from_secs(100 * 3600));
        within_5s("the context was not forgotten once folded", || {
            clock.advance(Duration::from_millis(500));
            !engine.shared.contexts.contains_key(key) && journal::rows(&db) == 0
        })
        .await;
        engine.shutdown().await;
    }

    /// A checkpoint whose chunk failed answers its batch with the failure, and what the chunk
    /// held is dirty again. Redelivered, a session revocation changes nothing in memory (the
    /// context holds it), so nothing else would write its row: the next checkpoint stores it
    /// before answering the redelivered batch. (The context itself is dirtied by any signal
    /// applied to it, changed or not.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_failed_checkpoint_chunk_left_unstored_is_stored_by_the_next() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _held, writer) = checkpoint_on_demand_and_writer(dir.path(), &clock);
        let revoked = || {
            vec![example_about(
                "caep-session-revoked.json",
                serde_json::json!({"format": "email", "email": "s@example.com"}),
                PROBED_T0,
                1,
            )]
        };
        let stored_revocations = || {
            persist::load(&db)
                .unwrap()
                .contexts
                .iter()
                .find(|c| c.key == "email:s@example.com")
                .map_or(0, |c| c.session_revocations.len())
        };
        writer.fail_bulk(true);
        let failed = engine.submit_batch(revoked()).unwrap();
        clock.advance(Duration::from_secs(3600));
        let answer = tokio::task::spawn_blocking(move || failed.wait_blocking())
            .await
            .unwrap();
        assert!(answer.is_err(), "answered as stored: {answer:?}");
        assert_eq!(stored_revocations(), 0);

        writer.fail_bulk(false);
        let redelivered = engine.submit_batch(revoked()).unwrap();
        clock.advance(Duration::from_secs(3600));
        tokio::task::spawn_blocking(move || redelivered.wait_blocking())
            .await
            .unwrap()
            .expect("the next checkpoint stored");
        assert_eq!(
            stored_revocations(),
            1,
            "the session revocation was never stored"
        );
        engine.shutdown().await;
    }

    /// A checkpoint larger than a part is written over several batches; the signal batch it
    /// covers is answered only once every part is on disk, and by then every context is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_answered_once_every_part_of_its_checkpoint_is_stored() {
        const T0: i64 = 1_700_000_000;
        const SUBJECTS: u64 = 1_000;
        let clock = crate::clock::Clock::manual(T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx, db, _threads) = checkpoint_on_demand(dir.path(), &clock);
        let signals = risk_feed(1, SUBJECTS, T0);
        let mut done = engine.submit_batch(signals).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!done.is_done(), "answered before its checkpoint");
        assert!(persist::load(&db).unwrap().contexts.is_empty());
        clock.advance(Duration::from_secs(3600));
        within_5s("the checkpoint did not answer the batch", || done.is_done()).await;
        tokio::task::spawn_blocking(move || done.wait_blocking())
            .await
            .unwrap()
            .expect("the checkpoint committed");
        let stored = persist::load(&db).unwrap().contexts;
        assert_eq!(stored.len() as u64, SUBJECTS, "every part is stored");
        engine.shutdown().await;
    }

    /// A signal batch is answered (its Kafka offsets may be committed) only once the checkpoint
    /// that writes its contexts is on disk, and the checkpoint interval runs on the injected
    /// clock: nothing is answered while the clock stands still, however long in real time; once
    /// it passes the interval, the next checkpoint answers the batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_answered_at_the_checkpoint_the_injected_clock_calls() {
        let clock = crate::clock::Clock::manual(1_700_000_000_000);
        let (engine, _held) = engine(EngineSettings {
            sweep_interval: Duration::from_millis(5),
            checkpoint_interval: Duration::from_secs(3600),
            clock: clock.clone(),
            ..EngineSettings::default()
        });
        let signal = crate::evaluate::testing::signal_from_claims(
            &crate::test_support::spec_example("caep-risk-level-change.json"),
            1,
        )
        .unwrap();
        let mut done = engine.submit_batch(vec![signal]).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!done.is_done(), "answered before its checkpoint");
        clock.advance(Duration::from_secs(3600));
        within_5s(
            "the checkpoint the clock called did not answer the batch",
            || done.is_done(),
        )
        .await;
        engine.shutdown().await;
    }
    /// A feed's risk-level changes about `user<from>` … `user<from + n - 1>` at `at` (seconds),
    /// intake sequence numbers the same.
    fn risk_feed(from: u64, n: u64, at: i64) -> Vec<Signal> {
        (from..from + n)
            .map(|i| {
                let email = format!("user{i}@example.com");
                example_about(
                    "caep-risk-level-change.json",
                    serde_json::json!({"format": "email", "email": email}),
                    at,
                    i,
                )
            })
            .collect()
    }

    /// The two backlog tests' engine: one shard, batches of 16, `clock`, a session grant `probe`
    /// and a rule that revokes sessions, with the state store's writer (which a test may slow).
    struct Probed {
        engine: Engine,
        db: Arc<redb::Database>,
        writer: BatchWriter,
        /// What delivery would take: nobody reads it unless a test does.
        decisions: Handoffs,
        _threads: Threads,
    }

    /// The seconds every backlog test's signals and grants are dated from.
    const PROBED_T0: i64 = 1_700_000_000;

    /// A session grant `id` of `email`, issued just before [`PROBED_T0`].
    fn probed_session(id: &str, email: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id, "kind": "session",
            "subject": {"format": "email", "email": email},
            "issued_at": PROBED_T0 - 10, "expires_at": PROBED_T0 + 86_400})
    }

    impl Probed {
        async fn start(dir: &std::path::Path, clock: &crate::clock::Clock) -> Probed {
            let (engine, decisions, db, _threads, writer) = engine_and_writer_in(
                dir,
                EngineSettings {
                    shards: 1,
                    max_batch: 16,
                    sweep_interval: Duration::from_millis(5),
                    clock: clock.clone(),
                    ..EngineSettings::default()
                },
            );
            register_json(&engine, probed_session("probe", "probe@example.com")).await;
            swap_rules(
                &engine,
                "rules:\n  - {id: sessions, on: [session-revoked], when: 'context.session_revoked_at > grant.issued_at', effect: revoke}\n",
            )
            .await;
            Probed {
                engine,
                db,
                writer,
                decisions,
                _threads,
            }
        }

        /// Pushes the probe's session revocation (intake sequence `seq`) and waits until the
        /// probe grant is revoked.
        async fn revoke_probe(&self, seq: u64) {
            self.engine
                .apply_signals(vec![example_about(
                    "caep-session-revoked.json",
                    serde_json::json!({"format": "email", "email": "probe@example.com"}),
                    PROBED_T0,
                    seq,
                )])
                .await
                .unwrap();
            within_5s("the pushed signal was not decided", || {
                self.engine
                    .grant("probe")
                    .is_some_and(|g| g.status == GrantStatus::Revoked)
            })
            .await;
        }

        /// Waits until no signal of a source is queued.
        async fn applied(&self, what: &str) {
            within_5s(what, || self.engine.queued_signals() == 0).await;
        }

        /// Waits for each source batch's answer, and checks `contexts` are stored.
        async fn stored(&self, batches: Vec<(&'static str, BatchDone)>, contexts: u64) {
            for (name, batch) in batches {
                tokio::task::spawn_blocking(move || batch.wait_blocking())
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("the {name} batch was not stored: {e}"));
            }
            assert_eq!(
                persist::load(&self.db).unwrap().contexts.len() as u64,
                contexts,
                "every signal's context is stored"
            );
        }
    }

    /// A signal intake hands on does not wait behind a source's backlog: with 4 000 of a feed's
    /// signals queued in a shard (a Kafka topic catching up), a pushed session revocation is
    /// decided while nearly all of them are still waiting — it waits for the batch being
    /// applied, not for the backlog (`engine/inbox.rs`). The backlog is then applied whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pushed_signal_does_not_wait_behind_a_sources_backlog() {
        const BACKLOG: u64 = 4_000;
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let probed = Probed::start(dir.path(), &clock).await;
        let backlog = probed
            .engine
            .submit_batch(risk_feed(1, BACKLOG, PROBED_T0))
            .unwrap();
        probed.revoke_probe(BACKLOG + 1).await;
        let waiting = probed.engine.queued_signals() as u64;
        assert!(
            waiting >= BACKLOG / 2,
            "the pushed signal waited for {} of the backlog's {BACKLOG} signals",
            BACKLOG - waiting
        );
        // The backlog is not the worse for it: applied whole, answered at its checkpoint.
        probed.applied("the backlog was not taken").await;
        clock.advance(Duration::from_secs(1));
        probed.stored(vec![("backlog", backlog)], BACKLOG + 1).await;
        probed.engine.shutdown().await;
    }

    /// A store behind on its checkpoints does not stop a shard: it holds a source's backlog back
    /// and goes on applying what intake hands on. With the store's bulk lane paused, one
    /// checkpoint's chunks stay in flight while the next one starts; a registration is still
    /// answered, a pushed session revocation still decided, while the backlog waits whole in
    /// the inbox. Once the store catches up the backlog is applied, stored and answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pushed_signal_is_applied_while_the_stores_checkpoints_lag() {
        const BACKLOG: u64 = 400;
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let probed = Probed::start(dir.path(), &clock).await;
        let engine = &probed.engine;
        let registered_within_5s = |id: &'static str| async move {
            let request = probed_session(id, &format!("{id}@example.com"));
            tokio::time::timeout(Duration::from_secs(5), register_json(engine, request))
                .await
                .unwrap_or_else(|_| panic!("the registration of {id} was not answered"));
        };
        probed.writer.pause_bulk(true);
        // A first checkpoint, whose chunk stays in the paused lane.
        let first = engine.submit_batch(risk_feed(1, 50, PROBED_T0)).unwrap();
        probed.applied("the first batch was not applied").await;
        clock.advance(Duration::from_secs(1));
        registered_within_5s("after-first").await;
        // A second batch and checkpoint: the first is still in flight, so the store lags.
        let second = engine.submit_batch(risk_feed(51, 50, PROBED_T0)).unwrap();
        probed.applied("the second batch was not applied").await;
        clock.advance(Duration::from_secs(1));
        registered_within_5s("after-second").await;

        let backlog = engine
            .submit_batch(risk_feed(101, BACKLOG, PROBED_T0))
            .unwrap();
        probed.revoke_probe(BACKLOG + 101).await;
        registered_within_5s("while-lagging").await;
        assert_eq!(
            engine.queued_signals() as u64,
            BACKLOG,
            "the backlog was taken while the store lagged"
        );

        probed.writer.pause_bulk(false);
        probed.applied("the backlog was not taken").await;
        clock.advance(Duration::from_secs(1));
        let batches = vec![("first", first), ("second", second), ("backlog", backlog)];
        probed.stored(batches, BACKLOG + 101).await;
        probed.engine.shutdown().await;
    }

    /// Session revocations of `user{from}`… as a source's batch (intake sequences from `seq`).
    fn session_feed(from: u64, n: u64, seq: u64) -> Vec<Signal> {
        (from..from + n)
            .map(|i| {
                example_about(
                    "caep-session-revoked.json",
                    serde_json::json!({"format": "email", "email": format!("user{i}@example.com")}),
                    PROBED_T0,
                    seq + i,
                )
            })
            .collect()
    }

    /// Decisions a source's backlog made go to delivery in their own lane (`engine/handover.rs`):
    /// a pushed revocation decided after 30 of the backlog's is alone in the other lane, and while
    /// the backlog's lane is at its bound the shard takes no more of the backlog — but still
    /// applies a pushed signal — until delivery takes what waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sources_backlog_goes_to_delivery_in_a_lane_of_its_own() {
        let clock = crate::clock::Clock::manual(PROBED_T0 * 1000);
        let dir = tempfile::tempdir().unwrap();
        let mut probed = Probed::start(dir.path(), &clock).await;
        for i in 1..=40 {
            register_json(
                &probed.engine,
                probed_session(&format!("s{i}"), &format!("user{i}@example.com")),
            )
            .await;
        }
        register_json(
            &probed.engine,
            probed_session("second", "second@example.com"),
        )
        .await;
        let revoked = |engine: &Engine, id: &str| {
            engine
                .grant(id)
                .is_some_and(|g| g.status == GrantStatus::Revoked)
        };
        let _first = probed
            .engine
            .submit_batch(session_feed(1, 30, 1000))
            .unwrap();
        within_5s("the backlog was not applied", || {
            (1..=30).all(|i| revoked(&probed.engine, &format!("s{i}")))
        })
        .await;
        probed.revoke_probe(2000).await;
        let first =
            tokio::time::timeout(Duration::from_secs(5), probed.decisions.interactive.recv())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(
            &*first.decision.grant_id, "probe",
            "the pushed revocation is alone in the interactive lane"
        );
        assert_eq!(probed.decisions.interactive.queued(), 0);
        let mut backlog = Vec::new();
        probed.decisions.bulk.fill(&mut backlog, usize::MAX);
        assert_eq!(
            backlog.len(),
            30,
            "the backlog's revocations are in the bulk lane"
        );

        // The bulk lane at its bound: the next backlog waits in the shard's inbox.
        for _ in 0..BULK_BOUND {
            let filler = Handed::restored(first.decision.clone(), first.grant.clone());
            assert!(probed
                .engine
                .shared
                .decisions
                .blocking_send(filler, Lane::Bulk)
                .is_ok());
        }
        // A shard looks at the lane before it waits for its inbox (every 5 ms here): one waiting
        // already may take one more batch, which the bound allows for.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _second = probed
            .engine
            .submit_batch(session_feed(31, 10, 1000))
            .unwrap();
        probed
            .engine
            .apply_signals(vec![example_about(
                "caep-session-revoked.json",
                serde_json::json!({"format": "email", "email": "second@example.com"}),
                PROBED_T0,
                3000,
            )])
            .await
            .unwrap();
        within_5s(
            "a pushed signal was not applied while the lane was full",
            || revoked(&probed.engine, "second"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            probed.engine.queued_signals(),
            10,
            "the backlog was taken while delivery's lane was full"
        );
        assert!(!revoked(&probed.engine, "s31"));
        let mut taken = Vec::new();
        probed.decisions.bulk.fill(&mut taken, BULK_BOUND);
        within_5s("the backlog was not taken once delivery caught up", || {
            (31..=40).all(|i| revoked(&probed.engine, &format!("s{i}")))
        })
        .await;
        probed.engine.shutdown().await;
    }
}
