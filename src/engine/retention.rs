//! Context retention: the context of a subject no grant refers to is forgotten once its newest
//! fact is older than [`EngineSettings::context_retention`](super::EngineSettings) (by event
//! time), and with it the links (aliases) that lead its identifiers to it. A principal that has
//! links but neither a context nor a grant (its grants ended before any signal named it) loses
//! its links once it has been so for a whole window, as the scans see it. Without this every
//! subject a transmitter ever named would stay in memory and on disk for good — a risk feed
//! scoring every account of an organisation fills both with subjects that never hold a grant
//! here. A subject that has a grant keeps its context and links as long as it has one, whatever
//! the age of its facts: what its grants are evaluated on never disappears under them.
//!
//! A thread of its own looks through the contexts and links every
//! [`context_scan_interval`](super::EngineSettings) and sends the principals it finds due to the
//! shards that own them ([`Msg::Forget`]), which look again — a grant registered or a signal
//! applied meanwhile keeps the principal — and delete them with their next commit (in cluster mode
//! the changelog gets the tombstones, and the alias topic those of the links). The scan costs the
//! shards nothing until a principal is due, and no shard's inbox waits behind a walk over a
//! million contexts, nor behind more than one chunk of what a scan found due ([`hand_out`]).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::commit::Pending;
use super::inbox::InboxSender;
use super::shard::Shard;
use super::{member_index, obo_index, principal_index, Msg, Shared};
use crate::context::PrincipalContext;
use crate::parts::in_parts;
use crate::principal::GRANT_MEMBERS;

/// Principals per [`Msg::Forget`], and so the most a shard has in flight. A wave of 200 000
/// forgotten 64 at a time kept signals within 11 ms of their usual latency, and ended sooner
/// than in chunks of 256, which held them up to 29 ms (`benches/retention_wave.rs`).
pub(super) const FORGET_CHUNK: usize = 64;

/// A principal the scan found past its retention, with the identifiers linked to it then.
pub(crate) struct Due {
    pub key: String,
    pub aliases: Vec<String>,
}

/// How often to scan for a retention window: ten times per window, so a principal outlives its
/// window by a tenth of it at most, and at most once a minute (a scan walks every context and
/// link) but at least every 100 ms.
pub fn scan_interval(window: Duration) -> Duration {
    (window / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Whether a grant refers to the context `key`: as its principal, one of its members (every member
/// is indexed), or the user an agent acts for.
fn referenced(shared: &Shared, key: &str) -> bool {
    shared.index.contains_key(principal_index(key).as_str())
        || shared.index.contains_key(obo_index(key).as_str())
        || GRANT_MEMBERS
            .iter()
            .any(|m| shared.index.contains_key(member_index(m, key).as_str()))
}

/// Whether `ctx`'s newest fact is older than the retention window at `now` (a context holding no
/// fact is). The window of a disabled or purged account is the longer of the two: forgotten, the
/// account would look enabled to a grant registered for it later — failing open.
fn stale(shared: &Shared, ctx: &PrincipalContext, now: f64) -> bool {
    let settings = &shared.settings;
    let window = if ctx.account_closed() {
        settings
            .context_retention
            .max(settings.disabled_account_retention)
    } else {
        settings.context_retention
    };
    let keep = window.as_secs_f64();
    ctx.last_event_time()
        .is_none_or(|newest| newest + keep < now)
}

/// Whether this instance owns `principal`: always on a single node; in cluster mode only the
/// partitions it holds (the alias table is the whole cluster's, and a link of a principal owned
/// elsewhere is for its owner to forget), and nothing before it knows which those are.
fn owned(shared: &Shared, principal: &str) -> bool {
    if shared.settings.changelog.is_none() {
        return true;
    }
    shared.owns.get().is_some_and(|owns| owns(principal))
}

/// The retention thread: a scan every interval until `stop` is dropped.
pub(super) fn run(shared: Arc<Shared>, inboxes: Vec<InboxSender>, stop: Receiver<()>) {
    let interval = shared.settings.context_scan_interval;
    let mut orphans = HashMap::new();
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let due = scan(&shared, &mut orphans);
        if !hand_out(due, &inboxes, &stop) {
            return;
        }
    }
}

/// How long the retention thread waits for a shard's answer before it looks whether it is told
/// to stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Hands the principals a scan found due to their shards a chunk at a time: a shard gets its next
/// chunk only once the last one's deletions are stored (each round waits for every shard that got
/// one). Everything that came due since the last scan is one wave — after a bulk import a window
/// ago, or a long downtime, most of the contexts. Sent at once, it queued ahead of every signal
/// behind it in the shards' inboxes, a batch (which counted a chunk as one message) took
/// hundreds of chunks into one commit, and the deletions filled the state writer's queue, which
/// the shards then waited on: signals behind a wave of 200 000 waited up to 12 s
/// (`benches/retention_wave.rs`). Now at most one chunk a shard is ahead of them, in memory or in
/// the writer. Returns whether to go on: `false` once `stop` says so or a shard is gone.
fn hand_out(due: Vec<Vec<Due>>, inboxes: &[InboxSender], stop: &Receiver<()>) -> bool {
    let mut chunks: Vec<_> = due
        .into_iter()
        .map(|due| in_parts(due, FORGET_CHUNK))
        .collect();
    loop {
        let (handled, answers) = std::sync::mpsc::channel();
        let mut sent = 0;
        for (inbox, chunks) in inboxes.iter().zip(&mut chunks) {
            if let Some(due) = chunks.next() {
                let handled = handled.clone();
                if inbox.send(Msg::Forget { due, handled }).is_err() {
                    return false;
                }
                sent += 1;
            }
        }
        drop(handled);
        if sent == 0 {
            return true;
        }
        let mut heard = 0;
        while heard < sent {
            match answers.recv_timeout(STOP_POLL) {
                Ok(()) => heard += 1,
                Err(RecvTimeoutError::Timeout) => {}
                // A chunk dropped unanswered: its shard has stopped.
                Err(RecvTimeoutError::Disconnected) => return false,
            }
            if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
                return false;
            }
        }
    }
}

/// The principals due to be forgotten, per owning shard, each with its links. The contexts are
/// only snapshotted (an `Arc` each) while the map's locks are held, so a shard updating one waits
/// for a pointer copy, not for every fact of a segment's contexts to be read; ages and grant
/// references are read after, with no lock of the contexts held.
///
/// The walk over the links holds each segment of the alias map while it reads it, and a shard that
/// links a new identifier in that segment waits for it, with everything behind it in its inbox.
/// So the map has many segments ([`super::ALIAS_SEGMENTS`]), and the walk looks only at what is
/// its own — the due set, the snapshot's keys — where it used to look each link's principal up in
/// the contexts' map (in cluster mode the ownership look-up still takes its own short lock). A
/// context made after the snapshot makes its principal look contextless here; that only starts
/// the window it must then stay contextless for, and the shard looks again before it forgets.
///
/// `orphans` carries from scan to scan the principals seen with links but neither a context nor
/// a grant, and since when (by the injected clock): their links go once that is a window ago.
fn scan(shared: &Shared, orphans: &mut HashMap<String, f64>) -> Vec<Vec<Due>> {
    let started = std::time::Instant::now();
    let now = shared.settings.clock.now();
    let contexts: Vec<Arc<PrincipalContext>> =
        shared.contexts.iter().map(|c| c.value().clone()).collect();
    metrics::gauge!(crate::telemetry::CONTEXTS).set(contexts.len() as f64);
    let mut due: HashMap<String, Vec<String>> = HashMap::new();
    for ctx in &contexts {
        if stale(shared, ctx, now) && !referenced(shared, &ctx.key) {
            due.insert(ctx.key.clone(), Vec::new());
        }
    }
    let with_context: HashSet<&str> = contexts.iter().map(|c| c.key.as_str()).collect();
    // One pass over the links: those of a due context go with it; those of an owned principal
    // without a context are looked at below.
    let mut contextless: HashMap<String, Vec<String>> = HashMap::new();
    for link in shared.aliases.iter() {
        let (alias, principal) = (link.key(), link.value());
        if let Some(aliases) = due.get_mut(principal) {
            aliases.push(alias.clone());
        } else if !with_context.contains(principal.as_str()) && owned(shared, principal) {
            contextless
                .entry(principal.clone())
                .or_default()
                .push(alias.clone());
        }
    }
    drop(with_context);
    drop(contexts);
    let keep = shared.settings.context_retention.as_secs_f64();
    let mut still = HashMap::new();
    for (principal, aliases) in contextless {
        if referenced(shared, &principal) {
            continue;
        }
        let since = orphans.get(&principal).copied().unwrap_or(now);
        if since + keep < now {
            due.insert(principal, aliases);
        } else {
            still.insert(principal, since);
        }
    }
    *orphans = still;
    let mut per_shard: Vec<Vec<Due>> = (0..shared.settings.shards.max(1))
        .map(|_| Vec::new())
        .collect();
    for (key, aliases) in due {
        per_shard[shared.shard_of(&key)].push(Due { key, aliases });
    }
    metrics::histogram!(crate::telemetry::CONTEXT_SCAN_SECONDS)
        .record(started.elapsed().as_secs_f64());
    per_shard
}

impl Shard {
    /// Forgets the principal `due` names if it is still due — no grant refers to it, its context
    /// (if it has one) is still past the window, and no write of it is waiting (a context changed
    /// since the scan is not stale any more; one that is part of this batch's writes stays for the
    /// next scan) — with the links the scan found that still lead to it.
    pub(super) fn forget(&mut self, due: Due, p: &mut Pending) {
        let key = due.key.as_str();
        if referenced(&self.shared, key)
            || self.dirty.contains(key)
            || p.decided.contains(key)
            || self.dirty_revocations.iter().any(|(c, _)| c == key)
            || self.draining.as_ref().is_some_and(|d| d.holds(key))
            || p.revocations.iter().any(|(c, _)| c == key)
            || self.fold.holds_context(key)
        {
            return;
        }
        if let Some(ctx) = self.shared.contexts.get(key).map(|c| c.clone()) {
            let now = self.shared.settings.clock.now();
            if !stale(&self.shared, &ctx, now) {
                return;
            }
            self.shared.contexts.remove(key);
            p.changes.revocations.extend(
                ctx.session_revocations
                    .keys()
                    .map(|filter| (format!("{key}\0{filter}"), None)),
            );
            p.changes.deleted_contexts.push(key.to_owned());
            metrics::counter!(crate::telemetry::CONTEXTS_FORGOTTEN).increment(1);
        }
        let mut forgotten = 0;
        for alias in due.aliases {
            if self
                .shared
                .aliases
                .remove_if(&alias, |_, principal| principal == key)
                .is_some()
            {
                // A link still waiting for its checkpoint is not written after its deletion.
                if self.dirty_aliases.get(&alias).is_some_and(|p| p == key) {
                    self.dirty_aliases.remove(&alias);
                }
                if let Some(draining) = &mut self.draining {
                    draining.unlink(&alias, key);
                }
                p.changes.deleted_aliases.push((alias, key.to_owned()));
                forgotten += 1;
            }
        }
        if forgotten > 0 {
            metrics::counter!(crate::telemetry::ALIASES_FORGOTTEN).increment(forgotten);
            metrics::gauge!(crate::telemetry::ALIASES).set(self.shared.aliases.len() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::inbox::{inbox, Bulk, Inbox};
    use super::*;
    use std::sync::mpsc::channel;
    use std::sync::mpsc::Sender;

    fn due(n: usize, tag: &str) -> Vec<Due> {
        (0..n)
            .map(|i| Due {
                key: format!("{tag}-{i}"),
                aliases: Vec::new(),
            })
            .collect()
    }

    /// The chunk a shard was sent, and the sender it answers on once the deletions are stored.
    fn taken(inbox: &Inbox) -> (usize, Sender<()>) {
        let mut taken = inbox
            .take_within(1, Bulk::Take, Duration::from_secs(5))
            .unwrap();
        assert!(taken.len() <= 1, "more than one message taken");
        match taken.pop() {
            Some(Msg::Forget { due, handled }) => (due.len(), handled),
            Some(_) => panic!("a message other than Forget"),
            None => panic!("no chunk came"),
        }
    }

    /// Whether anything reaches `inbox` within 50 ms: a chunk sent too early is sent at once.
    fn quiet(inbox: &Inbox) -> bool {
        std::thread::sleep(Duration::from_millis(50));
        // Disconnected (the sender is gone) is quiet too.
        inbox
            .take(1, Bulk::Take)
            .map_or(true, |taken| taken.is_empty())
    }

    /// A wave reaches each shard a chunk at a time: the next only once the shard has answered
    /// for the last, and a round waits for every shard in it.
    #[test]
    fn a_wave_reaches_each_shard_a_chunk_at_a_time() {
        let (to_0, inbox_0) = inbox();
        let (to_1, inbox_1) = inbox();
        let (_stop, stop) = channel();
        let wave = vec![due(2 * FORGET_CHUNK + 1, "a"), due(FORGET_CHUNK, "b")];
        let handing = std::thread::spawn(move || hand_out(wave, &[to_0, to_1], &stop));

        let (n0, handled_0) = taken(&inbox_0);
        let (n1, handled_1) = taken(&inbox_1);
        assert_eq!((n0, n1), (FORGET_CHUNK, FORGET_CHUNK));
        assert!(
            quiet(&inbox_0) && quiet(&inbox_1),
            "a chunk sent before the last was answered"
        );
        handled_1.send(()).unwrap();
        assert!(
            quiet(&inbox_0),
            "the round did not wait for its other shard"
        );
        handled_0.send(()).unwrap();

        let (n0, handled_0) = taken(&inbox_0);
        assert_eq!(n0, FORGET_CHUNK);
        assert!(quiet(&inbox_0) && quiet(&inbox_1));
        handled_0.send(()).unwrap();
        let (n0, handled_0) = taken(&inbox_0);
        assert_eq!(n0, 1, "the wave's last principal");
        handled_0.send(()).unwrap();
        assert!(
            handing.join().unwrap(),
            "a wave handed out whole goes on to the next scan"
        );
        assert!(quiet(&inbox_0) && quiet(&inbox_1));
    }

    /// Waiting for a shard ends when the thread is told to stop, or when the shard is gone.
    #[test]
    fn a_wave_ends_on_stop_or_when_a_shard_is_gone() {
        let (to_shard, inbox) = super::super::inbox::inbox();
        let (stop_tx, stop) = channel();
        let handing = std::thread::spawn(move || hand_out(vec![due(3, "a")], &[to_shard], &stop));
        let (_, _unanswered) = taken(&inbox);
        stop_tx.send(()).unwrap();
        assert!(!handing.join().unwrap(), "went on after stop");

        let (to_shard, inbox) = super::super::inbox::inbox();
        let (_stop, stop) = channel();
        let handing = std::thread::spawn(move || hand_out(vec![due(3, "a")], &[to_shard], &stop));
        // The shard's thread ends with the chunk unanswered in its inbox.
        let _ = taken(&inbox);
        drop(inbox);
        assert!(!handing.join().unwrap(), "went on without its shard");
    }

    /// Ten scans per window, never more often than every 100 ms nor less often than a minute.
    #[test]
    fn a_window_is_scanned_ten_times_within_bounds() {
        let secs = Duration::from_secs;
        assert_eq!(scan_interval(secs(5)), Duration::from_millis(500));
        assert_eq!(scan_interval(secs(300)), secs(30));
        assert_eq!(scan_interval(secs(30 * 24 * 3600)), secs(60));
        assert_eq!(scan_interval(secs(1) / 2), Duration::from_millis(100));
    }
}
