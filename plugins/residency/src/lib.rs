//! akosha's shipped residency policy: see [`rules`] for what it decides and how it is configured.

pub mod rules;

#[cfg(target_arch = "wasm32")]
mod plugin {
    use akosha_plugin_sdk::Config;
    use akosha_plugin_sdk::residency::{Decision, Policy, Record, Redaction, Route};

    use crate::rules::{self, RecordView, Rules};

    struct Residency(Rules);

    impl Policy for Residency {
        fn configure(config: &Config) -> Result<Self, String> {
            Rules::from_config(config.pairs()).map(Residency)
        }

        fn decide(&self, record: &Record) -> Decision {
            let view = RecordView {
                project: record.project.as_deref(),
                tags: &record.tags,
                text: record.text.as_deref(),
                name: record.name.as_deref(),
                metadata: record.metadata.as_deref(),
            };
            let verdict = self.0.decide(&view);
            Decision {
                route: match verdict.route {
                    rules::Route::Cloud => Route::Cloud,
                    rules::Route::Onprem => Route::Onprem,
                    rules::Route::Drop => Route::Drop,
                },
                redactions: verdict
                    .redactions
                    .into_iter()
                    .map(|r| Redaction { start: r.start as u32, end: r.end as u32 })
                    .collect(),
                reason: verdict.reason,
            }
        }
    }

    akosha_plugin_sdk::residency_plugin!(Residency);
}
