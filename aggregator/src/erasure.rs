//! Deleting records across every tier — for retention and right-to-erasure requests — and the append-only,
//! hash-chained audit log that records each deletion.
//!
//! A deletion names what goes with a [`Selector`] (a system, a project, or one record by id). It runs in this
//! order, each step durable before the next:
//!
//! 1. `delete.requested` is appended to the audit log (fsync) with the write-ahead log position up to which hot
//!    has applied batches — taken under hot's writer lock, so no batch slips in between.
//! 2. Hot and warm rows matching the selector are deleted and leave the search indexes; the warm file persists.
//! 3. Cold objects are immutable: a tombstone in the warm catalog hides the matching rows from every cold read
//!    at once, and compaction rewrites (or drops) the objects that hold them, then retires the tombstone.
//! 4. `delete.completed` is appended with what each tier deleted.
//!
//! On restart, the log's records before a requested deletion's position that match its selector are not
//! replayed (they were deleted or were about to be), and a deletion without `completed` is run again — every
//! step is idempotent. Records that arrive after the deletion are kept: hot and warm by position, cold by
//! `ingested_at` (a tombstone only hides rows ingested before it).
//!
//! The audit log (`<data_dir>/audit/audit.jsonl`) is one JSON object per line. Each carries `seq`, `prev` (the
//! previous line's `hash`) and `hash` = sha256 of the line's other fields in canonical form; [`AuditLog::verify`]
//! recomputes the chain, so an edited, reordered or removed line is reported with its sequence number.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use akosha_protocol::{Record, RecordKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// What a deletion covers. At least a system or a project; an id also needs its system and kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Records of this system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// Records of this project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Records of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "kind_name")]
    pub kind: Option<RecordKind>,
    /// The record with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A kind as its name (`conversation`, …).
mod kind_name {
    use akosha_protocol::RecordKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(kind: &Option<RecordKind>, s: S) -> Result<S::Ok, S::Error> {
        match kind {
            Some(k) => s.serialize_str(k.as_str()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RecordKind>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(name) => name.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{name}` is not a record kind (conversation, reflection, entity, relation, metric)"
                ))
            }),
            None => Ok(None),
        }
    }
}

/// Why a selector or the audit log was refused.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    /// The selector does not say clearly what to delete.
    #[error("invalid deletion: {0}")]
    Invalid(String),
    /// A tier refused the deletion (it is re-run at the next start if it was recorded as requested).
    #[error("deletion failed: {0}")]
    Storage(String),
    /// The audit log could not be read or written.
    #[error("audit log {path}: {message}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl Selector {
    /// Refuses selectors that would delete more than meant (nothing named) or are ambiguous.
    pub fn validate(&self) -> Result<(), ErasureError> {
        let blank = |v: &Option<String>| v.as_deref().is_some_and(|s| s.trim().is_empty());
        if blank(&self.system_id) || blank(&self.project) || blank(&self.id) {
            return Err(ErasureError::Invalid("`system_id`, `project` and `id` must not be empty when given".into()));
        }
        if self.system_id.is_none() && self.project.is_none() {
            return Err(ErasureError::Invalid(
                "name a `system_id` or a `project` (deleting everything is not a deletion request)".into(),
            ));
        }
        if self.id.is_some() && (self.system_id.is_none() || self.kind.is_none()) {
            return Err(ErasureError::Invalid("deleting by `id` needs its `system_id` and `kind` too".into()));
        }
        Ok(())
    }

    /// The kinds it covers.
    pub fn kinds(&self) -> Vec<RecordKind> {
        match self.kind {
            Some(kind) => vec![kind],
            None => RecordKind::ALL.to_vec(),
        }
    }

    /// A SQL condition on a row alias (`kind` is not a column: callers pick the tables with [`Self::kinds`]).
    pub fn sql(&self, alias: &str) -> String {
        let mut parts = vec!["TRUE".to_owned()];
        for (column, value) in [("system_id", &self.system_id), ("project", &self.project), ("id", &self.id)] {
            if let Some(v) = value {
                parts.push(format!("{alias}.{column} = {}", crate::cold::sql_text(v)));
            }
        }
        parts.join(" AND ")
    }

    /// Whether a record falls under it.
    pub fn matches(&self, r: &Record) -> bool {
        self.system_id.as_ref().is_none_or(|s| *s == r.system_id)
            && self.project.as_ref().is_none_or(|p| r.project.as_ref() == Some(p))
            && self.kind.is_none_or(|k| k == r.kind)
            && self.id.as_ref().is_none_or(|i| *i == r.id)
    }
}

/// Rows deleted per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Rows deleted from hot.
    pub hot: u64,
    /// Rows deleted from warm.
    pub warm: u64,
    /// Tombstones written for cold (the rows go when compaction rewrites their objects).
    pub cold_tombstones: u64,
}

/// A deletion as the audit log keeps it, for replay and for re-running one a crash interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The audit entry's sequence number (also the deletion's id).
    pub seq: u64,
    /// What it covers.
    pub selector: Selector,
    /// Log entries before this position were applied to hot when it ran.
    pub wal_position: u64,
    /// Rows ingested at or before this (microseconds since the epoch) are covered.
    pub at_us: i64,
    /// Whether `delete.completed` followed.
    pub completed: bool,
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainCheck {
    /// Entries read.
    pub entries: u64,
    /// `None` when every hash and link holds, else the first broken entry and why.
    pub broken: Option<String>,
}

/// The append-only, hash-chained audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<Tail>,
}

#[derive(Debug)]
struct Tail {
    seq: u64,
    hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// sha256 over the entry without its `hash`; serde_json's maps are ordered, so the form is canonical.
fn entry_hash(entry: &Value) -> String {
    let mut body = entry.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("hash");
    }
    crate::cold::cache::hex(&Sha256::digest(body.to_string().as_bytes()))
}

impl AuditLog {
    /// Opens (creating) the log under `dir`, checking the chain; a broken chain is an error naming the entry, so
    /// that tampering is noticed at start-up rather than extended.
    pub fn open(dir: &Path) -> Result<AuditLog, ErasureError> {
        let path = dir.join("audit.jsonl");
        let fail = |message: String| ErasureError::Audit { path: path.clone(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        // A torn last line (a crash mid-append) is cut off, so that the next entry starts on a line of its own.
        if let Ok(bytes) = std::fs::read(&path)
            && !bytes.is_empty()
            && !bytes.ends_with(b"\n")
        {
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| fail(e.to_string()))?;
            file.set_len(keep as u64).map_err(|e| fail(e.to_string()))?;
            file.sync_all().map_err(|e| fail(e.to_string()))?;
        }
        let (entries, check) = Self::read(&path)?;
        if let Some(broken) = check.broken {
            return Err(fail(format!("the hash chain is broken: {broken}")));
        }
        let tail = entries.last().map_or(Tail { seq: 0, hash: GENESIS.into() }, |e| Tail {
            seq: e["seq"].as_u64().unwrap_or(0),
            hash: e["hash"].as_str().unwrap_or(GENESIS).to_owned(),
        });
        Ok(AuditLog { path, state: Mutex::new(tail) })
    }

    /// Every entry, and whether the chain holds. A torn last line (a crash mid-append) is not part of the chain.
    pub fn read(path: &Path) -> Result<(Vec<Value>, ChainCheck), ErasureError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(ErasureError::Audit { path: path.to_owned(), message: e.to_string() }),
        };
        let mut entries = Vec::new();
        let mut prev = GENESIS.to_owned();
        let mut broken = None;
        let lines: Vec<&str> = text.lines().collect();
        let complete = if text.ends_with('\n') { lines.len() } else { lines.len().saturating_sub(1) };
        for (i, line) in lines.iter().take(complete).enumerate() {
            let expected_seq = i as u64 + 1;
            let entry: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    broken = Some(format!("line {expected_seq} is not JSON: {e}"));
                    break;
                }
            };
            let problem = if entry["seq"].as_u64() != Some(expected_seq) {
                Some(format!("line {expected_seq} has seq {}", entry["seq"]))
            } else if entry["prev"].as_str() != Some(prev.as_str()) {
                Some(format!("entry {expected_seq} does not link to the entry before it"))
            } else if entry["hash"].as_str() != Some(entry_hash(&entry).as_str()) {
                Some(format!("entry {expected_seq} was changed after it was written (hash mismatch)"))
            } else {
                None
            };
            if problem.is_some() {
                broken = problem;
                break;
            }
            prev = entry["hash"].as_str().unwrap_or_default().to_owned();
            entries.push(entry);
        }
        let check = ChainCheck { entries: entries.len() as u64, broken };
        Ok((entries, check))
    }

    /// Appends an entry (`action` plus `fields`) durably and returns its sequence number.
    pub fn append(&self, action: &str, fields: Value) -> Result<u64, ErasureError> {
        let fail = |message: String| ErasureError::Audit { path: self.path.clone(), message };
        let mut tail = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = tail.seq + 1;
        let mut entry = json!({
            "seq": seq,
            "at": jiff::Timestamp::now().as_microsecond(),
            "action": action,
            "prev": tail.hash,
        });
        if let (Some(map), Value::Object(extra)) = (entry.as_object_mut(), fields) {
            for (k, v) in extra {
                map.entry(k).or_insert(v);
            }
        }
        let hash = entry_hash(&entry);
        entry["hash"] = json!(hash);
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| fail(e.to_string()))?;
        file.write_all(format!("{entry}\n").as_bytes()).map_err(|e| fail(e.to_string()))?;
        file.sync_data().map_err(|e| fail(e.to_string()))?;
        *tail = Tail { seq, hash };
        Ok(seq)
    }

    /// The newest `limit` entries, newest first, and the chain check.
    pub fn tail(&self, limit: usize) -> Result<(Vec<Value>, ChainCheck), ErasureError> {
        let (mut entries, check) = Self::read(&self.path)?;
        entries.reverse();
        entries.truncate(limit);
        Ok((entries, check))
    }

    /// Every requested deletion, with whether it completed.
    pub fn deletions(&self) -> Result<Vec<Requested>, ErasureError> {
        Self::deletions_in(&self.path)
    }

    /// [`Self::deletions`] of the log at `path` (read before the aggregator opens it, for the replay).
    pub fn deletions_in(path: &Path) -> Result<Vec<Requested>, ErasureError> {
        let (entries, _) = Self::read(path)?;
        let mut out: Vec<Requested> = Vec::new();
        for e in &entries {
            match e["action"].as_str() {
                Some("delete.requested") => {
                    let Ok(selector) = serde_json::from_value::<Selector>(e["selector"].clone()) else { continue };
                    out.push(Requested {
                        seq: e["seq"].as_u64().unwrap_or(0),
                        selector,
                        wal_position: e["wal_position"].as_u64().unwrap_or(0),
                        at_us: e["ingested_before"].as_i64().or(e["at"].as_i64()).unwrap_or(0),
                        completed: false,
                    });
                }
                Some("delete.completed") => {
                    let request = e["request"].as_u64();
                    if let Some(r) = out.iter_mut().find(|r| Some(r.seq) == request) {
                        r.completed = true;
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Copies the log as it is now to `dest` (no append can interleave).
    pub fn copy_to(&self, dest: &Path) -> Result<(), ErasureError> {
        let fail = |message: String| ErasureError::Audit { path: self.path.clone(), message };
        let _tail = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match std::fs::copy(&self.path, dest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(dest, b"").map_err(|e| fail(e.to_string()))?;
            }
            Err(e) => return Err(fail(e.to_string())),
        }
        Ok(())
    }

    /// The first deletion that is not completed now (or the next sequence number). A backup records it: after a
    /// restore, deletions from there on run again, because their effects may be missing from the copied tiers.
    pub fn unsettled_from(&self) -> Result<u64, ErasureError> {
        let tail = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = Self::deletions_in(&self.path)?.into_iter().filter(|d| !d.completed).map(|d| d.seq).min();
        Ok(open.unwrap_or(tail.seq + 1))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What one deletion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The `delete.requested` entry's sequence number.
    pub request: u64,
    /// Rows deleted or hidden per tier.
    pub deleted: Deleted,
}

/// Runs a deletion through every tier and the audit log (see the module notes for the order).
pub fn delete(
    hot: &crate::hot::HotTier,
    audit: &AuditLog,
    selector: &Selector,
    reason: &str,
    actor: &str,
) -> Result<Outcome, ErasureError> {
    selector.validate()?;
    if reason.trim().is_empty() {
        return Err(ErasureError::Invalid("say why (`reason`): the audit log keeps it".into()));
    }
    let (mut request, mut cutoff) = (0, 0);
    let deleted = hot
        .delete(selector, None, |wal_position, ingested_before| {
            cutoff = ingested_before;
            request = audit
                .append(
                    "delete.requested",
                    json!({"selector": selector, "reason": reason, "actor": actor, "wal_position": wal_position,
                           "ingested_before": ingested_before}),
                )
                .map_err(|e| crate::hot::HotError::Io(e.to_string()))?;
            Ok(())
        })
        .map_err(|e| ErasureError::Storage(e.to_string()))?;
    finish(hot, audit, request, selector, cutoff, deleted, "delete.completed")
}

/// Tombstones cold, then records completion.
fn finish(
    hot: &crate::hot::HotTier,
    audit: &AuditLog,
    request: u64,
    selector: &Selector,
    ingested_before_us: i64,
    mut deleted: Deleted,
    action: &str,
) -> Result<Outcome, ErasureError> {
    if let Some(cold) = hot.cold() {
        deleted.cold_tombstones =
            cold.tombstone(request, selector, ingested_before_us).map_err(|e| ErasureError::Storage(e.to_string()))?;
    }
    audit.append(action, json!({"request": request, "deleted": deleted}))?;
    tracing::info!(
        message = "Deleted records.",
        request,
        hot = deleted.hot,
        warm = deleted.warm,
        cold_tombstones = deleted.cold_tombstones
    );
    Ok(Outcome { request, deleted })
}

/// Written beside the audit log by a restore: deletions from `reapply_from` on run again at the next start.
pub const RESTORED_MARKER: &str = "restored.json";

/// Runs again the deletions a crash interrupted (requested, never completed), and after a restore those the
/// backup may have caught half-applied (see [`AuditLog::unsettled_from`]). Hot needs nothing: the replay
/// already left their records out.
pub fn resume(hot: &crate::hot::HotTier, audit: &AuditLog) -> Result<Vec<Outcome>, ErasureError> {
    let marker = audit.path().with_file_name(RESTORED_MARKER);
    let reapply_from = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["reapply_from"].as_u64());
    let mut out = Vec::new();
    for d in audit.deletions()?.into_iter().filter(|d| !d.completed || reapply_from.is_some_and(|n| d.seq >= n)) {
        tracing::warn!(message = "Finishing a deletion a restart or restore interrupted.", request = d.seq);
        let deleted =
            hot.delete(&d.selector, Some(d.at_us), |_, _| Ok(())).map_err(|e| ErasureError::Storage(e.to_string()))?;
        let action = if d.completed { "delete.reapplied" } else { "delete.completed" };
        out.push(finish(hot, audit, d.seq, &d.selector, d.at_us, deleted, action)?);
    }
    if reapply_from.is_some() {
        std::fs::remove_file(&marker)
            .map_err(|e| ErasureError::Audit { path: marker.clone(), message: e.to_string() })?;
    }
    Ok(out)
}

/// Whether a replayed record at `position` was covered by a deletion.
pub fn erased(deletions: &[Requested], position: u64, record: &Record) -> bool {
    deletions.iter().any(|d| position < d.wal_position && d.selector.matches(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(system: &str, project: Option<&str>, id: &str) -> Record {
        Record {
            system_id: system.into(),
            kind: RecordKind::Conversation,
            id: id.into(),
            ts: 0,
            project: project.map(str::to_owned),
            ..Record::default()
        }
    }

    #[test]
    fn selectors_must_name_what_they_delete() {
        let ok = |s: Selector| s.validate().is_ok();
        assert!(!ok(Selector::default()));
        assert!(!ok(Selector { kind: Some(RecordKind::Reflection), ..Default::default() }));
        assert!(!ok(Selector { system_id: Some(" ".into()), ..Default::default() }));
        assert!(!ok(Selector { system_id: Some("a".into()), id: Some("x".into()), ..Default::default() }));
        assert!(ok(Selector { project: Some("p".into()), ..Default::default() }));
        assert!(ok(Selector {
            system_id: Some("a".into()),
            kind: Some(RecordKind::Conversation),
            id: Some("x".into()),
            ..Default::default()
        }));
        let s = Selector { system_id: Some("a".into()), project: Some("p'q".into()), ..Default::default() };
        assert_eq!(s.sql("w"), "TRUE AND w.system_id = 'a' AND w.project = 'p''q'");
        assert!(s.matches(&record("a", Some("p'q"), "1")));
        assert!(!s.matches(&record("a", None, "1")));
        assert!(!s.matches(&record("b", Some("p'q"), "1")));
    }

    #[test]
    fn the_chain_detects_edits_and_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        let selector = Selector { system_id: Some("a".into()), ..Default::default() };
        let seq = log
            .append("delete.requested", json!({"selector": selector, "wal_position": 7, "reason": "gdpr #1"}))
            .unwrap();
        log.append("delete.completed", json!({"request": seq, "deleted": Deleted { hot: 3, ..Default::default() }}))
            .unwrap();
        drop(log);
        // A crash mid-append leaves a torn line: not part of the chain, and the next append continues it.
        let path = dir.path().join("audit.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}{{\"seq\":3,")).unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append("note", json!({})).unwrap();
        assert_eq!(AuditLog::read(&path).unwrap().1, ChainCheck { entries: 3, broken: None });
        text = std::fs::read_to_string(&path).unwrap();
        let deletions = log.deletions().unwrap();
        assert_eq!(deletions.len(), 1);
        assert_eq!((deletions[0].wal_position, deletions[0].completed), (7, true));
        assert!(erased(&deletions, 6, &record("a", None, "x")));
        assert!(!erased(&deletions, 7, &record("a", None, "x")), "arrived after the deletion");
        assert!(!erased(&deletions, 1, &record("b", None, "x")));
        drop(log);

        // Editing an entry breaks the chain, and the log refuses to grow on top of it.
        text = text.replace("gdpr #1", "gdpr #2");
        std::fs::write(&path, &text).unwrap();
        let err = AuditLog::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("entry 1 was changed"), "{err}");
        // Removing the first entry breaks the links.
        let second = text.lines().nth(1).unwrap().to_owned();
        std::fs::write(&path, format!("{second}\n")).unwrap();
        let (_, check) = AuditLog::read(&path).unwrap();
        assert!(check.broken.unwrap().contains("line 1 has seq 2"));
    }
}
