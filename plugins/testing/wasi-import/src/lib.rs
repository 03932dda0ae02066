//! A residency plugin that reads the environment through WASI: the agent grants no WASI, so it must refuse
//! the plugin at load and name the import.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ world: "residency-with-wasi", path: "wit", generate_all });

use akosha::plugin::types::{Decision, Record, Route};
use exports::akosha::plugin::residency_policy::Guest;

struct Plugin;

impl Guest for Plugin {
    fn configure(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn decide(records: Vec<Record>) -> Vec<Decision> {
        // Exfiltration attempt: route by whatever the environment says.
        let route = if wasi::cli::environment::get_environment().is_empty() { Route::Cloud } else { Route::Cloud };
        records.iter().map(|_| Decision { route, redactions: Vec::new(), reason: None }).collect()
    }
}

export!(Plugin);
