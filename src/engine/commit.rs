//! A shard batch's way to disk and out: the work a batch applied in memory ([`Pending`]), its
//! commit (audit first, then one state-store write in the ordinary lane, the checkpoint's chunks
//! in the bulk lane), and its announcement once durable (forwards, decisions, replies) — in batch
//! order, pipelined with the next batch. A checkpoint is taken a part per batch ([`Draining`]) and
//! settles behind: the intake "processed" marks and Kafka batch answers it covers go out when
//! every chunk of every part is on disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::handed::{Commit, Durable, Handed, JournalPlace};
use super::handover::Lane;
use super::persist::{self, Changes};
use super::rewrite::Written;
use super::shard::Shard;
use super::{EngineError, Msg, Registered};
use crate::decision::Decision;
use crate::grant::{Grant, GrantId};
use crate::store::{Merge, PendingWrite, WriteError};

pub(super) enum Reply {
    Register(
        oneshot::Sender<Result<Registered, EngineError>>,
        Box<Result<Registered, EngineError>>,
    ),
    Delete(
        oneshot::Sender<Result<bool, EngineError>>,
        Result<bool, EngineError>,
    ),
}

/// The work of one batch, applied in memory and waiting for its commit.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) changes: Changes,
    /// Session revocations (context key, filter key) this batch's checkpoint writes, as rows
    /// encoded from the contexts' state at the commit.
    pub(super) revocations: Vec<(String, String)>,
    pub(super) processed: Vec<u64>,
    pub(super) decisions: Vec<Decision>,
    /// Which of `decisions` a bulk message made (ranges of indices, in order): they go to
    /// delivery in its bulk lane ([`super::handover`]).
    pub(super) bulk_decisions: Vec<std::ops::Range<usize>>,
    /// Keys of the contexts this batch's decisions were made on, written with them
    /// ([`Changes::decided_contexts`]).
    pub(super) decided: std::collections::HashSet<String>,
    /// The contexts of `decided` with the version this batch's commit writes, for
    /// [`Shard::decided_stored`] once the commit is durable.
    pub(super) decided_versions: Vec<(String, u64)>,
    /// The latest state of every grant a decision in this batch is about (handed on with it).
    pub(super) latest: std::collections::HashMap<GrantId, Arc<Grant>>,
    /// Policy swaps, releases and adoptions waiting for this batch's commit.
    pub(super) commit_waiters: Vec<oneshot::Sender<()>>,
    /// What waits for this batch's checkpoint: signal batches (told if it failed), and context
    /// retention for the deletions of a chunk this batch forgot.
    pub(super) batch_waiters: Vec<CheckpointWaiter>,
    /// Re-evaluations for grants other shards own, sent after the commit.
    pub(super) forwards: Vec<(usize, Msg)>,
    pub(super) replies: Vec<Reply>,
    pub(super) permits: Vec<OwnedSemaphorePermit>,
    /// Whether this batch started a checkpoint: the signals it applied are then covered by that
    /// checkpoint, otherwise by the next one ([`Committing::covers`]).
    pub(super) checkpoint_started: bool,
    /// The generation of the checkpoint whose part (not its last) this batch carries, if any.
    pub(super) part_of: Option<u64>,
    /// The newest generation whose last part this batch carries, if any.
    pub(super) completes: Option<u64>,
    /// What this batch's ordinary write holds, kept until its outcome is known
    /// ([`super::rewrite`]).
    pub(super) written: Written,
    /// Decisions of an earlier batch whose commit failed, handed to delivery again with this
    /// batch's (and written to the hand-off with them).
    pub(super) rehanded: Vec<(Decision, Arc<Grant>)>,
}

impl Pending {
    /// The decisions the cluster's decision trail gets with this batch: its own, and those of
    /// an earlier batch whose append failed and which this one hands to delivery again — the
    /// failed append took them off the trail with its rows. A decision on the trail twice (an
    /// append the brokers kept though they answered an error) is listed once by queries.
    pub(super) fn decisions_for_the_trail(&self) -> std::borrow::Cow<'_, [Decision]> {
        if self.rehanded.is_empty() {
            return std::borrow::Cow::Borrowed(&self.decisions);
        }
        let again = self.rehanded.iter().map(|(d, _)| d.clone());
        std::borrow::Cow::Owned(self.decisions.iter().cloned().chain(again).collect())
    }

    /// This batch's decisions delivery acts on (revoke, step-up, restrict), each with its index
    /// and the grant's latest state.
    pub(super) fn for_delivery(&self) -> impl Iterator<Item = (usize, &Decision, &Arc<Grant>)> {
        self.decisions
            .iter()
            .enumerate()
            .filter(|(_, d)| d.reaches_enforcement_points())
            .filter_map(|(i, d)| Some((i, d, self.latest.get(d.grant_id.as_str())?)))
    }
}

/// A decision of a batch on its way to delivery: its lane, and where its hand-off is stored.
pub(super) struct ToHand {
    decision: Decision,
    grant: Arc<Grant>,
    lane: Lane,
    journaled: Option<JournalPlace>,
    /// The decision's JSON, as the audit log got it (a decision handed again has none).
    json: Option<Arc<[u8]>>,
}

/// What waits for a checkpoint to be stored.
pub(super) enum CheckpointWaiter {
    /// A source's batch of signals (a Kafka poll's), told whether the checkpoint failed.
    Batch(oneshot::Sender<Result<(), String>>),
    /// Context retention, which sends the shard its next chunk of principals to forget only
    /// once the last chunk's deletions are stored: forgetting faster than the store deletes
    /// filled the state writer's queue, and every signal behind it waited.
    Forgotten(std::sync::mpsc::Sender<()>),
}

impl CheckpointWaiter {
    fn answer(self, outcome: Result<(), String>) {
        match self {
            CheckpointWaiter::Batch(done) => {
                let _ = done.send(outcome);
            }
            // Stored or not, the next chunk may come: rows a failed deletion left are loaded
            // at the next start and forgotten by a later scan.
            CheckpointWaiter::Forgotten(handled) => {
                let _ = handled.send(());
            }
        }
    }
}

/// A checkpoint in flight. Its chunks commit in the store's bulk lane while the shard goes on
/// deciding: a decision is announced once its own batch's ordinary write is on disk, never
/// behind a checkpoint's hundreds of rows (which held decisions for tens of milliseconds). What
/// depends on the checkpoint waits for all its chunks: the intake "processed" marks of the
/// pushed signals it covers and the answers to the signal batches (Kafka offsets) it covers. A
/// crash before then loses nothing: those signals are replayed, and the decisions they caused
/// are already stored.
pub(super) struct Checkpointing {
    /// The checkpoint's generation ([`Shard::checkpoint_generation`]) when this batch committed.
    pub(super) generation: u64,
    pub(super) writes: Vec<Result<PendingWrite<()>, WriteError>>,
    pub(super) processed: Vec<u64>,
    pub(super) waiters: Vec<CheckpointWaiter>,
    /// Contexts this batch's chunks delete (retention forgot them): see [`Shard::forgetting`].
    pub(super) forgotten: Vec<String>,
    /// [`Pending::part_of`]: a failure of this batch fails that checkpoint too.
    pub(super) part_of: Option<u64>,
    /// [`Pending::completes`]: this batch answers for every checkpoint up to that generation.
    pub(super) completes: Option<u64>,
    /// Keys of the contexts and session revocations this batch's chunks write: if a chunk
    /// fails, they are dirty again, so a later checkpoint writes them ([`super::rewrite`]).
    pub(super) contexts: Vec<String>,
    pub(super) revocations: Vec<(String, String)>,
    /// Why this batch's own writes (its chunks, or its ordinary write) failed; once settled, the
    /// failure of a checkpoint it completes.
    pub(super) failed: Option<String>,
}

impl Checkpointing {
    /// Collects the outcome of every chunk whose commit is done — of all of them, waiting, when
    /// `block` — and says whether none is left in flight.
    pub(super) fn settle(&mut self, block: bool) -> bool {
        crate::store::settle_writes(&mut self.writes, &mut self.failed, block)
    }
}

/// Commit failures not yet charged to a checkpoint, by the generation of the checkpoint that must
/// fail for each. A batch whose commit failed has its signals covered by the checkpoint it
/// started or else the next one to start; a failed part fails the checkpoint it belongs to.
/// Keyed by generation, a failure is charged to that checkpoint and no other: charged to
/// whichever checkpoint batch happened to be announced next (as it was), it could be taken by
/// the last part of the checkpoint before, or by a retention deletion, and the checkpoint that
/// did cover the failed batch's signals then marked them processed over state never stored.
/// What such a failure left in memory alone is written again by [`super::rewrite`].
#[derive(Debug, Default)]
pub(super) struct Unstored(std::collections::BTreeMap<u64, String>);

impl Unstored {
    /// Checkpoints with a failure waiting for them.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Notes that the checkpoint of `generation` must fail for `error` (the first one stays).
    pub(super) fn record(&mut self, generation: u64, error: &str) {
        self.0.entry(generation).or_insert_with(|| error.to_owned());
    }

    /// Takes every failure a checkpoint batch completing `generation` answers for — its own
    /// generation's and any older one's whose checkpoint carried nothing to fail — and gives the
    /// first. Failures for later checkpoints stay.
    pub(super) fn charge(&mut self, generation: u64) -> Option<String> {
        let later = match generation.checked_add(1) {
            Some(next) => self.0.split_off(&next),
            None => std::collections::BTreeMap::new(),
        };
        std::mem::replace(&mut self.0, later).into_values().next()
    }
}

/// Least time between two attempts to write again what failed commits held
/// ([`super::rewrite`]), by the injected clock.
const REWRITE_EVERY_MS: i64 = 1_000;

/// Rows (contexts, or session revocations) per checkpoint transaction: small enough that a
/// decision's commit never waits long behind one.
const CHECKPOINT_CHUNK: usize = 256;

/// Fewest contexts a batch takes of a checkpoint being drained: encoding one costs ≈ 5 µs, so a
/// part adds well under a millisecond to its batch.
const CHECKPOINT_PART: usize = 128;

/// Most batches a checkpoint is spread over (fewer when its parts would be smaller than
/// [`CHECKPOINT_PART`]). Few: under a Kafka backlog a batch takes tens of milliseconds, so
/// sixteen parts spread a checkpoint over most of its interval, and the revoking Kafka path
/// measured ≈ 6 % slower with them; with four, within the noise (benches/RESULTS.md). At half
/// the push load a checkpoint is ≈ 500 contexts: four parts of 129, or five of 128 with sixteen.
const CHECKPOINT_PARTS: usize = 4;

/// Most checkpoint batches in flight before the shard waits for the oldest: a checkpoint's parts
/// and forgotten contexts' deletions do not wait for each other, but their memory is bounded.
const CHECKPOINTS_IN_FLIGHT: usize = 64;

/// How many contexts a batch takes of a checkpoint of `contexts`.
fn part_size(contexts: usize) -> usize {
    contexts.div_ceil(CHECKPOINT_PARTS).max(CHECKPOINT_PART)
}

/// A checkpoint being taken a part per batch. Encoding all the contexts dirtied in an interval
/// in one batch (≈ 500 at half load, 2.5–3 ms of encoding, then the wait for room in the
/// writer's queue, 7–24 ms in all) held every signal behind that batch, once a second per shard:
/// the revocation p99. Each batch now encodes at most a part of them. A part reads its contexts
/// as they are then, possibly with later signals applied: those signals are replayed after a
/// crash too, onto a context that already has them, which changes nothing. Only the last part
/// carries the intake marks, session revocations and batch answers the checkpoint covers.
pub(super) struct Draining {
    /// The contexts not written yet.
    keys: std::collections::HashSet<String>,
    /// How many a batch takes.
    per_batch: usize,
    revocations: Vec<(String, String)>,
    /// Links learned since the last checkpoint ([`Shard::dirty_aliases`]): written with the last
    /// part, before the signals that made them are marked processed.
    aliases: HashMap<String, String>,
    processed: Vec<u64>,
    waiters: Vec<CheckpointWaiter>,
}

impl Draining {
    /// Whether a write of `key`'s context is still to come from this checkpoint.
    pub(super) fn holds(&self, key: &str) -> bool {
        self.keys.contains(key) || self.revocations.iter().any(|(c, _)| c == key)
    }

    /// Forgets the contexts of principals another instance owns now.
    pub(super) fn release(&mut self, released: &dyn Fn(&str) -> bool) {
        self.keys.retain(|key| !released(key));
        self.revocations.retain(|(key, _)| !released(key));
        self.aliases.retain(|_, principal| !released(principal));
    }

    /// Drops the link of `alias` to `principal` if it is still to be written: retention forgot it.
    pub(super) fn unlink(&mut self, alias: &str, principal: &str) {
        if self.aliases.get(alias).is_some_and(|p| p == principal) {
            self.aliases.remove(alias);
        }
    }
}

impl Shard {
    /// Finishes, oldest first, the checkpoints in flight whose chunks have all committed (see
    /// [`settled`]): marks their signals processed and answers their batches.
    pub(super) fn settle_checkpoints(&mut self, wait_before: u64) {
        let mut unwritten = Unwritten::default();
        while let Some(done) = settled(
            &mut self.checkpointing,
            &mut self.unstored,
            &mut unwritten,
            wait_before,
        ) {
            for key in &done.forgotten {
                if let Some(n) = self.forgetting.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        self.forgetting.remove(key);
                    }
                }
            }
            match &done.failed {
                None => self.shared.intake.mark_processed_detached(done.processed),
                Some(e) => {
                    tracing::error!(shard = self.id, error = %e, "checkpoint failed; its signals stay pending for replay");
                }
            }
            for w in done.waiters {
                w.answer(done.failed.clone().map_or(Ok(()), Err));
            }
        }
        // What failed chunks did not store is dirty again, for a later checkpoint (only what this
        // instance still holds): a source redelivering the signals that changed it may change
        // nothing in memory ([`super::rewrite`]).
        for key in unwritten.contexts {
            if self.shared.contexts.contains_key(&key) {
                self.dirty.insert(key);
            }
        }
        let contexts = &self.shared.contexts;
        self.dirty_revocations.extend(
            unwritten
                .revocations
                .into_iter()
                .filter(|(key, _)| contexts.contains_key(key)),
        );
    }

    /// Starts a checkpoint of the contexts changed since the last one, finishing the one before
    /// it in this batch if it is still being drained. `whole`: the whole checkpoint goes into
    /// this batch (at a stop). Otherwise this batch takes its first part ([`Draining`]).
    pub(super) fn start_checkpoint(&mut self, whole: bool, p: &mut Pending) {
        if let Some(draining) = &mut self.draining {
            draining.per_batch = usize::MAX;
            self.checkpoint_part(p);
        }
        p.checkpoint_started = true;
        let keys = std::mem::take(&mut self.dirty);
        // Entries of keys the finished checkpoint wrote or skipped, and of keys no checkpoint
        // holds any more, are done with.
        self.decided_stored.retain(|key, _| keys.contains(key));
        let per_batch = if whole {
            usize::MAX
        } else {
            part_size(keys.len())
        };
        self.draining = Some(Draining {
            keys,
            per_batch,
            revocations: std::mem::take(&mut self.dirty_revocations),
            aliases: std::mem::take(&mut self.dirty_aliases),
            processed: std::mem::take(&mut self.checkpoint_processed),
            waiters: std::mem::take(&mut self.checkpoint_waiters),
        });
        self.checkpoint_generation += 1;
        self.last_checkpoint_ms = self.shared.settings.clock.now_ms();
        self.checkpoint_part(p);
    }

    /// Moves the next part of the checkpoint being drained, if one is, into this batch's write;
    /// with its last part, what waits for the checkpoint.
    pub(super) fn checkpoint_part(&mut self, p: &mut Pending) {
        let Some(draining) = &mut self.draining else {
            return;
        };
        let contexts = &self.shared.contexts;
        let stored = &mut self.decided_stored;
        // A context a decision's durable commit stored at its present version is not written
        // again.
        let mut take = |key: &str| {
            let ctx = contexts.get(key).map(|c| c.clone())?;
            let decided_at = stored.remove(key);
            (decided_at != Some(ctx.version)).then_some(ctx)
        };
        if draining.keys.len() <= draining.per_batch {
            for key in draining.keys.drain() {
                p.changes.contexts.extend(take(&key));
            }
        } else {
            let part: Vec<String> = draining
                .keys
                .iter()
                .take(draining.per_batch)
                .cloned()
                .collect();
            for key in part {
                draining.keys.remove(&key);
                p.changes.contexts.extend(take(&key));
            }
            p.part_of = Some(self.checkpoint_generation);
            return;
        }
        p.completes = Some(self.checkpoint_generation);
        if let Some(last) = self.draining.take() {
            p.revocations.extend(last.revocations);
            p.changes.aliases.extend(last.aliases);
            p.processed.extend(last.processed);
            p.batch_waiters.extend(last.waiters);
        }
    }

    /// Starts making the batch durable: its decisions written to the audit log first, and synced
    /// before the state store's commit of the batch (so no decision that took effect is missing
    /// from it), then one state store write, queued without waiting. Intake hears which signals are
    /// processed only once that write is on disk (`announce`).
    pub(super) fn commit(&mut self, mut p: Pending) -> Committing {
        // At most once a second: while the store keeps failing, each attempt fails too.
        let now_ms = self.shared.settings.clock.now_ms();
        if self.rewrite.is_some() && now_ms >= self.rewrite_after_ms {
            self.rewrite_after_ms = now_ms.saturating_add(REWRITE_EVERY_MS);
            if let Some(written) = self.rewrite.take() {
                self.write_again(written, &mut p);
            }
        }
        // Each decision serialized once: for the audit log, and its hand-off's JSON.
        let json: Vec<Arc<[u8]>> = p
            .decisions
            .iter()
            .map(|d| serde_json::to_vec(d).map(Arc::from))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        let by_writer = self.shared.settings.changelog.is_none();
        // Single node: written here, synced on the writer's thread just before the commit that
        // makes the decisions take effect (or below, if no write of this batch carries it). In
        // cluster mode the changelog's append runs beside the local commit, and the brokers may
        // take the decisions before that: synced here first.
        let mut unsynced = None;
        if !p.decisions.is_empty() {
            let written = if json.len() == p.decisions.len() {
                self.shared.audit.write_encoded(
                    p.decisions
                        .iter()
                        .zip(&json)
                        .map(|(d, json)| (d.id.as_str(), &json[..])),
                )
            } else {
                self.shared.audit.append(&p.decisions).map(|()| None)
            };
            match written {
                Ok(written) if by_writer => unsynced = written,
                Ok(written) => sync_audit(&self.shared.audit, written),
                Err(e) => audit_failed(&e),
            }
        }
        // This batch's deletions go to the bulk lane, behind its ordinary write.
        let forgotten = p.changes.deleted_contexts.clone();
        for key in &forgotten {
            *self.forgetting.entry(key.clone()).or_default() += 1;
        }
        let contexts = &self.shared.contexts;
        for key in p.decided.drain() {
            if let Some(ctx) = contexts.get(&key).map(|c| c.clone()) {
                // A deletion of the key still in flight may commit after this write and take it
                // away: the next checkpoint, behind the deletion, writes the context again.
                if !self.forgetting.contains_key(&key) {
                    p.decided_versions.push((key, ctx.version));
                }
                p.changes.decided_contexts.push(ctx);
            }
        }
        p.revocations.sort_unstable();
        p.revocations.dedup();
        p.written = Written::of(&p.changes);
        let checkpoint_contexts: Vec<String> =
            p.changes.contexts.iter().map(|c| c.key.clone()).collect();
        let checkpoint_revocations = p.revocations.clone();
        let mut revocations = Ok(());
        for (key, filter) in std::mem::take(&mut p.revocations) {
            if let Some(ctx) = self.shared.contexts.get(&key).map(|c| c.clone()) {
                revocations = revocations.and_then(|()| {
                    let rows = persist::revocation_rows(&ctx, [&filter])?;
                    p.changes.revocations.extend(rows);
                    Ok(())
                });
            }
        }
        let mut writes = Vec::new();
        let mut chunks = Vec::new();
        // The changelog's records: the batch's rows, and its decisions with them.
        let mut records = Vec::new();
        // Delivery gets the decisions now and signs their SETs while the commit is written; the
        // gate opens when it is durable. Single node: the writer thread opens it the moment the
        // fsync ends. Cluster mode: `announce` does, once the changelog has the batch too.
        let mut handed = self.hand_over(&p, &json);
        // Decisions delivery must act on are committed with the state, so a crash cannot lose
        // them: their hand-offs, in the order they are handed over.
        p.changes.handoff = handed
            .iter()
            .map(|h| (h.decision.clone(), h.grant.clone(), h.json.clone()))
            .collect();
        let (gate, durable) = Durable::pending();
        let mut gate = Some(gate);
        if !p.changes.is_empty() {
            let changes = std::mem::take(&mut p.changes);
            // Single node: the batch's decided contexts and status changes go to the journal.
            let journaled = by_writer.then(|| super::journal::status_changed(&p.decisions));
            match revocations.and_then(|()| changes.encode()) {
                Err(e) => writes.push(Err(e)),
                Ok(mut urgent) => {
                    if self.shared.settings.changelog.is_some() {
                        records = urgent.records();
                    }
                    let bulk = urgent.split_bulk(CHECKPOINT_CHUNK);
                    let journal = self.journal(&mut urgent, journaled);
                    if let Ok(Some(slot)) = journal {
                        for (index, h) in (0u32..).zip(handed.iter_mut()) {
                            h.journaled = Some(JournalPlace { slot, index });
                        }
                    }
                    if let Err(e) = journal {
                        writes.push(Err(e));
                    } else if !urgent.is_empty() {
                        let audit = unsynced.take().map(|w| (self.shared.audit.clone(), w));
                        let write = move |txn: &redb::WriteTransaction| {
                            if let Some((log, written)) = &audit {
                                sync_audit(log, Some(*written));
                            }
                            persist::write(txn, &urgent)
                        };
                        writes.push(match (by_writer, gate.take()) {
                            (true, Some(g)) => self
                                .shared
                                .writer
                                .submit_blocking_then(write, move |ok| g.settle(ok)),
                            (_, g) => {
                                gate = g;
                                self.shared.writer.submit_blocking(write)
                            }
                        });
                    }
                    for chunk in bulk {
                        let merge = if chunk.deletes() {
                            Merge::Alone
                        } else {
                            Merge::Allowed
                        };
                        chunks.push(
                            self.shared.writer.submit_bulk_blocking(merge, move |txn| {
                                persist::write(txn, &chunk)
                            }),
                        );
                    }
                }
            }
        }
        sync_audit(&self.shared.audit, unsynced);
        let replicated = match &self.shared.settings.changelog {
            Some(changelog)
                if !records.is_empty() || !p.decisions.is_empty() || !p.rehanded.is_empty() =>
            {
                Some(changelog.append(records, &p.decisions_for_the_trail()))
            }
            _ => None,
        };
        // A batch that completes a checkpoint is settled even if it carries nothing else, so the
        // failures that checkpoint answers for are taken off `Shard::unstored`.
        let checkpoint = (!chunks.is_empty()
            || !p.processed.is_empty()
            || !p.batch_waiters.is_empty()
            || !forgotten.is_empty()
            || p.completes.is_some())
        .then(|| Checkpointing {
            generation: self.checkpoint_generation,
            writes: chunks,
            processed: std::mem::take(&mut p.processed),
            waiters: std::mem::take(&mut p.batch_waiters),
            forgotten,
            part_of: p.part_of,
            completes: p.completes,
            contexts: checkpoint_contexts,
            revocations: checkpoint_revocations,
            failed: None,
        });
        let covers = self.checkpoint_generation + u64::from(!p.checkpoint_started);
        // Handed over now only when the writer thread opens the gate: a gate `announce` opens
        // must not be waited for by delivery while this thread may block on a full channel.
        let handed = if gate.is_none() {
            self.send_to_delivery(handed, &durable);
            Vec::new()
        } else {
            handed
        };
        Committing {
            writes,
            replicated,
            checkpoint,
            covers,
            gate,
            handed: (handed, durable),
            p,
        }
    }

    /// Notes the contexts a batch's decisions stored, now durable, that a checkpoint still
    /// holds ([`Shard::decided_stored`]). Only those: an entry for a key no checkpoint holds
    /// would stay until the key's next checkpoint, which may never come.
    fn note_decided_stored(&mut self, versions: Vec<(String, u64)>) {
        for (key, version) in versions {
            let held = self.dirty.contains(&key)
                || self
                    .draining
                    .as_ref()
                    .is_some_and(|d| d.keys.contains(&key));
            if held {
                self.decided_stored.insert(key, version);
            }
        }
    }

    fn send_to_delivery(&self, handed: Vec<ToHand>, durable: &Durable) {
        for h in handed {
            let item = Handed {
                decision: h.decision,
                grant: h.grant,
                durable: durable.clone(),
                journaled: h.journaled,
            };
            if self.shared.decisions.blocking_send(item, h.lane).is_err() {
                tracing::debug!("no decision consumer");
            }
        }
    }

    /// The batch's decisions for delivery, with the grant each is about and its lane, `json`
    /// being each decision's JSON by its index.
    fn hand_over(&self, p: &Pending, json: &[Arc<[u8]>]) -> Vec<ToHand> {
        let ours = p.for_delivery().map(|(i, d, grant)| {
            let lane = if p.bulk_decisions.iter().any(|r| r.contains(&i)) {
                Lane::Bulk
            } else {
                Lane::Interactive
            };
            (d, grant, lane, json.get(i).cloned())
        });
        ours.chain(
            p.rehanded
                .iter()
                .map(|(d, g)| (d, g, Lane::Interactive, None)),
        )
        .map(|(d, g, lane, json)| ToHand {
            decision: d.clone(),
            grant: g.clone(),
            lane,
            journaled: None,
            json,
        })
        .collect()
    }

    /// Waits for the batch's ordinary write, then announces it: forwards, decisions and replies.
    /// Nothing is announced before it is durable. The batch's checkpoint, if it took one, goes on
    /// committing and is settled later ([`Checkpointing`]).
    pub(super) fn announce(&mut self, c: Committing) {
        let Committing {
            writes,
            replicated,
            checkpoint,
            covers,
            gate,
            handed,
            mut p,
        } = c;
        let mut failed = None;
        // The failure was the changelog's (the brokers), not the local store's.
        let mut unreplicated = false;
        for write in writes {
            if let (Err(e), None) = (write.and_then(PendingWrite::wait_blocking), &failed) {
                tracing::error!(shard = self.id, error = %e, "engine commit failed; signals stay pending for replay");
                failed = Some(e.to_string());
            }
        }
        if let Some(replicated) = replicated {
            let outcome = replicated
                .blocking_recv()
                .unwrap_or_else(|_| Err("the changelog stopped".to_owned()));
            if let (Err(e), None) = (outcome, &failed) {
                metrics::counter!(crate::telemetry::CLUSTER_CHANGELOG_ERRORS).increment(1);
                tracing::error!(shard = self.id, error = %e, "changelog append failed; signals stay pending for replay");
                failed = Some(e);
                unreplicated = true;
            }
        }
        if let Some(gate) = gate {
            gate.settle(failed.is_none());
        }
        self.send_to_delivery(handed.0, &handed.1);
        match &failed {
            // The checkpoint that covers this batch's signals must not mark them processed: they
            // stay pending for replay. Rows of a checkpoint part in this write (its links) are
            // not stored either: the batch's own checkpoint batch fails.
            Some(e) => {
                self.unstored.record(covers, e);
                let mut written = std::mem::take(&mut p.written);
                written.hand_again(&mut p);
                self.rewrite
                    .get_or_insert_with(Written::default)
                    .merge(written);
            }
            None => self.note_decided_stored(std::mem::take(&mut p.decided_versions)),
        }
        if let Some(mut checkpoint) = checkpoint {
            checkpoint.failed.clone_from(&failed);
            self.checkpointing.push_back(checkpoint);
            // Checkpoints slower than their interval do not stop the shard: it holds back the
            // sources' backlogs until they are written (`Shard::checkpoints_lag`).
            self.settle_checkpoints(0);
        }
        for (owner, msg) in p.forwards.drain(..) {
            if let Some(inbox) = self.inboxes.get(owner) {
                let _ = inbox.send(msg);
            }
        }
        for d in p.decisions.drain(..) {
            metrics::counter!(crate::telemetry::DECISIONS, "effect" => d.effect.metric_label(),
                "shadow" => if d.shadow { "true" } else { "false" })
            .increment(1);
            // Every decision is in the audit log already; a log line each, on the shard's thread,
            // was a few per cent of its time when every message revokes.
            tracing::debug!(grant = %d.grant_id, subject = %d.subject, effect = ?d.effect, rules = ?d.rules,
                reason = %d.reason, policy = %d.policy_version, shadow = d.shadow, "decision");
        }
        for reply in p.replies.drain(..) {
            match reply {
                Reply::Register(tx, r) => {
                    let _ = tx.send(unless_failed(&failed, unreplicated, *r));
                }
                Reply::Delete(tx, r) => {
                    let _ = tx.send(unless_failed(&failed, unreplicated, r));
                }
            }
        }
        for w in p.commit_waiters.drain(..) {
            let _ = w.send(());
        }
        drop(p.permits);
    }
}

/// Takes the oldest checkpoint batch off `queue` once all its chunks have committed, if signals
/// or batches wait for it — waiting for the batches of a generation older than `wait_before`,
/// and for the oldest while more than [`CHECKPOINTS_IN_FLIGHT`] are in flight. A failed batch
/// carrying a checkpoint's part fails that checkpoint ([`Unstored`]); a batch completing a
/// checkpoint fails if it or anything that checkpoint answers for failed, so its signals are
/// not marked processed. A batch nothing waits for is dropped once settled.
fn settled(
    queue: &mut VecDeque<Checkpointing>,
    unstored: &mut Unstored,
    unwritten: &mut Unwritten,
    wait_before: u64,
) -> Option<Checkpointing> {
    loop {
        let in_flight = queue.len();
        let oldest = queue.front_mut()?;
        let block = oldest.generation < wait_before || in_flight > CHECKPOINTS_IN_FLIGHT;
        if !oldest.settle(block) {
            return None;
        }
        let mut done = queue.pop_front()?;
        if let (Some(e), Some(generation)) = (&done.failed, done.part_of) {
            unstored.record(generation, e);
        }
        if done.failed.is_some() {
            unwritten.contexts.append(&mut done.contexts);
            unwritten.revocations.append(&mut done.revocations);
        }
        if let Some(generation) = done.completes {
            if let Some(charged) = unstored.charge(generation) {
                done.failed.get_or_insert(charged);
            }
            let outcome = if done.failed.is_some() {
                "failed"
            } else {
                "stored"
            };
            metrics::counter!(crate::telemetry::ENGINE_CHECKPOINTS, "outcome" => outcome)
                .increment(1);
        }
        if !done.processed.is_empty() || !done.waiters.is_empty() || !done.forgotten.is_empty() {
            return Some(done);
        }
    }
}

/// What failed checkpoint chunks did not store, for the dirty sets again.
#[derive(Default)]
pub(super) struct Unwritten {
    contexts: Vec<String>,
    revocations: Vec<(String, String)>,
}

/// A batch applied in memory whose commit is in flight.
pub(super) struct Committing {
    /// The batch's grants, decisions and hand-off (ordinary lane).
    pub(super) writes: Vec<Result<PendingWrite<()>, WriteError>>,
    /// Cluster mode: the changelog's answer for the batch's rows (checkpoint included).
    pub(super) replicated: Option<oneshot::Receiver<Result<(), String>>>,
    /// The checkpoint the batch took, if any: its chunks (bulk lane) and what waits for them.
    pub(super) checkpoint: Option<Checkpointing>,
    /// The generation of the checkpoint that covers the signals this batch applied: the one it
    /// started, or else the next. If the batch's write fails, that checkpoint fails.
    pub(super) covers: u64,
    /// The delivery gate of the batch's decisions, when `announce` opens it (cluster mode, or a
    /// batch with nothing to write); otherwise the writer thread holds it.
    pub(super) gate: Option<Commit>,
    /// The decisions delivery gets once `announce` has opened the gate (none when the writer
    /// thread holds it: they were handed over at the commit).
    pub(super) handed: (Vec<ToHand>, Durable),
    pub(super) p: Pending,
}

/// A reply stands only if the batch it belongs to committed.
fn unless_failed<T>(
    failed: &Option<String>,
    unreplicated: bool,
    r: Result<T, EngineError>,
) -> Result<T, EngineError> {
    match failed {
        Some(e) if unreplicated => Err(EngineError::Unreplicated(e.clone())),
        Some(e) => Err(EngineError::Storage(e.clone())),
        None => r,
    }
}

/// Makes the audit records `written` answered durable; a failure is counted and logged, and
/// the batch goes on, as a failed append does: the decisions have taken effect in memory.
fn sync_audit(log: &crate::audit::AuditLog, written: Option<crate::audit::Written>) {
    if let Some(written) = written {
        if let Err(e) = log.sync_through(written) {
            audit_failed(&e);
        }
    }
}

fn audit_failed(e: &std::io::Error) {
    metrics::counter!(crate::telemetry::AUDIT_ERRORS).increment(1);
    tracing::error!(error = %e, "audit append failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint batch of `generation` whose own writes fail if `failing`, carrying a part of
    /// the checkpoint `part_of` (not its last) and the last part of `completes`.
    fn batch(
        generation: u64,
        failing: bool,
        part_of: Option<u64>,
        completes: Option<u64>,
        processed: Vec<u64>,
    ) -> Checkpointing {
        Checkpointing {
            generation,
            writes: if failing {
                vec![Err(WriteError::Storage("disk full".into()))]
            } else {
                Vec::new()
            },
            processed,
            waiters: Vec::new(),
            forgotten: Vec::new(),
            part_of,
            completes,
            contexts: Vec::new(),
            revocations: Vec::new(),
            failed: None,
        }
    }

    /// Settles every batch of `queue`, giving each answered one's signals and whether it failed.
    fn settle_all(queue: Vec<Checkpointing>, unstored: &mut Unstored) -> Vec<(Vec<u64>, bool)> {
        let mut queue = VecDeque::from(queue);
        let mut answered = Vec::new();
        while let Some(done) = settled(&mut queue, unstored, &mut Unwritten::default(), 0) {
            answered.push((done.processed, done.failed.is_some()));
        }
        assert!(queue.is_empty());
        answered
    }

    /// Small checkpoints go in parts of at least `CHECKPOINT_PART`; a large one in at most
    /// `CHECKPOINT_PARTS` parts.
    #[test]
    fn a_checkpoint_is_spread_over_at_most_four_batches() {
        assert_eq!(part_size(0), CHECKPOINT_PART);
        assert_eq!(part_size(300), CHECKPOINT_PART);
        assert_eq!(300_usize.div_ceil(part_size(300)), 3);
        assert_eq!(part_size(515), 129);
        assert_eq!(part_size(100_000), 25_000);
        assert!(100_001_usize.div_ceil(part_size(100_001)) <= CHECKPOINT_PARTS);
    }

    /// A part that failed to commit makes the checkpoint's last part fail too: its signals stay
    /// pending for replay instead of being marked processed over contexts that are not stored.
    #[test]
    fn a_failed_part_fails_the_checkpoint_it_belongs_to() {
        let mut unstored = Unstored::default();
        let answered = settle_all(
            vec![
                batch(1, true, Some(1), None, Vec::new()),
                batch(1, false, None, Some(1), vec![7]),
            ],
            &mut unstored,
        );
        assert_eq!(answered, [(vec![7], true)]);

        // The last part not queued yet: it fails when it comes.
        assert!(settle_all(
            vec![batch(2, true, Some(2), None, Vec::new())],
            &mut unstored
        )
        .is_empty());
        let answered = settle_all(vec![batch(2, false, None, Some(2), vec![8])], &mut unstored);
        assert_eq!(answered, [(vec![8], true)]);

        // Parts that committed hand nothing on.
        let answered = settle_all(
            vec![
                batch(3, false, Some(3), None, Vec::new()),
                batch(3, false, None, Some(3), vec![9]),
            ],
            &mut unstored,
        );
        assert_eq!(answered, [(vec![9], false)]);
    }

    /// A batch whose write failed after checkpoint 1 started has its signals covered by
    /// checkpoint 2. Checkpoint 1, still draining then, stores its parts and succeeds; checkpoint
    /// 2 fails. (Charged to the next checkpoint batch announced, the failure was taken by 1's
    /// last part, and 2 marked the failed batch's signals processed.)
    #[test]
    fn a_failed_batch_fails_the_checkpoint_covering_it_not_the_one_draining() {
        let mut unstored = Unstored::default();
        unstored.record(2, "disk full");
        let answered = settle_all(
            vec![
                batch(1, false, Some(1), None, Vec::new()),
                batch(1, false, None, Some(1), vec![5]),
            ],
            &mut unstored,
        );
        assert_eq!(answered, [(vec![5], false)]);
        let answered = settle_all(vec![batch(2, false, None, Some(2), vec![6])], &mut unstored);
        assert_eq!(answered, [(vec![6], true)]);
    }

    /// A retention deletion settled between the failed batch and its checkpoint is answered and
    /// takes nothing: the checkpoint still fails.
    #[test]
    fn a_retention_deletion_does_not_take_a_failure_for_a_checkpoint() {
        let mut unstored = Unstored::default();
        unstored.record(4, "disk full");
        let mut deletion = batch(3, false, None, None, Vec::new());
        deletion.forgotten = vec!["email:x@example.com".to_owned()];
        let answered = settle_all(
            vec![deletion, batch(4, false, None, Some(4), vec![1])],
            &mut unstored,
        );
        assert_eq!(answered, [(Vec::new(), false), (vec![1], true)]);
    }

    /// A batch that completes checkpoint 1 and carries checkpoint 2's first part, failing,
    /// fails both.
    #[test]
    fn a_failed_batch_carrying_two_checkpoints_fails_both() {
        let mut unstored = Unstored::default();
        let answered = settle_all(
            vec![
                batch(2, true, Some(2), Some(1), vec![3]),
                batch(2, false, None, Some(2), vec![4]),
            ],
            &mut unstored,
        );
        assert_eq!(answered, [(vec![3], true), (vec![4], true)]);
        // Nothing is left for checkpoint 3.
        let answered = settle_all(vec![batch(3, false, None, Some(3), vec![5])], &mut unstored);
        assert_eq!(answered, [(vec![5], false)]);
    }
}
