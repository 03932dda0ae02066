//! The guest side of akosha's policy plugins, without the bindings boilerplate.
//!
//! A residency policy is a type implementing [`residency::Policy`] plus one macro call:
//!
//! ```ignore
//! use akosha_plugin_sdk::residency::{Decision, Policy, Record};
//! use akosha_plugin_sdk::Config;
//!
//! struct NoSecretsInProjectX;
//!
//! impl Policy for NoSecretsInProjectX {
//!     fn configure(_config: &Config) -> Result<Self, String> {
//!         Ok(NoSecretsInProjectX)
//!     }
//!     fn decide(&self, record: &Record) -> Decision {
//!         match record.project.as_deref() {
//!             Some("x") => Decision::onprem("project x stays on-premises"),
//!             _ => Decision::cloud(),
//!         }
//!     }
//! }
//!
//! akosha_plugin_sdk::residency_plugin!(NoSecretsInProjectX);
//! ```
//!
//! Enable the feature of the world you implement (`residency` or `compression`); one plugin implements one.
//! Panics are reported to the host (which logs the message with the plugin's name) before the plugin traps.

pub mod arena;

/// The configuration map an operator wrote for the plugin in the agent's config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    entries: Vec<(String, String)>,
}

impl Config {
    /// Wraps the pairs the host passed.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A comma-separated list (empty items dropped, whitespace trimmed).
    pub fn list(&self, key: &str) -> Vec<String> {
        self.get(key)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// A boolean (`true`/`false`/`yes`/`no`/`1`/`0`), `default` when unset.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "yes" | "1" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "no" | "0" | "off") => Ok(false),
            Some(v) => Err(format!("`{key}` must be true or false, not `{v}`")),
        }
    }

    /// Every `(key, value)` whose key starts with `prefix`, with the prefix removed.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.entries.iter().filter_map(move |(k, v)| k.strip_prefix(prefix).map(|rest| (rest, v.as_str())))
    }

    /// Every pair, in the order the operator wrote them.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.entries
    }

    /// All keys, for rejecting unknown ones.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }
}

/// Residency policies: where each record may go.
#[cfg(feature = "residency")]
pub mod residency {
    wit_bindgen::generate!({
        world: "residency",
        path: "../../wit/v0.1",
        pub_export_macro: true,
        export_macro_name: "export_residency",
        default_bindings_module: "akosha_plugin_sdk::residency",
    });

    pub use self::akosha::plugin::types::{Decision, Kind, Record, Redaction, Route};

    /// A residency policy.
    pub trait Policy: Sized + 'static {
        /// Builds the policy from its configuration; an error refuses the plugin at load.
        fn configure(config: &crate::Config) -> Result<Self, String>;

        /// The decision for one record.
        fn decide(&self, record: &Record) -> Decision;

        /// The decisions for a batch, one per record in order (override to share work across a batch).
        fn decide_batch(&self, records: &[Record]) -> Vec<Decision> {
            records.iter().map(|r| self.decide(r)).collect()
        }
    }

    impl Decision {
        /// May go anywhere.
        pub fn cloud() -> Self {
            Decision { route: Route::Cloud, redactions: Vec::new(), reason: None }
        }

        /// On-premises destinations only.
        pub fn onprem(reason: impl Into<String>) -> Self {
            Decision { route: Route::Onprem, redactions: Vec::new(), reason: Some(reason.into()) }
        }

        /// Discard.
        pub fn drop(reason: impl Into<String>) -> Self {
            Decision { route: Route::Drop, redactions: Vec::new(), reason: Some(reason.into()) }
        }

        /// May go anywhere once the given byte ranges of the text are blanked out.
        pub fn redact(ranges: Vec<std::ops::Range<usize>>, reason: impl Into<String>) -> Self {
            let redactions =
                ranges.into_iter().map(|r| Redaction { start: r.start as u32, end: r.end as u32 }).collect();
            Decision { route: Route::Cloud, redactions, reason: Some(reason.into()) }
        }
    }

    /// Sends panic messages to the host before the trap that follows them.
    #[doc(hidden)]
    pub fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| akosha::plugin::diagnostics::panicked(&info.to_string())));
    }

    /// Exports a [`Policy`] type as the plugin's residency policy.
    #[macro_export]
    macro_rules! residency_plugin {
        ($policy:ty) => {
            struct __AkoshaResidencyPlugin;

            thread_local! {
                static __AKOSHA_POLICY: ::core::cell::RefCell<::core::option::Option<$policy>> =
                    const { ::core::cell::RefCell::new(None) };
            }

            impl $crate::residency::exports::akosha::plugin::residency_policy::Guest for __AkoshaResidencyPlugin {
                fn configure(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>)
                    -> ::core::result::Result<(), ::std::string::String>
                {
                    $crate::arena::enter_body();
                    $crate::residency::install_panic_hook();
                    let configured = <$policy as $crate::residency::Policy>::configure(&$crate::Config::new(config));
                    let result = configured.map(|policy| __AKOSHA_POLICY.with(|slot| *slot.borrow_mut() = Some(policy)));
                    // SAFETY: `config` was moved into the `Config` dropped above; nothing the host passed is alive.
                    unsafe { $crate::arena::leave_body() };
                    result
                }

                fn decide(
                    records: ::std::vec::Vec<$crate::residency::Record>,
                ) -> ::std::vec::Vec<$crate::residency::Decision> {
                    $crate::arena::enter_body();
                    let decisions = __AKOSHA_POLICY.with(|slot| match slot.borrow().as_ref() {
                        Some(policy) => $crate::residency::Policy::decide_batch(policy, &records),
                        None => panic!("decide was called before configure"),
                    });
                    ::core::mem::drop(records);
                    // SAFETY: the records were the only thing the host passed, and they are dropped.
                    unsafe { $crate::arena::leave_body() };
                    decisions
                }
            }

            $crate::residency::export_residency!(__AkoshaResidencyPlugin with_types_in $crate::residency);
        };
    }
}

/// Compression policies: the codec of an outgoing batch.
#[cfg(feature = "compression")]
pub mod compression {
    wit_bindgen::generate!({
        world: "compression",
        path: "../../wit/v0.1",
        pub_export_macro: true,
        export_macro_name: "export_compression",
        default_bindings_module: "akosha_plugin_sdk::compression",
    });

    pub use self::akosha::plugin::types::{BatchStats, Codec, CodecChoice};

    /// A compression policy.
    pub trait Policy: Sized + 'static {
        /// Builds the policy from its configuration.
        fn configure(config: &crate::Config) -> Result<Self, String>;

        /// The codec for a batch.
        fn choose(&self, stats: &BatchStats) -> CodecChoice;
    }

    /// Sends panic messages to the host before the trap that follows them.
    #[doc(hidden)]
    pub fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| akosha::plugin::diagnostics::panicked(&info.to_string())));
    }

    /// Exports a [`Policy`] type as the plugin's compression policy.
    #[macro_export]
    macro_rules! compression_plugin {
        ($policy:ty) => {
            struct __AkoshaCompressionPlugin;

            thread_local! {
                static __AKOSHA_POLICY: ::core::cell::RefCell<::core::option::Option<$policy>> =
                    const { ::core::cell::RefCell::new(None) };
            }

            impl $crate::compression::exports::akosha::plugin::compression_policy::Guest
                for __AkoshaCompressionPlugin
            {
                fn configure(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>)
                    -> ::core::result::Result<(), ::std::string::String>
                {
                    $crate::arena::enter_body();
                    $crate::compression::install_panic_hook();
                    let configured = <$policy as $crate::compression::Policy>::configure(&$crate::Config::new(config));
                    let result = configured.map(|policy| __AKOSHA_POLICY.with(|slot| *slot.borrow_mut() = Some(policy)));
                    // SAFETY: `config` was moved into the `Config` dropped above; nothing the host passed is alive.
                    unsafe { $crate::arena::leave_body() };
                    result
                }

                fn choose(stats: $crate::compression::BatchStats) -> $crate::compression::CodecChoice {
                    $crate::arena::enter_body();
                    let choice = __AKOSHA_POLICY.with(|slot| match slot.borrow().as_ref() {
                        Some(policy) => $crate::compression::Policy::choose(policy, &stats),
                        None => panic!("choose was called before configure"),
                    });
                    ::core::mem::drop(stats);
                    // SAFETY: the statistics were the only thing the host passed, and they are dropped.
                    unsafe { $crate::arena::leave_body() };
                    choice
                }
            }

            $crate::compression::export_compression!(__AkoshaCompressionPlugin with_types_in $crate::compression);
        };
    }
}
