//! A residency plugin that misbehaves on purpose, chosen by `mode`: `loop`, `memory-bomb`, `trap`, `panic`,
//! `short` (one decision too few), `bad-redaction` (a range past the text), `bad-utf8` (a reason that is not
//! UTF-8, as a guest in another language could return), `onprem-all`, `cloud-all`, and `echo` (each record, as
//! the guest received it, rendered into its decision's reason).
//! The agent's tests load it to prove that no misbehaviour lets a record reach a cloud destination, and that
//! what the host lowers into a guest arrives intact.

#![cfg(target_arch = "wasm32")]

use akosha_plugin_sdk::Config;
use akosha_plugin_sdk::residency::{Decision, Kind, Policy, Record, Redaction};

struct Hostile {
    mode: String,
}

impl Policy for Hostile {
    fn configure(config: &Config) -> Result<Self, String> {
        match config.get("mode") {
            Some(mode) => Ok(Hostile { mode: mode.to_owned() }),
            None => Err("`mode` is required".into()),
        }
    }

    fn decide(&self, _record: &Record) -> Decision {
        Decision::cloud()
    }

    fn decide_batch(&self, records: &[Record]) -> Vec<Decision> {
        match self.mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("hostile plugin panicked on purpose with {} records", records.len()),
            "short" => records.iter().skip(1).map(|_| Decision::cloud()).collect(),
            "bad-redaction" => records
                .iter()
                .map(|r| {
                    let len = r.text.as_ref().map_or(0, String::len) as u32;
                    let mut d = Decision::cloud();
                    d.redactions.push(Redaction { start: 0, end: len + 10 });
                    d
                })
                .collect(),
            "bad-utf8" => records
                .iter()
                .map(|_| {
                    // SAFETY: not safe, on purpose: the bytes only cross into the host, which must refuse them.
                    #[allow(unsafe_code)]
                    let reason = unsafe { String::from_utf8_unchecked(vec![b'o', b'k', 0xff, 0xfe]) };
                    Decision::onprem(reason)
                })
                .collect(),
            "echo" => records.iter().map(|r| Decision::onprem(echo(r))).collect(),
            "onprem-all" => records.iter().map(|_| Decision::onprem("hostile: everything on-premises")).collect(),
            _ => records.iter().map(|_| Decision::cloud()).collect(),
        }
    }
}

/// Every field of the record, in the contract's order; the host's test renders its records the same way.
fn echo(r: &Record) -> String {
    let kind = match r.kind {
        Kind::Conversation => "conversation",
        Kind::Reflection => "reflection",
        Kind::Entity => "entity",
        Kind::Relation => "relation",
        Kind::Metric => "metric",
    };
    format!(
        "{kind}|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        r.system_id, r.id, r.project, r.namespace, r.category, r.name, r.tags, r.text, r.metadata, r.embedding
    )
}

akosha_plugin_sdk::residency_plugin!(Hostile);
