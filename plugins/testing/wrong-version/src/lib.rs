//! A residency plugin built against `akosha:plugin@9.0.0` (a copy of the contract with only the version
//! changed): the agent must refuse it at load, naming both versions.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ world: "residency", path: "wit" });

use akosha::plugin::types::{Decision, Record, Route};
use exports::akosha::plugin::residency_policy::Guest;

struct Plugin;

impl Guest for Plugin {
    fn configure(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn decide(records: Vec<Record>) -> Vec<Decision> {
        records.iter().map(|_| Decision { route: Route::Cloud, redactions: Vec::new(), reason: None }).collect()
    }
}

export!(Plugin);
