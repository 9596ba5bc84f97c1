//! The engine's state as a changelog (cluster mode): every row a shard batch writes to the local
//! store — a context, a session revocation, a grant, an alias, or a deletion of one — is also
//! appended, keyed by table and row key, to the partition of the principal it belongs to. The
//! instance that takes a partition over reads it back ([`Engine::adopt`](super::Engine::adopt))
//! before it applies any signal for it, so state moves with ownership (Kafka Streams' changelog).
//!
//! The engine only knows the records; where they go is a [`Changelog`] (the cluster's state
//! topic). A batch's replies, decisions and Kafka offsets are announced only after the changelog
//! has acknowledged its records, as after the local commit: what was acknowledged survives the
//! instance. The batch's decisions go with its rows: the audit trail of a principal outlives the
//! instance that owned it (the cluster's decisions topic, copied into every instance's log).

use tokio::sync::oneshot;

use crate::decision::Decision;

/// One row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// The routing key of the principal (or member) the row belongs to: it decides the partition.
    pub owner: String,
    /// The row: its table and key ([`Row::record_key`]).
    pub key: String,
    /// The row's stored bytes; `None` deletes it (a tombstone).
    pub value: Option<Vec<u8>>,
}

/// Where a batch's change records go.
pub trait Changelog: Send + Sync + std::fmt::Debug {
    /// Starts appending `records` (in order) and the `decisions` made with them; the answer comes
    /// once all are acknowledged, or with why they were not.
    fn append(
        &self,
        records: Vec<ChangeRecord>,
        decisions: &[Decision],
    ) -> oneshot::Receiver<Result<(), String>>;
}

/// The engine's tables that move with a partition. The hand-off to delivery moves too: a decision
/// its owner committed but had not yet queued for its enforcement points when it stopped is queued
/// by the next owner (its SETs keep their `jti`s); delivery's taking a decision over is its
/// tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Context,
    SessionRevocation,
    Grant,
    Alias,
    Handoff,
}

impl Table {
    fn tag(self) -> &'static str {
        match self {
            Table::Context => "ctx",
            Table::SessionRevocation => "rev",
            Table::Grant => "grant",
            Table::Alias => "alias",
            Table::Handoff => "handoff",
        }
    }

    fn of_tag(tag: &str) -> Option<Table> {
        [
            Table::Context,
            Table::SessionRevocation,
            Table::Grant,
            Table::Alias,
            Table::Handoff,
        ]
        .into_iter()
        .find(|t| t.tag() == tag)
    }
}

/// A row of one of the engine's tables, named in a changelog record's key as `table \x1f key`
/// (a unit separator: row keys hold `\0` already, and no identifier holds `\x1f`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub table: Table,
    pub key: String,
}

const SEPARATOR: char = '\u{1f}';

impl Row {
    pub fn new(table: Table, key: impl Into<String>) -> Row {
        Row {
            table,
            key: key.into(),
        }
    }

    pub fn record_key(&self) -> String {
        format!("{}{SEPARATOR}{}", self.table.tag(), self.key)
    }

    /// The row a record key names; `None` for a key this release does not write.
    pub fn parse(record_key: &str) -> Option<Row> {
        let (tag, key) = record_key.split_once(SEPARATOR)?;
        Some(Row::new(Table::of_tag(tag)?, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_name_their_row_and_nothing_else() {
        for row in [
            Row::new(Table::Context, "email:jane@example.com"),
            Row::new(Table::SessionRevocation, "email:jane@example.com\0sess-1"),
            Row::new(Table::Grant, "g-1"),
            Row::new(Table::Alias, "phone:+1 555"),
            Row::new(Table::Handoff, "d-1"),
        ] {
            assert_eq!(Row::parse(&row.record_key()), Some(row));
        }
        assert_eq!(Row::parse("ctx"), None);
        assert_eq!(Row::parse("table\u{1f}key"), None);
    }
}
