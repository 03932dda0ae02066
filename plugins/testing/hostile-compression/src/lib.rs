//! A compression plugin that misbehaves on purpose, chosen by `mode`: `loop`, `trap`, `panic`, or `zstd-99` (a
//! level no codec has). The agent's tests load it to prove that a failing compression policy only costs the
//! batch its chosen codec: the destination's default is used and nothing is lost.

#![cfg(target_arch = "wasm32")]

use akosha_plugin_sdk::Config;
use akosha_plugin_sdk::compression::{BatchStats, Codec, CodecChoice, Policy};

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

    fn choose(&self, stats: &BatchStats) -> CodecChoice {
        match self.mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("hostile compression plugin panicked on purpose with {} records", stats.records),
            "zstd-99" => CodecChoice { codec: Codec::Zstd, level: 99 },
            _ => CodecChoice { codec: Codec::None, level: 0 },
        }
    }
}

akosha_plugin_sdk::compression_plugin!(Hostile);
