//! Counters and the Prometheus text exposition format, shared by the agent and the aggregator.
//!
//! Plain atomics and string formatting: no registry, no global state, nothing to initialise.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Writes Prometheus text format: `# HELP`/`# TYPE` once per metric, then its samples.
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self { out: String::with_capacity(4096) }
    }

    /// One metric with its samples, each given as (label pairs, value).
    pub fn metric<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (&'a [(&'a str, &'a str)], f64)>,
    ) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = write!(self.out, "{name}");
            if !labels.is_empty() {
                let rendered: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                    .collect();
                let _ = write!(self.out, "{{{}}}", rendered.join(","));
            }
            let _ = writeln!(self.out, " {value}");
        }
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}

impl Default for Exposition {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_labels_and_escapes() {
        let c = Counter::default();
        c.add(3);
        let mut m = Exposition::new();
        m.metric("x_total", "counter", "Things.", [(&[("who", "a\"b")][..], c.get() as f64)]);
        assert_eq!(m.finish(), "# HELP x_total Things.\n# TYPE x_total counter\nx_total{who=\"a\\\"b\"} 3\n");
    }
}
