//! What the tiers hold and cost: `/health/warm` (disk usage of the warm file's filesystem against thresholds)
//! and `/v1/stats/storage` (bytes, objects and an estimated monthly cost per tier from configured prices).

use std::path::Path;

use serde::Serialize;

/// Prices and thresholds from config (`storage:`).
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
    /// Warm disk use (fraction of the filesystem) from which `/health/warm` warns.
    pub disk_warning: f64,
    /// Warm disk use from which `/health/warm` is critical (HTTP 503).
    pub disk_critical: f64,
    /// Prices per GiB and month.
    pub prices: TierPrices,
    /// The currency the prices are in (only a label).
    pub currency: String,
}

/// Price per GiB and month of each place data lives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TierPrices {
    /// Memory (the hot tier).
    pub hot: f64,
    /// Local SSD (the warm file, the WAL, the cold cache).
    pub warm: f64,
    /// Object storage (the cold tier).
    pub cold: f64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        // Public list prices in 2026 (memory of a cloud VM, gp3 SSD, S3 Standard), as a starting point.
        StorageConfig {
            disk_warning: 0.75,
            disk_critical: 0.90,
            prices: TierPrices { hot: 3.0, warm: 0.08, cold: 0.023 },
            currency: "USD".into(),
        }
    }
}

/// Space on the filesystem that holds a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiskUsage {
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Bytes in use (by anyone).
    pub used_bytes: u64,
    /// Bytes an unprivileged writer can still use.
    pub available_bytes: u64,
}

impl DiskUsage {
    /// Reads the filesystem of `path` (or of its nearest existing parent).
    pub fn of(path: &Path) -> std::io::Result<DiskUsage> {
        let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        let s = rustix::fs::statvfs(existing).map_err(std::io::Error::from)?;
        let block = s.f_frsize.max(1);
        let total = s.f_blocks * block;
        let free = s.f_bfree * block;
        Ok(DiskUsage {
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
            available_bytes: s.f_bavail * block,
        })
    }

    /// Used fraction as `df` shows it: used / (used + available), so root's reserve counts as full.
    pub fn used_fraction(&self) -> f64 {
        let usable = self.used_bytes + self.available_bytes;
        if usable == 0 { 0.0 } else { self.used_bytes as f64 / usable as f64 }
    }
}

/// The verdict of `/health/warm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskHealth {
    /// Below the warning threshold.
    Ok,
    /// At or above the warning threshold.
    Warning,
    /// At or above the critical threshold.
    Critical,
}

impl StorageConfig {
    /// Classifies a used fraction.
    pub fn health(&self, used_fraction: f64) -> DiskHealth {
        if used_fraction >= self.disk_critical {
            DiskHealth::Critical
        } else if used_fraction >= self.disk_warning {
            DiskHealth::Warning
        } else {
            DiskHealth::Ok
        }
    }

    /// Estimated monthly cost of `bytes` at `price` per GiB and month, rounded to a hundredth of a cent.
    pub fn monthly_cost(bytes: u64, price: f64) -> f64 {
        (bytes as f64 / (1u64 << 30) as f64 * price * 10_000.0).round() / 10_000.0
    }
}

/// One line of the storage report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TierUsage {
    /// Records held (absent where the place holds no records of its own, like the WAL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    /// Bytes held.
    pub bytes: u64,
    /// Files or objects held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
    /// Price per GiB and month applied.
    pub price_per_gib_month: f64,
    /// `bytes` at that price.
    pub monthly_cost: f64,
}

impl TierUsage {
    /// A line priced at `price`.
    pub fn priced(records: Option<u64>, bytes: u64, objects: Option<u64>, price: f64) -> TierUsage {
        TierUsage {
            records,
            bytes,
            objects,
            price_per_gib_month: price,
            monthly_cost: StorageConfig::monthly_cost(bytes, price),
        }
    }
}

/// Bytes of the files directly in `dir` whose names start with `prefix` (a DuckDB file and its `.wal`).
pub fn files_bytes(dir: &Path, prefix: &str) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, 0) };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(bytes, n), m| (bytes + m.len(), n + 1))
}

/// Bytes and files under `dir`, recursively (an index directory).
pub fn dir_bytes(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, 0) };
    entries.flatten().fold((0, 0), |(bytes, n), e| match e.file_type() {
        Ok(t) if t.is_dir() => {
            let (b, m) = dir_bytes(&e.path());
            (bytes + b, n + m)
        }
        Ok(t) if t.is_file() => (bytes + e.metadata().map_or(0, |m| m.len()), n + 1),
        _ => (bytes, n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_classify_disk_use() {
        let c = StorageConfig::default();
        assert_eq!(c.health(0.10), DiskHealth::Ok);
        assert_eq!(c.health(0.75), DiskHealth::Warning);
        assert_eq!(c.health(0.899), DiskHealth::Warning);
        assert_eq!(c.health(0.90), DiskHealth::Critical);
    }

    #[test]
    fn costs_are_per_gib_month() {
        assert_eq!(StorageConfig::monthly_cost(1 << 30, 0.023), 0.023);
        assert_eq!(StorageConfig::monthly_cost(10 << 30, 3.0), 30.0);
        assert_eq!(StorageConfig::monthly_cost(0, 3.0), 0.0);
    }

    #[test]
    fn the_disk_of_a_temp_dir_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let usage = DiskUsage::of(&dir.path().join("not/yet/there.duckdb")).unwrap();
        assert!(usage.total_bytes > 0);
        assert!(usage.used_bytes <= usage.total_bytes);
        assert!((0.0..=1.0).contains(&usage.used_fraction()));
        std::fs::write(dir.path().join("warm.duckdb"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("warm.duckdb.wal"), [0u8; 20]).unwrap();
        std::fs::write(dir.path().join("other"), [0u8; 7]).unwrap();
        assert_eq!(files_bytes(dir.path(), "warm.duckdb"), (120, 2));
        std::fs::create_dir_all(dir.path().join("idx/a")).unwrap();
        std::fs::write(dir.path().join("idx/a/seg"), [0u8; 5]).unwrap();
        assert_eq!(dir_bytes(dir.path()), (132, 4));
    }
}
