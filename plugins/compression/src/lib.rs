//! akosha's shipped compression policy.
//!
//! Tiny batches are not worth a codec's framing and CPU; incompressible ones (high byte entropy, e.g. mostly
//! embeddings) get lz4, which gives up quickly; text-heavy ones get zstd, harder the larger they are.
//!
//! Configuration: `min_bytes` (below: no compression, default 512), `zstd_level` (default 3),
//! `large_bytes` (from here zstd uses `zstd_level_large`, default 1 MiB and 6), `entropy_threshold` (bits per
//! byte above which lz4 is chosen, default 7.0).

/// The codec decision, natively testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// No compression.
    None,
    /// lz4.
    Lz4,
    /// zstd at a level.
    Zstd(i8),
}

/// Parsed configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    min_bytes: u64,
    zstd_level: i8,
    large_bytes: u64,
    zstd_level_large: i8,
    entropy_threshold: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { min_bytes: 512, zstd_level: 3, large_bytes: 1 << 20, zstd_level_large: 6, entropy_threshold: 7.0 }
    }
}

impl Settings {
    /// Reads `key=value` pairs; unknown keys and bad numbers are named.
    pub fn from_config(config: &[(String, String)]) -> Result<Settings, String> {
        let mut s = Settings::default();
        for (key, value) in config {
            let bad = || format!("`{key}` has an invalid value `{value}`");
            match key.as_str() {
                "min_bytes" => s.min_bytes = value.parse().map_err(|_| bad())?,
                "large_bytes" => s.large_bytes = value.parse().map_err(|_| bad())?,
                "zstd_level" => s.zstd_level = level(value).ok_or_else(bad)?,
                "zstd_level_large" => s.zstd_level_large = level(value).ok_or_else(bad)?,
                "entropy_threshold" => {
                    s.entropy_threshold =
                        value.parse().ok().filter(|v: &f64| (0.0..=8.0).contains(v)).ok_or_else(bad)?
                }
                _ => return Err(format!("unknown configuration key `{key}`")),
            }
        }
        Ok(s)
    }

    /// The codec for a batch of `bytes` whose sample is `sample`.
    pub fn choose(&self, bytes: u64, sample: &[u8]) -> Choice {
        if bytes < self.min_bytes {
            return Choice::None;
        }
        if entropy(sample) > self.entropy_threshold {
            return Choice::Lz4;
        }
        Choice::Zstd(if bytes >= self.large_bytes { self.zstd_level_large } else { self.zstd_level })
    }
}

fn level(text: &str) -> Option<i8> {
    text.parse().ok().filter(|l| (1..=19).contains(l))
}

/// Shannon entropy of the sample, in bits per byte (0 for an empty sample).
pub fn entropy(sample: &[u8]) -> f64 {
    if sample.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in sample {
        counts[b as usize] += 1;
    }
    let n = sample.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

#[cfg(target_arch = "wasm32")]
mod plugin {
    use akosha_plugin_sdk::Config;
    use akosha_plugin_sdk::compression::{BatchStats, Codec, CodecChoice, Policy};

    struct Compression(super::Settings);

    impl Policy for Compression {
        fn configure(config: &Config) -> Result<Self, String> {
            super::Settings::from_config(config.pairs()).map(Compression)
        }

        fn choose(&self, stats: &BatchStats) -> CodecChoice {
            match self.0.choose(stats.bytes, &stats.sample) {
                super::Choice::None => CodecChoice { codec: Codec::None, level: 0 },
                super::Choice::Lz4 => CodecChoice { codec: Codec::Lz4, level: 0 },
                super::Choice::Zstd(level) => CodecChoice { codec: Codec::Zstd, level },
            }
        }
    }

    akosha_plugin_sdk::compression_plugin!(Compression);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_batches_are_not_compressed_text_gets_zstd_noise_gets_lz4() {
        let s = Settings::default();
        assert_eq!(s.choose(100, b"hello"), Choice::None);
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(50);
        assert_eq!(s.choose(text.len() as u64, &text), Choice::Zstd(3));
        assert_eq!(s.choose(2 << 20, &text), Choice::Zstd(6));
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        assert!(entropy(&noise) > 7.0);
        assert_eq!(s.choose(1 << 16, &noise), Choice::Lz4);
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let cfg = |k: &str, v: &str| Settings::from_config(&[(k.to_owned(), v.to_owned())]);
        assert!(cfg("zstd_level", "40").unwrap_err().contains("`zstd_level`"));
        assert!(cfg("compress", "yes").unwrap_err().contains("unknown configuration key `compress`"));
        assert_eq!(cfg("min_bytes", "0").unwrap().choose(1, b"a"), Choice::Zstd(3));
    }
}
