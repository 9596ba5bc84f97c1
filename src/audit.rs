//! The audit log: every decision appended as one JSON line to `<data_dir>/audit/audit-NNNNNN.jsonl`,
//! fsynced before the state change it describes is committed (so the log never misses a decision
//! that took effect; after a crash a decision may appear twice, with the same deterministic id).
//! Files rotate at `max_bytes`; the newest `keep` files are kept. Queries scan the files.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::decision::Decision;

/// A query over the audit log. Absent filters match everything.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    pub subject: Option<String>,
    pub grant: Option<String>,
    /// Decisions made at or after this time (seconds).
    pub since: Option<f64>,
    /// Most decisions returned (the newest).
    pub limit: usize,
}

struct Current {
    file: File,
    index: u64,
    size: u64,
}

/// The append-only decision log.
pub struct AuditLog {
    dir: PathBuf,
    max_bytes: u64,
    keep: usize,
    current: Mutex<Current>,
}

impl AuditLog {
    pub fn open(dir: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        crate::store::private_dir(dir)?;
        let index = list_files(dir)?.last().map_or(1, |(i, _)| *i);
        let (file, size) = open_append(dir, index)?;
        Ok(AuditLog {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(1024),
            keep: keep.max(1),
            current: Mutex::new(Current { file, index, size }),
        })
    }

    /// Appends decisions and syncs them to disk.
    pub fn append(&self, decisions: &[Decision]) -> std::io::Result<()> {
        if decisions.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for d in decisions {
            serde_json::to_writer(&mut buf, d)?;
            buf.push(b'\n');
        }
        let mut cur = self
            .current
            .lock()
            .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
        if cur.size > 0 && cur.size + buf.len() as u64 > self.max_bytes {
            let index = cur.index + 1;
            let (file, size) = open_append(&self.dir, index)?;
            *cur = Current { file, index, size };
            self.prune()?;
        }
        cur.file.write_all(&buf)?;
        cur.file.sync_data()?;
        cur.size += buf.len() as u64;
        Ok(())
    }

    fn prune(&self) -> std::io::Result<()> {
        let files = list_files(&self.dir)?;
        if files.len() > self.keep {
            for (_, path) in &files[..files.len() - self.keep] {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// The newest decisions matching `q`, oldest first. Files are read newest first and the
    /// read stops once `limit` matches are found, so memory is bounded by `limit` whatever the
    /// log's size.
    pub fn query(&self, q: &DecisionQuery) -> std::io::Result<Vec<Decision>> {
        let limit = if q.limit == 0 { 1000 } else { q.limit };
        let mut out: VecDeque<Decision> = VecDeque::new();
        for (_, path) in list_files(&self.dir)?.into_iter().rev() {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // rotated away
                Err(e) => return Err(e),
            };
            // This file's newest matches, at most as many as are still wanted.
            let room = limit - out.len();
            let mut newest: VecDeque<Decision> = VecDeque::new();
            for line in BufReader::new(file).lines() {
                let line = line?;
                let Ok(d) = serde_json::from_str::<Decision>(&line) else {
                    continue; // a torn last line after a crash
                };
                let keep = q.subject.as_ref().is_none_or(|s| &d.subject == s)
                    && q.grant.as_ref().is_none_or(|g| &d.grant_id == g)
                    && q.since.is_none_or(|t| d.time >= t);
                if keep {
                    if newest.len() == room {
                        newest.pop_front();
                    }
                    newest.push_back(d);
                }
            }
            for d in newest.into_iter().rev() {
                out.push_front(d);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out.into())
    }
}

fn open_append(dir: &Path, index: u64) -> std::io::Result<(File, u64)> {
    let path = dir.join(format!("audit-{index:06}.jsonl"));
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    // Decisions name subjects and grants: the owner's alone.
    crate::store::private_file(&path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
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
        }
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
}
