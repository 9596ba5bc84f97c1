//! The embedded store: redb database files in the data directory. `vigil.redb` (the *state* store)
//! is shared by every module that persists state; intake keeps its own file (`intake.redb`, see
//! `intake.rs`) with its own writer, so acknowledging a pushed SET never queues behind the engine's
//! or delivery's commits. Each module owns its own tables (named with its prefix) and nobody else's.
//!
//! redb was chosen because it is pure Rust (no C toolchain, no background compaction threads), ACID
//! with a single writer and MVCC readers, and fsyncs on commit by default: an acknowledged write is on
//! disk. The single-writer model fits group commit: one thread batches many small writes per fsync.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
}

/// The store's page cache. Vigil holds grants and contexts in memory and reads the store back only
/// at start-up, so the cache serves writes (the B-tree pages on an insert's path), not lookups;
/// redb's default (1 GiB) filled with pages nothing reads again — ≈ 1 KiB of RSS per grant at 1 M
/// grants (`cargo bench --bench engine_scale`), and registration was ≈ 20 % slower with it. 32 MiB
/// (≈ 34 B per grant at 1 M) rather than 256 or 64: the OS page cache holds the file anyway.
const CACHE_BYTES: usize = 32 << 20;

/// The state store's file name.
pub const STATE_FILE: &str = "vigil.redb";

/// Opens (creating if needed) the state store, `<data_dir>/vigil.redb`.
pub fn open(data_dir: &Path) -> Result<Arc<redb::Database>, StoreError> {
    open_file(data_dir, STATE_FILE, CACHE_BYTES)
}

/// Opens (creating if needed) the database `<data_dir>/<name>` with a page cache of `cache_bytes`.
pub fn open_file(
    data_dir: &Path,
    name: &str,
    cache_bytes: usize,
) -> Result<Arc<redb::Database>, StoreError> {
    private_dir(data_dir).map_err(|source| StoreError::Dir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(name);
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(&path)
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
    private_file(&path).map_err(|source| StoreError::Dir {
        path: path.clone(),
        source,
    })?;
    Ok(Arc::new(db))
}

/// Creates `dir` (and its parents) if needed and makes it the owner's alone (0700): the data
/// directory holds push credentials, raw SETs, grants and signing keys.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes an existing file readable and writable by its owner only (0600).
pub fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Why a batched write failed. Nothing of the batch it belonged to was committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the store writer has stopped")]
    WriterGone,
}

impl WriteError {
    /// Wraps any redb error.
    pub fn storage<E: Into<redb::Error>>(e: E) -> WriteError {
        WriteError::Storage(e.into().to_string())
    }
}

/// Called after the batch's commit with its outcome.
type Completion = Box<dyn FnOnce(Result<(), WriteError>) + Send>;
/// Runs inside the batch's write transaction; returns whether it succeeded and its completion.
type Job = Box<dyn FnOnce(&redb::WriteTransaction) -> (bool, Completion) + Send>;

/// A queued write and its lane.
struct Queued {
    job: Job,
    lane: Lane,
}

/// Which lane a write takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lane {
    Ordinary,
    /// A bulk write (a checkpoint's contexts): committed after every other write queued by
    /// then, so a large checkpoint never holds up a decision's commit.
    Bulk(Merge),
}

/// Whether a bulk write may share its commit with other bulk writes once the writer is behind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Merge {
    /// Writes of rows that exist or grow the store anyway (a checkpoint's contexts): merged once
    /// behind.
    Allowed,
    /// Always a commit of its own: deletions. A retention pass queues all of its at once, so they
    /// would always count as behind, and eight chunks of deletions spread over a small table touch
    /// nearly every page of it in one commit. redb frees a commit's old pages only once it has
    /// committed, so such a commit needs about the table's size again in free pages: the soak's
    /// store file doubled (4.7 → 8.9 MB) at a forget wave and the pushes meanwhile waited up to 2 s.
    Alone,
}

/// How long the oldest bulk write may wait before the writer counts itself behind and commits
/// several together. Each commit rewrites the B-tree branch pages above the rows it changes and
/// the store's own metadata whatever its size, so a chunk alone costs about as much as several
/// together: with a Kafka backlog revoking a grant per message, the state store wrote 11–12 KiB
/// per signal with chunks alone and 9.3–10.5 KiB with up to eight a commit, 19 % more signals/s
/// (benches/RESULTS.md). Not at once: at moderate load a checkpoint's few chunks commit within
/// this age, each alone between decisions' commits, which keeps the wait of a decision that
/// arrives meanwhile short.
pub const BULK_BACKLOG_AGE: std::time::Duration = std::time::Duration::from_millis(200);

/// How long the oldest bulk write may wait while ordinary writes keep coming before one bulk
/// commit goes between two ordinary ones. Bulk writes otherwise commit only when no ordinary
/// write is waiting, and a steady stream of ordinary writes (pushed signals' decisions at the
/// full push rate) could leave a checkpoint unwritten for ever: its signals stay pending in
/// intake, and a shard behind on its checkpoints holds its sources' backlogs
/// (`engine/shard.rs`). A second: the checkpoint interval's default.
pub const BULK_OVERDUE: std::time::Duration = std::time::Duration::from_secs(1);

/// Most bulk writes one commit takes once the writer is behind (each a checkpoint chunk of a few
/// hundred rows). It bounds how much one commit adds to the store file's high-water mark: redb
/// copies each page a commit changes and frees the old one only after it.
const BULK_PER_COMMIT: usize = 8;

/// Group commit: one thread owns redb's single write transaction and runs many callers' writes in
/// each commit, so concurrent writers share one fsync. A caller's result is delivered only after
/// the commit that contains its write is on disk; if any write in a batch fails, the whole batch is
/// aborted and every caller in it gets the error.
///
/// Bulk writes ([`BatchWriter::submit_bulk_blocking`]) take a second lane: they commit only when no
/// other write is waiting, each alone unless the oldest has waited [`BULK_BACKLOG_AGE`] (then up to
/// eight that allow it ([`Merge::Allowed`]) together, and one failing fails those with it). Bulk
/// writes keep their order among themselves, other writes among themselves; a bulk write may
/// commit after a later ordinary one.
#[derive(Clone)]
pub struct BatchWriter {
    tx: tokio::sync::mpsc::Sender<Queued>,
    db: Arc<redb::Database>,
    /// The switches tests make a slow or broken store with.
    #[cfg(test)]
    faults: Arc<Faults>,
}

/// Switches the writer reads before each commit; only tests set them.
#[derive(Default)]
struct Faults {
    /// Set, the writer leaves the bulk lane waiting: a slow store.
    bulk_paused: std::sync::atomic::AtomicBool,
    /// Set, every commit of ordinary writes fails: a broken disk.
    ordinary_failing: std::sync::atomic::AtomicBool,
    /// The same for the bulk lane's commits.
    bulk_failing: std::sync::atomic::AtomicBool,
}

impl Faults {
    fn get(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The writer thread; [`BatchWriterThread::join`] waits until every [`BatchWriter`] is dropped and
/// the queue is drained.
pub struct BatchWriterThread(std::thread::JoinHandle<()>);

impl BatchWriterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("store writer thread panicked");
        }
    }
}

/// A write queued by [`BatchWriter::submit_blocking`].
pub struct PendingWrite<T>(tokio::sync::oneshot::Receiver<Result<T, WriteError>>);

impl<T> PendingWrite<T> {
    /// Waits until the commit holding the write is on disk (or failed).
    pub fn wait_blocking(self) -> Result<T, WriteError> {
        self.0.blocking_recv().map_err(|_| WriteError::WriterGone)?
    }

    /// [`PendingWrite::wait_blocking`] for async callers.
    pub async fn wait(self) -> Result<T, WriteError> {
        self.0.await.map_err(|_| WriteError::WriterGone)?
    }

    /// A write whose commit ended with `outcome`, and whether it was taken: for a test of what
    /// waits for writes.
    #[cfg(test)]
    pub fn ended(
        outcome: Option<Result<T, WriteError>>,
    ) -> (
        PendingWrite<T>,
        Option<tokio::sync::oneshot::Sender<Result<T, WriteError>>>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match outcome {
            Some(outcome) => {
                let _ = tx.send(outcome);
                (PendingWrite(rx), None)
            }
            None => (PendingWrite(rx), Some(tx)),
        }
    }

    /// The write's outcome if its commit is done, without waiting; `None` while it is in flight.
    /// Call it until it answers once: after that the outcome is gone.
    pub fn try_take(&mut self) -> Option<Result<T, WriteError>> {
        use tokio::sync::oneshot::error::TryRecvError;
        match self.0.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Closed) => Some(Err(WriteError::WriterGone)),
        }
    }
}

/// Collects the outcome of every write in `writes` whose commit is done — of all of them,
/// waiting, when `block` — keeping the first failure in `failed`; says whether none is left in
/// flight. For what waits for several writes (a checkpoint's chunks, a fold round's parts).
pub fn settle_writes(
    writes: &mut Vec<Result<PendingWrite<()>, WriteError>>,
    failed: &mut Option<String>,
    block: bool,
) -> bool {
    let mut left = Vec::new();
    for write in writes.drain(..) {
        let outcome = match write {
            Err(e) => Some(Err(e)),
            Ok(pending) if block => Some(pending.wait_blocking()),
            Ok(mut pending) => match pending.try_take() {
                Some(outcome) => Some(outcome),
                None => {
                    left.push(Ok(pending));
                    None
                }
            },
        };
        if let (Some(Err(e)), None) = (outcome, &*failed) {
            *failed = Some(e.to_string());
        }
    }
    *writes = left;
    writes.is_empty()
}

impl BatchWriter {
    /// Starts the writer thread of the store called `store` (the label of its metrics).
    /// `max_batch` bounds how many writes share one commit.
    pub fn start(
        db: Arc<redb::Database>,
        store: &'static str,
        max_batch: usize,
    ) -> std::io::Result<(BatchWriter, BatchWriterThread)> {
        Self::start_merging_after(db, store, max_batch, BULK_BACKLOG_AGE, BULK_OVERDUE)
    }

    /// [`BatchWriter::start`] with the age after which bulk writes commit together, and the one
    /// after which a bulk write goes between ordinary ones (tests choose them instead of waiting
    /// for them).
    pub fn start_merging_after(
        db: Arc<redb::Database>,
        store: &'static str,
        max_batch: usize,
        bulk_backlog_age: std::time::Duration,
        bulk_overdue: std::time::Duration,
    ) -> std::io::Result<(BatchWriter, BatchWriterThread)> {
        let max_batch = max_batch.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel(max_batch * 4);
        let faults = Arc::new(Faults::default());
        let handle = std::thread::Builder::new()
            .name(format!("vigil-{store}-writer"))
            .spawn({
                let db = db.clone();
                let lanes = Lanes {
                    rx,
                    faults: faults.clone(),
                    bulk_backlog_age,
                    bulk_overdue,
                };
                move || writer_loop(db, store, lanes, max_batch)
            })?;
        Ok((
            BatchWriter {
                tx,
                db,
                #[cfg(test)]
                faults,
            },
            BatchWriterThread(handle),
        ))
    }

    /// Leaves the bulk lane's writes waiting (`true`) or lets them commit again: a store behind
    /// on its checkpoints, for tests.
    #[cfg(test)]
    pub(crate) fn pause_bulk(&self, paused: bool) {
        self.faults
            .bulk_paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes every commit of ordinary writes fail (`true`), as a broken disk would, or lets
    /// them commit again; the bulk lane is not affected. For tests.
    #[cfg(test)]
    pub(crate) fn fail_ordinary(&self, failing: bool) {
        self.faults
            .ordinary_failing
            .store(failing, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`BatchWriter::fail_ordinary`] for the bulk lane's commits. For tests.
    #[cfg(test)]
    pub(crate) fn fail_bulk(&self, failing: bool) {
        self.faults
            .bulk_failing
            .store(failing, std::sync::atomic::Ordering::Relaxed);
    }

    /// The file this writer commits to. A long read that decides what to write (a scan of a
    /// whole table) takes its read transaction here, on the caller's thread: inside a write it
    /// would hold up the commits of every other writer of the file.
    pub fn database(&self) -> &Arc<redb::Database> {
        &self.db
    }

    /// Runs `f` inside a write transaction shared with other callers; resolves after the commit.
    pub async fn write<T, F>(&self, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        self.queue(f).await?.wait().await
    }

    /// Queues `f` for a commit and returns once it is queued, not committed: writes queued this
    /// way keep their order with every other ordinary write. [`PendingWrite::wait`] gives the
    /// outcome.
    pub async fn queue<T, F>(&self, f: F) -> Result<PendingWrite<T>, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        let (job, rx) = Self::job(f);
        self.tx
            .send(Queued {
                job,
                lane: Lane::Ordinary,
            })
            .await
            .map_err(|_| WriteError::WriterGone)?;
        Ok(PendingWrite(rx))
    }

    /// [`BatchWriter::write`] for callers on a plain thread (never call it from an async task).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        self.submit_blocking(f)?.wait_blocking()
    }

    /// Queues `f` for a commit without waiting for it, so a plain thread can go on working while
    /// the commit is written; [`PendingWrite::wait_blocking`] gives the outcome. Commits happen in
    /// submission order.
    pub fn submit_blocking<T, F>(&self, f: F) -> Result<PendingWrite<T>, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        self.submit_in_lane(f, Lane::Ordinary)
    }

    /// [`BatchWriter::submit_blocking`] in the bulk lane: for large writes nobody waits on
    /// urgently (contexts at a checkpoint), which must not delay the small ones that are.
    pub fn submit_bulk_blocking<T, F>(
        &self,
        merge: Merge,
        f: F,
    ) -> Result<PendingWrite<T>, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        self.submit_in_lane(f, Lane::Bulk(merge))
    }

    /// [`BatchWriter::submit_blocking`], and `then` is called on the writer thread the moment the
    /// commit ends, with whether the write is on disk: for a waiter that must not wait for the
    /// caller to collect the outcome (delivery waits for a decision's commit this way, while the
    /// shard that submitted it goes on with the next batch).
    pub fn submit_blocking_then<T, F>(
        &self,
        f: F,
        then: impl FnOnce(bool) + Send + 'static,
    ) -> Result<PendingWrite<T>, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        let (job, rx) = Self::job_then(f, Some(Box::new(then)));
        self.tx
            .blocking_send(Queued {
                job,
                lane: Lane::Ordinary,
            })
            .map_err(|_| WriteError::WriterGone)?;
        Ok(PendingWrite(rx))
    }

    fn submit_in_lane<T, F>(&self, f: F, lane: Lane) -> Result<PendingWrite<T>, WriteError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        let (job, rx) = Self::job(f);
        self.tx
            .blocking_send(Queued { job, lane })
            .map_err(|_| WriteError::WriterGone)?;
        Ok(PendingWrite(rx))
    }

    #[allow(clippy::type_complexity)]
    fn job<T, F>(f: F) -> (Job, tokio::sync::oneshot::Receiver<Result<T, WriteError>>)
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        Self::job_then(f, None)
    }

    #[allow(clippy::type_complexity)]
    fn job_then<T, F>(
        f: F,
        then: Option<Box<dyn FnOnce(bool) + Send>>,
    ) -> (Job, tokio::sync::oneshot::Receiver<Result<T, WriteError>>)
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = f(txn);
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                // A caller's own error wins over the batch's (which it caused).
                let outcome = result.and_then(|v| commit.map(|()| v));
                if let Some(then) = then {
                    then(outcome.is_ok());
                }
                let _ = reply.send(outcome);
            });
            (ok, completion)
        });
        (job, rx)
    }
}

/// What the writer thread takes its writes from, and when the bulk lane's turn comes.
struct Lanes {
    rx: tokio::sync::mpsc::Receiver<Queued>,
    /// [`BatchWriter::pause_bulk`], [`BatchWriter::fail_ordinary`], [`BatchWriter::fail_bulk`]
    /// (never set outside tests).
    faults: Arc<Faults>,
    /// [`BULK_BACKLOG_AGE`].
    bulk_backlog_age: std::time::Duration,
    /// [`BULK_OVERDUE`].
    bulk_overdue: std::time::Duration,
}

fn writer_loop(db: Arc<redb::Database>, store: &'static str, lanes: Lanes, max_batch: usize) {
    use std::time::Instant;
    let Lanes {
        mut rx,
        faults,
        bulk_backlog_age,
        bulk_overdue,
    } = lanes;
    // Bulk writes taken off the channel (and when), waiting for a moment when nothing else is.
    type Deferred = std::collections::VecDeque<(Instant, Merge, Job)>;
    let mut bulk = Deferred::new();
    let mut open = true;
    // Ordinary writes taken off the channel and held for one commit behind an overdue bulk one.
    let mut carried: Vec<Job> = Vec::new();
    // Whether the last commit was of ordinary writes: an overdue bulk write goes between two.
    let mut last_ordinary = false;
    loop {
        let mut jobs = std::mem::take(&mut carried);
        let take = |q: Queued, jobs: &mut Vec<Job>, bulk: &mut Deferred| match q.lane {
            Lane::Bulk(merge) => bulk.push_back((Instant::now(), merge, q.job)),
            Lane::Ordinary => jobs.push(q.job),
        };
        if bulk.is_empty() && jobs.is_empty() {
            // Nothing deferred: sleep until a write arrives (or every handle is gone).
            match rx.blocking_recv() {
                Some(q) => take(q, &mut jobs, &mut bulk),
                None => break,
            }
        }
        while open && jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(q) => take(q, &mut jobs, &mut bulk),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let paused = open && Faults::get(&faults.bulk_paused);
        if jobs.is_empty() && paused {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let overdue = !paused
            && last_ordinary
            && !jobs.is_empty()
            && bulk
                .front()
                .is_some_and(|(queued, _, _)| queued.elapsed() >= bulk_overdue);
        if overdue {
            carried = std::mem::take(&mut jobs);
        }
        last_ordinary = !jobs.is_empty();
        if jobs.is_empty() {
            let behind = bulk.front().is_some_and(|(queued, merge, _)| {
                *merge == Merge::Allowed && queued.elapsed() >= bulk_backlog_age
            });
            // The oldest, and once behind the ones after it that allow merging, up to the first
            // that does not.
            let n = if behind {
                bulk.iter()
                    .take(BULK_PER_COMMIT)
                    .take_while(|(_, merge, _)| *merge == Merge::Allowed)
                    .count()
            } else {
                1
            };
            jobs.extend(bulk.drain(..n.min(bulk.len())).map(|(_, _, job)| job));
            if jobs.is_empty() {
                if open {
                    continue;
                }
                break;
            }
        }
        let started = std::time::Instant::now();
        let size = jobs.len();
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                // Dropping the jobs drops their reply channels: each caller sees `WriterGone`.
                tracing::error!(error = %WriteError::storage(e), "cannot begin a write transaction");
                drop(jobs);
                continue;
            }
        };
        let mut completions = Vec::with_capacity(size);
        let mut all_ok = true;
        for job in jobs {
            let (ok, completion) = job(&txn);
            all_ok &= ok;
            completions.push(completion);
        }
        let broken = Faults::get(if last_ordinary {
            &faults.ordinary_failing
        } else {
            &faults.bulk_failing
        });
        let outcome = if broken {
            let _ = txn.abort();
            Err(WriteError::Storage(
                "the disk is broken (a test said so)".into(),
            ))
        } else if all_ok {
            txn.commit().map_err(WriteError::storage)
        } else {
            let _ = txn.abort();
            Err(WriteError::Storage(
                "a write in the same batch failed; the batch was rolled back".into(),
            ))
        };
        if let Err(e) = &outcome {
            metrics::counter!(crate::telemetry::STORE_COMMIT_ERRORS, "store" => store).increment(1);
            tracing::error!(error = %e, size, "store commit failed; nothing in this batch was written");
        } else {
            metrics::histogram!(crate::telemetry::STORE_COMMIT_SECONDS, "store" => store)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::telemetry::STORE_BATCH_SIZE, "store" => store)
                .record(size as f64);
        }
        for completion in completions {
            completion(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer on a new store whose bulk writes commit together once they waited `age`.
    fn merging_after(
        age: std::time::Duration,
    ) -> (tempfile::TempDir, BatchWriter, BatchWriterThread) {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        let (writer, thread) =
            BatchWriter::start_merging_after(db, "test", 8, age, std::time::Duration::MAX).unwrap();
        (dir, writer, thread)
    }

    /// Holds the writer inside a first transaction, so the writes queued next wait together
    /// until the sender is used.
    fn hold(writer: &BatchWriter) -> (std::sync::mpsc::Sender<()>, PendingWrite<()>) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let first = writer
            .submit_blocking(move |_| {
                gate.recv().unwrap();
                Ok(())
            })
            .unwrap();
        (release, first)
    }

    /// Ordinary writes queued behind bulk ones commit first; a bulk write that has not waited long
    /// commits alone (one failing does not take the next with it); bulk writes keep their order.
    #[test]
    fn bulk_writes_commit_alone_after_the_ordinary_ones_waiting() {
        let (_dir, writer, thread) = merging_after(std::time::Duration::MAX);
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = |name: &'static str, ok: bool| {
            let order = order.clone();
            move |_: &redb::WriteTransaction| {
                order.lock().unwrap().push(name);
                if ok {
                    Ok(())
                } else {
                    Err(WriteError::Storage("refused".into()))
                }
            }
        };
        let (release, first) = hold(&writer);
        let b1 = writer
            .submit_bulk_blocking(Merge::Allowed, log("b1", false))
            .unwrap();
        let b2 = writer
            .submit_bulk_blocking(Merge::Allowed, log("b2", true))
            .unwrap();
        let o1 = writer.submit_blocking(log("o1", true)).unwrap();
        release.send(()).unwrap();
        first.wait_blocking().unwrap();
        assert!(o1.wait_blocking().is_ok());
        assert!(b1.wait_blocking().is_err());
        assert!(b2.wait_blocking().is_ok(), "a bulk write commits alone");
        assert_eq!(*order.lock().unwrap(), vec!["o1", "b1", "b2"]);
        drop(writer);
        thread.join();
    }

    /// Bulk writes that waited long enough commit up to eight together, still after the ordinary
    /// writes waiting and in their order, and one that must commit alone (deletions) stops a
    /// merge and is not merged: one failing fails those committed with it and no other.
    #[test]
    fn bulk_writes_that_waited_commit_eight_together_but_deletions_alone() {
        let (_dir, writer, thread) = merging_after(std::time::Duration::ZERO);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (release, first) = hold(&writer);
        // b0 and b6 fail; b5 deletes (alone). Commits: b0–b4 (stopped by b5), b5, b6–b13 (eight),
        // b14.
        let bulk: Vec<_> = (0..15)
            .map(|i| {
                let order = order.clone();
                let merge = if i == 5 { Merge::Alone } else { Merge::Allowed };
                writer
                    .submit_bulk_blocking(merge, move |_| {
                        order.lock().unwrap().push(format!("b{i}"));
                        if i == 0 || i == 6 {
                            Err(WriteError::Storage("refused".into()))
                        } else {
                            Ok(())
                        }
                    })
                    .unwrap()
            })
            .collect();
        let ordinary = {
            let order = order.clone();
            writer
                .submit_blocking(move |_| {
                    order.lock().unwrap().push("o".to_owned());
                    Ok(())
                })
                .unwrap()
        };
        release.send(()).unwrap();
        first.wait_blocking().unwrap();
        assert!(ordinary.wait_blocking().is_ok());
        let outcomes: Vec<bool> = bulk
            .into_iter()
            .map(|b| b.wait_blocking().is_ok())
            .collect();
        assert_eq!(
            outcomes,
            [vec![false; 5], vec![true], vec![false; 8], vec![true]].concat()
        );
        let expected: Vec<String> = std::iter::once("o".to_owned())
            .chain((0..15).map(|i| format!("b{i}")))
            .collect();
        assert_eq!(*order.lock().unwrap(), expected);
        drop(writer);
        thread.join();
    }

    /// A bulk write that has waited [`BULK_OVERDUE`] while ordinary writes kept coming commits
    /// between two ordinary commits; otherwise bulk writes wait until no ordinary one does.
    #[test]
    fn an_overdue_bulk_write_goes_between_ordinary_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        let (writer, thread) = BatchWriter::start_merging_after(
            db,
            "test",
            8,
            std::time::Duration::MAX,
            std::time::Duration::ZERO,
        )
        .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = |name: &'static str| {
            let order = order.clone();
            move |_: &redb::WriteTransaction| {
                order.lock().unwrap().push(name);
                Ok(())
            }
        };
        // The writer inside a first ordinary commit before the others are queued.
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let first = writer
            .submit_blocking(move |_| {
                started_tx.send(()).unwrap();
                gate.recv().unwrap();
                Ok(())
            })
            .unwrap();
        started.recv().unwrap();
        let b0 = writer
            .submit_bulk_blocking(Merge::Allowed, log("b0"))
            .unwrap();
        let b1 = writer
            .submit_bulk_blocking(Merge::Allowed, log("b1"))
            .unwrap();
        let o1 = writer.submit_blocking(log("o1")).unwrap();
        release.send(()).unwrap();
        for pending in [first, b0, b1, o1] {
            pending.wait_blocking().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["b0", "o1", "b1"]);
        drop(writer);
        thread.join();
    }

    /// `try_take` answers nothing while the commit is in flight, then its outcome once.
    #[test]
    fn try_take_reports_a_write_only_once_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        let (writer, thread) = BatchWriter::start(db, "test", 8).unwrap();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let mut held = writer
            .submit_bulk_blocking(Merge::Allowed, move |_| {
                gate.recv().unwrap();
                Ok(7)
            })
            .unwrap();
        assert!(held.try_take().is_none(), "still committing");
        release.send(()).unwrap();
        let outcome = loop {
            if let Some(outcome) = held.try_take() {
                break outcome;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(outcome.unwrap(), 7);
        drop(writer);
        thread.join();
    }
}
