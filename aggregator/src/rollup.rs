//! Metric rollups: raw points stay in hot, 5-minute buckets summarise the metric rows in warm, 1-hour buckets
//! summarise those in cold. Queries at `5m` and `1h` read the rollups instead of scanning (and, for cold,
//! fetching) every raw point; `raw` and `1m` read the points.
//!
//! Both tables live in the warm DuckDB file — beside the cold catalog — so an hourly query over years of data
//! fetches no object at all, and a backup carries them with the rest of warm:
//!
//! | table              | summarises                   | maintained by                                              |
//! |--------------------|------------------------------|------------------------------------------------------------|
//! | `warm.metric_5m`   | `warm.metric`                | hot→warm moves, warm→cold moves, cold→warm promotion, erasure |
//! | `warm.metric_1h`   | the visible rows of cold objects | warm→cold moves, compaction (which applies erasures), promotion |
//!
//! A warm file written before rollups existed gets its 5-minute buckets at open; its cold days are queued in
//! `warm.rollup_backfill` and the lifecycle computes their hourly buckets a few days per round.
//!
//! Each row is `(system_id, name, bucket, n, sum, min, max)`: partial aggregates, so a query merges buckets from
//! several tiers (a day split between two tiers, a 5-minute bucket folded into an hour) exactly — the mean is
//! `Σsum / Σn`.
//!
//! A rollup is never incremented: whatever changes the metric rows of a system's day recomputes that day's
//! buckets from the rows themselves, in the same transaction as the change. Re-delivered points (the same id
//! again) therefore count once, and a crash leaves either the old rows with the old buckets or the new with the
//! new.

use std::fmt::Write as _;

/// The tables, created with the warm tier.
pub(crate) const DDL: &str = "\
    CREATE TABLE IF NOT EXISTS warm.metric_5m (system_id VARCHAR NOT NULL, name VARCHAR NOT NULL, \
      bucket TIMESTAMP NOT NULL, n BIGINT NOT NULL, sum DOUBLE NOT NULL, min DOUBLE NOT NULL, max DOUBLE NOT NULL);\n\
    CREATE TABLE IF NOT EXISTS warm.metric_1h (system_id VARCHAR NOT NULL, name VARCHAR NOT NULL, \
      bucket TIMESTAMP NOT NULL, n BIGINT NOT NULL, sum DOUBLE NOT NULL, min DOUBLE NOT NULL, max DOUBLE NOT NULL);\n";

/// A rollup table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rollup {
    /// 5-minute buckets of warm rows.
    FiveMinutes,
    /// 1-hour buckets of cold rows.
    Hour,
}

impl Rollup {
    pub(crate) fn table(self) -> &'static str {
        match self {
            Rollup::FiveMinutes => "warm.metric_5m",
            Rollup::Hour => "warm.metric_1h",
        }
    }

    fn width(self) -> &'static str {
        match self {
            Rollup::FiveMinutes => "INTERVAL '5 minutes'",
            Rollup::Hour => "INTERVAL '1 hour'",
        }
    }

    /// SQL that replaces this rollup's buckets for the days `days` names — a relation with columns
    /// `(system_id, day DATE)` — with the buckets of `source`'s rows on those days. `source` is a relation with
    /// at least `system_id`, `name`, `ts` and `value`; a day without rows in `source` ends up without buckets.
    pub(crate) fn refresh_sql(self, days: &str, source: &str) -> String {
        let table = self.table();
        format!(
            "{clear}INSERT INTO {table} SELECT s.system_id, s.name, time_bucket({width}, s.ts), count(*), sum(s.value), \
               min(s.value), max(s.value) \
               FROM {source} s JOIN (SELECT DISTINCT system_id, day FROM {days}) d \
               ON s.system_id = d.system_id AND CAST(s.ts AS DATE) = d.day \
               WHERE s.name IS NOT NULL AND s.value IS NOT NULL AND isfinite(s.value) GROUP BY ALL;\n",
            clear = self.clear_sql(days),
            width = self.width(),
        )
    }

    /// SQL that removes this rollup's buckets for the days `days` names (see [`Rollup::refresh_sql`]).
    pub(crate) fn clear_sql(self, days: &str) -> String {
        format!(
            "DELETE FROM {} r USING (SELECT DISTINCT system_id, day FROM {days}) d \
               WHERE r.system_id = d.system_id AND CAST(r.bucket AS DATE) = d.day;\n",
            self.table()
        )
    }

    /// [`Rollup::refresh_sql`] from the rows in warm.
    pub(crate) fn refresh_from_warm_sql(self, days: &str) -> String {
        self.refresh_sql(days, "warm.metric")
    }
}

/// A `(VALUES …) AS d(system_id, day)` relation of `(system, YYYY-MM-DD)` pairs; `None` when there are none.
pub(crate) fn days_relation<'a>(days: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<String> {
    let mut values = String::new();
    for (system, day) in days {
        if !values.is_empty() {
            values.push_str(", ");
        }
        let _ = write!(values, "({}, DATE {})", crate::cold::sql_text(system), crate::cold::sql_text(day));
    }
    (!values.is_empty()).then(|| format!("(VALUES {values}) AS d(system_id, day)"))
}

/// Cold days whose hourly buckets are still to be computed (a warm file from before rollups existed):
/// [`crate::cold::ColdTier::backfill_rollups`] works through them a few at a time.
pub(crate) const BACKFILL_DDL: &str =
    "CREATE TABLE IF NOT EXISTS warm.rollup_backfill (system_id VARCHAR NOT NULL, day DATE NOT NULL);\n";

/// Queues every cold metric day of the catalog for [`BACKFILL_DDL`].
pub(crate) const QUEUE_COLD_DAYS: &str =
    "INSERT INTO warm.rollup_backfill SELECT DISTINCT system_id, day FROM warm.cold_objects WHERE kind = 'metric';\n";

/// Fills `warm.metric_5m` from warm's rows when the table is new (a warm file from before rollups existed).
pub(crate) fn backfill_sql() -> String {
    Rollup::FiveMinutes.refresh_from_warm_sql("(SELECT system_id, CAST(ts AS DATE) AS day FROM warm.metric)")
}
