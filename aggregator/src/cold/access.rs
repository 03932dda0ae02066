//! How often old data is read, per (kind, system, day): the input of access-based promotion.
//!
//! Every record a query returns from cold (or from warm when it is older than the warm window, i.e. it was
//! promoted) adds one read to its group, at most once per query. A group's score decays exponentially with a
//! half-life of `promotion.window`, so "read N times within the window" is "score ≥ N", and a group nobody reads
//! any more cools down by itself. Counting is a hash-map update in memory; the scores are written to
//! `warm.access_scores` by every lifecycle round and read back at start, so they survive restarts (a crash loses
//! at most the reads since the last round).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use duckdb::Connection;

use super::sql_text;

/// A group of records that moves between tiers as one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    /// Record kind.
    pub kind: String,
    /// System id.
    pub system_id: String,
    /// Day (UTC) of the records' `ts`, `YYYY-MM-DD`.
    pub day: String,
}

impl Group {
    /// The group of a record with `ts` (microseconds since the epoch).
    pub fn of(kind: &str, system_id: &str, ts_us: i64) -> Group {
        let day = jiff::Timestamp::from_microsecond(ts_us)
            .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date().to_string())
            .unwrap_or_else(|_| "1970-01-01".into());
        Group { kind: kind.to_owned(), system_id: system_id.to_owned(), day }
    }
}

#[derive(Debug, Clone, Copy)]
struct Score {
    value: f64,
    at_us: i64,
}

/// Decayed read counts per group.
#[derive(Debug)]
pub struct AccessTracker {
    half_life_us: f64,
    scores: Mutex<HashMap<Group, Score>>,
}

/// Scores below this are forgotten when saved.
const FORGET_BELOW: f64 = 0.01;

impl AccessTracker {
    /// Scores halve every `half_life`.
    pub fn new(half_life: Duration) -> AccessTracker {
        AccessTracker { half_life_us: half_life.as_micros().max(1) as f64, scores: Mutex::default() }
    }

    fn decayed(&self, score: Score, now_us: i64) -> f64 {
        let elapsed = (now_us - score.at_us).max(0) as f64;
        score.value * 0.5f64.powf(elapsed / self.half_life_us)
    }

    /// One read of each of `groups` (duplicates count once: one query reads a group once).
    pub fn note(&self, groups: impl IntoIterator<Item = Group>, now_us: i64) {
        let groups: HashSet<Group> = groups.into_iter().collect();
        if groups.is_empty() {
            return;
        }
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        for group in groups {
            let value = scores.get(&group).map_or(0.0, |s| self.decayed(*s, now_us)) + 1.0;
            scores.insert(group, Score { value, at_us: now_us });
        }
    }

    /// A group's score now.
    pub fn score(&self, group: &Group, now_us: i64) -> f64 {
        let scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        scores.get(group).map_or(0.0, |s| self.decayed(*s, now_us))
    }

    /// Groups scoring at least `threshold` now, best first.
    pub fn at_least(&self, threshold: f64, now_us: i64) -> Vec<(Group, f64)> {
        let scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(Group, f64)> = scores
            .iter()
            .map(|(g, s)| (g.clone(), self.decayed(*s, now_us)))
            .filter(|(_, score)| *score >= threshold)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Creates the table (`conn` has warm attached) and loads the saved scores.
    pub fn load(&self, conn: &Connection) -> Result<(), duckdb::Error> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS warm.access_scores (kind VARCHAR NOT NULL, system_id VARCHAR NOT NULL, \
             day DATE NOT NULL, score DOUBLE NOT NULL, updated_at TIMESTAMP NOT NULL);",
        )?;
        let mut stmt = conn.prepare(
            "SELECT kind, system_id, strftime(day, '%Y-%m-%d'), score, epoch_us(updated_at) FROM warm.access_scores",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                Group { kind: r.get(0)?, system_id: r.get(1)?, day: r.get(2)? },
                Score { value: r.get(3)?, at_us: r.get(4)? },
            ))
        })?;
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let (group, score) = row?;
            scores.insert(group, score);
        }
        Ok(())
    }

    /// Replaces the saved scores with the current ones (forgetting those that decayed to nothing).
    pub fn save(&self, conn: &Connection, now_us: i64) -> Result<(), duckdb::Error> {
        let rows: Vec<String> = {
            let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
            scores.retain(|_, s| self.decayed(*s, now_us) >= FORGET_BELOW);
            scores
                .iter()
                .map(|(g, s)| {
                    format!(
                        "({}, {}, DATE {}, {}, make_timestamp({}))",
                        sql_text(&g.kind),
                        sql_text(&g.system_id),
                        sql_text(&g.day),
                        s.value,
                        s.at_us
                    )
                })
                .collect()
        };
        let mut sql = String::from("BEGIN TRANSACTION; DELETE FROM warm.access_scores;");
        for chunk in rows.chunks(1000) {
            sql.push_str(&format!(" INSERT INTO warm.access_scores VALUES {};", chunk.join(", ")));
        }
        sql.push_str(" COMMIT;");
        if let Err(e) = conn.execute_batch(&sql) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_US: i64 = 86_400_000_000;

    #[test]
    fn reads_decay_with_the_half_life_and_one_query_counts_once() {
        let tracker = AccessTracker::new(Duration::from_secs(86_400));
        let g = Group::of("conversation", "a", 3 * DAY_US + 5);
        assert_eq!(g.day, "1970-01-04");
        tracker.note([g.clone(), g.clone()], 0);
        assert!((tracker.score(&g, 0) - 1.0).abs() < 1e-9);
        tracker.note([g.clone()], 0);
        tracker.note([g.clone()], 0);
        assert!((tracker.score(&g, 0) - 3.0).abs() < 1e-9);
        assert!((tracker.score(&g, DAY_US) - 1.5).abs() < 1e-9, "halved after one half-life");
        let other = Group::of("conversation", "b", 0);
        tracker.note([other.clone()], 0);
        let hot: Vec<Group> = tracker.at_least(2.0, 0).into_iter().map(|(g, _)| g).collect();
        assert_eq!(hot, std::slice::from_ref(&g));
        assert!(tracker.at_least(2.0, 2 * DAY_US).is_empty());
    }

    #[test]
    fn scores_survive_a_save_and_load() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("ATTACH ':memory:' AS warm;").unwrap();
        let tracker = AccessTracker::new(Duration::from_secs(86_400));
        tracker.load(&conn).unwrap();
        let g = Group::of("reflection", "it's", 0);
        tracker.note([g.clone()], 0);
        tracker.note([g.clone()], 0);
        tracker.note([Group::of("reflection", "faded", 0)], -100 * DAY_US);
        tracker.save(&conn, 0).unwrap();
        let again = AccessTracker::new(Duration::from_secs(86_400));
        again.load(&conn).unwrap();
        assert!((again.score(&g, 0) - 2.0).abs() < 1e-9);
        assert_eq!(again.at_least(0.0, 0).len(), 1, "the faded score was forgotten");
    }
}
