//! Policies in the data path: the residency stage that decides where each accepted record may go, the
//! compression chooser each sender asks for a codec, and the audit of both.
//!
//! Residency fails closed. Policies run in their configured order over batches of `policy_batch_records`; each
//! sees the text the previous one redacted, and a record's route is the strictest of its own `residency`, the
//! default route and every policy's decision (`cloud` < `onprem` < `drop`). A policy that traps, times out, runs
//! out of memory, panics, miscounts or redacts out of range makes its whole batch `onprem`: the records then
//! reach only on-premises destinations, or the quarantine buffer, never the cloud.
//!
//! Compression fails open: the first policy that answers picks the codec; if none does, the destination's
//! configured codec is used. A bad codec choice costs bytes, never data.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use akosha_protocol::{Codec, Record, Residency};
use serde_json::json;
use tracing::{debug, error, warn};

use crate::config::RoutingConfig;
use crate::plugin::{
    BatchStats, CompressionPlugin, PluginConfig, PluginError, PluginIdentity, ResidencyPlugin, apply_redactions, timed,
};

/// Decisions kept for `status`.
const RECENT_DECISIONS: usize = 256;
/// Distinct (policy, route, reason) counters kept; further reasons are counted under `(other)`, so a plugin
/// that writes record ids into its reasons cannot grow the agent's memory or the metrics without bound.
const MAX_REASONS: usize = 512;
/// Longest reason kept.
const MAX_REASON_BYTES: usize = 200;
/// Bytes of a batch shown to the compression policy, taken from evenly spaced places.
const SAMPLE_BYTES: usize = 4096;
/// Consecutive failures after which a policy is rested.
const BREAKER_THRESHOLD: u32 = 3;
/// How long a failing policy rests before it is tried again.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);

/// Rests a policy that keeps failing: while open, a residency batch fails closed at once and a compression
/// batch uses the fallback codec, instead of each waiting out the policy's deadline again (a looping policy
/// would otherwise cost its full timeout on every batch). After the cooldown one call is tried; a success
/// closes the breaker, a failure opens it again.
#[derive(Debug, Default)]
struct Breaker {
    consecutive: u32,
    open_until: Option<Instant>,
    last: Option<PluginError>,
}

impl Breaker {
    /// The failure to report instead of calling, while resting.
    fn resting(&self) -> Option<&PluginError> {
        match self.open_until {
            Some(until) if Instant::now() < until => self.last.as_ref(),
            _ => None,
        }
    }

    fn succeeded(&mut self) {
        *self = Breaker::default();
    }

    fn failed(&mut self, error: &PluginError) {
        self.consecutive += 1;
        self.last = Some(error.clone());
        if self.consecutive >= BREAKER_THRESHOLD {
            self.open_until = Some(Instant::now() + BREAKER_COOLDOWN);
            warn!(
                message = "Policy failed repeatedly; resting it before the next try.",
                policy = error.plugin(),
                failures = self.consecutive,
                cooldown_s = BREAKER_COOLDOWN.as_secs(),
                cause = error.label()
            );
        }
    }
}

/// Counters and recent decisions of every policy; shared by the residency stage and the senders.
#[derive(Debug, Default)]
pub struct Audit {
    state: Mutex<AuditState>,
}

#[derive(Debug, Default)]
struct AuditState {
    /// `onprem` and `drop` decisions by policy, route and reason.
    decisions: BTreeMap<(String, Residency, String), u64>,
    /// Failed calls by policy and cause.
    failures: BTreeMap<(String, &'static str), u64>,
    /// Records sent on-prem (or to quarantine) because a residency policy failed.
    failed_closed_records: u64,
    /// Records whose text a policy redacted.
    redacted_records: u64,
    /// Final routes of accepted records.
    routed: BTreeMap<Residency, u64>,
    /// Records kept in quarantine.
    quarantined: u64,
    /// Calls and time per policy.
    calls: BTreeMap<String, (u64, Duration)>,
    /// Codecs picked per destination.
    codecs: BTreeMap<(String, String), u64>,
    recent: VecDeque<AuditEntry>,
}

/// One audited decision, as `akosha-agent status` shows it. Never holds record text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditEntry {
    /// When (RFC 3339).
    pub at: String,
    /// The policy.
    pub policy: String,
    /// Record kind.
    pub kind: String,
    /// Record id (or the batch's record count for a failure).
    pub id: String,
    /// `onprem` or `drop`.
    pub route: &'static str,
    /// The policy's reason, or the failure.
    pub reason: Option<String>,
}

impl Audit {
    fn lock(&self) -> MutexGuard<'_, AuditState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(state: &mut AuditState, entry: AuditEntry) {
        if state.recent.len() == RECENT_DECISIONS {
            state.recent.pop_front();
        }
        state.recent.push_back(entry);
    }

    fn decision(&self, policy: &str, record: &Record, route: Residency, reason: Option<&str>) {
        let reason = reason.map(|r| truncate(r, MAX_REASON_BYTES).to_owned());
        let mut state = self.lock();
        let mut key = (policy.to_owned(), route, reason.clone().unwrap_or_default());
        if !state.decisions.contains_key(&key) && state.decisions.len() >= MAX_REASONS {
            key.2 = "(other)".to_owned();
        }
        *state.decisions.entry(key).or_default() += 1;
        let entry = AuditEntry {
            at: jiff::Timestamp::now().to_string(),
            policy: policy.to_owned(),
            kind: record.kind.as_str().to_owned(),
            id: record.id.clone(),
            route: route.as_str(),
            reason,
        };
        Self::push(&mut state, entry);
    }

    fn failure(&self, error: &PluginError, records: usize) {
        let mut state = self.lock();
        *state.failures.entry((error.plugin().to_owned(), error.label())).or_default() += 1;
        state.failed_closed_records += records as u64;
        let entry = AuditEntry {
            at: jiff::Timestamp::now().to_string(),
            policy: error.plugin().to_owned(),
            kind: "batch".to_owned(),
            id: format!("{records} records"),
            route: Residency::Onprem.as_str(),
            reason: Some(format!("failed closed: {error}")),
        };
        Self::push(&mut state, entry);
    }

    fn compression_failure(&self, error: &PluginError) {
        *self.lock().failures.entry((error.plugin().to_owned(), error.label())).or_default() += 1;
    }

    fn call(&self, policy: &str, elapsed: Duration) {
        let mut state = self.lock();
        let entry = state.calls.entry(policy.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += elapsed;
    }

    /// Counts the final routes of accepted records and how many went to quarantine.
    pub fn routed(&self, routes: &[Residency], quarantined: u64) {
        let mut state = self.lock();
        for route in routes {
            *state.routed.entry(*route).or_default() += 1;
        }
        state.quarantined += quarantined;
    }

    fn codec(&self, destination: &str, codec: Codec) {
        *self.lock().codecs.entry((destination.to_owned(), codec.to_string())).or_default() += 1;
    }

    /// The audit section of `/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let state = self.lock();
        json!({
            "routed": state.routed.iter().map(|(r, n)| (r.as_str().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "quarantined_records": state.quarantined,
            "redacted_records": state.redacted_records,
            "failed_closed_records": state.failed_closed_records,
            "decisions": state.decisions.iter().map(|((policy, route, reason), count)| json!({
                "policy": policy, "route": route.as_str(), "reason": reason, "count": count,
            })).collect::<Vec<_>>(),
            "failures": state.failures.iter().map(|((policy, cause), count)| json!({
                "policy": policy, "cause": cause, "count": count,
            })).collect::<Vec<_>>(),
            "calls": state.calls.iter().map(|(policy, (calls, time))| json!({
                "policy": policy, "calls": calls, "seconds": time.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "codecs": state.codecs.iter().map(|((destination, codec), count)| json!({
                "destination": destination, "codec": codec, "batches": count,
            })).collect::<Vec<_>>(),
            "recent": state.recent.iter().rev().collect::<Vec<_>>(),
        })
    }

    /// Prometheus series.
    pub fn metrics(&self, m: &mut crate::metrics::Exposition) {
        let state = self.lock();
        let routed: Vec<([(&str, &str); 1], f64)> =
            state.routed.iter().map(|(r, n)| ([("route", r.as_str())], *n as f64)).collect();
        m.metric(
            "akosha_agent_routed_records_total",
            "counter",
            "Accepted records by final residency route.",
            routed.iter().map(|(l, v)| (&l[..], *v)),
        );
        m.metric(
            "akosha_agent_quarantined_records_total",
            "counter",
            "Records kept in quarantine: routed onprem with no on-prem destination.",
            [(&[][..], state.quarantined as f64)],
        );
        m.metric(
            "akosha_agent_redacted_records_total",
            "counter",
            "Records whose text a residency policy redacted.",
            [(&[][..], state.redacted_records as f64)],
        );
        m.metric(
            "akosha_agent_failed_closed_records_total",
            "counter",
            "Records routed onprem because a residency policy failed.",
            [(&[][..], state.failed_closed_records as f64)],
        );
        let decisions: Vec<([(&str, &str); 3], f64)> = state
            .decisions
            .iter()
            .map(|((p, r, reason), n)| {
                ([("policy", p.as_str()), ("route", r.as_str()), ("reason", reason.as_str())], *n as f64)
            })
            .collect();
        m.metric(
            "akosha_agent_residency_decisions_total",
            "counter",
            "onprem and drop decisions by policy and reason.",
            decisions.iter().map(|(l, v)| (&l[..], *v)),
        );
        let failures: Vec<([(&str, &str); 2], f64)> =
            state.failures.iter().map(|((p, c), n)| ([("policy", p.as_str()), ("cause", *c)], *n as f64)).collect();
        m.metric(
            "akosha_agent_policy_failures_total",
            "counter",
            "Failed policy calls by cause.",
            failures.iter().map(|(l, v)| (&l[..], *v)),
        );
        let calls: Vec<([(&str, &str); 1], f64)> =
            state.calls.iter().map(|(p, (n, _))| ([("policy", p.as_str())], *n as f64)).collect();
        m.metric(
            "akosha_agent_policy_calls_total",
            "counter",
            "Policy calls.",
            calls.iter().map(|(l, v)| (&l[..], *v)),
        );
        let seconds: Vec<([(&str, &str); 1], f64)> =
            state.calls.iter().map(|(p, (_, t))| ([("policy", p.as_str())], t.as_secs_f64())).collect();
        m.metric(
            "akosha_agent_policy_seconds_total",
            "counter",
            "Time spent in policy calls.",
            seconds.iter().map(|(l, v)| (&l[..], *v)),
        );
        let codecs: Vec<([(&str, &str); 2], f64)> = state
            .codecs
            .iter()
            .map(|((d, c), n)| ([("destination", d.as_str()), ("codec", c.as_str())], *n as f64))
            .collect();
        m.metric(
            "akosha_agent_batch_codec_total",
            "counter",
            "Batches sent per codec.",
            codecs.iter().map(|(l, v)| (&l[..], *v)),
        );
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The residency policies, in order, and the default route.
pub struct ResidencyStage {
    policies: Vec<Slot>,
    identities: Vec<PluginIdentity>,
    default_route: Residency,
    batch_records: usize,
    audit: Arc<Audit>,
}

/// Records after the residency stage: redacted, each with its route (also set as the record's `residency`).
#[derive(Debug)]
pub struct Routed {
    /// The records.
    pub records: Vec<Record>,
    /// Route per record.
    pub routes: Vec<Residency>,
}

/// A configured residency policy: loaded, or refused at load (and then failing closed on every batch).
enum Slot {
    Loaded { plugin: Box<Mutex<(ResidencyPlugin, Breaker)>>, identity: PluginIdentity },
    Unloadable(PluginError),
}

impl ResidencyStage {
    /// Loads every residency policy (compiling each component once) and configures one instance of each; the
    /// first that cannot be loaded is the error (what `validate` reports).
    pub fn load(
        configs: &[PluginConfig],
        routing: &RoutingConfig,
        audit: Arc<Audit>,
    ) -> Result<ResidencyStage, PluginError> {
        let stage = Self::load_fail_closed(configs, routing, audit);
        let first_error = stage.load_errors().next().cloned();
        match first_error {
            Some(error) => Err(error),
            None => Ok(stage),
        }
    }

    /// Like [`ResidencyStage::load`], but a policy that cannot be loaded (missing file, pin mismatch, foreign
    /// contract version, ungranted import, refused configuration) does not stop the agent: it stays in its
    /// place and fails closed on every batch, so nothing it would have judged can reach the cloud.
    pub fn load_fail_closed(configs: &[PluginConfig], routing: &RoutingConfig, audit: Arc<Audit>) -> ResidencyStage {
        let mut policies = Vec::with_capacity(configs.len());
        let mut identities = Vec::with_capacity(configs.len());
        for config in configs {
            match ResidencyPlugin::load(config.clone()) {
                Ok(plugin) => {
                    identities.push(plugin.identity().clone());
                    policies.push(Slot::Loaded {
                        identity: plugin.identity().clone(),
                        plugin: Box::new(Mutex::new((plugin, Breaker::default()))),
                    });
                }
                Err(error) => {
                    error!(message = "Residency policy cannot be loaded; every batch stays on the premises until it is fixed.", policy = %config.name, path = %config.path.display(), cause = error.label(), %error);
                    policies.push(Slot::Unloadable(error));
                }
            }
        }
        ResidencyStage {
            policies,
            identities,
            default_route: routing.default_route,
            batch_records: routing.policy_batch_records.max(1),
            audit,
        }
    }

    /// Whether any policy is configured (without one, routing needs no copy of the records).
    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// The loaded policies.
    pub fn identities(&self) -> &[PluginIdentity] {
        &self.identities
    }

    /// Why configured policies could not be loaded.
    pub fn load_errors(&self) -> impl Iterator<Item = &PluginError> {
        self.policies.iter().filter_map(|slot| match slot {
            Slot::Unloadable(error) => Some(error),
            Slot::Loaded { .. } => None,
        })
    }

    /// A record's route before any policy: its own residency or the default, whichever is stricter.
    pub fn floor(&self, record: &Record) -> Residency {
        record.residency.map_or(self.default_route, |own| own.max(self.default_route))
    }

    /// Runs every policy over `records`. Blocking (plugins run synchronously under their deadlines): call it
    /// from a blocking thread.
    pub fn decide(&self, mut records: Vec<Record>) -> Routed {
        let mut routes: Vec<Residency> = records.iter().map(|r| self.floor(r)).collect();
        let mut start = 0;
        while start < records.len() {
            let end = (start + self.batch_records).min(records.len());
            for slot in &self.policies {
                if routes[start..end].iter().all(|r| *r == Residency::Drop) {
                    break;
                }
                let (plugin, identity) = match slot {
                    Slot::Loaded { plugin, identity } => (plugin, identity),
                    Slot::Unloadable(error) => {
                        debug!(
                            message = "Unloadable residency policy: batch stays on the premises.",
                            policy = error.plugin(),
                            records = end - start
                        );
                        self.audit.failure(error, end - start);
                        for route in &mut routes[start..end] {
                            *route = (*route).max(Residency::Onprem);
                        }
                        continue;
                    }
                };
                let mut guard = plugin.lock().unwrap_or_else(|p| p.into_inner());
                let (plugin, breaker) = &mut *guard;
                let result = if let Some(resting) = breaker.resting() {
                    Err(resting.clone())
                } else {
                    let (result, elapsed) = timed(|| plugin.decide(&records[start..end]));
                    self.audit.call(&identity.name, elapsed);
                    match &result {
                        Ok(_) => breaker.succeeded(),
                        Err(failure) => breaker.failed(failure),
                    }
                    result
                };
                drop(guard);
                match result {
                    Ok(decisions) => {
                        for (offset, decision) in decisions.into_iter().enumerate() {
                            let index = start + offset;
                            // An earlier policy's drop is final: nothing later is applied or audited.
                            if routes[index] == Residency::Drop {
                                continue;
                            }
                            let record = &mut records[index];
                            if !decision.redactions.is_empty()
                                && let Some(text) = &record.text
                            {
                                record.text = Some(apply_redactions(text, &decision.redactions));
                                self.audit.lock().redacted_records += 1;
                            }
                            if decision.route != Residency::Cloud {
                                debug!(message = "Residency decision.", policy = %identity.name, id = %record.id, route = decision.route.as_str(), reason = decision.reason.as_deref().unwrap_or(""));
                                self.audit.decision(&identity.name, record, decision.route, decision.reason.as_deref());
                            }
                            routes[index] = routes[index].max(decision.route);
                        }
                    }
                    Err(failure) => {
                        error!(
                            message = "Residency policy failed; its whole batch stays on the premises.",
                            policy = %identity.name,
                            contract = %identity.contract,
                            sha256 = %identity.sha256,
                            records = end - start,
                            cause = failure.label(),
                            error = %failure,
                        );
                        self.audit.failure(&failure, end - start);
                        for route in &mut routes[start..end] {
                            *route = (*route).max(Residency::Onprem);
                        }
                    }
                }
            }
            start = end;
        }
        for (record, route) in records.iter_mut().zip(&routes) {
            record.residency = Some(*route);
        }
        Routed { records, routes }
    }
}

/// Picks the codec of each outgoing batch for one destination.
pub struct CompressionChooser {
    destination: String,
    policies: Vec<(CompressionPlugin, Breaker)>,
    fallback: Codec,
    audit: Arc<Audit>,
}

impl CompressionChooser {
    /// Loads the compression policies for a destination whose configured codec is `fallback`.
    pub fn load(
        destination: &str,
        configs: &[PluginConfig],
        fallback: Codec,
        audit: Arc<Audit>,
    ) -> Result<CompressionChooser, PluginError> {
        let policies = configs
            .iter()
            .map(|c| CompressionPlugin::load(c.clone()).map(|p| (p, Breaker::default())))
            .collect::<Result<_, _>>()?;
        Ok(CompressionChooser { destination: destination.to_owned(), policies, fallback, audit })
    }

    /// Like [`CompressionChooser::load`], but a policy that cannot be loaded is left out (logged and counted):
    /// a codec choice is an optimisation, and the destination's codec is always safe.
    pub fn load_skipping_failures(
        destination: &str,
        configs: &[PluginConfig],
        fallback: Codec,
        audit: Arc<Audit>,
    ) -> CompressionChooser {
        let mut policies = Vec::with_capacity(configs.len());
        for config in configs {
            match CompressionPlugin::load(config.clone()) {
                Ok(plugin) => policies.push((plugin, Breaker::default())),
                Err(error) => {
                    error!(message = "Compression policy cannot be loaded; using the destination's codec instead.", policy = %config.name, destination, cause = error.label(), %error);
                    audit.compression_failure(&error);
                }
            }
        }
        CompressionChooser { destination: destination.to_owned(), policies, fallback, audit }
    }

    /// A chooser that always answers `codec` (no policy configured), still counting choices.
    pub fn fixed(destination: &str, codec: Codec, audit: Arc<Audit>) -> CompressionChooser {
        CompressionChooser { destination: destination.to_owned(), policies: Vec::new(), fallback: codec, audit }
    }

    /// The loaded policies.
    pub fn identities(&self) -> Vec<PluginIdentity> {
        self.policies.iter().map(|(p, _)| p.identity().clone()).collect()
    }

    /// Whether a policy may be consulted (and so the call should leave the async runtime).
    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    /// The codec for a batch of `records` encoded as `payload`.
    pub fn choose(&mut self, payload: &[u8], records: u32) -> Codec {
        let codec = self.consult(payload, records).unwrap_or(self.fallback);
        self.audit.codec(&self.destination, codec);
        codec
    }

    fn consult(&mut self, payload: &[u8], records: u32) -> Option<Codec> {
        if self.policies.is_empty() {
            return None;
        }
        let sizes = akosha_protocol::payload_stats(payload);
        let stats = BatchStats {
            records,
            bytes: payload.len() as u64,
            text_bytes: sizes.text_bytes,
            embedding_bytes: sizes.embedding_bytes,
            sample: sample(payload, SAMPLE_BYTES),
        };
        for (policy, breaker) in &mut self.policies {
            if breaker.resting().is_some() {
                continue;
            }
            let (result, elapsed) = timed(|| policy.choose(&stats));
            let name = policy.identity().name.clone();
            self.audit.call(&name, elapsed);
            match &result {
                Ok(_) => breaker.succeeded(),
                Err(failure) => breaker.failed(failure),
            }
            match result {
                Ok(codec) => return Some(codec),
                Err(failure) => {
                    warn!(message = "Compression policy failed; trying the next one or the destination's codec.", policy = %name, destination = %self.destination, cause = failure.label(), error = %failure);
                    self.audit.compression_failure(&failure);
                }
            }
        }
        None
    }
}

/// Up to `max` bytes of `payload`: all of it when small, else eight evenly spaced slices, so the estimate does
/// not see only the first records.
fn sample(payload: &[u8], max: usize) -> Vec<u8> {
    if payload.len() <= max {
        return payload.to_vec();
    }
    let slices = 8;
    let each = max / slices;
    let stride = payload.len() / slices;
    (0..slices).flat_map(|i| &payload[i * stride..i * stride + each]).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_spans_the_payload() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i / 12_500) as u8).collect();
        let s = sample(&payload, 4096);
        assert_eq!(s.len(), 4096);
        let distinct: std::collections::BTreeSet<u8> = s.iter().copied().collect();
        assert_eq!(distinct.len(), 8);
        assert_eq!(sample(b"abc", 4096), b"abc");
    }

    #[test]
    fn reasons_are_bounded_and_truncated() {
        let audit = Audit::default();
        let record = Record { system_id: "s".into(), id: "1".into(), ..Record::default() };
        for i in 0..MAX_REASONS + 10 {
            audit.decision("p", &record, Residency::Onprem, Some(&format!("reason {i}")));
        }
        audit.decision("p", &record, Residency::Drop, Some(&"é".repeat(500)));
        let state = audit.lock();
        assert_eq!(state.decisions.len(), MAX_REASONS + 2, "one (other) per route");
        assert_eq!(state.decisions[&("p".to_owned(), Residency::Onprem, "(other)".to_owned())], 10);
        assert_eq!(state.recent.len(), RECENT_DECISIONS);
        assert!(state.recent.back().unwrap().reason.as_ref().unwrap().len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn floor_is_the_stricter_of_own_and_default() {
        let stage = ResidencyStage {
            policies: Vec::new(),
            identities: Vec::new(),
            default_route: Residency::Cloud,
            batch_records: 10,
            audit: Arc::default(),
        };
        let mut r = Record { system_id: "s".into(), id: "1".into(), ..Record::default() };
        assert_eq!(stage.floor(&r), Residency::Cloud);
        r.residency = Some(Residency::Onprem);
        assert_eq!(stage.floor(&r), Residency::Onprem);
        let routed = stage.decide(vec![r]);
        assert_eq!(routed.routes, [Residency::Onprem]);
        assert_eq!(routed.records[0].residency, Some(Residency::Onprem));
    }
}
