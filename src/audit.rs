//! The audit log: every decision appended as one JSON line to `<data_dir>/audit/audit-NNNNNN.jsonl`,
//! fsynced before the state change it describes is committed, so the log never misses a decision
//! that took effect. Files rotate at `max_bytes`; the newest `keep` files are kept. Queries scan
//! the files. Access-request decisions are kept apart, a log per API client ([`AccessLogs`]).
//!
//! Each decision is in the log once. A crash between a decision's append and its state commit
//! makes the restarted engine replay the signal and make the same decision again, with the same
//! deterministic id; the log remembers the ids in its tail at open ([`RECOVERY_TAIL_BYTES`]: what
//! a replay can re-make is what the killed process wrote last) and does not append them again.
//! Queries also collapse repeated ids, for logs written by releases before this rule.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::decision::{Decision, DecisionEffect};
use crate::grant::GrantStatus;

/// A query over the audit log. Absent filters match everything.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    pub subject: Option<String>,
    pub grant: Option<String>,
    /// Decisions made at or after this time (seconds).
    pub since: Option<f64>,
    /// Decisions made before this time (seconds).
    pub until: Option<f64>,
    /// Made under this policy set version.
    pub policy_version: Option<String>,
    /// Whose cause is of this kind (`signal`, `registration`, `policy_swap`, `dependency`).
    pub cause: Option<String>,
    /// Whose deciding rules include this one.
    pub rule: Option<String>,
    /// That left the grant in this status.
    pub status: Option<GrantStatus>,
    /// With this effect.
    pub effect: Option<DecisionEffect>,
    /// Most decisions returned (the newest); 0 for [`DecisionQuery::DEFAULT_LIMIT`].
    pub limit: usize,
}

impl DecisionQuery {
    /// How many a query without a `limit` returns.
    pub const DEFAULT_LIMIT: usize = 1000;

    /// The most decisions the query returns.
    pub fn limit(&self) -> usize {
        if self.limit == 0 {
            DecisionQuery::DEFAULT_LIMIT
        } else {
            self.limit
        }
    }

    /// Whether `d` passes every filter given.
    pub fn matches(&self, d: &Decision) -> bool {
        self.subject.as_ref().is_none_or(|s| &d.subject == s)
            && self.grant.as_ref().is_none_or(|g| &d.grant_id == g)
            && self.since.is_none_or(|t| d.time >= t)
            && self.until.is_none_or(|t| d.time < t)
            && self
                .policy_version
                .as_ref()
                .is_none_or(|v| &d.policy_version == v)
            && self.cause.as_ref().is_none_or(|c| &d.cause.kind == c)
            && self.rule.as_ref().is_none_or(|r| d.rules.contains(r))
            && self.status.is_none_or(|s| d.status == s)
            && self.effect.is_none_or(|e| d.effect == e)
    }
}

struct Current {
    /// Shared, so [`AuditLog::sync_through`] syncs it without holding the lock writes take.
    file: Arc<File>,
    index: u64,
    size: u64,
    /// Bytes of this file known to be on disk.
    synced: u64,
}

impl Current {
    fn open(dir: &Path, index: u64) -> std::io::Result<Current> {
        let (file, size) = open_append(dir, index)?;
        Ok(Current {
            file: Arc::new(file),
            index,
            size,
            synced: size,
        })
    }

    /// Writes `bytes` at the file's end, not synced.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (&*self.file).write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Syncs what is written of this file, if anything is not yet.
    fn sync(&mut self) -> std::io::Result<()> {
        if self.synced < self.size {
            self.file.sync_data()?;
            self.synced = self.size;
        }
        Ok(())
    }

    /// Syncs this file and goes on in the next one.
    fn rotate(&mut self, dir: &Path) -> std::io::Result<()> {
        self.sync()?;
        *self = Current::open(dir, self.index + 1)?;
        Ok(())
    }
}

/// How far a log was written by [`AuditLog::write_encoded`]: what [`AuditLog::sync_through`]
/// makes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    index: u64,
    size: u64,
}

/// How much of the log's end is read at open for the ids a replay may make again.
pub const RECOVERY_TAIL_BYTES: u64 = 32 * 1024 * 1024;

/// The append-only decision log.
pub struct AuditLog {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// Rotated files whose last write is older than this are dropped (`audit.max_age_secs`).
    max_age: Option<std::time::Duration>,
    /// When aged files were last looked for (monotonic: pacing, not a record's time).
    aged_checked: Mutex<std::time::Instant>,
    current: Mutex<Current>,
    /// Ids of the decisions at the log's end when it was opened (bounded by
    /// `RECOVERY_TAIL_BYTES`): a decision replay makes again is not appended twice.
    before_start: HashSet<String>,
    /// This log's own name, kept in `<dir>/origin`: in cluster mode the decisions it made carry it
    /// on the decisions topic, so that its copier does not write them into it twice.
    origin: String,
}

impl AuditLog {
    pub fn open(dir: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        AuditLog::open_reading_tail(dir, max_bytes, keep, RECOVERY_TAIL_BYTES)
    }

    /// [`AuditLog::open`], remembering the ids in the last `tail` bytes (none for a log of
    /// decisions no replay makes again: access requests).
    fn open_reading_tail(
        dir: &Path,
        max_bytes: u64,
        keep: usize,
        tail: u64,
    ) -> std::io::Result<AuditLog> {
        crate::store::private_dir(dir)?;
        let index = list_files(dir)?.last().map_or(1, |(i, _)| *i);
        let current = Current::open(dir, index)?;
        let before_start = tail_ids(dir, tail)?;
        let origin = origin_of(dir)?;
        Ok(AuditLog {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(1024),
            keep: keep.max(1),
            max_age: None,
            aged_checked: Mutex::new(std::time::Instant::now()),
            current: Mutex::new(current),
            before_start,
            origin,
        })
    }

    /// Drops rotated files last written more than `max_age` ago (checked at open, at each
    /// rotation and at most once a minute as decisions are appended). The file being written is
    /// bounded by `max_bytes` and goes once rotated, or once it is that old itself
    /// ([`AuditLog::expire_aged`]).
    pub fn with_max_age(mut self, max_age: std::time::Duration) -> std::io::Result<AuditLog> {
        self.max_age = Some(max_age);
        self.prune()?;
        Ok(self)
    }

    /// The log's own name (random, made when the directory was; a new directory is a new log).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The log's directory (cluster mode keeps its copier's read positions there, beside what
    /// they describe).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends decisions and syncs them to disk. A file is rotated between two records whenever
    /// the next would take it past `max_bytes`, within a batch too: written whole, a batch larger
    /// than a file (a flood of access requests queued while the writer was busy) made one file
    /// as large as the batch, and the log's bound was the flood's size.
    pub fn append(&self, decisions: &[Decision]) -> std::io::Result<()> {
        let json = decisions
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()?;
        self.append_encoded(
            decisions
                .iter()
                .zip(&json)
                .map(|(d, json)| (d.id.as_str(), json.as_slice())),
        )
    }

    /// [`AuditLog::append`] of decisions already serialized, each with its id: the engine
    /// serializes a batch's decisions once, for this log and for their hand-offs.
    pub fn append_encoded<'a>(
        &self,
        decisions: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
    ) -> std::io::Result<()> {
        match self.write_encoded(decisions)? {
            Some(written) => self.sync_through(written),
            None => Ok(()),
        }
    }

    /// [`AuditLog::append_encoded`] without the sync: what it wrote is durable once
    /// [`AuditLog::sync_through`] is called with the answer (`None`: nothing was written). The
    /// engine writes a batch's decisions on its shard thread and syncs them on the state
    /// writer's, just before the commit that makes them take effect: a shard does not wait for a
    /// sync of its own, and one sync covers every batch written before it.
    pub fn write_encoded<'a>(
        &self,
        decisions: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
    ) -> std::io::Result<Option<Written>> {
        if decisions.len() == 0 {
            return Ok(None);
        }
        // The records one after another, and where each ends.
        let mut buf = Vec::new();
        let mut ends = Vec::with_capacity(decisions.len());
        for (id, json) in decisions {
            if self.before_start.contains(id) {
                // Made again by a replay after a crash: already in the log.
                metrics::counter!(crate::telemetry::AUDIT_REPEATS_SKIPPED).increment(1);
                continue;
            }
            buf.extend_from_slice(json);
            buf.push(b'\n');
            ends.push(buf.len());
        }
        if buf.is_empty() {
            return Ok(None);
        }
        let mut cur = self
            .current
            .lock()
            .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
        // `buf[written..end]` goes to the current file; it is written out when the next record
        // would take the file past `max_bytes`, and a new file is opened.
        let (mut written, mut end) = (0, 0);
        for next in ends {
            let size = cur.size + (end - written) as u64;
            if size > 0 && size + (next - end) as u64 > self.max_bytes {
                cur.write(&buf[written..end])?;
                written = end;
                cur.rotate(&self.dir)?;
                self.prune()?;
            }
            end = next;
        }
        cur.write(&buf[written..end])?;
        let at = Written {
            index: cur.index,
            size: cur.size,
        };
        drop(cur);
        if self.max_age.is_some() {
            let due = {
                let mut checked = self
                    .aged_checked
                    .lock()
                    .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
                let due = checked.elapsed() >= AGE_SWEEP;
                if due {
                    *checked = std::time::Instant::now();
                }
                due
            };
            if due {
                self.prune()?;
            }
        }
        Ok(Some(at))
    }

    /// Makes what [`AuditLog::write_encoded`] answered `written` for durable, if no sync since
    /// did. The sync runs outside the lock, so writes go on meanwhile. A file rotated since was
    /// synced whole before the next was opened.
    pub fn sync_through(&self, written: Written) -> std::io::Result<()> {
        let file = {
            let cur = self
                .current
                .lock()
                .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
            if cur.index != written.index || cur.synced >= written.size {
                return Ok(());
            }
            cur.file.clone()
        };
        file.sync_data()?;
        let mut cur = self
            .current
            .lock()
            .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
        if cur.index == written.index {
            cur.synced = cur.synced.max(written.size);
        }
        Ok(())
    }

    /// Whether everything written is synced (tests of the engine's commit order).
    #[cfg(test)]
    pub(crate) fn synced_to_end(&self) -> bool {
        self.current.lock().is_ok_and(|cur| cur.synced == cur.size)
    }

    /// Holds `max_age` for a log nobody appends to: the age check above runs only as decisions
    /// are appended, and the file being written is never dropped by it, so an idle log — a
    /// client that stopped asking, an instance that decides nothing — kept records past their age
    /// until the next start. Now a sweep calls this: a file being written whose last write is
    /// older than `max_age` holds only records that old, so a fresh file takes its place and it
    /// goes with the aged rotated ones. A no-op without `max_age`.
    pub fn expire_aged(&self) -> std::io::Result<()> {
        let Some(max_age) = self.max_age else {
            return Ok(());
        };
        let mut cur = self
            .current
            .lock()
            .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
        let aged = cur.size > 0
            && cur
                .file
                .metadata()?
                .modified()?
                .elapsed()
                .is_ok_and(|age| age > max_age);
        if aged {
            cur.rotate(&self.dir)?;
        }
        drop(cur);
        self.prune()
    }

    /// Drops the oldest files beyond `keep`, and rotated files older than `max_age`.
    fn prune(&self) -> std::io::Result<()> {
        let files = list_files(&self.dir)?;
        let over = files.len().saturating_sub(self.keep);
        // The newest file is the one being written: never dropped here.
        for (i, (_, path)) in files.iter().enumerate().take(files.len().saturating_sub(1)) {
            let aged = match self.max_age {
                Some(max_age) => std::fs::metadata(path)?
                    .modified()?
                    .elapsed()
                    .is_ok_and(|age| age > max_age),
                None => false,
            };
            if i < over || aged {
                std::fs::remove_file(path)?;
                metrics::counter!(crate::telemetry::AUDIT_FILES_DROPPED).increment(1);
            }
        }
        Ok(())
    }

    /// The newest decisions matching `q`, oldest first. Files are read newest first and the
    /// read stops once `limit` matches are found, so memory is bounded by `limit` whatever the
    /// log's size.
    pub fn query(&self, q: &DecisionQuery) -> std::io::Result<Vec<Decision>> {
        let limit = q.limit();
        let mut out: VecDeque<Decision> = VecDeque::new();
        // Ids already in `out` (newer files first): an older copy of one is not listed again.
        let mut seen: HashSet<String> = HashSet::new();
        for (_, path) in list_files(&self.dir)?.into_iter().rev() {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // rotated away
                Err(e) => return Err(e),
            };
            // This file's newest matches, at most as many as are still wanted, each id once.
            let room = limit - out.len();
            let mut newest: VecDeque<Decision> = VecDeque::new();
            let mut in_window: HashSet<String> = HashSet::new();
            for line in BufReader::new(file).lines() {
                let line = line?;
                let Ok(d) = serde_json::from_str::<Decision>(&line) else {
                    continue; // a torn last line after a crash
                };
                let keep = q.matches(&d);
                if keep && !seen.contains(&d.id) && in_window.insert(d.id.clone()) {
                    if newest.len() == room {
                        if let Some(old) = newest.pop_front() {
                            in_window.remove(&old.id);
                        }
                    }
                    newest.push_back(d);
                }
            }
            for d in newest.into_iter().rev() {
                seen.insert(d.id.clone());
                out.push_front(d);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out.into())
    }
}

/// Access-request decisions (AuthZEN), one log per API client under `<audit dir>/access/<client>/`,
/// each bounded on its own (`audit.access_max_file_bytes` × `audit.access_keep_files`, and
/// `audit.max_age_secs`). In the decision log they shared its bound with every revocation: a
/// client that asked for many evaluations rotated the revocations, and other clients' access
/// records, out of it. Now it rotates out only its own access records. Clients are the
/// configured ones, so the logs are bounded in number too.
pub struct AccessLogs {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    max_age: std::time::Duration,
    logs: Mutex<std::collections::HashMap<String, std::sync::Arc<AuditLog>>>,
}

impl AccessLogs {
    /// Opens `dir` and every client's log already in it (rotated files past `max_age` go now).
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        keep: usize,
        max_age: std::time::Duration,
    ) -> std::io::Result<AccessLogs> {
        crate::store::private_dir(dir)?;
        let logs = AccessLogs {
            dir: dir.to_owned(),
            max_bytes,
            keep,
            max_age,
            logs: Mutex::new(std::collections::HashMap::new()),
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                if let Some(name) = entry.file_name().to_str() {
                    logs.open_client(name)?;
                }
            }
        }
        Ok(logs)
    }

    /// The log of the client whose directory is `dir_name`, opened once.
    fn open_client(&self, dir_name: &str) -> std::io::Result<std::sync::Arc<AuditLog>> {
        let mut logs = self
            .logs
            .lock()
            .map_err(|_| std::io::Error::other("access logs lock poisoned"))?;
        if let Some(log) = logs.get(dir_name) {
            return Ok(log.clone());
        }
        let log = std::sync::Arc::new(
            // An access decision is never made again by a replay: no tail to read at start.
            AuditLog::open_reading_tail(&self.dir.join(dir_name), self.max_bytes, self.keep, 0)?
                .with_max_age(self.max_age)?,
        );
        logs.insert(dir_name.to_owned(), log.clone());
        Ok(log)
    }

    /// Appends `client`'s decisions to its log and syncs them.
    pub fn append(&self, client: &str, decisions: &[Decision]) -> std::io::Result<()> {
        self.open_client(&dir_name(client))?.append(decisions)
    }

    /// [`AuditLog::expire_aged`] for every client's log.
    pub fn expire_aged(&self) -> std::io::Result<()> {
        self.every_log()?
            .iter()
            .try_for_each(|log| log.expire_aged())
    }

    /// Every client's log open now, taken out of the lock (reading one takes file I/O).
    fn every_log(&self) -> std::io::Result<Vec<std::sync::Arc<AuditLog>>> {
        Ok(self
            .logs
            .lock()
            .map_err(|_| std::io::Error::other("access logs lock poisoned"))?
            .values()
            .cloned()
            .collect())
    }

    /// The newest decisions matching `q` across every client's log, oldest first.
    pub fn query(&self, q: &DecisionQuery) -> std::io::Result<Vec<Decision>> {
        let mut all = Vec::new();
        for log in self.every_log()? {
            all.extend(log.query(q)?);
        }
        Ok(newest(all, q.limit()))
    }
}

/// How often the age bound is looked at: by appending, at most, and by [`expire_aged_every`].
pub const AGE_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs [`AuditLog::expire_aged`] on the decision log and every client's access log each `every`
/// until shutdown, off the async workers (it reads file times and may remove files).
pub async fn expire_aged_every(
    decisions: std::sync::Arc<AuditLog>,
    access: std::sync::Arc<AccessLogs>,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let (d, a) = (decisions.clone(), access.clone());
        let swept =
            tokio::task::spawn_blocking(move || d.expire_aged().and_then(|()| a.expire_aged()))
                .await;
        if let Ok(Err(e)) = swept {
            tracing::warn!(error = %e, "aged audit files not dropped; trying again later");
        }
    }
}

/// `decisions` ordered by time, the newest `limit` of them.
pub fn newest(mut decisions: Vec<Decision>, limit: usize) -> Vec<Decision> {
    decisions.sort_by(|a, b| a.time.total_cmp(&b.time));
    let over = decisions.len().saturating_sub(limit);
    decisions.split_off(over)
}

/// A client's name as a directory name: letters, digits, `-` and `_` kept, every other byte as
/// `%XX` (so `client:gw-1` is `client%3Agw-1`, and no name is `.`, `..` or holds a `/`).
fn dir_name(client: &str) -> String {
    let mut out = String::with_capacity(client.len());
    for b in client.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// The log's name in `<dir>/origin`, made if missing.
fn origin_of(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("origin");
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => return Ok(name.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes: [u8; 16] = rand::random();
    let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &name)?;
    crate::store::private_file(&path)?;
    Ok(name)
}

fn open_append(dir: &Path, index: u64) -> std::io::Result<(File, u64)> {
    let path = dir.join(format!("audit-{index:06}.jsonl"));
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    // Decisions name subjects and grants: the owner's alone.
    crate::store::private_file(&path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// The decision ids in the last `budget` bytes of the log (newest files first).
fn tail_ids(dir: &Path, budget: u64) -> std::io::Result<HashSet<String>> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    let mut ids = HashSet::new();
    let mut left = budget;
    for (_, path) in list_files(dir)?.into_iter().rev() {
        if left == 0 {
            break;
        }
        let mut file = File::open(&path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(left);
        left = left.saturating_sub(len);
        file.seek(SeekFrom::Start(start))?;
        let mut lines = BufReader::new(file).lines();
        if start > 0 {
            let _ = lines.next(); // a partial first line
        }
        for line in lines {
            if let Ok(d) = serde_json::from_str::<Id>(&line?) {
                ids.insert(d.id);
            }
        }
    }
    Ok(ids)
}

fn list_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name
                .strip_prefix("audit-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((index, e.path()))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Cause, DecisionEffect};
    use crate::grant::GrantStatus;

    fn decision(grant: &str, subject: &str, time: f64) -> Decision {
        Decision {
            id: format!("{grant}-{time}"),
            time,
            grant_id: grant.into(),
            subject: subject.into(),
            effect: DecisionEffect::Revoke,
            previous_status: GrantStatus::Active,
            status: GrantStatus::Revoked,
            rules: vec!["r".into()],
            reason: "x".repeat(100),
            errors: vec![],
            shadow: false,
            policy_version: "v".into(),
            context_version: 1,
            cause: Cause {
                kind: "signal".into(),
                seq: Some(1),
                jti: None,
                txn: None,
                source: None,
                event_type: None,
                event_time: None,
            },
            enforcement_points: vec![],
            hops: Vec::new(),
        }
    }

    /// One batch larger than a file is spread over files at most `max_bytes` each, and only the
    /// newest `keep` stay: the bound holds however many records one append brings.
    #[test]
    fn a_batch_larger_than_a_file_is_rotated_between_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1024, 2).unwrap();
        let batch: Vec<Decision> = (0..100)
            .map(|i| decision(&format!("g{i}"), "flood", i as f64))
            .collect();
        log.append(&batch).unwrap();
        let files = list_files(dir.path()).unwrap();
        assert_eq!(files.len(), 2, "older files pruned");
        for (_, path) in &files {
            let size = std::fs::metadata(path).unwrap().len();
            assert!(size <= 1024, "{path:?} holds {size} bytes");
        }
        let kept = log.query(&DecisionQuery::default()).unwrap();
        assert!(kept.len() < 20, "{} of 100 kept", kept.len());
        assert_eq!(kept.last().unwrap().grant_id, "g99", "the newest are kept");
    }

    /// The file being written: its index, its bytes and how many of them are synced.
    fn sync_state(log: &AuditLog) -> (u64, u64, u64) {
        let cur = log.current.lock().unwrap();
        (cur.index, cur.size, cur.synced)
    }

    /// [`AuditLog::write_encoded`] of `decisions`, each serialized as the engine does.
    fn write(log: &AuditLog, decisions: &[Decision]) -> Option<Written> {
        let rows: Vec<(String, Vec<u8>)> = decisions
            .iter()
            .map(|d| (d.id.clone(), serde_json::to_vec(d).unwrap()))
            .collect();
        log.write_encoded(rows.iter().map(|(id, j)| (id.as_str(), j.as_slice())))
            .unwrap()
    }

    /// Records written without a sync are in the log at once (listed, and whole in the file),
    /// unsynced until `sync_through`; a second sync through the same point, or through a point
    /// an earlier sync covered, syncs nothing more; and a rotation syncs the file it leaves, so
    /// a sync through a point in it has nothing left to do.
    #[test]
    fn written_records_are_synced_through_a_point_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 4096, 10).unwrap();
        let first = write(&log, &[decision("g1", "s", 1.0), decision("g2", "s", 2.0)]).unwrap();
        let (index, size, synced) = sync_state(&log);
        assert_eq!((index, synced), (first.index, 0), "written, not synced");
        assert_eq!(size, first.size);
        assert_eq!(log.query(&DecisionQuery::default()).unwrap().len(), 2);
        let second = write(&log, &[decision("g3", "s", 3.0)]).unwrap();
        assert!(second.size > first.size);
        // One sync covers what was written before it.
        log.sync_through(second).unwrap();
        assert_eq!(sync_state(&log).2, second.size);
        log.sync_through(first).unwrap();
        assert_eq!(
            sync_state(&log).2,
            second.size,
            "an earlier point is covered"
        );
        // Nothing written: nothing to sync.
        assert_eq!(write(&log, &[]), None);

        // Written up to a rotation: the file left is synced whole by the rotation.
        let mut last = second;
        let mut i = 4;
        while sync_state(&log).0 == first.index {
            last = write(&log, &[decision(&format!("g{i}"), "s", i as f64)]).unwrap();
            i += 1;
        }
        let (index, size, synced) = sync_state(&log);
        assert_eq!(last.index, index, "the last record opened the next file");
        assert_eq!(synced, 0, "the next file's record is not synced yet");
        let left = std::fs::metadata(&list_files(dir.path()).unwrap()[0].1)
            .unwrap()
            .len();
        assert!(left > second.size && left <= 4096, "{left}");
        // A point in the file left needs no sync; one in the new file does.
        log.sync_through(Written {
            index: first.index,
            size: left,
        })
        .unwrap();
        assert_eq!(sync_state(&log).2, 0);
        log.sync_through(last).unwrap();
        assert_eq!(sync_state(&log).2, size);
        assert_eq!(
            log.query(&DecisionQuery::default()).unwrap().len(),
            i - 1,
            "every record written is listed"
        );
    }

    #[test]
    fn appends_rotates_prunes_and_queries() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 2048, 3).unwrap();
        for i in 0..100 {
            let subject = if i % 2 == 0 { "even" } else { "odd" };
            log.append(&[decision(&format!("g{i}"), subject, i as f64)])
                .unwrap();
        }
        let files = list_files(dir.path()).unwrap();
        assert_eq!(files.len(), 3, "older files pruned");
        let all = log.query(&DecisionQuery::default()).unwrap();
        assert!(!all.is_empty() && all.len() < 100);
        assert_eq!(all.last().unwrap().grant_id, "g99");
        let odd = log
            .query(&DecisionQuery {
                subject: Some("odd".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(odd.iter().all(|d| d.subject == "odd"));
        let one = log
            .query(&DecisionQuery {
                grant: Some("g98".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one.len(), 1);
        let recent = log
            .query(&DecisionQuery {
                since: Some(97.0),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(recent.len(), 3);
        let limited = log
            .query(&DecisionQuery {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            limited
                .iter()
                .map(|d| d.grant_id.clone())
                .collect::<Vec<_>>(),
            vec!["g98", "g99"]
        );
        // Reopening continues the newest file.
        drop(log);
        let log = AuditLog::open(dir.path(), 2048, 3).unwrap();
        log.append(&[decision("g100", "even", 100.0)]).unwrap();
        assert_eq!(
            log.query(&DecisionQuery {
                grant: Some("g100".into()),
                ..Default::default()
            })
            .unwrap()
            .len(),
            1
        );
    }

    /// Sets `path`'s last write two days back: older than the tests' one-day age bound.
    fn last_written_two_days_ago(path: &Path) {
        std::fs::File::options()
            .append(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400))
            .unwrap();
    }

    /// Rotated files last written before `max_age` go; the file being written stays.
    #[test]
    fn rotated_files_older_than_the_age_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 2048, 100).unwrap();
        for i in 0..40 {
            log.append(&[decision(&format!("g{i}"), "s", i as f64)])
                .unwrap();
        }
        let files = list_files(dir.path()).unwrap();
        assert!(files.len() >= 3, "{} files", files.len());
        // The two oldest were last written two days ago.
        for (_, path) in &files[..2] {
            last_written_two_days_ago(path);
        }
        drop(log);
        let log = AuditLog::open(dir.path(), 2048, 100)
            .unwrap()
            .with_max_age(std::time::Duration::from_secs(86_400))
            .unwrap();
        let left = list_files(dir.path()).unwrap();
        assert_eq!(left.len(), files.len() - 2);
        assert_eq!(left.first().map(|f| f.0), Some(files[2].0));
        assert!(!log
            .query(&DecisionQuery {
                limit: 1000,
                ..DecisionQuery::default()
            })
            .unwrap()
            .is_empty());
    }

    /// An idle log keeps its age bound: the file being written goes once its last write is past
    /// `max_age` (a fresh one takes its place), for the decision log and a client's access log;
    /// a log whose last write is recent, or one without an age bound, keeps everything.
    #[test]
    fn an_idle_logs_aged_records_go_at_the_next_sweep() {
        let age = last_written_two_days_ago;
        let all = DecisionQuery {
            limit: 1000,
            ..DecisionQuery::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 2048, 100)
            .unwrap()
            .with_max_age(std::time::Duration::from_secs(86_400))
            .unwrap();
        for i in 0..40 {
            log.append(&[decision(&format!("g{i}"), "s", i as f64)])
                .unwrap();
        }
        log.expire_aged().unwrap();
        assert_eq!(log.query(&all).unwrap().len(), 40, "nothing is old yet");
        for (_, path) in list_files(dir.path()).unwrap() {
            age(&path);
        }
        log.expire_aged().unwrap();
        assert!(log.query(&all).unwrap().is_empty(), "aged records kept");
        assert_eq!(list_files(dir.path()).unwrap().len(), 1, "a fresh file");
        log.append(&[decision("new", "s", 50.0)]).unwrap();
        assert_eq!(log.query(&all).unwrap().len(), 1);

        // Without an age bound the sweep keeps everything.
        let unbounded_dir = tempfile::tempdir().unwrap();
        let unbounded = AuditLog::open(unbounded_dir.path(), 2048, 100).unwrap();
        unbounded.append(&[decision("g", "s", 1.0)]).unwrap();
        for (_, path) in list_files(unbounded_dir.path()).unwrap() {
            age(&path);
        }
        unbounded.expire_aged().unwrap();
        assert_eq!(unbounded.query(&all).unwrap().len(), 1);

        // A client that stopped asking: only its own log goes.
        let access_dir = tempfile::tempdir().unwrap();
        let logs = AccessLogs::open(
            access_dir.path(),
            2048,
            100,
            std::time::Duration::from_secs(86_400),
        )
        .unwrap();
        logs.append("client:idle", &[decision("i", "s", 1.0)])
            .unwrap();
        logs.append("client:busy", &[decision("b", "s", 2.0)])
            .unwrap();
        for (_, path) in list_files(&access_dir.path().join(dir_name("client:idle"))).unwrap() {
            age(&path);
        }
        logs.expire_aged().unwrap();
        let left: Vec<String> = logs
            .query(&all)
            .unwrap()
            .into_iter()
            .map(|d| d.grant_id)
            .collect();
        assert_eq!(left, ["b"]);
    }

    #[test]
    fn a_decision_made_again_after_a_restart_is_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 1 << 20, 3).unwrap();
        log.append(&[decision("g1", "s", 1.0), decision("g2", "s", 2.0)])
            .unwrap();
        drop(log);
        // The restarted process replays the signal and makes the same decisions again.
        let log = AuditLog::open(dir.path(), 1 << 20, 3).unwrap();
        log.append(&[decision("g2", "s", 2.0), decision("g3", "s", 3.0)])
            .unwrap();
        let all = log.query(&DecisionQuery::default()).unwrap();
        let ids: Vec<&str> = all.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["g1-1", "g2-2", "g3-3"]);
        let text = std::fs::read_to_string(dir.path().join("audit-000001.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3, "the file holds each decision once");

        // A log an earlier release wrote twice into is listed once too.
        let raw = serde_json::to_string(&decision("g3", "s", 3.0)).unwrap();
        std::fs::write(
            dir.path().join("audit-000001.jsonl"),
            format!("{text}{raw}\n"),
        )
        .unwrap();
        let again = log
            .query(&DecisionQuery {
                limit: 2,
                ..DecisionQuery::default()
            })
            .unwrap();
        let ids: Vec<&str> = again.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["g2-2", "g3-3"]);
    }

    /// One client's flood of access records rotates out only its own: another client's record
    /// stays, the flood's newest are kept within its log's bound, a query spans every client's
    /// log, and a restart finds the logs again.
    #[test]
    fn access_logs_are_bounded_per_client() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("access");
        let day = std::time::Duration::from_secs(86_400);
        let logs = AccessLogs::open(&at, 1024, 1, day).unwrap();
        let access = |grant: &str, time: f64| Decision {
            cause: Cause::of_state(Cause::ACCESS_REQUEST),
            ..decision(grant, "s", time)
        };
        logs.append("client:quiet", &[access("q", 1.0)]).unwrap();
        for i in 0..200 {
            logs.append("client:loud", &[access("l", 2.0 + f64::from(i))])
                .unwrap();
        }
        let listed = logs.query(&DecisionQuery::default()).unwrap();
        assert!(
            listed.iter().any(|d| d.grant_id == "q"),
            "the quiet client's record went"
        );
        let loud: Vec<f64> = listed
            .iter()
            .filter(|d| d.grant_id == "l")
            .map(|d| d.time)
            .collect();
        assert!(loud.len() < 20, "the flood was not bounded: {}", loud.len());
        assert_eq!(loud.last(), Some(&201.0), "the flood's newest is kept");
        assert_eq!(list_files(&at.join("client%3Aloud")).unwrap().len(), 1);
        let limited = logs
            .query(&DecisionQuery {
                limit: 2,
                ..DecisionQuery::default()
            })
            .unwrap();
        let times: Vec<f64> = limited.iter().map(|d| d.time).collect();
        assert_eq!(
            times,
            [200.0, 201.0],
            "the newest across the logs, oldest first"
        );
        drop(logs);
        let reopened = AccessLogs::open(&at, 1024, 1, day).unwrap();
        let listed = reopened.query(&DecisionQuery::default()).unwrap();
        assert!(
            listed.iter().any(|d| d.grant_id == "q"),
            "not found again at start"
        );
        assert_eq!(dir_name("a/../b"), "a%2F%2E%2E%2Fb");
        assert_eq!(dir_name(""), "%00");
    }
}
