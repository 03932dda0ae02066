//! The in-process model reproduces Session-Buddy's stored embeddings: every conversation and reflection in the
//! `small` fixture, embedded from its `content`, has cosine ≥ 0.999 with the vector Session-Buddy stored.

use akosha_aggregator::embed::{Embedder, default_model_dir};

#[test]
fn session_buddy_embeddings_are_reproduced() {
    let model_dir = default_model_dir(std::env::var("HOME").ok().as_deref());
    if !model_dir.join("model.safetensors").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no embedding model at {} (run scripts/setup.sh)",
            model_dir.display()
        );
        eprintln!("skipping: no embedding model at {}", model_dir.display());
        return;
    }
    let embedder = Embedder::load(&model_dir, 256).expect("model loads");
    // The running test's CARGO_MANIFEST_DIR: a build reused from another checkout keeps the old compile-time one.
    let fixture = std::path::Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../../shared/fixtures/session-buddy/small/reflection.duckdb");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("reflection.duckdb");
    std::fs::copy(fixture, &copy).expect("fixture present");
    let conn = duckdb::Connection::open(&copy).unwrap();
    let mut checked = 0;
    let mut worst = f32::MAX;
    for table in ["conversations_v2", "reflections_v2"] {
        let mut stmt = conn
            .prepare(&format!("SELECT id, content, embedding::FLOAT[] FROM {table} WHERE embedding IS NOT NULL"))
            .unwrap();
        let rows: Vec<(String, String, Vec<f32>)> = stmt
            .query_map([], |row| {
                let embedding = match row.get::<_, duckdb::types::Value>(2)? {
                    duckdb::types::Value::List(values) => values
                        .into_iter()
                        .map(|v| match v {
                            duckdb::types::Value::Float(f) => f,
                            other => panic!("embedding element {other:?}"),
                        })
                        .collect(),
                    other => panic!("embedding {other:?}"),
                };
                Ok((row.get(0)?, row.get(1)?, embedding))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!rows.is_empty(), "{table} has no embedded rows");
        let texts: Vec<&str> = rows.iter().map(|(_, text, _)| text.as_str()).collect();
        let ours = embedder.embed(&texts).unwrap();
        for ((id, _, stored), mine) in rows.iter().zip(&ours) {
            let cosine: f32 = stored.iter().zip(mine).map(|(a, b)| a * b).sum::<f32>()
                / (stored.iter().map(|a| a * a).sum::<f32>().sqrt() * mine.iter().map(|b| b * b).sum::<f32>().sqrt());
            worst = worst.min(cosine);
            assert!(cosine >= 0.999, "{table} {id}: cosine {cosine} < 0.999");
            checked += 1;
        }
    }
    assert_eq!(checked, 28, "20 conversations and 8 reflections");
    eprintln!("{checked} embeddings reproduced; lowest cosine {worst}");
}
