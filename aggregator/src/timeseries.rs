//! Metric queries over `metric` records: time ranges at a chosen resolution, and the analyses Akosha offers
//! (trend, anomalies, cross-system correlation), computed in DuckDB over the downsampled series.
//!
//! Differences from the Python peer, on purpose: every analysis works per system and per metric name instead
//! of pooling unrelated series; correlation aligns the systems on common time buckets (the peer correlates
//! whatever values happen to share an index); anomalies can use a robust score (median and MAD), which a few
//! large outliers cannot hide behind the way they inflate a standard deviation.

use duckdb::{Connection, ToSql};
use serde::Serialize;

use crate::graph::{system_clause, time_clause};
use crate::hot::HotError;

/// Resolution of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// Every stored point.
    Raw,
    /// One-minute buckets.
    #[serde(rename = "1m")]
    Minute,
    /// Five-minute buckets.
    #[serde(rename = "5m")]
    FiveMinutes,
    /// One-hour buckets.
    #[serde(rename = "1h")]
    Hour,
}

impl Resolution {
    /// Parses `raw`, `1m`, `5m`, `1h`; `auto` (and nothing) picks by range: under a day raw, under 30 days
    /// 5 minutes, beyond that hourly.
    pub fn parse(text: Option<&str>, since_us: Option<i64>, until_us: Option<i64>) -> Result<Resolution, String> {
        match text.unwrap_or("auto") {
            "raw" => Ok(Resolution::Raw),
            "1m" => Ok(Resolution::Minute),
            "5m" => Ok(Resolution::FiveMinutes),
            "1h" => Ok(Resolution::Hour),
            "auto" => {
                let now = jiff::Timestamp::now().as_microsecond();
                let span = until_us.unwrap_or(now) - since_us.unwrap_or(0);
                const DAY: i64 = 86_400_000_000;
                Ok(if span < DAY {
                    Resolution::Raw
                } else if span < 30 * DAY {
                    Resolution::FiveMinutes
                } else {
                    Resolution::Hour
                })
            }
            other => Err(format!("`resolution` must be raw, 1m, 5m, 1h or auto, not `{other}`")),
        }
    }

    fn bucket_sql(self) -> &'static str {
        match self {
            Resolution::Raw => "ts",
            Resolution::Minute => "time_bucket(INTERVAL '1 minute', ts)",
            Resolution::FiveMinutes => "time_bucket(INTERVAL '5 minutes', ts)",
            Resolution::Hour => "time_bucket(INTERVAL '1 hour', ts)",
        }
    }
}

/// Which points a metric query covers.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    /// Metric name.
    pub name: String,
    /// Systems (all when empty).
    pub systems: Vec<String>,
    /// From (inclusive), microseconds since the epoch.
    pub since_us: Option<i64>,
    /// Until (exclusive), microseconds since the epoch.
    pub until_us: Option<i64>,
    /// Resolution.
    pub resolution: Resolution,
}

/// One point of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Bucket start (or the point's time), microseconds since the epoch.
    pub ts: i64,
    /// Mean of the bucket.
    pub value: f64,
    /// Minimum of the bucket.
    pub min: f64,
    /// Maximum of the bucket.
    pub max: f64,
    /// Points in the bucket.
    pub count: u64,
}

/// One system's series.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// System id.
    pub system_id: String,
    /// Points, oldest first.
    pub points: Vec<Point>,
}

/// A linear trend.
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    /// System id.
    pub system_id: String,
    /// `increasing`, `decreasing` or `stable` (fitted change under 5 % of the mean level).
    pub direction: &'static str,
    /// Least-squares slope, units per hour.
    pub slope_per_hour: f64,
    /// Fitted change over the range, percent of the mean level.
    pub change_percent: f64,
    /// Goodness of fit.
    pub r_squared: f64,
    /// Points fitted.
    pub points: u64,
}

/// An anomalous point.
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    /// System id.
    pub system_id: String,
    /// Time, microseconds since the epoch.
    pub ts: i64,
    /// Value.
    pub value: f64,
    /// Score (standard or robust z).
    pub score: f64,
    /// The series' centre the score is relative to (mean or median).
    pub centre: f64,
}

/// Correlation of two systems' series.
#[derive(Debug, Clone, Serialize)]
pub struct Correlation {
    /// First system.
    pub system_a: String,
    /// Second system.
    pub system_b: String,
    /// Pearson's r over common buckets.
    pub r: f64,
    /// Common buckets.
    pub points: u64,
    /// `strong` (|r| ≥ 0.7), `moderate` (≥ 0.4) or `weak`.
    pub strength: &'static str,
}

/// A metric name and how much of it is stored.
#[derive(Debug, Clone, Serialize)]
pub struct MetricSummary {
    /// System id.
    pub system_id: String,
    /// Metric name.
    pub name: String,
    /// Points.
    pub points: u64,
    /// Latest value.
    pub latest: f64,
    /// Mean.
    pub mean: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// First point, microseconds since the epoch.
    pub first_ts: i64,
    /// Last point, microseconds since the epoch.
    pub last_ts: i64,
}

/// The bucketed series as a SQL subquery `(system_id, b, v, lo, hi, n)` with its parameters.
///
/// `raw` and `1m` bucket every point. Where the warm tier keeps rollups (see [`crate::rollup`]), `5m` merges
/// hot and cold points with warm's 5-minute buckets, and `1h` merges hot points with warm's 5-minute and cold's
/// hourly buckets — no cold object is read. A rollup bucket counts when its start is in the range.
fn series_sql<'a>(conn: &Connection, q: &'a SeriesQuery, params: &mut Vec<&'a dyn ToSql>) -> Result<String, HotError> {
    let bucket = q.resolution.bucket_sql();
    let points = |tiers: &str, params: &mut Vec<&'a dyn ToSql>| {
        params.push(&q.name);
        let mut sql = format!(
            "SELECT system_id, {bucket} AS b, count(*) AS n, sum(value) AS s, min(value) AS lo, max(value) AS hi \
             FROM all_metric WHERE name = ? AND value IS NOT NULL AND isfinite(value){tiers}"
        );
        sql.push_str(&system_clause("system_id", &q.systems, params));
        sql.push_str(&time_clause(&q.since_us, &q.until_us, params));
        sql.push_str(" GROUP BY ALL");
        sql
    };
    let rollup = |rollup: crate::rollup::Rollup, params: &mut Vec<&'a dyn ToSql>| {
        params.push(&q.name);
        let table = rollup.table();
        // Warm days promoted to hot are counted from their hot copy.
        let promoted = match rollup {
            crate::rollup::Rollup::FiveMinutes => {
                format!(" AND {}", crate::warm::not_promoted(akosha_protocol::RecordKind::Metric, "r"))
            }
            crate::rollup::Rollup::Hour => String::new(),
        };
        let mut sql = format!(
            "SELECT system_id, {bucket} AS b, sum(n) AS n, sum(sum) AS s, min(min) AS lo, max(max) AS hi \
             FROM (SELECT system_id, name, bucket AS ts, n, sum, min, max FROM {table}) r WHERE name = ?{promoted}"
        );
        sql.push_str(&system_clause("system_id", &q.systems, params));
        sql.push_str(&time_clause(&q.since_us, &q.until_us, params));
        sql.push_str(" GROUP BY ALL");
        sql
    };
    let has_rollups: bool = conn.query_row(
        "SELECT count(*) > 0 FROM duckdb_tables() WHERE database_name = 'warm' AND table_name = 'metric_5m'",
        [],
        |r| r.get(0),
    )?;
    let parts = match q.resolution {
        Resolution::FiveMinutes if has_rollups => {
            vec![points(" AND tier IN ('hot', 'cold')", params), rollup(crate::rollup::Rollup::FiveMinutes, params)]
        }
        Resolution::Hour if has_rollups => vec![
            points(" AND tier = 'hot'", params),
            rollup(crate::rollup::Rollup::FiveMinutes, params),
            rollup(crate::rollup::Rollup::Hour, params),
        ],
        _ => vec![points("", params)],
    };
    Ok(format!(
        "SELECT system_id, b, sum(s) / sum(n) AS v, min(lo) AS lo, max(hi) AS hi, sum(n)::BIGINT AS n \
         FROM ({}) GROUP BY system_id, b",
        parts.join(" UNION ALL ")
    ))
}

/// Whether a query at `resolution` reads raw points of cold objects (`1h` reads the hourly rollups instead,
/// where the warm tier keeps them).
pub fn reads_cold_points(resolution: Resolution) -> bool {
    resolution != Resolution::Hour
}

/// The series of every matching system, at the query's resolution.
pub fn range(conn: &Connection, q: &SeriesQuery, max_points: usize) -> Result<Vec<Series>, HotError> {
    let mut params = Vec::new();
    let inner = series_sql(conn, q, &mut params)?;
    let sql = format!("SELECT system_id, epoch_us(b), v, lo, hi, n FROM ({inner}) ORDER BY system_id, b");
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params.as_slice())?;
    let mut out: Vec<Series> = Vec::new();
    while let Some(row) = rows.next()? {
        let system_id: String = row.get(0)?;
        if out.last().is_none_or(|s| s.system_id != system_id) {
            out.push(Series { system_id, points: Vec::new() });
        }
        let series = out.last_mut().expect("pushed above");
        if series.points.len() < max_points {
            series.points.push(Point {
                ts: row.get(1)?,
                value: row.get(2)?,
                min: row.get(3)?,
                max: row.get(4)?,
                count: row.get::<_, i64>(5)? as u64,
            });
        }
    }
    Ok(out)
}

/// A least-squares line through each system's series.
pub fn trend(conn: &Connection, q: &SeriesQuery) -> Result<Vec<Trend>, HotError> {
    let mut params = Vec::new();
    let inner = series_sql(conn, q, &mut params)?;
    // x in hours since the first bucket keeps the regression numerically tame.
    let sql = format!(
        "WITH s AS ({inner}), x AS (SELECT system_id, (epoch(b) - min(epoch(b)) OVER (PARTITION BY system_id)) / 3600.0 AS h, v FROM s) \
         SELECT system_id, regr_slope(v, h), coalesce(regr_r2(v, h), 0), avg(v), max(h) - min(h), count(*) \
         FROM x GROUP BY system_id HAVING count(*) >= 2 ORDER BY system_id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |row| {
        let slope: Option<f64> = row.get(1)?;
        let slope = slope.unwrap_or(0.0);
        let mean: f64 = row.get(3)?;
        let span: f64 = row.get(4)?;
        let change = slope * span;
        let change_percent = if mean.abs() > f64::EPSILON { 100.0 * change / mean.abs() } else { 0.0 };
        Ok(Trend {
            system_id: row.get(0)?,
            direction: if change_percent.abs() < 5.0 {
                "stable"
            } else if slope > 0.0 {
                "increasing"
            } else {
                "decreasing"
            },
            slope_per_hour: slope,
            change_percent,
            r_squared: row.get(2)?,
            points: row.get::<_, i64>(5)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Points whose score exceeds `threshold`: the standard z-score, or with `robust` the modified z-score
/// `0.6745 · (x − median) / MAD` (falling back to the standard one where the MAD is zero).
pub fn anomalies(
    conn: &Connection,
    q: &SeriesQuery,
    threshold: f64,
    robust: bool,
    limit: usize,
) -> Result<Vec<Anomaly>, HotError> {
    let mut params = Vec::new();
    let inner = series_sql(conn, q, &mut params)?;
    let sql = format!(
        "WITH s AS ({inner}), \
         stats AS (SELECT system_id, avg(v) AS mean, stddev_samp(v) AS sd, median(v) AS med, count(*) AS n FROM s GROUP BY 1), \
         mad AS (SELECT s.system_id, median(abs(s.v - stats.med)) AS mad FROM s JOIN stats USING (system_id) GROUP BY 1), \
         scored AS (SELECT s.system_id, epoch_us(s.b) AS t, s.v, \
             CASE WHEN {robust} AND mad.mad > 0 THEN 0.6745 * (s.v - stats.med) / mad.mad \
                  WHEN stats.sd > 0 THEN (s.v - stats.mean) / stats.sd ELSE 0 END AS score, \
             CASE WHEN {robust} AND mad.mad > 0 THEN stats.med ELSE stats.mean END AS centre \
             FROM s JOIN stats USING (system_id) JOIN mad USING (system_id) WHERE stats.n >= 3) \
         SELECT system_id, t, v, score, centre FROM scored WHERE abs(score) > ? \
         ORDER BY abs(score) DESC, system_id, t LIMIT ?"
    );
    params.push(&threshold);
    let limit = limit as i64;
    params.push(&limit);
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |row| {
        Ok(Anomaly {
            system_id: row.get(0)?,
            ts: row.get(1)?,
            value: row.get(2)?,
            score: row.get(3)?,
            centre: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Pearson correlation between every pair of systems over the buckets both have (at least 3).
pub fn correlate(conn: &Connection, q: &SeriesQuery, min_abs_r: f64) -> Result<Vec<Correlation>, HotError> {
    let mut params = Vec::new();
    let inner = series_sql(conn, q, &mut params)?;
    let sql = format!(
        "WITH s AS ({inner}) SELECT a.system_id, b.system_id, corr(a.v, b.v) AS r, count(*) \
         FROM s a JOIN s b ON a.b = b.b AND a.system_id < b.system_id \
         GROUP BY 1, 2 HAVING count(*) >= 3 AND r IS NOT NULL AND isfinite(r) AND abs(r) >= ? \
         ORDER BY abs(r) DESC, 1, 2"
    );
    params.push(&min_abs_r);
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |row| {
        let r: f64 = row.get(2)?;
        Ok(Correlation {
            system_a: row.get(0)?,
            system_b: row.get(1)?,
            r,
            points: row.get::<_, i64>(3)? as u64,
            strength: if r.abs() >= 0.7 {
                "strong"
            } else if r.abs() >= 0.4 {
                "moderate"
            } else {
                "weak"
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every metric name per system with its summary, optionally since a time.
pub fn summaries(conn: &Connection, systems: &[String], since_us: Option<i64>) -> Result<Vec<MetricSummary>, HotError> {
    let mut params: Vec<&dyn ToSql> = Vec::new();
    let mut sql = String::from(
        "SELECT system_id, name, count(*), arg_max(value, ts), avg(value), min(value), max(value), \
         epoch_us(min(ts)), epoch_us(max(ts)) FROM all_metric WHERE name IS NOT NULL AND value IS NOT NULL",
    );
    sql.push_str(&system_clause("system_id", systems, &mut params));
    if let Some(since) = &since_us {
        sql.push_str(" AND ts >= make_timestamp(?)");
        params.push(since);
    }
    sql.push_str(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 10000");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params.as_slice(), |row| {
        Ok(MetricSummary {
            system_id: row.get(0)?,
            name: row.get(1)?,
            points: row.get::<_, i64>(2)? as u64,
            latest: row.get(3)?,
            mean: row.get(4)?,
            min: row.get(5)?,
            max: row.get(6)?,
            first_ts: row.get(7)?,
            last_ts: row.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use akosha_protocol::{Record, RecordKind};

    use super::*;
    use crate::hot::HotTier;

    const MINUTE: i64 = 60_000_000;
    const T0: i64 = 1_750_000_000_000_000 - 1_750_000_000_000_000 % (60 * MINUTE);

    fn point(system: &str, name: &str, minute: i64, value: f64) -> Record {
        Record {
            system_id: system.into(),
            kind: RecordKind::Metric,
            id: format!("{name}-{minute}"),
            ts: T0 + minute * MINUTE,
            name: Some(name.into()),
            value: Some(value),
            ..Record::default()
        }
    }

    fn query(name: &str, resolution: Resolution) -> SeriesQuery {
        SeriesQuery { name: name.into(), systems: Vec::new(), since_us: None, until_us: None, resolution }
    }

    /// Two hours per system: `a` rises 1 per minute, `b` follows `a` with noise, `c` falls; `a` has one spike.
    fn metrics() -> HotTier {
        let hot = HotTier::open("256MB", 1, None).unwrap();
        let mut records = Vec::new();
        for m in 0..120 {
            let wobble = if m % 2 == 0 { 0.5 } else { -0.5 };
            records.push(point("a", "latency", m, if m == 60 { 1000.0 } else { m as f64 }));
            records.push(point("b", "latency", m, 2.0 * m as f64 + wobble));
            records.push(point("c", "latency", m, 500.0 - m as f64));
            records.push(point("a", "memory", m, 7.0));
        }
        hot.insert(&records).unwrap();
        hot
    }

    #[test]
    fn downsampling_buckets_and_ranges() {
        let hot = metrics();
        let raw = hot.read(|c| range(c, &query("latency", Resolution::Raw), 10_000)).unwrap();
        assert_eq!(raw.len(), 3);
        assert_eq!(raw[0].points.len(), 120);
        let five = hot.read(|c| range(c, &query("latency", Resolution::FiveMinutes), 10_000)).unwrap();
        assert_eq!(five[2].points.len(), 24);
        assert_eq!(five[2].points[0], Point { ts: T0, value: 498.0, min: 496.0, max: 500.0, count: 5 });
        let hourly = hot.read(|c| range(c, &query("latency", Resolution::Hour), 10_000)).unwrap();
        assert_eq!(hourly[1].points.len(), 2);
        let mut q = query("latency", Resolution::Minute);
        q.systems = vec!["b".into()];
        q.since_us = Some(T0 + 10 * MINUTE);
        q.until_us = Some(T0 + 20 * MINUTE);
        let window = hot.read(|c| range(c, &q, 10_000)).unwrap();
        assert_eq!(window.len(), 1);
        assert_eq!(window[0].points.len(), 10, "since inclusive, until exclusive");
        assert_eq!(Resolution::parse(None, Some(0), Some(3_600_000_000)).unwrap(), Resolution::Raw);
        assert_eq!(Resolution::parse(Some("auto"), Some(0), Some(40 * 86_400_000_000)).unwrap(), Resolution::Hour);
        assert!(Resolution::parse(Some("2m"), None, None).is_err());
    }

    #[test]
    fn trends_anomalies_and_correlations() {
        let hot = metrics();
        let trends = hot.read(|c| trend(c, &query("latency", Resolution::FiveMinutes))).unwrap();
        let by: HashMap<&str, &Trend> = trends.iter().map(|t| (t.system_id.as_str(), t)).collect();
        assert_eq!(by["b"].direction, "increasing");
        assert!((by["b"].slope_per_hour - 120.0).abs() < 1.0, "{}", by["b"].slope_per_hour);
        assert_eq!(by["c"].direction, "decreasing");
        let flat = hot.read(|c| trend(c, &query("memory", Resolution::Raw))).unwrap();
        assert_eq!(flat[0].direction, "stable");

        let robust = hot.read(|c| anomalies(c, &query("latency", Resolution::Raw), 3.5, true, 100)).unwrap();
        assert_eq!(robust.len(), 1, "{robust:?}");
        assert_eq!((robust[0].system_id.as_str(), robust[0].ts, robust[0].value), ("a", T0 + 60 * MINUTE, 1000.0));
        let standard = hot.read(|c| anomalies(c, &query("latency", Resolution::Raw), 3.0, false, 100)).unwrap();
        assert_eq!(standard.len(), 1);
        assert!(hot.read(|c| anomalies(c, &query("memory", Resolution::Raw), 3.0, false, 100)).unwrap().is_empty());

        let pairs = hot.read(|c| correlate(c, &query("latency", Resolution::FiveMinutes), 0.0)).unwrap();
        let r: HashMap<(&str, &str), f64> =
            pairs.iter().map(|p| ((p.system_a.as_str(), p.system_b.as_str()), p.r)).collect();
        assert!(r[&("b", "c")] < -0.99, "{pairs:?}");
        assert!(r[&("a", "b")] > 0.5, "{pairs:?}");
        assert_eq!(pairs[0].strength, "strong");
    }

    #[test]
    fn summaries_list_every_metric() {
        let hot = metrics();
        let all = hot.read(|c| summaries(c, &[], None)).unwrap();
        assert_eq!(all.len(), 4);
        let memory = all.iter().find(|m| m.name == "memory").unwrap();
        assert_eq!((memory.points, memory.latest, memory.mean), (120, 7.0, 7.0));
        assert_eq!(hot.read(|c| summaries(c, &["c".into()], None)).unwrap().len(), 1);
    }

    use std::collections::HashMap;
}
