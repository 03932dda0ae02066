//! The host side of WASM policy plugins (contract: `wit/v0.1`, `akosha:plugin@0.1.0`).
//!
//! A plugin is a WebAssembly component. Before anything of it runs, the host reads its exports and imports:
//! the contract version is part of the export name and must be one this agent speaks, and the only imports
//! allowed are the contract's own (`diagnostics`); WASI or anything else is refused at load, naming the import.
//!
//! Every call runs under an epoch deadline (a ticker thread advances the engine's epoch) and a linear-memory
//! limit. An instance is reused between batches while its memory stays within twice what it used after its
//! first batch; beyond that, or after any failure, the next batch gets a fresh instance, so a plugin cannot
//! accumulate memory across batches.
//! Callers decide what a failure means: residency must fail closed (never to a cloud destination), compression
//! falls back to the default codec.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use akosha_protocol::{Record, RecordKind, Residency};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Engine, ResourceLimiter, Store};

mod guest_decision;
mod guest_record;

use guest_decision::GuestDecisions;
use guest_record::GuestRecord;

mod residency_bindings {
    wasmtime::component::bindgen!({ world: "residency", path: "../wit/v0.1" });
}

mod compression_bindings {
    wasmtime::component::bindgen!({ world: "compression", path: "../wit/v0.1" });
}

use compression_bindings::akosha::plugin::types as ctypes;
use residency_bindings::akosha::plugin::types as rtypes;

/// The contract version this agent implements.
pub const CONTRACT_VERSION: &str = "0.1.0";
const CONTRACT_PACKAGE: &str = "akosha:plugin";
/// Epoch ticks per second.
const TICKS_PER_SECOND: u64 = 100;

/// What a plugin decides about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Where records may go.
    Residency,
    /// Which codec a batch gets.
    Compression,
}

impl PluginKind {
    fn interface(self) -> &'static str {
        match self {
            PluginKind::Residency => "residency-policy",
            PluginKind::Compression => "compression-policy",
        }
    }
}

/// How one plugin is loaded and limited.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// The `.wasm` component.
    pub path: PathBuf,
    /// Expected SHA-256 of the file (hex), if pinned.
    pub sha256: Option<String>,
    /// Wall-clock budget per call.
    pub timeout: Duration,
    /// Largest linear memory.
    pub memory_limit: u64,
    /// Passed to the plugin's `configure`.
    pub config: Vec<(String, String)>,
    /// Whether records are passed with their embeddings.
    pub embeddings: bool,
}

impl PluginConfig {
    /// A plugin with default limits (500 ms per call, 64 MiB of memory).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        PluginConfig {
            name: name.into(),
            path: path.into(),
            sha256: None,
            timeout: Duration::from_millis(500),
            memory_limit: 64 << 20,
            config: Vec::new(),
            embeddings: false,
        }
    }
}

/// Why a plugin failed; every variant names the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The file cannot be read, or its pin does not match.
    #[error("plugin `{plugin}`: {message}")]
    Load {
        /// The plugin.
        plugin: String,
        /// What went wrong.
        message: String,
    },
    /// Built against a contract version this agent does not speak.
    #[error(
        "plugin `{plugin}` implements {CONTRACT_PACKAGE}@{found}, but this agent speaks {CONTRACT_PACKAGE}@{CONTRACT_VERSION}"
    )]
    Version {
        /// The plugin.
        plugin: String,
        /// Its version.
        found: String,
    },
    /// Imports something not granted.
    #[error("plugin `{plugin}` imports `{import}`, which is not granted (policies get no WASI or other host access)")]
    Import {
        /// The plugin.
        plugin: String,
        /// The import.
        import: String,
    },
    /// `configure` refused the configuration.
    #[error("plugin `{plugin}` refused its configuration: {message}")]
    Configure {
        /// The plugin.
        plugin: String,
        /// Its message.
        message: String,
    },
    /// A call failed.
    #[error("plugin `{plugin}` failed: {cause}")]
    Call {
        /// The plugin.
        plugin: String,
        /// Why.
        cause: CallFailure,
    },
}

impl PluginError {
    /// A short label for metrics: the call failure's kind, or why loading failed.
    pub fn label(&self) -> &'static str {
        match self {
            PluginError::Call { cause, .. } => cause.label(),
            PluginError::Configure { .. } => "configure",
            PluginError::Version { .. } => "contract_version",
            PluginError::Import { .. } => "ungranted_import",
            PluginError::Load { .. } => "load",
        }
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        match self {
            PluginError::Load { plugin, .. }
            | PluginError::Version { plugin, .. }
            | PluginError::Import { plugin, .. }
            | PluginError::Configure { plugin, .. }
            | PluginError::Call { plugin, .. } => plugin,
        }
    }
}

/// How a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// Ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Tried to grow memory past the limit.
    #[error("exceeded its memory limit of {0} bytes")]
    MemoryLimit(u64),
    /// Panicked (with the guest's message).
    #[error("panicked: {0}")]
    Panic(String),
    /// Trapped.
    #[error("trapped: {0}")]
    Trap(String),
    /// Returned the wrong number of decisions.
    #[error("returned {got} decisions for {expected} records")]
    WrongCount {
        /// Records sent.
        expected: usize,
        /// Decisions returned.
        got: usize,
    },
    /// A redaction does not fit the record's text.
    #[error("redaction {start}..{end} does not fit the {len}-byte text of record `{record}`")]
    BadRedaction {
        /// The record id.
        record: String,
        /// Range start.
        start: u32,
        /// Range end.
        end: u32,
        /// Text length.
        len: usize,
    },
    /// Chose a zstd level outside 1..=19.
    #[error("chose zstd level {0}, outside 1..=19")]
    BadLevel(i8),
}

impl CallFailure {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CallFailure::Timeout(_) => "timeout",
            CallFailure::MemoryLimit(_) => "memory_limit",
            CallFailure::Panic(_) => "panic",
            CallFailure::Trap(_) => "trap",
            CallFailure::WrongCount { .. } => "wrong_count",
            CallFailure::BadRedaction { .. } => "bad_redaction",
            CallFailure::BadLevel(_) => "bad_level",
        }
    }
}

/// The shared engine: epoch interruption on, one ticker thread while any plugin exists.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginEngine")
    }
}

impl PluginEngine {
    /// The process-wide engine (compiled code is shared between plugins and instances).
    /// Fails only if wasmtime refuses the configuration; a default engine instead would have no deadlines.
    pub fn shared(plugin: &str) -> Result<PluginEngine, PluginError> {
        static ENGINE: OnceLock<Result<PluginEngine, String>> = OnceLock::new();
        ENGINE
            .get_or_init(|| {
                let mut config = wasmtime::Config::new();
                config.epoch_interruption(true);
                config.wasm_component_model(true);
                let engine = Engine::new(&config).map_err(|e| format!("cannot create the WASM engine: {e:#}"))?;
                let ticker = engine.weak();
                // The ticker ends with the process; it only wakes 100 times a second and only once a plugin
                // was loaded.
                let _ = std::thread::Builder::new().name("akosha-plugin-epoch".into()).spawn(move || {
                    while let Some(engine) = ticker.upgrade() {
                        engine.increment_epoch();
                        drop(engine);
                        std::thread::sleep(Duration::from_millis(1000 / TICKS_PER_SECOND));
                    }
                });
                Ok(PluginEngine { engine })
            })
            .clone()
            .map_err(|message| PluginError::Load { plugin: plugin.to_owned(), message })
    }
}

/// Per-store state: memory accounting and the guest's last panic message.
struct HostState {
    memory_limit: u64,
    memory_denied: bool,
    memory_grew: bool,
    memory_size: u64,
    panic: Option<String>,
    /// The plugin tolerates one allocation for all of a call's arguments ([`bulk_arguments`]).
    bulk_arguments: bool,
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_limit {
            self.memory_denied = true;
            return Ok(false);
        }
        if current > 0 {
            self.memory_grew = true;
        }
        self.memory_size = desired as u64;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl residency_bindings::akosha::plugin::diagnostics::Host for HostState {
    fn panicked(&mut self, message: String) {
        self.panic = Some(message);
    }
}

impl residency_bindings::akosha::plugin::types::Host for HostState {}

impl compression_bindings::akosha::plugin::diagnostics::Host for HostState {
    fn panicked(&mut self, message: String) {
        self.panic = Some(message);
    }
}

impl compression_bindings::akosha::plugin::types::Host for HostState {}

/// Reads, pins, checks and compiles a component.
/// What a loaded plugin is, for logs, status and the audit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginIdentity {
    /// The configured name.
    pub name: String,
    /// The `.wasm` file.
    pub path: PathBuf,
    /// SHA-256 of the file (hex): the plugin's exact version.
    pub sha256: String,
    /// Contract version it implements.
    pub contract: String,
    /// Whether the plugin lets the host put a call's arguments in one allocation (see [`bulk_arguments`]).
    pub bulk_arguments: bool,
}

/// Custom section by which a plugin declares that freeing any address inside a block allocated for a call's
/// arguments is harmless (the SDK's argument arena, `plugins/sdk/src/arena.rs`), and its expected content.
const BULK_ARGUMENTS_SECTION: &str = "akosha:bulk-arguments";
const BULK_ARGUMENTS_VERSION: &[u8] = b"v1";

/// Whether the component carries [`BULK_ARGUMENTS_SECTION`] with the version this host knows, and has one
/// linear memory (one guest program; the shim modules `wit-component` adds define none). The canonical ABI has
/// the host ask the guest's `realloc` for one block per string and list (a call into the guest each, most of what
/// crossing the boundary costs per record); a guest whose allocator tolerates frees of interior addresses may be
/// given all of them in one block. A component with several memories takes the standard path, since the host
/// cannot tell whose `realloc` a call uses; a guest that makes the promise falsely only corrupts its own
/// sandboxed heap, which fails its calls closed.
pub fn bulk_arguments(component: &[u8]) -> bool {
    let mut memories = 0;
    let mut marked = false;
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload {
            Ok(wasmparser::Payload::MemorySection(section)) => memories += section.count(),
            Ok(wasmparser::Payload::CustomSection(section)) if section.name() == BULK_ARGUMENTS_SECTION => {
                marked = section.data() == BULK_ARGUMENTS_VERSION;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    memories == 1 && marked
}

fn load_component(
    engine: &Engine,
    config: &PluginConfig,
    kind: PluginKind,
) -> Result<(Component, PluginIdentity), PluginError> {
    let load_err = |message: String| PluginError::Load { plugin: config.name.clone(), message };
    let bytes =
        std::fs::read(&config.path).map_err(|e| load_err(format!("cannot read {}: {e}", config.path.display())))?;
    use sha2::Digest;
    let actual: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    if let Some(expected) = &config.sha256
        && !actual.eq_ignore_ascii_case(expected.trim())
    {
        return Err(load_err(format!(
            "{} has sha256 {actual}, but the configuration pins {expected}",
            config.path.display()
        )));
    }
    // Compiled once per process and content: several policies (or destinations) may load the same file.
    static COMPILED: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Component>>> = OnceLock::new();
    let cache = COMPILED.get_or_init(Default::default);
    let cached = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&actual).cloned();
    let component = match cached {
        Some(component) => component,
        None => {
            let component =
                Component::new(engine, &bytes).map_err(|e| load_err(format!("not a valid component: {e:#}")))?;
            cache.lock().unwrap_or_else(|p| p.into_inner()).insert(actual.clone(), component.clone());
            component
        }
    };
    let contract = check_contract(engine, &component, &config.name, kind)?;
    let identity = PluginIdentity {
        name: config.name.clone(),
        path: config.path.clone(),
        sha256: actual,
        contract,
        bulk_arguments: bulk_arguments(&bytes),
    };
    Ok((component, identity))
}

/// Loads the component and pre-links it against the contract's host imports (and nothing else).
fn link<P>(
    engine: &Engine,
    config: &PluginConfig,
    kind: PluginKind,
    add_to_linker: impl FnOnce(&mut Linker<HostState>) -> wasmtime::Result<()>,
    bindings: impl FnOnce(InstancePre<HostState>) -> wasmtime::Result<P>,
) -> Result<(P, PluginIdentity), PluginError> {
    let (component, identity) = load_component(engine, config, kind)?;
    let link_err =
        |e: wasmtime::Error| PluginError::Load { plugin: config.name.clone(), message: format!("linking: {e:#}") };
    let mut linker: Linker<HostState> = Linker::new(engine);
    add_to_linker(&mut linker).map_err(link_err)?;
    let instance_pre = linker.instantiate_pre(&component).map_err(link_err)?;
    Ok((bindings(instance_pre).map_err(link_err)?, identity))
}

/// Checks the contract's exports and imports, read from the component's type before instantiation, and
/// returns the contract version the component implements.
pub fn check_contract(
    engine: &Engine,
    component: &Component,
    plugin: &str,
    kind: PluginKind,
) -> Result<String, PluginError> {
    let ty = component.component_type();
    let wanted = format!("{CONTRACT_PACKAGE}/{}@", kind.interface());
    let mut found = None;
    for (name, _) in ty.exports(engine) {
        if let Some(version) = name.strip_prefix(&wanted) {
            found = Some(version.to_owned());
        }
    }
    let Some(version) = found else {
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_owned()).collect();
        return Err(PluginError::Load {
            plugin: plugin.to_owned(),
            message: format!(
                "exports no {CONTRACT_PACKAGE}/{} (it exports: {}); is it a {} plugin?",
                kind.interface(),
                if exports.is_empty() { "nothing".to_owned() } else { exports.join(", ") },
                match kind {
                    PluginKind::Residency => "residency",
                    PluginKind::Compression => "compression",
                }
            ),
        });
    };
    if !compatible(&version) {
        return Err(PluginError::Version { plugin: plugin.to_owned(), found: version });
    }
    for (name, _) in ty.imports(engine) {
        let granted = [format!("{CONTRACT_PACKAGE}/diagnostics@"), format!("{CONTRACT_PACKAGE}/types@")];
        let allowed = granted.iter().any(|prefix| name.strip_prefix(prefix.as_str()).is_some_and(compatible));
        if !allowed {
            return Err(PluginError::Import { plugin: plugin.to_owned(), import: name.to_owned() });
        }
    }
    Ok(version)
}

/// Semver compatibility with [`CONTRACT_VERSION`]: same major, and for 0.x the same minor.
fn compatible(version: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(version), parse(CONTRACT_VERSION)) {
        (Some((0, minor)), Some((0, ours))) => minor == ours,
        (Some((major, _)), Some((ours, _))) => major == ours,
        _ => false,
    }
}

/// What a component exports and imports, for `akosha-agent plugin inspect`.
pub fn describe(path: &Path) -> Result<String, PluginError> {
    let plugin = path.display().to_string();
    let engine = &PluginEngine::shared(&plugin)?.engine;
    let bytes =
        std::fs::read(path).map_err(|e| PluginError::Load { plugin: plugin.clone(), message: e.to_string() })?;
    let component = Component::new(engine, &bytes)
        .map_err(|e| PluginError::Load { plugin: plugin.clone(), message: format!("not a valid component: {e:#}") })?;
    let ty = component.component_type();
    let mut out = String::new();
    let mut kind = None;
    for (name, _) in ty.exports(engine) {
        out.push_str(&format!("export {name}\n"));
        for k in [PluginKind::Residency, PluginKind::Compression] {
            if let Some(version) = name.strip_prefix(&format!("{CONTRACT_PACKAGE}/{}@", k.interface())) {
                kind = Some((k, version.to_owned()));
            }
        }
    }
    for (name, _) in ty.imports(engine) {
        out.push_str(&format!("import {name}\n"));
    }
    let summary = match kind {
        Some((k, version)) => {
            let verdict = match check_contract(engine, &component, &plugin, k) {
                Ok(_) => "loadable by this agent".to_owned(),
                Err(e) => format!("NOT loadable: {e}"),
            };
            let arguments = if bulk_arguments(&bytes) {
                "arguments: one block per call (the plugin declares akosha:bulk-arguments v1)"
            } else {
                "arguments: one block per string and list (canonical ABI)"
            };
            format!("{k:?} policy, contract {CONTRACT_PACKAGE}@{version} ({verdict})\n{arguments}\n")
        }
        None => format!("not an akosha policy (no {CONTRACT_PACKAGE} policy export)\n"),
    };
    Ok(format!("{summary}{out}"))
}

/// The residency export the host calls per batch (typed with borrowed records at each call).
struct ResidencyExports {
    decide: wasmtime::component::Func,
}

/// An instance that may be reused, and the store it lives in.
struct Live<T> {
    store: Store<HostState>,
    bindings: T,
}

/// Runs a call under the plugin's deadline, translating traps into [`CallFailure`]s.
fn classify(error: &wasmtime::Error, state: &HostState, timeout: Duration) -> CallFailure {
    if let Some(message) = &state.panic {
        return CallFailure::Panic(message.clone());
    }
    if state.memory_denied {
        return CallFailure::MemoryLimit(state.memory_limit);
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallFailure::Timeout(timeout),
        Some(trap) => CallFailure::Trap(trap.to_string()),
        None => CallFailure::Trap(format!("{error:#}")),
    }
}

fn new_store(engine: &Engine, config: &PluginConfig, identity: &PluginIdentity) -> Store<HostState> {
    let state = HostState {
        memory_limit: config.memory_limit,
        memory_denied: false,
        memory_grew: false,
        memory_size: 0,
        panic: None,
        bulk_arguments: identity.bulk_arguments,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| s);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(deadline_ticks(config.timeout));
    store
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() as u64 * TICKS_PER_SECOND).div_ceil(1000).max(1) + 1
}

/// A loaded residency policy.
pub struct ResidencyPlugin {
    config: PluginConfig,
    identity: PluginIdentity,
    engine: Engine,
    pre: residency_bindings::ResidencyPre<HostState>,
    live: Option<Live<ResidencyExports>>,
    /// Linear memory after the instance's first batch. The guest allocator may still grow a little while it
    /// settles, but past twice this the instance is replaced, so memory cannot grow without bound across batches.
    baseline: Option<u64>,
}

/// A residency decision, as the host uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where.
    pub route: Residency,
    /// Byte ranges of the text to blank out (checked to fit).
    pub redactions: Vec<(u32, u32)>,
    /// Why.
    pub reason: Option<String>,
}

impl ResidencyPlugin {
    /// Loads, checks and pre-links the plugin, then configures one instance to surface configuration errors
    /// at load rather than at the first batch.
    pub fn load(config: PluginConfig) -> Result<ResidencyPlugin, PluginError> {
        let engine = PluginEngine::shared(&config.name)?.engine;
        let (pre, identity) = link(
            &engine,
            &config,
            PluginKind::Residency,
            |linker| residency_bindings::Residency::add_to_linker::<_, HasSelf<_>>(linker, |s| s),
            residency_bindings::ResidencyPre::new,
        )?;
        let mut plugin = ResidencyPlugin { config, identity, engine, pre, live: None, baseline: None };
        plugin.instance()?;
        Ok(plugin)
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// What was loaded.
    pub fn identity(&self) -> &PluginIdentity {
        &self.identity
    }

    fn instance(&mut self) -> Result<&mut Live<ResidencyExports>, PluginError> {
        if self.live.is_none() {
            let mut store = new_store(&self.engine, &self.config, &self.identity);
            let call_err = |store: &Store<HostState>, e: wasmtime::Error, plugin: &str, timeout| PluginError::Call {
                plugin: plugin.to_owned(),
                cause: classify(&e, store.data(), timeout),
            };
            let instance = self
                .pre
                .instance_pre()
                .instantiate(&mut store)
                .map_err(|e| call_err(&store, e, &self.config.name, self.config.timeout))?;
            let generated = residency_bindings::Residency::new(&mut store, &instance)
                .map_err(|e| call_err(&store, e, &self.config.name, self.config.timeout))?;
            let decide = instance
                .get_export_index(&mut store, None, &format!("{CONTRACT_PACKAGE}/residency-policy@{CONTRACT_VERSION}"))
                .and_then(|interface| instance.get_export_index(&mut store, Some(&interface), "decide"))
                .and_then(|index| instance.get_func(&mut store, index))
                .ok_or_else(|| PluginError::Load {
                    plugin: self.config.name.clone(),
                    message: "exports no residency-policy.decide".into(),
                })?;
            let configured = generated
                .akosha_plugin_residency_policy()
                .call_configure(&mut store, &self.config.config)
                .map_err(|e| call_err(&store, e, &self.config.name, self.config.timeout))?;
            let bindings = ResidencyExports { decide };
            if let Err(message) = configured {
                return Err(PluginError::Configure { plugin: self.config.name.clone(), message });
            }
            self.baseline = None;
            self.live = Some(Live { store, bindings });
        }
        self.live
            .as_mut()
            .ok_or_else(|| PluginError::Load { plugin: self.config.name.clone(), message: "no instance".into() })
    }

    /// One decision per record. Any failure discards the instance; the caller fails closed.
    pub fn decide(&mut self, records: &[Record]) -> Result<Vec<Decision>, PluginError> {
        let plugin = self.config.name.clone();
        let timeout = self.config.timeout;
        let embeddings = self.config.embeddings;
        let input: Vec<GuestRecord<'_>> = records.iter().map(|r| to_guest(r, embeddings)).collect();
        let live = self.instance()?;
        live.store.data_mut().memory_grew = false;
        live.store.set_epoch_deadline(deadline_ticks(timeout));
        let result = live
            .bindings
            .decide
            .typed::<(&[GuestRecord<'_>],), (GuestDecisions,)>(&live.store)
            .and_then(|decide| decide.call(&mut live.store, (&input,)))
            .map(|(GuestDecisions(decisions),)| decisions);
        let outcome = match result {
            Ok(decisions) => check_decisions(records, decisions).map_err(|cause| PluginError::Call { plugin, cause }),
            Err(e) => Err(PluginError::Call { plugin, cause: classify(&e, live.store.data(), timeout) }),
        };
        let grew = live.store.data().memory_grew;
        // A fresh instance after any failure, and whenever memory grew after the first batch.
        let size = live.store.data().memory_size;
        let baseline = *self.baseline.get_or_insert(size);
        if outcome.is_err() || (grew && size > baseline.saturating_mul(2)) {
            self.live = None;
            self.baseline = None;
        }
        outcome
    }
}

fn to_guest(r: &Record, embeddings: bool) -> GuestRecord<'_> {
    GuestRecord {
        kind: match r.kind {
            RecordKind::Conversation => rtypes::Kind::Conversation,
            RecordKind::Reflection => rtypes::Kind::Reflection,
            RecordKind::Entity => rtypes::Kind::Entity,
            RecordKind::Relation => rtypes::Kind::Relation,
            _ => rtypes::Kind::Metric,
        },
        system_id: &r.system_id,
        id: &r.id,
        project: r.project.as_deref(),
        namespace: r.namespace.as_deref(),
        category: r.category.as_deref(),
        name: r.name.as_deref(),
        tags: &r.tags,
        text: r.text.as_deref(),
        metadata: r.metadata.as_deref(),
        embedding: if embeddings { r.embedding.as_deref() } else { None },
    }
}

fn check_decisions(records: &[Record], decisions: Vec<rtypes::Decision>) -> Result<Vec<Decision>, CallFailure> {
    if decisions.len() != records.len() {
        return Err(CallFailure::WrongCount { expected: records.len(), got: decisions.len() });
    }
    records
        .iter()
        .zip(decisions)
        .map(|(record, d)| {
            let text = record.text.as_deref().unwrap_or("");
            let mut redactions = Vec::with_capacity(d.redactions.len());
            for r in &d.redactions {
                let fits = r.start <= r.end
                    && (r.end as usize) <= text.len()
                    && text.is_char_boundary(r.start as usize)
                    && text.is_char_boundary(r.end as usize);
                if !fits {
                    return Err(CallFailure::BadRedaction {
                        record: record.id.clone(),
                        start: r.start,
                        end: r.end,
                        len: text.len(),
                    });
                }
                redactions.push((r.start, r.end));
            }
            let route = match d.route {
                rtypes::Route::Cloud => Residency::Cloud,
                rtypes::Route::Onprem => Residency::Onprem,
                rtypes::Route::Drop => Residency::Drop,
            };
            Ok(Decision { route, redactions, reason: d.reason })
        })
        .collect()
}

/// Replaces each (checked) byte range of `text` with `[REDACTED]`.
pub fn apply_redactions(text: &str, ranges: &[(u32, u32)]) -> String {
    let mut sorted: Vec<(usize, usize)> = ranges.iter().map(|&(s, e)| (s as usize, e as usize)).collect();
    sorted.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in merged {
        out.push_str(&text[at..start]);
        out.push_str("[REDACTED]");
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// A loaded compression policy.
pub struct CompressionPlugin {
    config: PluginConfig,
    identity: PluginIdentity,
    engine: Engine,
    pre: compression_bindings::CompressionPre<HostState>,
    live: Option<Live<compression_bindings::Compression>>,
}

/// What a compression policy is told about a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// Records.
    pub records: u32,
    /// Encoded bytes.
    pub bytes: u64,
    /// Bytes of text.
    pub text_bytes: u64,
    /// Bytes of embeddings.
    pub embedding_bytes: u64,
    /// Up to 4 KiB of the encoded batch.
    pub sample: Vec<u8>,
}

impl CompressionPlugin {
    /// Loads, checks and configures the plugin.
    pub fn load(config: PluginConfig) -> Result<CompressionPlugin, PluginError> {
        let engine = PluginEngine::shared(&config.name)?.engine;
        let (pre, identity) = link(
            &engine,
            &config,
            PluginKind::Compression,
            |linker| compression_bindings::Compression::add_to_linker::<_, HasSelf<_>>(linker, |s| s),
            compression_bindings::CompressionPre::new,
        )?;
        let mut plugin = CompressionPlugin { config, identity, engine, pre, live: None };
        plugin.instance()?;
        Ok(plugin)
    }

    /// What was loaded.
    pub fn identity(&self) -> &PluginIdentity {
        &self.identity
    }

    fn instance(&mut self) -> Result<&mut Live<compression_bindings::Compression>, PluginError> {
        if self.live.is_none() {
            let mut store = new_store(&self.engine, &self.config, &self.identity);
            let plugin = self.config.name.clone();
            let timeout = self.config.timeout;
            let bindings = self.pre.instantiate(&mut store).map_err(|e| PluginError::Call {
                plugin: plugin.clone(),
                cause: classify(&e, store.data(), timeout),
            })?;
            let configured =
                bindings.akosha_plugin_compression_policy().call_configure(&mut store, &self.config.config).map_err(
                    |e| PluginError::Call { plugin: plugin.clone(), cause: classify(&e, store.data(), timeout) },
                )?;
            if let Err(message) = configured {
                return Err(PluginError::Configure { plugin, message });
            }
            self.live = Some(Live { store, bindings });
        }
        self.live
            .as_mut()
            .ok_or_else(|| PluginError::Load { plugin: self.config.name.clone(), message: "no instance".into() })
    }

    /// The codec for a batch; on failure the caller uses its default codec.
    pub fn choose(&mut self, stats: &BatchStats) -> Result<akosha_protocol::Codec, PluginError> {
        let plugin = self.config.name.clone();
        let timeout = self.config.timeout;
        let live = self.instance()?;
        live.store.set_epoch_deadline(deadline_ticks(timeout));
        let input = ctypes::BatchStats {
            records: stats.records,
            bytes: stats.bytes,
            text_bytes: stats.text_bytes,
            embedding_bytes: stats.embedding_bytes,
            sample: stats.sample.iter().take(4096).copied().collect(),
        };
        let result = live.bindings.akosha_plugin_compression_policy().call_choose(&mut live.store, &input);
        match result {
            Ok(choice) => match choice.codec {
                ctypes::Codec::None => Ok(akosha_protocol::Codec::None),
                ctypes::Codec::Lz4 => Ok(akosha_protocol::Codec::Lz4),
                ctypes::Codec::Zstd if (1..=19).contains(&choice.level) => {
                    Ok(akosha_protocol::Codec::Zstd(choice.level))
                }
                ctypes::Codec::Zstd => Err(PluginError::Call { plugin, cause: CallFailure::BadLevel(choice.level) }),
            },
            Err(e) => {
                let cause = classify(&e, live.store.data(), timeout);
                self.live = None;
                Err(PluginError::Call { plugin, cause })
            }
        }
    }
}

/// Turns a core WebAssembly module built with wit-bindgen into a component (what `wasm-tools component new`
/// does), for plugin builds without wasm-tools installed.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}

/// Times a batch call, for `plugin test`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactions_replace_ranges_and_merge_overlaps() {
        assert_eq!(apply_redactions("my key is AKIA123 ok", &[(10, 17)]), "my key is [REDACTED] ok");
        assert_eq!(apply_redactions("abcdef", &[(0, 2), (1, 4)]), "[REDACTED]ef");
        assert_eq!(apply_redactions("abc", &[]), "abc");
    }

    #[test]
    fn versions_compatible_by_semver() {
        assert!(compatible("0.1.0"));
        assert!(compatible("0.1.7"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("9.0.0"));
        assert!(!compatible("garbage"));
    }
}
