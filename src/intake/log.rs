//! The intake log: segment files of framed records in `<data_dir>/intake/`, appended by one thread
//! with group commit (one `fdatasync` per batch), read by anyone through positioned reads.
//!
//! Why a log and not a B-tree: what must be durable before a 202 is the verified SET and its
//! `(iss, jti)`. An append and one `fdatasync` per batch is the least a durable record costs; a
//! B-tree insert rewrote pages of three tables per SET (≈ 2.3 KB of file per SET that nothing
//! ever pruned). The indexes a B-tree kept on disk — `(iss, jti)` → sequence number, sequence
//! number → record, the pending set — live in memory, rebuilt by scanning the retained segments
//! at start-up, and segments are dropped whole once processed and past the retention window.
//!
//! A segment file starts with [`MAGIC`], then frames: `len: u32 LE | crc32(body): u32 LE | body`.
//! A body's first byte is its kind:
//! - [`KIND_SET`]: `seq: u64 LE | received_at_ms: i64 LE | packed` — a recorded SET, its
//!   normalized signal and the token as received, packed by [`pack`] (the signal's own `seq`
//!   field is ignored: the frame's wins);
//! - [`KIND_PROCESSED`]: `seq: u64 LE` × n — those records' effects are in the state store.
//!
//! The newest segment's file runs ahead of its frames with written zeros ([`ZEROED_AHEAD`]), so a
//! batch's `fdatasync` does not also commit a new file size; a zero frame header is the end of the
//! frames. A torn frame at the end of the newest segment (a crash mid-write: never acknowledged)
//! is cut off at start-up; a bad frame anywhere else is corruption and stops the start.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::hash::BuildHasher;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Deserialize;

use super::{IntakeError, LogError};

/// A segment file's first bytes: the format and its version.
pub const MAGIC: &[u8; 8] = b"VIGLOG01";
/// A recorded SET.
const KIND_SET: u8 = 1;
/// Sequence numbers whose records are processed.
const KIND_PROCESSED: u8 = 2;
/// `len` + `crc`.
const FRAME_HEADER: usize = 8;
/// `kind` + `seq` + `received_at_ms`.
const SET_HEADER: usize = 1 + 8 + 8;
/// zstd's level for packed records: its fastest band; a record is about a kilobyte.
const ZSTD_LEVEL: i32 = 1;
/// [`pack`]'s forms.
const PACKED_VERBATIM: u8 = 0;
const PACKED_JWS: u8 = 1;
/// How far ahead of its frames the newest segment's file is extended with written zeros. A
/// frame then lands inside the file's size, so its `fdatasync` flushes data only: an append
/// that grows the file also commits the inode's new size through ext4's journal, which cost a
/// third more CPU and wall time per sync on this project's VMs (`benches/RESULTS.md`). A zero
/// frame header is where a scan stops, so the zeros read as the end of the segment. The batch
/// that extends it flushes the zeros too: a quarter of a MiB took ≈ 0.4 ms here, a whole one
/// 1–4 ms, which a probe behind that batch would see.
const ZEROED_AHEAD: u64 = 256 << 10;
/// No frame is larger (a SET's body is bounded by `push.max_body_bytes` long before this): a
/// length beyond it is a torn or corrupt frame, never an allocation.
const MAX_FRAME: usize = 16 << 20;
/// The largest packed record a frame holds: a larger one is refused before it is acknowledged
/// (written, it could not be read back).
pub const MAX_RECORD: usize = MAX_FRAME - SET_HEADER;
/// Reading a segment in order: bytes per positioned read.
const SCAN_CHUNK: usize = 1 << 20;

/// Where a record is: its segment's file and the frame's offset in it.
#[derive(Clone)]
pub struct Loc {
    pub file: Arc<File>,
    pub offset: u64,
}

/// One segment file and what the in-memory indexes know of it.
struct Segment {
    id: u64,
    path: PathBuf,
    file: Arc<File>,
    /// `(seq, frame offset)` of every SET record in it, in sequence order.
    records: Vec<(u64, u32)>,
    /// No record in this segment or a later one has a lower sequence number: the first record's
    /// number, or — before it has one — one past the previous segments' last.
    floor: u64,
    /// The newest record's receipt time (ms); `i64::MIN` without records.
    newest_received_ms: i64,
    /// Bytes of frames (and the magic): where the next frame goes.
    len: u64,
    /// The file's size: `len` and, in the newest segment, zeros written ahead of it
    /// ([`ZEROED_AHEAD`]).
    allocated: u64,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|r| r.0)
    }
}

/// Hashes of `(iss, jti)` are already uniform (a keyed SipHash): the map keyed by them needs no
/// second hash.
#[derive(Default, Clone, Copy)]
struct Prehashed;

/// [`Prehashed`]'s hasher: the `u64` key is its own hash.
#[derive(Default)]
struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed (`write_u64`); fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher::default()
    }
}

/// Everything the log knows in memory. Readers take the lock only to find locations; no I/O
/// happens under it.
struct State {
    /// Oldest first; the last is the one appended to.
    segments: VecDeque<Segment>,
    /// Keyed hash of `"iss\0jti"` → the record's sequence number.
    jti: HashMap<u64, u64, Prehashed>,
    /// A key whose hash another key already holds (a collision: keyed, so never made on purpose).
    jti_overflow: HashMap<Box<str>, u64>,
    /// Recorded and not yet processed.
    pending: BTreeSet<u64>,
    /// The segments' files' sizes: their frames, and the newest one's zeros ahead.
    bytes: u64,
    sets: u64,
    /// Set when a failed write could not be undone: every later write is refused.
    failed: Option<String>,
    /// The newest segment holds bytes written without an `fdatasync` since
    /// ([`Sync::Deferred`]): the next synced commit covers them, and a roll syncs them first.
    unsynced: bool,
}

impl State {
    /// The newest segment's file was cut to `len` bytes.
    fn cut_newest_to(&mut self, len: u64) {
        if let Some(last) = self.segments.back_mut() {
            let cut = last.allocated.saturating_sub(len);
            last.allocated -= cut;
            self.bytes = self.bytes.saturating_sub(cut);
        }
    }
}

/// Whether a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Written and `fdatasync`ed before the commit returns: what is acknowledged.
    Now,
    /// Written only, made durable by the next synced commit (or a roll). For what may be lost in
    /// a crash without harm — detached processed marks: the signals they name are replayed and
    /// change nothing — it saves a sync (a disk flush, and in a VM an exit) per engine commit.
    Deferred,
}

/// The log, shared by the appender thread and readers.
pub struct Log {
    dir: PathBuf,
    state: RwLock<State>,
    hasher: std::collections::hash_map::RandomState,
    segment_bytes: u64,
    /// `fdatasync`s so far (also counted by the metric; this one is the log's own, for tests).
    syncs: std::sync::atomic::AtomicU64,
}

/// A SET ready to append, encoded by the caller's thread.
pub struct Encoded {
    pub key: String,
    pub hash: u64,
    pub received_at_ms: i64,
    /// The signal's JSON and the token, [`pack`]ed.
    pub packed: Vec<u8>,
}

/// What a start-up scan found.
pub struct Opened {
    pub log: Log,
    /// A torn frame cut off the newest segment, in bytes.
    pub truncated: u64,
}

/// One decoded SET frame.
pub struct SetFrame {
    pub seq: u64,
    pub received_at_ms: i64,
    pub signal: Vec<u8>,
    pub token: Vec<u8>,
}

fn io(context: &str, e: std::io::Error) -> LogError {
    LogError::Io(format!("{context}: {e}"))
}

fn corrupt(path: &Path, offset: u64, reason: &str) -> IntakeError {
    IntakeError::Corrupt {
        seq: 0,
        reason: format!("{} at byte {offset}: {reason}", path.display()),
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.log"))
}

fn read_lock(l: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock(l: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `iss` and `jti` of a stored signal's JSON, for the dedupe index.
#[derive(Deserialize)]
struct Key<'a> {
    #[serde(borrow)]
    iss: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    jti: std::borrow::Cow<'a, str>,
}

pub fn jti_key(iss: &str, jti: &str) -> String {
    format!("{iss}\0{jti}")
}

fn key_of(signal: &[u8]) -> Option<String> {
    let k: Key<'_> = serde_json::from_slice(signal).ok()?;
    Some(jti_key(&k.iss, &k.jti))
}

impl Log {
    /// Opens (creating) the log in `dir`: scans every segment, rebuilding the indexes, and cuts
    /// a torn frame off the newest.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Opened, IntakeError> {
        crate::store::private_dir(dir)
            .map_err(|e| LogError::Io(format!("{}: {e}", dir.display())))?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing the intake log", e))? {
            let entry = entry.map_err(|e| io("listing the intake log", e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                continue;
            };
            if let Ok(id) = u64::from_str_radix(stem, 16) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let hasher = std::collections::hash_map::RandomState::new();
        let mut state = State {
            segments: VecDeque::new(),
            jti: HashMap::with_hasher(Prehashed),
            jti_overflow: HashMap::new(),
            pending: BTreeSet::new(),
            bytes: 0,
            sets: 0,
            failed: None,
            unsynced: false,
        };
        let mut truncated = 0;
        let count = ids.len();
        for (i, id) in ids.into_iter().enumerate() {
            let newest = i + 1 == count;
            let path = segment_path(dir, id);
            let (segment, cut) = scan_segment(&path, id, newest, &hasher, &mut state)?;
            truncated += cut;
            state.bytes += segment.allocated;
            state.sets += segment.records.len() as u64;
            state.segments.push_back(segment);
        }
        let log = Log {
            dir: dir.to_owned(),
            state: RwLock::new(state),
            hasher,
            segment_bytes,
            syncs: Default::default(),
        };
        if log.read().segments.is_empty() {
            log.roll(0)?;
        }
        Ok(Opened { log, truncated })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        read_lock(&self.state)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        write_lock(&self.state)
    }

    /// The keyed hash of a dedupe key.
    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Starts a new segment after the newest (`id`: the next one's number), durably (the file and
    /// its directory entry synced) before anything is appended to it.
    fn roll(&self, id: u64) -> Result<(), LogError> {
        // The segment being closed loses its zeros ahead and what a deferred commit left in it
        // unsynced is made durable, before anything goes to the next: only the newest segment
        // may end in a torn frame.
        self.seal()?;
        let path = segment_path(&self.dir, id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("creating an intake segment", e))?;
        crate::store::private_file(&path).map_err(|e| io("creating an intake segment", e))?;
        file.write_all_at(MAGIC, 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| io("creating an intake segment", e))?;
        sync_dir(&self.dir)?;
        let mut st = self.write();
        st.bytes += MAGIC.len() as u64;
        let floor = floor_after(&st.segments);
        st.segments.push_back(Segment {
            floor,
            id,
            path,
            file: Arc::new(file),
            records: Vec::new(),
            newest_received_ms: i64::MIN,
            len: MAGIC.len() as u64,
            allocated: MAGIC.len() as u64,
        });
        Ok(())
    }

    /// The sequence number `key` (hashed `hash`) was recorded under, reading the record back to
    /// rule out a hash collision. `Err` only when the record cannot be read.
    pub fn lookup(&self, key: &str, hash: u64) -> Result<Option<u64>, IntakeError> {
        let (candidate, overflow) = {
            let st = self.read();
            (
                st.jti.get(&hash).copied(),
                st.jti_overflow.get(key).copied(),
            )
        };
        if let Some(seq) = overflow {
            return Ok(Some(seq));
        }
        let Some(seq) = candidate else {
            return Ok(None);
        };
        Ok(self.key_at(seq)?.filter(|k| k == key).map(|_| seq))
    }

    /// The dedupe key of the record `seq`, if it is retained.
    fn key_at(&self, seq: u64) -> Result<Option<String>, IntakeError> {
        let Some(frame) = self.read_set(seq)? else {
            return Ok(None);
        };
        Ok(key_of(&frame.signal))
    }

    /// Where record `seq` is, if retained.
    pub fn locate(&self, seq: u64) -> Option<Loc> {
        let st = self.read();
        locate_in(&st, seq)
    }

    /// The record `seq`, if retained.
    pub fn read_set(&self, seq: u64) -> Result<Option<SetFrame>, IntakeError> {
        let Some(loc) = self.locate(seq) else {
            return Ok(None);
        };
        read_frame_at(&loc.file, loc.offset).map(Some)
    }

    /// Hands every retained record with a sequence number in `range` to `each`, in order, reading
    /// each segment sequentially, until it answers `false`. Records appended meanwhile may or may
    /// not be included.
    pub fn scan(
        &self,
        from_seq: u64,
        mut each: impl FnMut(SetFrame) -> Result<bool, IntakeError>,
    ) -> Result<(), IntakeError> {
        // One segment's worth of locations at a time, copied out: no I/O under the lock.
        let mut next = from_seq;
        loop {
            let chunk = {
                let st = self.read();
                st.segments
                    .iter()
                    .find(|s| s.last_seq().is_some_and(|last| last >= next))
                    .map(|s| {
                        let start = s.records.partition_point(|r| r.0 < next);
                        (s.file.clone(), s.records[start..].to_vec(), s.len)
                    })
            };
            let Some((file, records, len)) = chunk else {
                return Ok(());
            };
            let Some(&(_, first_offset)) = records.first() else {
                return Ok(());
            };
            let mut reader = SegmentReader::new(&file, u64::from(first_offset), len);
            let mut wanted = records.iter().peekable();
            while let Some(&&(seq, offset)) = wanted.peek() {
                let Some((at, body)) = reader.next_frame().map_err(IntakeError::Log)? else {
                    break;
                };
                if at != u64::from(offset) {
                    continue; // a mark frame between records
                }
                wanted.next();
                let frame = decode_set(&body).ok_or_else(|| IntakeError::Corrupt {
                    seq,
                    reason: "not a SET frame where the index has one".into(),
                })?;
                next = seq + 1;
                if !each(frame)? {
                    return Ok(());
                }
            }
            if wanted.peek().is_some() {
                return Err(IntakeError::Corrupt {
                    seq: next,
                    reason: "indexed record missing from its segment".into(),
                });
            }
        }
    }

    /// Up to `limit` retained sequence numbers greater than `after`, newest first.
    pub fn newest_seqs(&self, after: u64, limit: usize) -> Vec<u64> {
        let st = self.read();
        st.segments
            .iter()
            .rev()
            .flat_map(|s| s.records.iter().rev())
            .map(|r| r.0)
            .take_while(|seq| *seq > after)
            .take(limit)
            .collect()
    }

    /// The first retained sequence number of a record received at or after `since_ms`' segment:
    /// where a scan for the window starts (earlier records of that segment are skipped by time).
    pub fn first_seq_of_window(&self, since_ms: i64) -> Option<u64> {
        let st = self.read();
        st.segments
            .iter()
            .find(|s| s.newest_received_ms >= since_ms)
            .and_then(|s| s.records.first().map(|r| r.0))
    }

    pub fn first_seq(&self) -> Option<u64> {
        let st = self.read();
        st.segments
            .iter()
            .find_map(|s| s.records.first().map(|r| r.0))
    }

    pub fn last_seq(&self) -> Option<u64> {
        let st = self.read();
        st.segments.iter().rev().find_map(|s| s.last_seq())
    }

    pub fn pending(&self) -> Vec<u64> {
        self.read().pending.iter().copied().collect()
    }

    pub fn pending_count(&self) -> u64 {
        self.read().pending.len() as u64
    }

    /// Retained records, bytes on disk, segments.
    pub fn size(&self) -> (u64, u64, u64) {
        let st = self.read();
        (st.sets, st.bytes, st.segments.len() as u64)
    }

    pub fn failed(&self) -> Option<String> {
        self.read().failed.clone()
    }
}

/// Where `seq` is in `st`.
fn locate_in(st: &State, seq: u64) -> Option<Loc> {
    // Floors never fall from one segment to the next: the holder is the last segment with a
    // floor ≤ seq that has records (segments without records — only marks, or just started —
    // share their neighbour's floor and are passed over).
    let i = st.segments.partition_point(|s| s.floor <= seq);
    let s = st
        .segments
        .range(..i)
        .rev()
        .find(|s| !s.records.is_empty())?;
    let j = s.records.binary_search_by_key(&seq, |r| r.0).ok()?;
    Some(Loc {
        file: s.file.clone(),
        offset: u64::from(s.records[j].1),
    })
}

/// The floor of a segment started after `segments`.
fn floor_after(segments: &VecDeque<Segment>) -> u64 {
    segments.back().map_or(0, |last| {
        last.last_seq()
            .map_or(last.floor, |seq| seq.saturating_add(1))
    })
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the intake directory", e))
}

/// Reads a segment's frames in order through positioned reads of [`SCAN_CHUNK`] bytes.
struct SegmentReader<'f> {
    file: &'f File,
    /// File offset of `buf[0]`.
    base: u64,
    buf: Vec<u8>,
    pos: usize,
    end: u64,
}

impl<'f> SegmentReader<'f> {
    fn new(file: &'f File, from: u64, end: u64) -> SegmentReader<'f> {
        SegmentReader {
            file,
            base: from,
            buf: Vec::new(),
            pos: 0,
            end,
        }
    }

    /// Makes `n` bytes available at `pos`; false at the end of the segment (as known).
    fn fill(&mut self, n: usize) -> Result<bool, LogError> {
        if self.buf.len() - self.pos >= n {
            return Ok(true);
        }
        self.buf.drain(..self.pos);
        self.base += self.pos as u64;
        self.pos = 0;
        let have = self.buf.len();
        let remaining = self.end.saturating_sub(self.base + have as u64);
        let want = (n - have).max(SCAN_CHUNK).min(remaining as usize);
        if have + want < n {
            return Ok(false);
        }
        self.buf.resize(have + want, 0);
        self.file
            .read_exact_at(&mut self.buf[have..], self.base + have as u64)
            .map_err(|e| io("reading the intake log", e))?;
        Ok(true)
    }

    /// The next frame's offset and body; `None` at the end (or at a torn frame, which a scan at
    /// start-up has already cut off the newest segment).
    fn next_frame(&mut self) -> Result<Option<(u64, Vec<u8>)>, LogError> {
        if !self.fill(FRAME_HEADER)? {
            return Ok(None);
        }
        let at = self.base + self.pos as u64;
        let (len, crc) = frame_header(&self.buf[self.pos..self.pos + FRAME_HEADER]);
        if len == 0 || len > MAX_FRAME || !self.fill(FRAME_HEADER + len)? {
            return Ok(None);
        }
        let body = &self.buf[self.pos + FRAME_HEADER..self.pos + FRAME_HEADER + len];
        if crc32fast::hash(body) != crc {
            return Ok(None);
        }
        let body = body.to_vec();
        self.pos += FRAME_HEADER + len;
        Ok(Some((at, body)))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let mut a = [0u8; 4];
    a.copy_from_slice(b.get(at..at + 4)?);
    Some(u32::from_le_bytes(a) as usize)
}

/// Packs a signal's JSON and its token for a record: what a retained SET costs on disk is most
/// of the log's size. A compact JWS whose parts re-encode exactly is stored decoded — its
/// header and payload compressed with the signal (which repeats much of the payload: issuer,
/// `jti`, event type, subject), its signature raw; any other token is compressed as received.
/// `form | compressed_len: u32 LE | zstd(signal_len: u32 LE | signal | rest) | signature`, where
/// `rest` is `header_len: u32 LE | header | payload` (form [`PACKED_JWS`]) or the token's text.
pub fn pack(signal: &[u8], token: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut raw = Vec::with_capacity(signal.len() + token.len() + 8);
    raw.extend_from_slice(&(signal.len() as u32).to_le_bytes());
    raw.extend_from_slice(signal);
    let parts: Vec<&str> = token.split('.').collect();
    // Only a token rebuilt byte for byte from its parts is stored decoded: the decoder refuses
    // padding and non-zero trailing bits, so a part it decodes is the canonical encoding of its
    // bytes (`packed_records_unpack_to_what_was_packed` holds it to that).
    let decoded: Option<Vec<Vec<u8>>> = (parts.len() == 3)
        .then(|| parts.iter().map(|p| b64.decode(p).ok()).collect())
        .flatten();
    let (form, signature) = match &decoded {
        Some(d) => {
            raw.extend_from_slice(&(d[0].len() as u32).to_le_bytes());
            raw.extend_from_slice(&d[0]);
            raw.extend_from_slice(&d[1]);
            (PACKED_JWS, d[2].as_slice())
        }
        None => {
            raw.extend_from_slice(token.as_bytes());
            (PACKED_VERBATIM, &[][..])
        }
    };
    // Compressing memory that is already there cannot fail but for a bug; store it verbatim then.
    let (form, compressed, signature) = match compress(&raw) {
        Ok(c) => (form, c, signature),
        Err(_) => {
            let mut plain = Vec::with_capacity(signal.len() + token.len() + 4);
            plain.extend_from_slice(&(signal.len() as u32).to_le_bytes());
            plain.extend_from_slice(signal);
            plain.extend_from_slice(token.as_bytes());
            (PACKED_VERBATIM | 0x80, plain, &[][..])
        }
    };
    let mut out = Vec::with_capacity(5 + compressed.len() + signature.len());
    out.push(form);
    out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
    out.extend_from_slice(&compressed);
    out.extend_from_slice(signature);
    out
}

thread_local! {
    /// A compression context per thread: creating one per record cost more than compressing it.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        match c.as_mut() {
            Some(c) => c.compress(raw),
            None => zstd::bulk::compress(raw, ZSTD_LEVEL),
        }
    })
}

fn decompress(body: &[u8]) -> Option<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        // The frame says its size (the compressor writes it); a record never exceeds MAX_FRAME.
        let size = zstd::zstd_safe::get_frame_content_size(body).ok()??;
        let size = usize::try_from(size).ok().filter(|s| *s <= MAX_FRAME)?;
        d.as_mut()?.decompress(body, size).ok()
    })
}

/// [`pack`]'s inverse: the signal's JSON and the token's text; `None` if `packed` is not one.
fn unpack(packed: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let form = *packed.first()?;
    let len = u32_at(packed, 1)?;
    let body = packed.get(5..5usize.checked_add(len)?)?;
    let signature = packed.get(5 + len..)?;
    let raw = if form & 0x80 != 0 {
        body.to_vec()
    } else {
        decompress(body)?
    };
    let signal_len = u32_at(&raw, 0)?;
    let signal = raw.get(4..4usize.checked_add(signal_len)?)?.to_vec();
    let rest = raw.get(4 + signal_len..)?;
    let token = match form & 0x7f {
        PACKED_VERBATIM => rest.to_vec(),
        PACKED_JWS => {
            let header_len = u32_at(rest, 0)?;
            let header = rest.get(4..4usize.checked_add(header_len)?)?;
            let payload = rest.get(4 + header_len..)?;
            format!(
                "{}.{}.{}",
                b64.encode(header),
                b64.encode(payload),
                b64.encode(signature)
            )
            .into_bytes()
        }
        _ => return None,
    };
    Some((signal, token))
}

fn frame_header(b: &[u8]) -> (usize, u32) {
    let mut len = [0u8; 4];
    let mut crc = [0u8; 4];
    len.copy_from_slice(&b[..4]);
    crc.copy_from_slice(&b[4..8]);
    (u32::from_le_bytes(len) as usize, u32::from_le_bytes(crc))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(at..at + 8)?);
    Some(u64::from_le_bytes(a))
}

/// A SET frame's fields; `None` if `body` is not one.
fn decode_set(body: &[u8]) -> Option<SetFrame> {
    if body.first() != Some(&KIND_SET) || body.len() < SET_HEADER {
        return None;
    }
    let seq = u64_at(body, 1)?;
    let received_at_ms = u64_at(body, 9)? as i64;
    let (signal, token) = unpack(body.get(SET_HEADER..)?)?;
    Some(SetFrame {
        seq,
        received_at_ms,
        signal,
        token,
    })
}

/// The sequence numbers of a processed-marks frame.
fn decode_processed(body: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    if body.first() != Some(&KIND_PROCESSED) || (body.len() - 1) % 8 != 0 {
        return None;
    }
    Some((1..body.len()).step_by(8).filter_map(|at| u64_at(body, at)))
}

/// Reads the frame at `offset` (one positioned read in the common case).
fn read_frame_at(file: &File, offset: u64) -> Result<SetFrame, IntakeError> {
    let mut head = vec![0u8; 2048];
    let n = read_up_to(file, &mut head, offset).map_err(IntakeError::Log)?;
    if n < FRAME_HEADER {
        return Err(IntakeError::Corrupt {
            seq: 0,
            reason: format!("frame at byte {offset} cut short"),
        });
    }
    let (len, crc) = frame_header(&head[..FRAME_HEADER]);
    if len == 0 || len > MAX_FRAME {
        return Err(IntakeError::Corrupt {
            seq: 0,
            reason: format!("frame at byte {offset} has length {len}"),
        });
    }
    let body = if FRAME_HEADER + len <= n {
        head[FRAME_HEADER..FRAME_HEADER + len].to_vec()
    } else {
        let mut body = vec![0u8; len];
        file.read_exact_at(&mut body, offset + FRAME_HEADER as u64)
            .map_err(|e| IntakeError::Log(io("reading the intake log", e)))?;
        body
    };
    if crc32fast::hash(&body) != crc {
        return Err(IntakeError::Corrupt {
            seq: 0,
            reason: format!("frame at byte {offset} fails its checksum"),
        });
    }
    decode_set(&body).ok_or_else(|| IntakeError::Corrupt {
        seq: 0,
        reason: format!("frame at byte {offset} is not a SET"),
    })
}

/// Writes zeros over `[from, to)` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Whether `file` holds only zeros over `[from, to)`: zeros written ahead of the frames, not a
/// torn frame.
fn zeros_only(file: &File, from: u64, to: u64) -> Result<bool, LogError> {
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut at = from;
    while at < to {
        let want = (to - at).min(SCAN_CHUNK as u64) as usize;
        let n = read_up_to(file, &mut buf[..want], at)?;
        if n == 0 || buf[..n].iter().any(|b| *b != 0) {
            return Ok(n == 0);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Reads what there is at `offset` into `buf` (short at the end of the file).
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> Result<usize, LogError> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading the intake log", e)),
        }
    }
    Ok(n)
}

/// Scans one segment into `state`'s indexes. The newest segment's torn tail is cut off (its
/// length in bytes is returned); elsewhere a bad frame is an error.
fn scan_segment(
    path: &Path,
    id: u64,
    newest: bool,
    hasher: &std::collections::hash_map::RandomState,
    state: &mut State,
) -> Result<(Segment, u64), IntakeError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| IntakeError::Log(io(&format!("opening {}", path.display()), e)))?;
    let file_len = file
        .metadata()
        .map_err(|e| IntakeError::Log(io("reading a segment's size", e)))?
        .len();
    let mut magic = [0u8; 8];
    let n = read_up_to(&file, &mut magic, 0).map_err(IntakeError::Log)?;
    if n < MAGIC.len() || &magic != MAGIC {
        if newest && n < MAGIC.len() {
            // Created but its header never made it to disk: nothing was appended to it.
            file.write_all_at(&MAGIC[n..], n as u64)
                .and_then(|()| file.set_len(MAGIC.len() as u64))
                .and_then(|()| file.sync_data())
                .map_err(|e| IntakeError::Log(io("repairing a segment header", e)))?;
        } else {
            return Err(corrupt(path, 0, "not an intake segment"));
        }
    }
    let mut segment = Segment {
        floor: floor_after(&state.segments),
        id,
        path: path.to_owned(),
        file: Arc::new(file),
        records: Vec::new(),
        newest_received_ms: i64::MIN,
        len: MAGIC.len() as u64,
        allocated: MAGIC.len() as u64,
    };
    let file = segment.file.clone();
    let mut reader =
        SegmentReader::new(&file, MAGIC.len() as u64, file_len.max(MAGIC.len() as u64));
    let mut good_end = MAGIC.len() as u64;
    while let Some((at, body)) = reader.next_frame().map_err(IntakeError::Log)? {
        good_end = at + (FRAME_HEADER + body.len()) as u64;
        if let Some(set) = decode_set(&body) {
            let key = key_of(&set.signal).ok_or_else(|| IntakeError::Corrupt {
                seq: set.seq,
                reason: "its signal has no iss or jti".into(),
            })?;
            let offset =
                u32::try_from(at).map_err(|_| corrupt(path, at, "segment larger than 4 GiB"))?;
            if segment.last_seq().is_some_and(|last| last >= set.seq) {
                return Err(corrupt(path, at, "sequence numbers out of order"));
            }
            if segment.records.is_empty() {
                segment.floor = segment.floor.max(set.seq);
            }
            segment.records.push((set.seq, offset));
            segment.newest_received_ms = segment.newest_received_ms.max(set.received_at_ms);
            index_key(state, hasher.hash_one(key.as_str()), key, set.seq);
            state.pending.insert(set.seq);
        } else if let Some(seqs) = decode_processed(&body) {
            for seq in seqs {
                state.pending.remove(&seq);
            }
        } else {
            return Err(corrupt(path, at, "unknown frame kind"));
        }
    }
    segment.len = good_end;
    segment.allocated = file_len.max(good_end);
    let mut torn = 0;
    if good_end < file_len {
        let zeros = zeros_only(&file, good_end, file_len).map_err(IntakeError::Log)?;
        if !zeros && !newest {
            return Err(corrupt(path, good_end, "bad frame inside an older segment"));
        }
        // The newest segment keeps its zeros ahead; an older one had them cut at its roll, and
        // has them cut now if a crash came between.
        if !zeros || !newest {
            file.set_len(good_end)
                .and_then(|()| file.sync_data())
                .map_err(|e| IntakeError::Log(io("cutting a torn frame off the intake log", e)))?;
            segment.allocated = good_end;
        }
        if !zeros {
            torn = file_len - good_end;
        }
    }
    Ok((segment, torn))
}

/// Adds `key` → `seq` to the dedupe index. A hash another record holds belongs to a different
/// key (a redelivery is never recorded twice while the first is retained: the writer looked it
/// up), so the later key is kept whole in the overflow map.
fn index_key(state: &mut State, hash: u64, key: String, seq: u64) {
    if let std::collections::hash_map::Entry::Vacant(slot) = state.jti.entry(hash) {
        slot.insert(seq);
    } else {
        state.jti_overflow.insert(key.into_boxed_str(), seq);
    }
}

/// A batch of frames built by the appender, with what the indexes learn once it is on disk.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// `(seq, offset in buf, received_at_ms, hash, key)` of each SET frame.
    records: Vec<(u64, usize, i64, u64, String)>,
    processed: Vec<u64>,
}

impl Batch {
    /// Adds a SET frame (`packed` by [`pack`]).
    pub fn push_set(
        &mut self,
        seq: u64,
        received_at_ms: i64,
        packed: &[u8],
        hash: u64,
        key: String,
    ) {
        let at = self.buf.len();
        let len = SET_HEADER + packed.len();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        let body = self.buf.len();
        self.buf.push(KIND_SET);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf.extend_from_slice(&received_at_ms.to_le_bytes());
        self.buf.extend_from_slice(packed);
        let crc = crc32fast::hash(&self.buf[body..]);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        self.records.push((seq, at, received_at_ms, hash, key));
    }

    /// Adds a processed-marks frame for `seqs`.
    pub fn push_processed(&mut self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let len = 1 + 8 * seqs.len();
        let at = self.buf.len();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        let body = self.buf.len();
        self.buf.push(KIND_PROCESSED);
        for seq in seqs {
            self.buf.extend_from_slice(&seq.to_le_bytes());
        }
        let crc = crc32fast::hash(&self.buf[body..]);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        self.processed.extend_from_slice(seqs);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// What one pruning dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub segments: u64,
    pub sets: u64,
    pub bytes: u64,
    /// Of `segments`, those dropped before their retention window ended (the size cap).
    pub early: u64,
}

impl Log {
    /// Of `seqs`, those pending (the only ones worth a mark).
    pub fn pending_among(&self, seqs: &[u64]) -> Vec<u64> {
        let st = self.read();
        seqs.iter()
            .copied()
            .filter(|s| st.pending.contains(s))
            .collect()
    }

    /// Whether the oldest segment would be dropped now (the same test [`Log::prune`] applies).
    fn oldest_due(&self, horizon: i64, max_bytes: u64) -> bool {
        let st = self.read();
        if st.segments.len() < 2 {
            return false;
        }
        let Some(oldest) = st.segments.front() else {
            return false;
        };
        let processed = match (oldest.last_seq(), st.pending.first()) {
            (Some(last), Some(p)) => *p > last,
            _ => true,
        };
        processed && (oldest.newest_received_ms < horizon || st.bytes > max_bytes)
    }

    /// Bytes the log holds on disk.
    pub fn bytes(&self) -> u64 {
        self.read().bytes
    }

    fn count_sync(&self) {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(crate::telemetry::INTAKE_LOG_SYNCS).increment(1);
    }

    /// `fdatasync`s of appends so far (a roll's own syncs of the new file are not counted).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes the newest segment for writing (before a roll, and at a clean shutdown): its
    /// zeros ahead are cut off, so a segment that is not the newest ends at its last frame, and
    /// what deferred commits wrote is made durable — one sync for both, when either is needed.
    pub fn seal(&self) -> Result<(), LogError> {
        let (file, len, zeros, unsynced) = {
            let st = self.read();
            let Some(last) = st.segments.back() else {
                return Ok(());
            };
            (
                last.file.clone(),
                last.len,
                last.allocated > last.len,
                st.unsynced,
            )
        };
        if zeros {
            file.set_len(len)
                .map_err(|e| io("cutting an intake segment's zeros ahead", e))?;
        }
        if zeros || unsynced {
            file.sync_data()
                .map_err(|e| io("syncing the intake log", e))?;
            self.count_sync();
        }
        let mut st = self.write();
        st.unsynced = false;
        st.cut_newest_to(len);
        Ok(())
    }

    /// Appends `batch` to the newest segment (a new one first if it would pass the segment
    /// size), syncs it (`fdatasync`) unless `sync` defers that, and only then makes it visible to
    /// readers. On a failed write the segment is cut back to where it was; if even that fails,
    /// the log refuses every later write.
    pub fn commit(&self, batch: Batch, sync: Sync) -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.failed() {
            return Err(LogError::Failed(why));
        }
        let (id, len) = {
            let st = self.read();
            let last = st
                .segments
                .back()
                .ok_or_else(|| LogError::Failed("no segment".into()))?;
            (last.id, last.len)
        };
        if len > MAGIC.len() as u64 && len + batch.buf.len() as u64 > self.segment_bytes {
            self.roll(id + 1)?;
        }
        let (file, len, allocated) = {
            let st = self.read();
            let last = st
                .segments
                .back()
                .ok_or_else(|| LogError::Failed("no segment".into()))?;
            (last.file.clone(), last.len, last.allocated)
        };
        let end = len + batch.buf.len() as u64;
        if end > u64::from(u32::MAX) {
            return Err(LogError::Io("a segment would pass 4 GiB".into()));
        }
        // Zeros first, then the frames: this batch's sync covers both, and a crash between
        // leaves zeros, which read as the segment's end.
        let extend_to =
            (end > allocated).then(|| end.max((allocated + ZEROED_AHEAD).min(self.segment_bytes)));
        let written = extend_to
            .map_or(Ok(()), |to| write_zeros(&file, end.max(allocated), to))
            .and_then(|()| file.write_all_at(&batch.buf, len))
            .and_then(|()| match sync {
                Sync::Now => file.sync_data(),
                Sync::Deferred => Ok(()),
            });
        if let Err(e) = written {
            // Nothing of the batch is acknowledged; leave no part of it to be read back.
            if let Err(cut) = file.set_len(len).and_then(|()| file.sync_data()) {
                let why = format!("a failed append could not be undone: {cut}");
                self.write().failed = Some(why);
            } else {
                self.write().cut_newest_to(len);
            }
            return Err(io("appending to the intake log", e));
        }
        if sync == Sync::Now {
            self.count_sync();
        }
        let mut st = self.write();
        let st = &mut *st;
        // A sync covers every byte written to the file before it.
        st.unsynced = sync == Sync::Deferred;
        let Some(segment) = st.segments.back_mut() else {
            return Err(LogError::Failed("no segment".into()));
        };
        for (seq, at, received, _, _) in &batch.records {
            if segment.records.is_empty() {
                segment.floor = segment.floor.max(*seq);
            }
            segment.records.push((*seq, (len as usize + at) as u32));
            segment.newest_received_ms = segment.newest_received_ms.max(*received);
        }
        segment.len += batch.buf.len() as u64;
        let grown = extend_to.map_or(0, |to| to.saturating_sub(segment.allocated));
        segment.allocated += grown;
        st.bytes += grown;
        st.sets += batch.records.len() as u64;
        for (seq, _, _, hash, key) in batch.records {
            index_key(st, hash, key, seq);
            st.pending.insert(seq);
        }
        for seq in batch.processed {
            st.pending.remove(&seq);
        }
        Ok(())
    }

    /// Drops the oldest segments (never the newest) whose every record is processed and whose
    /// newest record was received before `now_ms - retention_ms` — or, while the log holds more
    /// than `max_bytes`, processed segments regardless of age. A prefix of the log, oldest first:
    /// the indexes forget them first, then the files are removed (a crash in between leaves
    /// files that are dropped again at the next pruning).
    pub fn prune(
        &self,
        now_ms: i64,
        retention_ms: i64,
        max_bytes: u64,
    ) -> Result<Pruned, LogError> {
        let horizon = now_ms.saturating_sub(retention_ms);
        let mut pruned = Pruned::default();
        // Called after every batch: most calls find nothing due, and must not hold readers up
        // with the write lock to find that out.
        if !self.oldest_due(horizon, max_bytes) {
            return Ok(pruned);
        }
        let dropped: Vec<PathBuf> = {
            let mut st = self.write();
            let st = &mut *st;
            let min_pending = st.pending.first().copied();
            let mut cutoff = None;
            let mut paths = Vec::new();
            while st.segments.len() > 1 {
                let Some(oldest) = st.segments.front() else {
                    break;
                };
                let processed = match (oldest.last_seq(), min_pending) {
                    (Some(last), Some(p)) => p > last,
                    _ => true,
                };
                let old = oldest.newest_received_ms < horizon;
                let over = st.bytes > max_bytes;
                if !processed || !(old || over) {
                    break;
                }
                let Some(segment) = st.segments.pop_front() else {
                    break;
                };
                pruned.segments += 1;
                pruned.sets += segment.records.len() as u64;
                pruned.bytes += segment.allocated;
                if !old {
                    pruned.early += 1;
                }
                st.bytes -= segment.allocated;
                st.sets -= segment.records.len() as u64;
                if let Some(last) = segment.last_seq() {
                    cutoff = Some(last);
                }
                paths.push(segment.path);
            }
            if let Some(cutoff) = cutoff {
                st.jti.retain(|_, seq| *seq > cutoff);
                st.jti_overflow.retain(|_, seq| *seq > cutoff);
            }
            paths
        };
        for path in &dropped {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing an intake segment", e)),
            }
        }
        if !dropped.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact JWS comes back byte for byte, stored in fewer bytes than it arrived in; any other
    /// token (or one whose base64 does not re-encode exactly) comes back as received.
    #[test]
    fn packed_records_unpack_to_what_was_packed() {
        let signal = br#"{"iss":"https://idp.example.com/","jti":"4d3559ec67504aaba65d40b0363faad8","event_uri":"https://schemas.openid.net/secevent/caep/event-type/session-revoked"}"#;
        let jws = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIiwidHlwIjoic2VjZXZlbnQrand0In0.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlLmNvbS8iLCJqdGkiOiI0ZDM1NTllYzY3NTA0YWFiYTY1ZDQwYjAzNjNmYWFkOCJ9.c2lnbmF0dXJlLWJ5dGVz";
        // Not canonical base64url: trailing bits set, padding, the standard alphabet's `+` and
        // `/`, whitespace.
        let odd = [
            "eyJh.eyJh.AB",
            "eyJh.eyJh.AA==",
            "eyJh.eyJh.a+/b",
            "eyJh.eyJh.YW Jj",
            "eyJhb.e.AA",
        ];
        for token in [jws, "not.a-jws", "a.b.c.d", "plain text", ".."]
            .iter()
            .chain(&odd)
        {
            let packed = pack(signal, token);
            let (s, t) = unpack(&packed).unwrap();
            assert_eq!(s, signal.to_vec());
            assert_eq!(String::from_utf8(t).unwrap(), *token);
        }
        assert!(pack(signal, jws).len() < signal.len() + jws.len());
        assert!(unpack(&[PACKED_JWS, 200, 0, 0, 0, 1]).is_none());
    }

    fn commit_set(log: &Log, seq: u64) {
        let signal = format!(r#"{{"iss":"https://idp.example.com/","jti":"j{seq}"}}"#);
        let key = jti_key("https://idp.example.com/", &format!("j{seq}"));
        let mut batch = Batch::default();
        batch.push_set(
            seq,
            1_000,
            &pack(signal.as_bytes(), "tok"),
            log.hash(&key),
            key,
        );
        log.commit(batch, Sync::Now).unwrap();
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    fn newest_path(log: &Log) -> PathBuf {
        log.read().segments.back().unwrap().path.clone()
    }

    /// Frames land inside zeros written ahead of them, so a commit's sync does not change the
    /// file's size; a crash leaves the zeros, which read back as the end of the segment, not as a
    /// torn frame; sealing cuts them off.
    #[test]
    fn frames_are_written_inside_zeros_ahead_and_read_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path;
        {
            let log = Log::open(dir.path(), 64 << 20).unwrap().log;
            path = newest_path(&log);
            commit_set(&log, 1);
            let size = file_len(&path);
            assert_eq!(
                size,
                MAGIC.len() as u64 + ZEROED_AHEAD,
                "zeros written ahead"
            );
            for seq in 2..=20 {
                commit_set(&log, seq);
            }
            assert_eq!(file_len(&path), size, "the commits wrote inside the file");
            assert_eq!(log.size().1, size, "the log counts the disk it takes");
            // Dropped unsealed: a crash.
        }
        let opened = Log::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(opened.truncated, 0, "zeros are not a torn frame");
        let log = opened.log;
        assert_eq!(log.size().0, 20);
        assert_eq!(log.read_set(20).unwrap().unwrap().seq, 20);
        commit_set(&log, 21);
        assert_eq!(log.read_set(21).unwrap().unwrap().seq, 21);
        let frames = log.read().segments.back().unwrap().len;
        log.seal().unwrap();
        assert_eq!(
            file_len(&path),
            frames,
            "sealed: the file ends at its last frame"
        );
        assert_eq!(log.size().1, frames);
        drop(log);
        let log = Log::open(dir.path(), 64 << 20).unwrap().log;
        assert_eq!(log.size().0, 21);
        assert!(log.pending().contains(&21));
    }

    /// A frame torn by a crash inside the zeros ahead is cut off with them; the frames before it
    /// stay.
    #[test]
    fn a_torn_frame_inside_the_zeros_ahead_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (path, frames) = {
            let log = Log::open(dir.path(), 64 << 20).unwrap().log;
            commit_set(&log, 1);
            commit_set(&log, 2);
            let frames = log.read().segments.back().unwrap().len;
            (newest_path(&log), frames)
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9], frames)
            .unwrap();
        let allocated = file_len(&path);
        let opened = Log::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(opened.truncated, allocated - frames);
        assert_eq!(file_len(&path), frames);
        assert_eq!(opened.log.size().0, 2);
        commit_set(&opened.log, 3);
        assert_eq!(opened.log.read_set(3).unwrap().unwrap().seq, 3);
    }

    /// A roll seals the segment it closes; one left with zeros (a crash in the middle of a roll)
    /// has them cut at the next start, and a bad frame there still stops the start.
    #[test]
    fn only_the_newest_segment_keeps_zeros_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (older, newer) = {
            // Segments of 4 KiB: about a dozen records each.
            let log = Log::open(dir.path(), 4096).unwrap().log;
            let first = newest_path(&log);
            let mut seq = 1;
            while newest_path(&log) == first {
                commit_set(&log, seq);
                seq += 1;
            }
            let older_frames = log.read().segments.front().unwrap().len;
            assert_eq!(file_len(&first), older_frames, "the roll cut the zeros");
            assert!(file_len(&newest_path(&log)) > log.read().segments.back().unwrap().len);
            (first, newest_path(&log))
        };
        let frames = file_len(&older);
        write_zeros(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(&older)
                .unwrap(),
            frames,
            frames + 1000,
        )
        .unwrap();
        let opened = Log::open(dir.path(), 4096).unwrap();
        assert_eq!(opened.truncated, 0);
        assert_eq!(
            file_len(&older),
            frames,
            "the older segment's zeros are cut"
        );
        assert!(file_len(&newer) > opened.log.read().segments.back().unwrap().len);
        drop(opened);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&older)
            .unwrap()
            .write_all_at(&[7, 7, 7], frames)
            .unwrap();
        assert!(Log::open(dir.path(), 4096).is_err());
    }
}
