//! Lifecycle policy pieces shared by the tier moves: per-kind windows and the daily schedule moves keep to.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use akosha_protocol::RecordKind;

/// A daily window (UTC) in which scheduled moves run, e.g. `01:00-05:00`; it may wrap past midnight
/// (`22:00-02:00`). Moves asked for through the API run whenever they are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    start_min: u16,
    end_min: u16,
}

impl Schedule {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let minutes = |part: &str| -> Option<u16> {
            let (h, m) = part.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60 && part.trim().len() == 5).then_some(h * 60 + m)
        };
        let parsed = text.split_once('-').and_then(|(a, b)| Some((minutes(a)?, minutes(b)?)));
        match parsed {
            Some((start_min, end_min)) if start_min != end_min => Ok(Schedule { start_min, end_min }),
            Some(_) => Err(format!("`{text}` is an empty window; leave `schedule` out to move at any time")),
            None => Err(format!("`{text}` is not a daily UTC window like `01:00-05:00`")),
        }
    }

    /// Whether `at_us` (microseconds since the epoch) falls inside the window.
    pub fn contains(&self, at_us: i64) -> bool {
        let minute = (at_us.div_euclid(60_000_000).rem_euclid(24 * 60)) as u16;
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{} UTC", hm(self.start_min), hm(self.end_min))
    }
}

/// A window with overrides for some record kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    /// For every kind without an override.
    pub default: Duration,
    /// Per-kind overrides.
    pub per_kind: BTreeMap<RecordKind, Duration>,
}

impl Windows {
    /// The same window for every kind.
    pub fn uniform(default: Duration) -> Windows {
        Windows { default, per_kind: BTreeMap::new() }
    }

    /// The window of `kind`.
    pub fn of(&self, kind: RecordKind) -> Duration {
        self.per_kind.get(&kind).copied().unwrap_or(self.default)
    }

    /// The cutoff of `kind` at `now_us`: records older than it are due.
    pub fn cutoff(&self, kind: RecordKind, now_us: i64) -> i64 {
        now_us - self.of(kind).as_micros() as i64
    }

    /// The shortest window of any kind.
    pub fn shortest(&self) -> Duration {
        self.per_kind.values().copied().fold(self.default, Duration::min)
    }

    /// As `/v1/lifecycle` shows it: seconds per kind.
    pub fn to_json(&self) -> serde_json::Value {
        RecordKind::ALL.iter().map(|k| (k.as_str().to_owned(), serde_json::json!(self.of(*k).as_secs()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    #[test]
    fn schedules_parse_and_contain_their_minutes_including_across_midnight() {
        let night = Schedule::parse("01:00-05:00").unwrap();
        assert!(night.contains(60 * MIN) && night.contains((5 * 60 - 1) * MIN));
        assert!(!night.contains(5 * 60 * MIN) && !night.contains(59 * MIN));
        assert!(night.contains(86_400 * 1_000_000 + 2 * 60 * MIN), "any day");
        let wrapping = Schedule::parse("22:30-02:00").unwrap();
        assert!(wrapping.contains(23 * 60 * MIN) && wrapping.contains(MIN) && !wrapping.contains(12 * 60 * MIN));
        assert_eq!(wrapping.to_string(), "22:30-02:00 UTC");
        for bad in ["1:00-05:00", "01:00", "25:00-01:00", "01:00-01:00", "01:60-02:00", "night"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_fall_back_to_the_default_per_kind() {
        let mut w = Windows::uniform(Duration::from_secs(7 * 86_400));
        w.per_kind.insert(RecordKind::Metric, Duration::from_secs(86_400));
        assert_eq!(w.of(RecordKind::Metric), Duration::from_secs(86_400));
        assert_eq!(w.of(RecordKind::Conversation), Duration::from_secs(7 * 86_400));
        assert_eq!(w.shortest(), Duration::from_secs(86_400));
        assert_eq!(w.cutoff(RecordKind::Metric, 100 * 86_400_000_000), 99 * 86_400_000_000);
        assert_eq!(w.to_json()["metric"], 86_400);
    }
}
