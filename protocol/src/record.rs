//! The record: one memory from one system, as DESIGN.md's data model describes it.

use std::fmt;
use std::str::FromStr;

/// Length of a Session-Buddy embedding (all-MiniLM-L6-v2).
pub const EMBEDDING_DIM: usize = 384;

/// Longest accepted `id`, `system_id`, `project`, … (bytes).
const MAX_SHORT_FIELD_LEN: usize = 1024;
/// Longest accepted `text` (bytes): well below the aggregator's default batch limit (8 MiB), so that a record
/// that is valid at the agent always fits in a batch the aggregator accepts.
const MAX_TEXT_LEN: usize = 4 * 1024 * 1024;
const MAX_TAGS: usize = 256;

/// What a record is. The dedup key is `(system_id, kind, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum RecordKind {
    /// A conversation turn.
    #[default]
    Conversation,
    /// A reflection (an insight the assistant stored).
    Reflection,
    /// A knowledge-graph entity.
    Entity,
    /// A knowledge-graph relation between two entities.
    Relation,
    /// A metric point.
    Metric,
}

impl RecordKind {
    /// Every kind, in wire-tag order.
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Conversation,
        RecordKind::Reflection,
        RecordKind::Entity,
        RecordKind::Relation,
        RecordKind::Metric,
    ];

    /// The lower-case name used in APIs, configs and table names.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Conversation => "conversation",
            RecordKind::Reflection => "reflection",
            RecordKind::Entity => "entity",
            RecordKind::Relation => "relation",
            RecordKind::Metric => "metric",
        }
    }

    pub(crate) fn tag(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.get(usize::from(tag)).copied()
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordKind {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| RecordError::UnknownKind(s.to_owned()))
    }
}

/// Where a residency policy sends a record. Ordered by restrictiveness: combining decisions takes the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Residency {
    /// May leave the premises.
    Cloud,
    /// Must stay on the premises.
    Onprem,
    /// Must not be stored anywhere.
    Drop,
}

impl Residency {
    /// The lower-case name used in APIs and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Residency::Cloud => "cloud",
            Residency::Onprem => "onprem",
            Residency::Drop => "drop",
        }
    }

    pub(crate) fn tag(self) -> u8 {
        match self {
            Residency::Cloud => 0,
            Residency::Onprem => 1,
            Residency::Drop => 2,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Self> {
        [Residency::Cloud, Residency::Onprem, Residency::Drop].get(usize::from(tag)).copied()
    }
}

impl FromStr for Residency {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cloud" => Ok(Residency::Cloud),
            "onprem" => Ok(Residency::Onprem),
            "drop" => Ok(Residency::Drop),
            other => Err(RecordError::UnknownResidency(other.to_owned())),
        }
    }
}

/// One memory from one system.
///
/// `metadata` holds the text of a JSON object; it is checked when a record is validated or decoded, and kept as
/// text so that the pipeline never re-serialises it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// The agent's authenticated identity.
    pub system_id: String,
    /// What the record is.
    pub kind: RecordKind,
    /// Stable id at the source.
    pub id: String,
    /// UTC timestamp in microseconds since the Unix epoch.
    pub ts: i64,
    /// Project the memory belongs to.
    pub project: Option<String>,
    /// Namespace within the source.
    pub namespace: Option<String>,
    /// Category (for entities, the entity type).
    pub category: Option<String>,
    /// The content.
    pub text: Option<String>,
    /// Entity name or metric name.
    pub name: Option<String>,
    /// 384 floats, when the source computed them.
    pub embedding: Option<Vec<f32>>,
    /// Free-form labels.
    pub tags: Vec<String>,
    /// A JSON object, as text.
    pub metadata: Option<String>,
    /// Relevance weight given by the source.
    pub importance: Option<f64>,
    /// Set by the residency policy.
    pub residency: Option<Residency>,
    /// Relation source entity.
    pub from: Option<String>,
    /// Relation target entity.
    pub to: Option<String>,
    /// Relation type.
    pub relation_type: Option<String>,
    /// Relation weight.
    pub weight: Option<f64>,
    /// Metric value.
    pub value: Option<f64>,
}

/// Why a record is not acceptable. Each variant names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// `kind` is not one of the five kinds.
    #[error("unknown kind `{0}` (expected conversation, reflection, entity, relation or metric)")]
    UnknownKind(String),
    /// `residency` is not cloud, onprem or drop.
    #[error("unknown residency `{0}` (expected cloud, onprem or drop)")]
    UnknownResidency(String),
    /// A required field is missing or empty.
    #[error("field `{0}` is required")]
    Missing(&'static str),
    /// A field is longer than allowed.
    #[error("field `{field}` is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The embedding does not have 384 dimensions.
    #[error("field `embedding` has {0} dimensions, expected {EMBEDDING_DIM}")]
    EmbeddingDim(usize),
    /// A float is NaN or infinite.
    #[error("field `{0}` contains a value that is not a finite number")]
    NotFinite(&'static str),
    /// `system_id` has characters outside `[A-Za-z0-9._-]`.
    #[error("field `system_id` `{0}` may only contain letters, digits, '.', '_' and '-'")]
    BadSystemId(String),
    /// `metadata` is not a JSON object.
    #[error("field `metadata` is not a JSON object: {0}")]
    BadMetadata(String),
    /// Too many tags.
    #[error("field `tags` has {0} entries, more than the {MAX_TAGS} allowed")]
    TooManyTags(usize),
}

impl Record {
    /// Checks everything the data model requires, naming the first field that is wrong.
    pub fn validate(&self) -> Result<(), RecordError> {
        validate_system_id(&self.system_id)?;
        require("id", Some(&self.id))?;
        for (field, value) in [
            ("id", Some(&self.id)),
            ("project", self.project.as_ref()),
            ("namespace", self.namespace.as_ref()),
            ("category", self.category.as_ref()),
            ("name", self.name.as_ref()),
            ("from", self.from.as_ref()),
            ("to", self.to.as_ref()),
            ("relation_type", self.relation_type.as_ref()),
        ] {
            if let Some(v) = value {
                check_len(field, v, MAX_SHORT_FIELD_LEN)?;
            }
        }
        if let Some(text) = &self.text {
            check_len("text", text, MAX_TEXT_LEN)?;
        }
        if self.tags.len() > MAX_TAGS {
            return Err(RecordError::TooManyTags(self.tags.len()));
        }
        for tag in &self.tags {
            check_len("tags", tag, MAX_SHORT_FIELD_LEN)?;
        }
        if let Some(embedding) = &self.embedding {
            if embedding.len() != EMBEDDING_DIM {
                return Err(RecordError::EmbeddingDim(embedding.len()));
            }
            if !embedding.iter().all(|v| v.is_finite()) {
                return Err(RecordError::NotFinite("embedding"));
            }
        }
        for (field, value) in [("importance", self.importance), ("weight", self.weight), ("value", self.value)] {
            if value.is_some_and(|v| !v.is_finite()) {
                return Err(RecordError::NotFinite(field));
            }
        }
        if let Some(metadata) = &self.metadata {
            check_metadata(metadata)?;
        }
        match self.kind {
            RecordKind::Relation => {
                require("from", self.from.as_ref())?;
                require("to", self.to.as_ref())?;
                require("relation_type", self.relation_type.as_ref())?;
            }
            RecordKind::Metric => {
                require("name", self.name.as_ref())?;
                if self.value.is_none() {
                    return Err(RecordError::Missing("value"));
                }
            }
            RecordKind::Conversation | RecordKind::Reflection | RecordKind::Entity => {}
        }
        Ok(())
    }

    /// Rough number of bytes the record occupies, used for buffer and batch size accounting.
    pub fn approx_size(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        64 + self.system_id.len()
            + self.id.len()
            + opt(&self.project)
            + opt(&self.namespace)
            + opt(&self.category)
            + opt(&self.text)
            + opt(&self.name)
            + opt(&self.metadata)
            + opt(&self.from)
            + opt(&self.to)
            + opt(&self.relation_type)
            + self.embedding.as_ref().map_or(0, |e| e.len() * 4)
            + self.tags.iter().map(|t| t.len() + 1).sum::<usize>()
    }
}

/// Checks a system id: non-empty, at most 1 KiB, only `[A-Za-z0-9._-]` (it appears in object keys and paths).
pub(crate) fn validate_system_id(system_id: &str) -> Result<(), RecordError> {
    require("system_id", Some(&system_id.to_owned()))?;
    check_len("system_id", system_id, MAX_SHORT_FIELD_LEN)?;
    if !system_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(RecordError::BadSystemId(system_id.to_owned()));
    }
    Ok(())
}

fn require(field: &'static str, value: Option<&String>) -> Result<(), RecordError> {
    match value {
        Some(v) if !v.is_empty() => Ok(()),
        _ => Err(RecordError::Missing(field)),
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), RecordError> {
    if value.len() > max {
        return Err(RecordError::TooLong { field, len: value.len(), max });
    }
    Ok(())
}

fn check_metadata(metadata: &str) -> Result<(), RecordError> {
    match serde_json::from_str::<serde_json::Value>(metadata) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(RecordError::BadMetadata("expected an object".into())),
        Err(e) => Err(RecordError::BadMetadata(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Record {
        Record { system_id: "host-1".into(), id: "a".into(), ts: 1, ..Record::default() }
    }

    #[test]
    fn a_minimal_record_is_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut r = valid();
        r.embedding = Some(vec![0.0; 3]);
        assert_eq!(r.validate().unwrap_err().to_string(), "field `embedding` has 3 dimensions, expected 384");
        let mut r = valid();
        r.kind = RecordKind::Relation;
        assert_eq!(r.validate().unwrap_err(), RecordError::Missing("from"));
        let mut r = valid();
        r.system_id = "a/b".into();
        assert!(matches!(r.validate(), Err(RecordError::BadSystemId(_))));
        let mut r = valid();
        r.metadata = Some("[1]".into());
        assert!(matches!(r.validate(), Err(RecordError::BadMetadata(_))));
    }

    #[test]
    fn kinds_parse_by_name() {
        for kind in RecordKind::ALL {
            assert_eq!(kind.as_str().parse::<RecordKind>().unwrap(), kind);
            assert_eq!(RecordKind::from_tag(kind.tag()), Some(kind));
        }
        assert!("memory".parse::<RecordKind>().is_err());
    }
}
