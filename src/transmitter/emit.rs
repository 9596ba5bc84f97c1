//! Turning decisions into SETs for the enforcement points' streams.
//!
//! Mapping (documented, stable):
//! - `revoke`   → CAEP `session-revoked`, subject precise enough to hit only that grant: a `jwt_id` for a
//!   token grant, else a complex subject with `user` and (when the grant has one) `session`/`device`;
//! - `step_up`  → CAEP `assurance-level-change` with `change_direction: decrease` and
//!   `current_level: "step-up-required"` (namespace: the grant's required one, else `RFC8176`);
//! - `restrict` → CAEP `token-claims-change` with `claims: {"vigil_restricted": true}`;
//! - `allow` and `notify` emit nothing.
//!
//! Every SET carries `reason_admin` (the decision's reason), `txn` (the triggering signal's `jti`, or
//! the decision id), `event_timestamp` and `initiating_entity: policy`; its `iat` is the decision's
//! time, so the SET a decision makes is the same whenever it is signed. A stream gets the SET only when
//! it requested that event type, is not disabled, and belongs to one of the enforcement points that
//! hold the grant (every stream when the grant names none).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::streams::{Outgoing, Stream, StreamStore};
use super::Identity;
use crate::decision::{Decision, DecisionEffect};
use crate::engine::{
    ChangeRecord, Changelog, Handed, HandoffMark, Handoffs, LaneReceiver, Row, Table,
};
use crate::events::{
    AssuranceLevelChange, AssuranceNamespace, CaepCommon, ChangeDirection, EventKind,
    InitiatingEntity, LangMap, SessionRevoked, StreamUpdated, TokenClaimsChange, Verification,
};
use crate::grant::{Grant, GrantKind};

fn identifier(v: &Value) -> Value {
    match v {
        Value::String(s) => json!({"format": "opaque", "id": s}),
        other => other.clone(),
    }
}

/// The SET subject for a grant.
pub fn subject_for(grant: &Grant) -> Value {
    if grant.kind != GrantKind::Session {
        if let Some((iss, jti)) = grant
            .token
            .as_deref()
            .and_then(|t| t.strip_prefix("jwt_id:"))
            .and_then(|t| t.split_once('|'))
        {
            return json!({"format": "jwt_id", "iss": iss, "jti": jti});
        }
    }
    let member_ids = grant.member_ids.value();
    let narrowing: Map<String, Value> = ["session", "device"]
        .iter()
        .filter_map(|m| member_ids.get(*m).map(|v| (m.to_string(), identifier(v))))
        .collect();
    if narrowing.is_empty() {
        return grant.subject_id.value();
    }
    let mut complex = narrowing;
    complex.insert("format".into(), json!("complex"));
    complex.insert("user".into(), grant.subject_id.value());
    Value::Object(complex)
}

/// The event (type and payload) a decision maps to, if any: built as the typed CAEP event, so what
/// Vigil emits is what its own parser accepts.
pub fn event_for(decision: &Decision, grant: &Grant) -> Option<(EventKind, Value)> {
    let common = CaepCommon {
        event_timestamp: Some(decision.time),
        initiating_entity: Some(InitiatingEntity::Policy),
        reason_admin: Some(LangMap([("en".to_owned(), decision.reason.clone())].into())),
        reason_user: None,
    };
    let (kind, payload) = match decision.effect {
        DecisionEffect::Revoke => (
            EventKind::SessionRevoked,
            serde_json::to_value(SessionRevoked { common }),
        ),
        DecisionEffect::StepUp => {
            let namespace = grant
                .attributes
                .get("required_assurance")
                .and_then(|r| r.get("namespace"))
                .and_then(Value::as_str)
                .and_then(|ns| AssuranceNamespace::parse(ns).ok())
                .unwrap_or(AssuranceNamespace::Rfc8176);
            let event = AssuranceLevelChange {
                common,
                namespace,
                current_level: "step-up-required".to_owned(),
                previous_level: None,
                change_direction: Some(ChangeDirection::Decrease),
            };
            (EventKind::AssuranceLevelChange, serde_json::to_value(event))
        }
        DecisionEffect::Restrict => {
            let mut claims = Map::new();
            claims.insert("vigil_restricted".into(), Value::Bool(true));
            (
                EventKind::TokenClaimsChange,
                serde_json::to_value(TokenClaimsChange { common, claims }),
            )
        }
        DecisionEffect::Allow | DecisionEffect::Notify | DecisionEffect::Deny => return None,
    };
    payload.ok().map(|p| (kind, p))
}

/// A fresh `jti`, for SETs that are not re-emitted (verification, stream-updated).
fn jti() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The `jti` of the SET carrying `decision` on `stream`: derived from the two, so a decision emitted
/// again (after a crash between its delivery and its "taken over" mark, or replayed from intake,
/// which reproduces the decision's id) carries the same `jti`, and the receiver's duplicate check
/// (RFC 8935 §2.3, RFC 8936 acknowledgements) sees one event, not two.
pub fn decision_jti(decision_id: &str, stream_id: &str) -> String {
    crate::decision::digest_hex(&[decision_id, stream_id], 16)
}

/// `claims` signed for `stream`, with the algorithm its enforcement point gets.
fn signed(
    identity: &Identity,
    stream: &Stream,
    claims: &Value,
    jti: String,
) -> Result<Outgoing, String> {
    let set = identity
        .signer_for(&stream.owner)
        .sign_set(claims)
        .map_err(|e| e.to_string())?;
    Ok(Outgoing {
        jti,
        set,
        queued_at_ms: identity.clock().now_ms(),
        replayed_at_ms: None,
    })
}

/// The SET for `decision` on `stream`, if the stream should get one.
pub fn set_for(
    identity: &Identity,
    stream: &Stream,
    decision: &Decision,
    grant: &Grant,
) -> Option<Result<Outgoing, String>> {
    if !decision.reaches_enforcement_points() {
        return None;
    }
    if !grant.enforcement_points.is_empty() && !grant.enforcement_points.contains(&stream.owner) {
        return None;
    }
    let (kind, payload) = event_for(decision, grant)?;
    if !stream.events_delivered().contains(&kind.uri()) {
        return None;
    }
    let jti = decision_jti(&decision.id, &stream.stream_id);
    // `iat` is the decision's time, not the signing time: a decision's SET signed again (after a
    // crash between its delivery and the outbox's commit, or by a partition's next owner) is then
    // the same SET — byte for byte with a deterministic algorithm (RS256, EdDSA) — not a new one.
    let claims = json!({
        "iss": stream.iss,
        "aud": stream.aud,
        "jti": jti,
        "iat": decision.time.max(0.0).floor() as u64,
        "txn": decision.cause.jti.clone().unwrap_or_else(|| decision.id.clone()),
        "sub_id": subject_for(grant),
        "events": {kind.uri(): payload},
    });
    Some(signed(identity, stream, &claims, jti))
}

/// An SSF verification SET for `stream` (SSF §8.1.4).
pub fn verification(
    identity: &Identity,
    stream: &Stream,
    state: Option<&str>,
) -> Result<Outgoing, String> {
    let jti = jti();
    let payload = serde_json::to_value(Verification {
        state: state.map(str::to_owned),
    })
    .map_err(|e| e.to_string())?;
    let claims = json!({
        "iss": stream.iss, "aud": stream.aud, "jti": jti, "iat": identity.clock().now_ms() / 1000,
        "sub_id": {"format": "opaque", "id": stream.stream_id},
        "events": {EventKind::Verification.uri(): payload},
    });
    signed(identity, stream, &claims, jti)
}

/// An SSF stream-updated SET (SSF §8.1.5) telling the stream's receiver its new status.
pub fn stream_updated(identity: &Identity, stream: &Stream) -> Result<Outgoing, String> {
    let jti = jti();
    let payload = serde_json::to_value(StreamUpdated {
        status: stream.status.clone(),
        reason: stream.status_reason.clone(),
    })
    .map_err(|e| e.to_string())?;
    let claims = json!({
        "iss": stream.iss, "aud": stream.aud, "jti": jti, "iat": identity.clock().now_ms() / 1000,
        "sub_id": {"format": "opaque", "id": stream.stream_id},
        "events": {EventKind::StreamUpdated.uri(): payload},
    });
    signed(identity, stream, &claims, jti)
}

/// Most decisions signed and queued by one store write.
const EMIT_BATCH: usize = 256;

/// Batches of one lane whose outbox commit may be in flight at once. Queueing waited for each
/// commit before the next batch: delivery then took at most one batch per commit of the state
/// store's one writer — behind the shards' own commits — and when every signal revoked a grant,
/// the shards blocked on the full decision channel most of the time they waited at all. The
/// writer commits in queue order, so a lane's SETs keep their order however many are in flight.
const EMIT_IN_FLIGHT: usize = 4;

/// Consumes decisions (with the grant each is about) and queues their SETs on every stream that should
/// get them; `pending` (decisions committed before a restart but not yet taken over) go first, then
/// the engine's two lanes, each taken by a loop of its own (`engine/handover.rs`): a batch waits
/// for its decisions' commit, and one of a source's backlog waits behind that backlog's other
/// commits in the state store's writer, which another party's revocation must not wait for.
/// Decisions waiting together are emitted together: their SETs are signed in parallel — while the
/// engine's commit of them is still being written — and, once the commit is durable, queued with
/// their "taken over" marks by one write, which hands them to the streams' deliverers at once (the
/// outbox's commit is not waited for: see [`StreamStore::enqueue`]); up to [`EMIT_IN_FLIGHT`]
/// batches' writes commit while the next are queued. Ends when the engine, the sender, is gone —
/// after draining what it sent and every commit in flight.
pub async fn run(
    rx: Handoffs,
    identity: Arc<Identity>,
    streams: Arc<StreamStore>,
    pending: Vec<(Decision, Arc<Grant>)>,
    changelog: Option<Arc<dyn Changelog>>,
) {
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "delivering decisions committed before the restart"
        );
    }
    let in_flight = Arc::new(tokio::sync::Semaphore::new(EMIT_IN_FLIGHT));
    let pending = pending
        .into_iter()
        .map(|(decision, grant)| Handed::restored(decision, grant));
    for batch in crate::parts::in_parts(pending, EMIT_BATCH) {
        emit_batch(&identity, &streams, &changelog, &in_flight, batch).await;
    }
    let Handoffs { interactive, bulk } = rx;
    tokio::join!(
        emit_lane(interactive, "interactive", &identity, &streams, &changelog),
        emit_lane(bulk, "bulk", &identity, &streams, &changelog),
    );
    // Every commit in flight has ended once all the permits are back.
    let _ = in_flight.acquire_many(EMIT_IN_FLIGHT as u32).await;
}

/// Emits one lane's decisions, a batch at a time, until the engine is gone and the lane is empty;
/// returns once its commits in flight have ended.
async fn emit_lane(
    mut lane: LaneReceiver,
    name: &'static str,
    identity: &Arc<Identity>,
    streams: &Arc<StreamStore>,
    changelog: &Option<Arc<dyn Changelog>>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(EMIT_IN_FLIGHT));
    while let Some(first) = lane.recv().await {
        let mut batch = vec![first];
        lane.fill(&mut batch, EMIT_BATCH);
        metrics::gauge!(crate::telemetry::DELIVERY_QUEUED, "lane" => name)
            .set(lane.queued() as f64);
        emit_batch(identity, streams, changelog, &in_flight, batch).await;
    }
    let _ = in_flight.acquire_many(EMIT_IN_FLIGHT as u32).await;
}

/// How long a batch's SETs are retried when they cannot be queued.
const QUEUE_RETRY_FOR: Duration = Duration::from_secs(60);

/// A batch's SETs and hand-off marks, as queued (and queued again if their commit fails).
struct Queueing {
    items: Vec<(String, Outgoing)>,
    handed: Vec<HandoffMark>,
    /// Cluster mode: the hand-off rows' tombstones for the state topic.
    taken_over: Vec<ChangeRecord>,
}

async fn emit_batch(
    identity: &Arc<Identity>,
    streams: &Arc<StreamStore>,
    changelog: &Option<Arc<dyn Changelog>>,
    in_flight: &Arc<tokio::sync::Semaphore>,
    batch: Vec<Handed>,
) {
    let Some(queueing) = sign_durable(identity, streams, batch).await else {
        return;
    };
    let Ok(permit) = in_flight.clone().acquire_owned().await else {
        return;
    };
    let Some(enqueued) = queue_with_retries(streams, &queueing).await else {
        return;
    };
    let (streams, changelog) = (streams.clone(), changelog.clone());
    tokio::spawn(async move {
        let committed = match enqueued.committed(&streams).await {
            Ok(()) => true,
            Err(e) => {
                // Queued again, after whatever was queued since: a failed commit is the rare
                // case, and each SET's `jti` and `event_timestamp` still say what it is.
                metrics::counter!(crate::telemetry::EMIT_ERRORS).increment(1);
                tracing::warn!(error = %e, decisions = queueing.handed.len(), "SETs not committed; queueing them again");
                match queue_with_retries(&streams, &queueing).await {
                    Some(again) => again.committed(&streams).await.is_ok(),
                    None => false,
                }
            }
        };
        drop(permit);
        if let (Some(changelog), true, false) =
            (changelog, committed, queueing.taken_over.is_empty())
        {
            // Not awaited: a tombstone lost means the next owner queues the SETs again, with the
            // same `jti`s.
            let appended = changelog.append(queueing.taken_over, &[]);
            tokio::spawn(async move {
                if !matches!(appended.await, Ok(Ok(()))) {
                    tracing::warn!("hand-off rows not deleted from the state topic; the next owner may send their SETs again");
                }
            });
        }
    });
}

/// Queues a batch's SETs, or retries for a while: in cluster mode the outbox topic may be out of
/// reach for a moment (the brokers). Batches queue behind in order; decisions never queued stay
/// in the hand-off and are delivered after the next start (or by the partition's next owner).
async fn queue_with_retries(
    streams: &StreamStore,
    queueing: &Queueing,
) -> Option<super::streams::Enqueued> {
    let decisions = queueing.handed.len();
    let mut wait = Duration::from_millis(100);
    let give_up = tokio::time::Instant::now() + QUEUE_RETRY_FOR;
    loop {
        match streams
            .start_enqueue(queueing.items.clone(), queueing.handed.clone())
            .await
        {
            Ok(enqueued) => return Some(enqueued),
            Err(e) => {
                metrics::counter!(crate::telemetry::EMIT_ERRORS).increment(1);
                if tokio::time::Instant::now() + wait > give_up {
                    tracing::error!(error = %e, decisions, "could not queue SETs; the decisions stay pending");
                    return None;
                }
                tracing::warn!(error = %e, decisions, "could not queue SETs; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Signs the SETs of a batch's decisions while their commit is written and keeps those of the
/// decisions that became durable; `None` when there is nothing to queue.
async fn sign_durable(
    identity: &Arc<Identity>,
    streams: &StreamStore,
    batch: Vec<Handed>,
) -> Option<Queueing> {
    let batch: Vec<Handed> = batch
        .into_iter()
        .filter(|h| h.decision.reaches_enforcement_points())
        .collect();
    if batch.is_empty() {
        return None;
    }
    let live = streams.live();
    // Signing is CPU work (an RSA signature is ≈ 1 ms): off the async workers, over the cores,
    // while the decisions' commit is written.
    let signer = identity.clone();
    let jobs: Vec<(Decision, Arc<Grant>)> = batch
        .iter()
        .map(|h| (h.decision.clone(), h.grant.clone()))
        .collect();
    let signing = tokio::task::spawn_blocking(move || sign_batch(&signer, &live, &jobs));
    // Only what is durable goes out: a decision whose commit failed is made again when its
    // signals are replayed (same id, same `jti`s).
    let mut durable = Vec::with_capacity(batch.len());
    for h in &batch {
        durable.push(h.durable.wait().await);
    }
    let items = match signing.await {
        Ok(Some(items)) => items,
        Ok(None) => {
            metrics::counter!(crate::telemetry::EMIT_ERRORS).increment(1);
            tracing::error!(
                decisions = batch.len(),
                "signing failed; the decisions stay pending"
            );
            return None;
        }
        Err(e) => {
            metrics::counter!(crate::telemetry::EMIT_ERRORS).increment(1);
            tracing::error!(error = %e, "signing failed; the decisions stay pending");
            return None;
        }
    };
    let items: Vec<(String, Outgoing)> = items
        .into_iter()
        .filter(|(i, _, _)| durable[*i])
        .map(|(_, stream, out)| (stream, out))
        .collect();
    let kept: Vec<&Handed> = batch
        .iter()
        .zip(&durable)
        .filter_map(|(h, ok)| ok.then_some(h))
        .collect();
    if kept.len() < batch.len() {
        tracing::warn!(
            dropped = batch.len() - kept.len(),
            "decisions whose commit failed are not delivered; their signals are replayed"
        );
    }
    // Cluster mode: once queued, each decision's hand-off row is deleted from the state topic too,
    // so the partition's next owner does not queue it again.
    let taken_over: Vec<ChangeRecord> = kept
        .iter()
        .map(|h| ChangeRecord {
            owner: h.grant.principal.to_string(),
            key: Row::new(Table::Handoff, h.decision.id.as_str()).record_key(),
            value: None,
        })
        .collect();
    let handed: Vec<HandoffMark> = kept.iter().map(|h| h.mark()).collect();
    if handed.is_empty() {
        return None;
    }
    Some(Queueing {
        items,
        handed,
        taken_over,
    })
}

/// Every SET the batch's decisions call for, in decision order, then stream order, each with the
/// index of its decision; `None` if a signing thread failed (nothing is queued then, so no
/// decision is marked taken over without its SETs).
fn sign_batch(
    identity: &Identity,
    live: &[Stream],
    batch: &[(Decision, Arc<Grant>)],
) -> Option<Vec<(usize, String, Outgoing)>> {
    let jobs: Vec<(usize, &Stream, &Decision, &Grant)> = batch
        .iter()
        .enumerate()
        .flat_map(|(i, (d, g))| live.iter().map(move |s| (i, s, d, &**g)))
        .collect();
    let sign = |chunk: &[(usize, &Stream, &Decision, &Grant)]| -> Vec<(usize, String, Outgoing)> {
        chunk
            .iter()
            .filter_map(|(i, stream, decision, grant)| {
                match set_for(identity, stream, decision, grant)? {
                    Ok(out) => Some((*i, stream.stream_id.clone(), out)),
                    Err(e) => {
                        tracing::error!(error = %e, "could not sign a SET");
                        None
                    }
                }
            })
            .collect()
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    if workers < 2 || jobs.len() < 2 {
        return Some(sign(&jobs));
    }
    let size = jobs.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let mut chunks = jobs.chunks(size);
        let first = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks.map(|c| scope.spawn(move || sign(c))).collect();
        let mut out = sign(first);
        for handle in others {
            out.extend(handle.join().ok()?);
        }
        Some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::decision_jti;
    use crate::decision::testing::decision;

    #[test]
    fn a_decision_keeps_its_jti_per_stream_and_streams_differ() {
        let a = decision_jti("0123456789abcdef", "stream-a");
        assert_eq!(a, decision_jti("0123456789abcdef", "stream-a"));
        assert_eq!(a.len(), 32);
        assert_ne!(a, decision_jti("0123456789abcdef", "stream-b"));
        assert_ne!(a, decision_jti("0123456789abcdee", "stream-a"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(decision_jti("ab", "c"), decision_jti("a", "bc"));
    }

    /// A decision's SET signed again later — after a crash between its delivery and the outbox's
    /// commit, the restarted instance signs it from the hand-off — is the SET already delivered,
    /// byte for byte, with the deterministic algorithms: an enforcement point sees a retransmission,
    /// not a second SET with the same `jti`.
    #[test]
    fn a_decision_signed_again_later_is_the_same_set() {
        use super::set_for;
        use crate::clock::Clock;
        use crate::jose::Alg;
        use crate::transmitter::streams::new_stream;
        use crate::transmitter::Identity;
        let dir = tempfile::tempdir().unwrap();
        let grant = serde_json::from_value::<crate::grant::GrantRequest>(serde_json::json!({
            "id": "g", "kind": "session", "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0}))
        .unwrap()
        .into_grant("email:u@example.com".into(), 10.0)
        .unwrap();
        let decision = decision(crate::decision::DecisionEffect::Revoke, 1_699_999_990.25);
        let body = serde_json::json!({}).as_object().cloned().unwrap();
        let stream = new_stream(&body, "ep", "https://vigil", "ep-aud", "https://vigil").unwrap();
        for alg in [Alg::RS256, Alg::EdDSA] {
            let keys = dir.path().join(format!("{alg:?}"));
            let clock = Clock::manual(1_700_000_000_000);
            let sign = |clock: &Clock| {
                let identity =
                    Identity::load_or_create(&keys, &[alg], 3600, clock.clone()).unwrap();
                set_for(&identity, &stream, &decision, &grant)
                    .unwrap()
                    .unwrap()
            };
            let first = sign(&clock);
            clock.advance(std::time::Duration::from_secs(90));
            let again = sign(&clock);
            assert_eq!(first.jti, again.jti, "{alg:?}");
            assert_eq!(
                first.set, again.set,
                "{alg:?}: signed again, a different SET"
            );
        }
    }

    /// Decisions flowing through [`super::run`] in many small batches, several batches' commits in
    /// flight at once, reach the outbox in decision order — those pending from before a restart
    /// first — and `run` returns only once every one of their writes is on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_batches_reach_the_outbox_in_order_and_are_all_committed_at_the_end() {
        use crate::clock::Clock;
        use crate::decision::DecisionEffect;
        use crate::engine::Handed;
        use crate::jose::Alg;
        use crate::transmitter::streams::{new_stream, StreamStore};
        use crate::transmitter::Identity;
        use redb::{ReadableTableMetadata, TableDefinition};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open(dir.path()).unwrap();
        let (writer, _thread) = crate::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let clock = Clock::manual(1_700_000_000_000);
        let streams =
            Arc::new(StreamStore::open(db.clone(), writer.clone(), clock.clone()).unwrap());
        let body = serde_json::json!({}).as_object().cloned().unwrap();
        let stream = new_stream(&body, "ep", "https://vigil", "ep-aud", "https://vigil").unwrap();
        let stream_id = stream.stream_id.clone();
        streams.put(stream).await.unwrap();
        let identity =
            Identity::load_or_create(&dir.path().join("keys"), &[Alg::EdDSA], 3600, clock).unwrap();
        let grant = Arc::new(
            serde_json::from_value::<crate::grant::GrantRequest>(serde_json::json!({
                "id": "g", "kind": "session", "subject": {"format": "email", "email": "u@example.com"},
                "issued_at": 10.0, "expires_at": 3600.0}))
            .unwrap()
            .into_grant("email:u@example.com".into(), 10.0)
            .unwrap(),
        );
        let made = |i: usize| {
            let mut d = decision(DecisionEffect::Revoke, 1_699_999_000.0 + i as f64);
            d.id = format!("d{i:05}");
            d
        };
        let (before, live) = (5, 3 * super::EMIT_BATCH + 10);
        let pending = (0..before).map(|i| (made(i), grant.clone())).collect();
        // A small lane: batches of a few decisions each, many of them in flight.
        let (tx, rx) = crate::engine::lanes(8);
        let sender = tokio::task::spawn_blocking({
            let grant = grant.clone();
            move || {
                for i in before..before + live {
                    let handed = Handed::restored(made(i), grant.clone());
                    assert!(tx
                        .blocking_send(handed, crate::engine::Lane::Interactive)
                        .is_ok());
                }
            }
        });
        super::run(rx, Arc::new(identity), streams.clone(), pending, None).await;
        sender.await.unwrap();
        let (queued, more) = streams.outstanding(&stream_id, usize::MAX).unwrap();
        assert!(!more);
        let jtis: Vec<String> = queued.into_iter().map(|(_, o)| o.jti).collect();
        let expected: Vec<String> = (0..before + live)
            .map(|i| super::decision_jti(&format!("d{i:05}"), &stream_id))
            .collect();
        assert_eq!(jtis, expected);
        // On disk, not only staged for the deliverers.
        let txn = db.begin_read().unwrap();
        let outbox = txn
            .open_table(TableDefinition::<&str, &[u8]>::new("tx_outbox"))
            .unwrap();
        assert_eq!(outbox.len().unwrap(), (before + live) as u64);
        drop((outbox, txn));

        // With the store's writer held, batches are queued and handed to the deliverers, but
        // `run` does not end before their commits do.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holding = writer
            .queue(move |_| {
                let _ = held.recv();
                Ok(())
            })
            .await
            .unwrap();
        let more = 300;
        let pending = (0..more)
            .map(|i| (made(100_000 + i), grant.clone()))
            .collect();
        let (tx, rx) = crate::engine::lanes(8);
        drop(tx);
        let running = tokio::spawn(super::run(
            rx,
            Arc::new(
                Identity::load_or_create(
                    &dir.path().join("keys"),
                    &[Alg::EdDSA],
                    3600,
                    Clock::manual(1_700_000_000_000),
                )
                .unwrap(),
            ),
            streams.clone(),
            pending,
            None,
        ));
        let all = before + live + more;
        for _ in 0..500 {
            if streams.outstanding(&stream_id, usize::MAX).unwrap().0.len() == all {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            streams.outstanding(&stream_id, usize::MAX).unwrap().0.len(),
            all
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !running.is_finished(),
            "run ended with its commits in flight"
        );
        release.send(()).unwrap();
        holding.wait().await.unwrap();
        running.await.unwrap();
        let txn = db.begin_read().unwrap();
        let outbox = txn
            .open_table(TableDefinition::<&str, &[u8]>::new("tx_outbox"))
            .unwrap();
        assert_eq!(outbox.len().unwrap(), all as u64);
    }

    /// Every event a decision maps to is one Vigil's own parser accepts as that event, with the
    /// spec's fields (the mapping table of this module's doc).
    #[test]
    fn decisions_map_to_events_vigil_itself_accepts() {
        use super::event_for;
        use crate::decision::DecisionEffect;
        use crate::events::Event;
        use crate::grant::GrantRequest;
        let grant = serde_json::from_value::<GrantRequest>(serde_json::json!({
            "id": "g", "kind": "session", "subject": {"format": "email", "email": "u@example.com"},
            "issued_at": 10.0, "expires_at": 3600.0,
            "attributes": {"required_assurance": {"namespace": "NIST-AAL", "level": "nist-aal2"}}}))
        .unwrap()
        .into_grant("email:u@example.com".into(), 10.0)
        .unwrap();
        let decision = |effect| decision(effect, 1234.5);
        for effect in [
            DecisionEffect::Revoke,
            DecisionEffect::StepUp,
            DecisionEffect::Restrict,
        ] {
            let (kind, payload) = event_for(&decision(effect), &grant).unwrap();
            let parsed = Event::parse(&kind.uri(), &payload).unwrap();
            assert_eq!(parsed.kind(), Some(kind));
            assert_eq!(parsed.event_timestamp(), Some(1234.5));
            assert_eq!(payload["initiating_entity"], "policy");
            assert_eq!(payload["reason_admin"]["en"], "why");
        }
        let (_, step_up) = event_for(&decision(DecisionEffect::StepUp), &grant).unwrap();
        assert_eq!(step_up["namespace"], "NIST-AAL");
        assert_eq!(step_up["current_level"], "step-up-required");
        assert_eq!(step_up["change_direction"], "decrease");
        let (_, restrict) = event_for(&decision(DecisionEffect::Restrict), &grant).unwrap();
        assert_eq!(restrict["claims"]["vigil_restricted"], true);
        assert!(event_for(&decision(DecisionEffect::Allow), &grant).is_none());
        assert!(event_for(&decision(DecisionEffect::Notify), &grant).is_none());
    }
}
