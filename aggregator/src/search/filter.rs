//! Query filters, shared by every kind of search.

use akosha_protocol::RecordKind;

use super::DocMeta;

/// Which records a query may return. Empty lists and `None` mean "any".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    /// Any of these systems.
    pub system_ids: Vec<String>,
    /// Any of these kinds.
    pub kinds: Vec<RecordKind>,
    /// This project.
    pub project: Option<String>,
    /// This category.
    pub category: Option<String>,
    /// All of these tags.
    pub tags: Vec<String>,
    /// `ts` at or after, microseconds since the epoch.
    pub since_us: Option<i64>,
    /// `ts` before, microseconds since the epoch.
    pub until_us: Option<i64>,
    /// Vector searches: at least this cosine similarity.
    pub min_similarity: Option<f32>,
}

impl Filters {
    /// Whether a record passes (everything but `min_similarity`, which needs the query).
    pub fn matches(&self, d: &DocMeta) -> bool {
        (self.system_ids.is_empty() || self.system_ids.iter().any(|s| **s == *d.system_id))
            && (self.kinds.is_empty() || self.kinds.contains(&d.kind))
            && self.project.as_deref().is_none_or(|p| d.project.as_deref() == Some(p))
            && self.category.as_deref().is_none_or(|c| d.category.as_deref() == Some(c))
            && self.tags.iter().all(|t| d.tags.iter().any(|have| **have == **t))
            && self.since_us.is_none_or(|since| d.ts >= since)
            && self.until_us.is_none_or(|until| d.ts < until)
    }

    /// Whether any filter other than `min_similarity` is set.
    pub fn is_empty(&self) -> bool {
        self.system_ids.is_empty()
            && self.kinds.is_empty()
            && self.project.is_none()
            && self.category.is_none()
            && self.tags.is_empty()
            && self.since_us.is_none()
            && self.until_us.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn doc() -> DocMeta {
        DocMeta {
            system_id: Arc::from("laptop-1"),
            kind: RecordKind::Reflection,
            id: Box::from("r1"),
            project: Some(Arc::from("akosha")),
            category: None,
            tags: vec![Arc::from("rust"), Arc::from("wasm")].into(),
            ts: 1_000,
        }
    }

    #[test]
    fn every_filter_narrows() {
        let d = doc();
        assert!(Filters::default().matches(&d));
        let pass = Filters {
            system_ids: vec!["other".into(), "laptop-1".into()],
            kinds: vec![RecordKind::Reflection],
            project: Some("akosha".into()),
            tags: vec!["wasm".into()],
            since_us: Some(1_000),
            until_us: Some(1_001),
            ..Filters::default()
        };
        assert!(pass.matches(&d));
        for fail in [
            Filters { system_ids: vec!["other".into()], ..Filters::default() },
            Filters { kinds: vec![RecordKind::Conversation], ..Filters::default() },
            Filters { project: Some("web".into()), ..Filters::default() },
            Filters { category: Some("x".into()), ..Filters::default() },
            Filters { tags: vec!["rust".into(), "go".into()], ..Filters::default() },
            Filters { since_us: Some(1_001), ..Filters::default() },
            Filters { until_us: Some(1_000), ..Filters::default() },
        ] {
            assert!(!fail.matches(&d), "{fail:?}");
        }
    }
}
