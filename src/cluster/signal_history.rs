//! The signals topic read back for operators: a replay's window and the console's live feed.
//!
//! On a single node intake records every pushed and polled SET; in cluster mode the signals topic
//! is the record (every SET, polled event and risk-feed message is appended there before it is
//! acknowledged), so replay and the feed read it. Its records carry the signal as it was
//! validated; the owner numbers each by its offset ([`SignalRecord::seq_at`]), so a signal read
//! back here has the sequence number its facts carry.
//!
//! - **Replay** ([`History`]): an instance replays the partitions it owns, from the first record
//!   appended at or after the window's start (found by bisection on the records' receipt times:
//!   brokers need not answer offsets-by-time, and librdkafka's mock broker does not) to each
//!   partition's end as the replay began; the instance asked adds the others' answers up.
//! - **Feed** ([`SignalHistory::newest`]): the newest records of every partition, merged by
//!   receipt time, with a cursor of each partition's end so the next page holds only what came.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{partition_of, topics, ClusterError};
use crate::config::ClusterConfig;
use crate::engine::{EngineError, History, Window};
use crate::kafka::{KafkaHealth, SignalRecord};
use crate::signal::Signal;

/// How long one record or one partition's end may take to arrive before a read fails.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// How long a replay's whole read may take.
const WINDOW_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// How long a feed page's read may take.
const FEED_DEADLINE: Duration = Duration::from_secs(5);
/// Records held per partition while the window's partitions are merged by receipt time: beyond
/// it the partition is paused until its buffer drains to [`RESUME_BELOW`].
const PAUSE_ABOVE: usize = 10_000;
const RESUME_BELOW: usize = 1_000;

/// The signals topic, for reading back.
pub struct SignalHistory {
    config: ClusterConfig,
    topic: String,
    partitions: i32,
    /// The partitions this instance owns (a replay reads those alone).
    health: Arc<KafkaHealth>,
}

impl SignalHistory {
    pub fn new(
        config: ClusterConfig,
        topic: String,
        partitions: i32,
        health: Arc<KafkaHealth>,
    ) -> SignalHistory {
        SignalHistory {
            config,
            topic,
            partitions,
            health,
        }
    }

    fn reader(&self, what: &str) -> Result<BaseConsumer, ClusterError> {
        Ok(topics::reader_config(&self.config, &format!("{}.{what}", self.topic)).create()?)
    }

    fn watermarks(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
    ) -> Result<(i64, i64), ClusterError> {
        consumer
            .fetch_watermarks(&self.topic, partition, FETCH_WAIT)
            .map_err(|e| ClusterError::Brokers(format!("{}/{partition}: {e}", self.topic)))
    }

    /// The newest signals of every partition after `cursor` (each partition's offset to read
    /// from; a partition it does not name: its newest `limit`), newest first, at most `limit`,
    /// and the cursor of the next page (each partition's end).
    pub fn newest(
        &self,
        cursor: &BTreeMap<i32, i64>,
        limit: usize,
    ) -> Result<(Vec<Signal>, BTreeMap<i32, i64>), ClusterError> {
        let consumer = self.reader("feed")?;
        let back = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut spans = BTreeMap::new();
        for partition in 0..self.partitions {
            let (low, high) = self.watermarks(&consumer, partition)?;
            let from = cursor
                .get(&partition)
                .copied()
                .unwrap_or(low)
                .max(low)
                .max(high.saturating_sub(back));
            spans.insert(partition, (from, high));
        }
        let mut out = Vec::new();
        read_spans(
            &consumer,
            &self.topic,
            &spans,
            FEED_DEADLINE,
            |_, offset, record| {
                let mut signal = record.signal;
                signal.seq = SignalRecord::seq_at(offset);
                out.push(signal);
                true
            },
        )?;
        out.sort_by(|a, b| {
            b.received_at_ms
                .cmp(&a.received_at_ms)
                .then(b.seq.cmp(&a.seq))
        });
        out.truncate(limit);
        let next = spans.into_iter().map(|(p, (_, high))| (p, high)).collect();
        Ok((out, next))
    }

    /// The first offset of `partition` in `[low, high)` whose signal was received at or after
    /// `since_ms`: a bisection over the records' receipt times (`high` if none was).
    fn first_since(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
        (low, high): (i64, i64),
        since_ms: i64,
    ) -> Result<i64, ClusterError> {
        let (mut lo, mut hi) = (low, high);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (offset, received_at_ms) = self.record_at(consumer, partition, mid, high)?;
            if received_at_ms < since_ms {
                lo = offset + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// The first record of `partition` at or after `offset` (before `high`): its offset and
    /// receipt time. A record that does not decode counts as received at the start of time (a
    /// replay reads past it, and skips it).
    fn record_at(
        &self,
        consumer: &BaseConsumer,
        partition: i32,
        offset: i64,
        high: i64,
    ) -> Result<(i64, i64), ClusterError> {
        let mut found = None;
        let spans = BTreeMap::from([(partition, (offset, (offset + 1).min(high)))]);
        read_spans(
            consumer,
            &self.topic,
            &spans,
            FETCH_WAIT,
            |_, at, record| {
                found = Some((at, record.signal.received_at_ms));
                false
            },
        )?;
        Ok(found.unwrap_or((offset, i64::MIN)))
    }
}

impl History for SignalHistory {
    fn window(&self, since_ms: i64) -> Result<Box<dyn Window + '_>, EngineError> {
        let owned: BTreeSet<i32> = self
            .health
            .owned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let consumer = self.reader("replay").map_err(unavailable)?;
        let mut spans = BTreeMap::new();
        for &partition in &owned {
            let marks = self.watermarks(&consumer, partition).map_err(unavailable)?;
            let start = self
                .first_since(&consumer, partition, marks, since_ms)
                .map_err(unavailable)?;
            spans.insert(partition, (start, marks.1));
        }
        Ok(Box::new(TopicWindow {
            history: self,
            consumer,
            owned,
            spans,
        }))
    }
}

/// A replay's window on the partitions this instance owns.
struct TopicWindow<'h> {
    history: &'h SignalHistory,
    consumer: BaseConsumer,
    owned: BTreeSet<i32>,
    /// Each owned partition's window: from its first record at or after the start to its end
    /// when the replay began.
    spans: BTreeMap<i32, (i64, i64)>,
}

impl Window for TopicWindow<'_> {
    fn log_of(&self, key: &str) -> i32 {
        partition_of(key, self.history.partitions)
    }

    fn first_seq(&self, log: i32) -> Option<u64> {
        let (start, end) = self.spans.get(&log)?;
        (start < end).then(|| SignalRecord::seq_at(*start))
    }

    /// Records before the window's first (also ones retention has deleted since).
    fn history_before(&self, log: i32) -> bool {
        self.spans.get(&log).is_none_or(|(start, _)| *start > 0)
    }

    fn holds(&self, principal: &str) -> bool {
        self.owned.contains(&self.log_of(principal))
    }

    fn for_each(&self, each: &mut dyn FnMut(Signal) -> bool) -> Result<(), EngineError> {
        read_spans(
            &self.consumer,
            &self.history.topic,
            &self.spans,
            WINDOW_DEADLINE,
            |_, offset, record| {
                let mut signal = record.signal;
                signal.seq = SignalRecord::seq_at(offset);
                each(signal)
            },
        )
        .map_err(unavailable)
    }

    fn logs(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    fn still_held(&self) -> Result<(), EngineError> {
        let now: BTreeSet<i32> = self
            .history
            .health
            .owned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        if now == self.owned {
            Ok(())
        } else {
            Err(EngineError::Unavailable(format!(
                "the partitions this instance owns changed during the replay ({:?} → {:?})",
                self.owned, now
            )))
        }
    }
}

fn unavailable(e: ClusterError) -> EngineError {
    EngineError::Unavailable(format!("the signals topic could not be read back: {e}"))
}

/// Reads each partition's span `[from, to)` of `topic` and hands the records to `take` merged by
/// receipt time (a partition's own records in offset order), until it returns `false`. A record
/// that does not decode is logged and skipped. Fails if the spans are not read within
/// `deadline`, or a partition gives nothing for [`FETCH_WAIT`].
fn read_spans(
    consumer: &BaseConsumer,
    topic: &str,
    spans: &BTreeMap<i32, (i64, i64)>,
    deadline: Duration,
    mut take: impl FnMut(i32, i64, SignalRecord) -> bool,
) -> Result<(), ClusterError> {
    let mut assignment = TopicPartitionList::new();
    // Per partition: the next offset to read, and what was read and not yet handed on.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut held: BTreeMap<i32, VecDeque<(i64, SignalRecord)>> = BTreeMap::new();
    for (&partition, &(from, to)) in spans {
        if from < to {
            assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
            next.insert(partition, from);
            held.insert(partition, VecDeque::new());
        }
    }
    if next.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut last_record = Instant::now();
    let mut paused: BTreeSet<i32> = BTreeSet::new();
    let unfinished =
        |next: &BTreeMap<i32, i64>, p: i32| next.get(&p).is_some_and(|n| *n < spans[&p].1);
    loop {
        // Every partition not yet read to its end has a record to compare, or is fetched.
        while held
            .iter()
            .any(|(p, buffer)| buffer.is_empty() && unfinished(&next, *p))
        {
            if started.elapsed() > deadline || last_record.elapsed() > FETCH_WAIT {
                return Err(ClusterError::Brokers(format!(
                    "{topic}: not read to the end of its window in {}s",
                    started.elapsed().as_secs()
                )));
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, %topic, "reading back signals; retrying")
                }
                Some(Ok(message)) => {
                    last_record = Instant::now();
                    let p = message.partition();
                    let offset = message.offset();
                    let Some(n) = next.get_mut(&p) else { continue };
                    if offset < *n || offset >= spans[&p].1 {
                        continue;
                    }
                    *n = offset + 1;
                    let record = message
                        .payload()
                        .map(serde_json::from_slice::<SignalRecord>);
                    match record {
                        Some(Ok(record)) => {
                            let buffer = held.entry(p).or_default();
                            buffer.push_back((offset, record));
                            if buffer.len() > PAUSE_ABOVE && paused.insert(p) {
                                pause(consumer, topic, p, true);
                            }
                        }
                        _ => tracing::warn!(%topic, partition = p, offset,
                            "a signals-topic record that does not decode: skipped"),
                    }
                }
            }
        }
        // The earliest received of the records at hand.
        let Some(p) = held
            .iter()
            .filter_map(|(p, buffer)| buffer.front().map(|(_, r)| (r.signal.received_at_ms, *p)))
            .min()
            .map(|(_, p)| p)
        else {
            return Ok(()); // every partition read to its end
        };
        let Some((offset, record)) = held.get_mut(&p).and_then(VecDeque::pop_front) else {
            continue;
        };
        if held.get(&p).is_some_and(|b| b.len() < RESUME_BELOW) && paused.remove(&p) {
            pause(consumer, topic, p, false);
        }
        if !take(p, offset, record) {
            return Ok(());
        }
    }
}

fn pause(consumer: &BaseConsumer, topic: &str, partition: i32, pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let done = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = done {
        tracing::warn!(error = %e, %topic, partition, "could not pause or resume a partition read back");
    }
}
