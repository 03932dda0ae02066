//! The residency rules, in plain Rust: the plugin wraps them for WASM, and the host's benchmark runs them
//! natively to measure what WASM costs.
//!
//! Configuration (all optional):
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `detect` | detectors to run: `aws-keys`, `private-keys`, `tokens`, `passwords`, `emails` | all |
//! | `on_match` | what a detected secret does: `onprem`, `redact` (blank it, then cloud) or `drop` | `onprem` |
//! | `onprem_projects` | projects that stay on-premises (`name` or `prefix*`) | none |
//! | `cloud_projects` | if set, only these projects may go to the cloud | all |
//! | `onprem_tags` | tags that keep a record on-premises | none |
//! | `drop_tags` | tags that discard a record | none |
//! | `pattern.<name>` | an extra regular expression treated like a detector | none |
//! | `scan_metadata` | also scan names and metadata (never redacted: a match there means `onprem`) | `true` |

use std::ops::Range;

use regex::{Regex, RegexSet};

/// Where a record may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Anywhere.
    Cloud,
    /// On-premises only.
    Onprem,
    /// Nowhere.
    Drop,
}

/// A decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Where.
    pub route: Route,
    /// Byte ranges of the text to blank out.
    pub redactions: Vec<Range<usize>>,
    /// Why (for the audit log).
    pub reason: Option<String>,
}

impl Verdict {
    fn cloud() -> Self {
        Verdict { route: Route::Cloud, redactions: Vec::new(), reason: None }
    }

    fn with(route: Route, reason: String) -> Self {
        Verdict { route, redactions: Vec::new(), reason: Some(reason) }
    }
}

/// What the rules look at.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordView<'a> {
    /// Project, if any.
    pub project: Option<&'a str>,
    /// Tags.
    pub tags: &'a [String],
    /// Text, if any.
    pub text: Option<&'a str>,
    /// Entity name, if any.
    pub name: Option<&'a str>,
    /// Metadata JSON, if any.
    pub metadata: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnMatch {
    Onprem,
    Redact,
    Drop,
}

/// Compiled rules.
#[derive(Debug)]
pub struct Rules {
    names: Vec<String>,
    any: RegexSet,
    each: Vec<Regex>,
    on_match: OnMatch,
    onprem_projects: Vec<String>,
    cloud_projects: Option<Vec<String>>,
    onprem_tags: Vec<String>,
    drop_tags: Vec<String>,
    scan_metadata: bool,
}

const DETECTORS: [(&str, &str); 5] = [
    ("aws-keys", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b|(?i:aws_secret_access_key)\s*[:=]\s*\S+"),
    (
        "private-keys",
        r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)",
    ),
    (
        "tokens",
        r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|\bsk-[A-Za-z0-9_-]{20,}|(?i:\bbearer\s+)[A-Za-z0-9._~+/-]{20,}=*",
    ),
    (
        "passwords",
        r#"(?i)(?:password|passwd|pwd|passphrase|secret|api[_-]?key|access[_-]?token)\b["']?\s*[:=]\s*["']?[^\s"',;]{4,}"#,
    ),
    ("emails", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
];

const KNOWN_KEYS: [&str; 7] =
    ["detect", "on_match", "onprem_projects", "cloud_projects", "onprem_tags", "drop_tags", "scan_metadata"];

impl Rules {
    /// Compiles the rules from the plugin's configuration; unknown keys and bad values are errors that name them.
    pub fn from_config(config: &[(String, String)]) -> Result<Rules, String> {
        let get = |key: &str| config.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let list = |key: &str| -> Vec<String> {
            get(key)
                .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        for (key, _) in config {
            if !KNOWN_KEYS.contains(&key.as_str()) && !key.starts_with("pattern.") {
                return Err(format!(
                    "unknown configuration key `{key}` (known: {}, pattern.<name>)",
                    KNOWN_KEYS.join(", ")
                ));
            }
        }
        let wanted = if get("detect").is_some() {
            list("detect")
        } else {
            DETECTORS.iter().map(|(n, _)| (*n).to_owned()).collect()
        };
        let mut names = Vec::new();
        let mut patterns = Vec::new();
        for name in &wanted {
            let Some((_, pattern)) = DETECTORS.iter().find(|(n, _)| n == name) else {
                let known: Vec<&str> = DETECTORS.iter().map(|(n, _)| *n).collect();
                return Err(format!("unknown detector `{name}` in `detect` (known: {})", known.join(", ")));
            };
            names.push(name.clone());
            patterns.push((*pattern).to_owned());
        }
        for (key, pattern) in config.iter().filter_map(|(k, v)| k.strip_prefix("pattern.").map(|n| (n, v))) {
            Regex::new(pattern).map_err(|e| format!("`pattern.{key}` is not a valid regular expression: {e}"))?;
            names.push(key.to_owned());
            patterns.push(pattern.clone());
        }
        let any = RegexSet::new(&patterns).map_err(|e| format!("patterns do not compile: {e}"))?;
        let each = patterns.iter().map(|p| Regex::new(p)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        let on_match = match get("on_match").unwrap_or("onprem") {
            "onprem" => OnMatch::Onprem,
            "redact" => OnMatch::Redact,
            "drop" => OnMatch::Drop,
            other => return Err(format!("`on_match` must be onprem, redact or drop, not `{other}`")),
        };
        let scan_metadata = match get("scan_metadata").unwrap_or("true") {
            "true" | "yes" | "1" => true,
            "false" | "no" | "0" => false,
            other => return Err(format!("`scan_metadata` must be true or false, not `{other}`")),
        };
        Ok(Rules {
            names,
            any,
            each,
            on_match,
            onprem_projects: list("onprem_projects"),
            cloud_projects: get("cloud_projects").map(|_| list("cloud_projects")),
            onprem_tags: list("onprem_tags"),
            drop_tags: list("drop_tags"),
            scan_metadata,
        })
    }

    /// The decision for one record.
    pub fn decide(&self, record: &RecordView<'_>) -> Verdict {
        if let Some(tag) = record.tags.iter().find(|t| self.drop_tags.contains(t)) {
            return Verdict::with(Route::Drop, format!("tag `{tag}` is dropped"));
        }
        if let Some(project) = record.project {
            if self.onprem_projects.iter().any(|p| project_matches(p, project)) {
                return Verdict::with(Route::Onprem, format!("project `{project}` stays on-premises"));
            }
            if let Some(allowed) = &self.cloud_projects {
                if !allowed.iter().any(|p| project_matches(p, project)) {
                    return Verdict::with(Route::Onprem, format!("project `{project}` is not allowed in the cloud"));
                }
            }
        } else if self.cloud_projects.is_some() {
            return Verdict::with(Route::Onprem, "records without a project are not allowed in the cloud".into());
        }
        if let Some(tag) = record.tags.iter().find(|t| self.onprem_tags.contains(t)) {
            return Verdict::with(Route::Onprem, format!("tag `{tag}` stays on-premises"));
        }
        if self.scan_metadata {
            for (field, value) in [("name", record.name), ("metadata", record.metadata)] {
                if let Some(detector) = value.and_then(|v| self.first_match(v)) {
                    let route = if self.on_match == OnMatch::Drop { Route::Drop } else { Route::Onprem };
                    return Verdict::with(route, format!("{field} contains {detector}"));
                }
            }
        }
        let Some(text) = record.text else { return Verdict::cloud() };
        let Some(detector) = self.first_match(text) else { return Verdict::cloud() };
        match self.on_match {
            OnMatch::Onprem => Verdict::with(Route::Onprem, format!("text contains {detector}")),
            OnMatch::Drop => Verdict::with(Route::Drop, format!("text contains {detector}")),
            OnMatch::Redact => {
                let mut ranges: Vec<Range<usize>> = self
                    .any
                    .matches(text)
                    .into_iter()
                    .flat_map(|i| self.each[i].find_iter(text).map(|m| m.range()))
                    .collect();
                ranges.sort_by_key(|r| r.start);
                let merged = merge(ranges);
                let kinds: Vec<&str> = self.any.matches(text).into_iter().map(|i| self.names[i].as_str()).collect();
                Verdict {
                    route: Route::Cloud,
                    redactions: merged,
                    reason: Some(format!("redacted {}", kinds.join(", "))),
                }
            }
        }
    }

    fn first_match(&self, text: &str) -> Option<&str> {
        self.any.matches(text).into_iter().next().map(|i| describe(&self.names[i]))
    }
}

fn describe(name: &str) -> &str {
    match name {
        "aws-keys" => "an AWS key",
        "private-keys" => "a private key",
        "tokens" => "an access token",
        "passwords" => "a password",
        "emails" => "an e-mail address",
        custom => custom,
    }
}

fn project_matches(pattern: &str, project: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => project.starts_with(prefix),
        None => pattern == project,
    }
}

/// Sorted ranges with overlaps merged.
fn merge(ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(config: &[(&str, &str)]) -> Rules {
        Rules::from_config(&config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>()).unwrap()
    }

    fn text(t: &str) -> RecordView<'_> {
        RecordView { text: Some(t), ..RecordView::default() }
    }

    #[test]
    fn secrets_stay_on_premises() {
        let r = rules(&[]);
        for (secret, what) in [
            ("key AKIAIOSFODNN7EXAMPLE in the config", "an AWS key"),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "a private key"),
            ("use ghp_abcdefghijklmnopqrstuvwxyz0123456789 for the API", "an access token"),
            ("DB_PASSWORD=hunter2hunter2", "a password"),
            ("mail jane.doe@example.com about it", "an e-mail address"),
        ] {
            let v = r.decide(&text(secret));
            assert_eq!(v.route, Route::Onprem, "{secret}");
            assert_eq!(v.reason.as_deref(), Some(format!("text contains {what}").as_str()), "{secret}");
        }
        assert_eq!(r.decide(&text("refactored the parser, tests pass")), Verdict::cloud());
    }

    #[test]
    fn redaction_blanks_every_match_and_ranges_are_on_char_boundaries() {
        let r = rules(&[("on_match", "redact")]);
        let t = "é AKIAIOSFODNN7EXAMPLE and bob@example.org, password: s3cretvalue";
        let v = r.decide(&text(t));
        assert_eq!(v.route, Route::Cloud);
        let cut: Vec<&str> = v.redactions.iter().map(|range| &t[range.clone()]).collect();
        assert_eq!(cut, ["AKIAIOSFODNN7EXAMPLE", "bob@example.org", "password: s3cretvalue"]);
    }

    #[test]
    fn projects_and_tags_route_before_text() {
        let r = rules(&[("onprem_projects", "secret-*, hr"), ("drop_tags", "scratch"), ("onprem_tags", "internal")]);
        let tags = vec!["scratch".to_owned()];
        assert_eq!(r.decide(&RecordView { tags: &tags, ..text("x") }).route, Route::Drop);
        assert_eq!(r.decide(&RecordView { project: Some("secret-sauce"), ..text("x") }).route, Route::Onprem);
        assert_eq!(r.decide(&RecordView { project: Some("public"), ..text("x") }).route, Route::Cloud);
        let tags = vec!["internal".to_owned()];
        assert_eq!(r.decide(&RecordView { tags: &tags, ..text("x") }).route, Route::Onprem);
        let allow = rules(&[("cloud_projects", "oss")]);
        assert_eq!(allow.decide(&RecordView { project: Some("oss"), ..text("x") }).route, Route::Cloud);
        assert_eq!(allow.decide(&RecordView { project: Some("client"), ..text("x") }).route, Route::Onprem);
        assert_eq!(allow.decide(&text("x")).route, Route::Onprem);
    }

    #[test]
    fn metadata_matches_cannot_be_redacted_so_they_stay_on_premises() {
        let r = rules(&[("on_match", "redact")]);
        let v = r.decide(&RecordView {
            metadata: Some(r#"{"token":"ghp_abcdefghijklmnopqrstuvwxyz0123456789"}"#),
            ..text("ok")
        });
        assert_eq!(v.route, Route::Onprem);
        let off = rules(&[("scan_metadata", "false")]);
        assert_eq!(off.decide(&RecordView { metadata: Some("a@b.example.com"), ..text("ok") }).route, Route::Cloud);
    }

    #[test]
    fn bad_configuration_is_named() {
        let err = |c: &[(&str, &str)]| {
            Rules::from_config(&c.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>())
                .unwrap_err()
        };
        assert!(err(&[("detekt", "x")]).contains("unknown configuration key `detekt`"));
        assert!(err(&[("detect", "emails,ssn")]).contains("unknown detector `ssn`"));
        assert!(err(&[("on_match", "email-the-ciso")]).contains("`on_match` must be"));
        assert!(err(&[("pattern.bad", "(")]).contains("`pattern.bad` is not a valid regular expression"));
        let custom = rules(&[("detect", ""), ("pattern.ticket", r"\bSEC-\d+\b")]);
        assert_eq!(custom.decide(&text("see SEC-42")).reason.as_deref(), Some("text contains ticket"));
        assert_eq!(custom.decide(&text("mail a@b.example.com")).route, Route::Cloud);
    }
}
