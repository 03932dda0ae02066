//! Recall of the hot tier's HNSW index against exact search, on random-but-clustered 384-dim vectors.
//!
//! `cargo bench --profile release --workspace --bench ann_recall -- [vectors, default 1000000] [connectivity
//! expansion_add, default the aggregator's]`
//!
//! Vectors: 2,000 random unit centres, each point a centre plus Gaussian-ish noise (σ chosen so that a point's
//! cluster-mates are its nearest neighbours but far from identical), normalised. Queries: 300 fresh points
//! drawn the same way. Recall@10 = |ANN top-10 ∩ exact top-10| / 10, averaged; exact is a brute-force scan of
//! the full-precision vectors.
//! Reports build rate, query latency and recall for several `expansion_search` values, with the build
//! parameters the aggregator uses, and — as the baseline of the same run — DuckDB's brute-force
//! `array_cosine_similarity` top-10 over the same vectors (in-memory table, every core).

use std::sync::Arc;
use std::time::Instant;

use akosha_aggregator::search::vector::VectorIndex;
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

const DIMS: usize = 384;
const CLUSTERS: usize = 2_000;

struct Rng(akosha_e2e::Xorshift);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next()
    }
    /// Roughly normal (sum of four uniforms), mean 0, variance 1/3.
    fn gauss(&mut self) -> f32 {
        (0..4).map(|_| (self.next() % 1_000_000) as f32 / 1_000_000.0 - 0.5).sum::<f32>()
    }
}

fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= norm);
    v
}

/// Appends vectors `first..` to the DuckDB baseline table through Arrow (the hot tier's own load path).
fn append(duck: &duckdb::Connection, first: usize, batch: &[Vec<f32>]) {
    let ids: ArrayRef = Arc::new(Int64Array::from((first..first + batch.len()).map(|i| i as i64).collect::<Vec<_>>()));
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let values = Float32Array::from(batch.iter().flatten().copied().collect::<Vec<f32>>());
    let vectors: ArrayRef =
        Arc::new(FixedSizeListArray::try_new(item.clone(), DIMS as i32, Arc::new(values), None).expect("vectors"));
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("embedding", DataType::FixedSizeList(item, DIMS as i32), false),
    ]);
    let rb = RecordBatch::try_new(Arc::new(schema), vec![ids, vectors]).expect("batch");
    let mut appender = duck.appender("v").expect("appender");
    appender.append_record_batch(rb).expect("append");
    appender.flush().expect("flush");
}

fn main() {
    let numbers: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = numbers.first().copied().unwrap_or(1_000_000);
    let mut rng = Rng(akosha_e2e::Xorshift(0x2545_F491_4F6C_DD1D));
    let centres: Vec<Vec<f32>> = (0..CLUSTERS).map(|_| normalise((0..DIMS).map(|_| rng.gauss()).collect())).collect();
    let point = |rng: &mut Rng| -> Vec<f32> {
        let c = &centres[(rng.next() % CLUSTERS as u64) as usize];
        normalise(c.iter().map(|x| x + 0.06 * rng.gauss()).collect())
    };
    let index = match numbers.get(1..3) {
        Some([connectivity, expansion_add]) => {
            println!("graph: connectivity {connectivity}, expansion_add {expansion_add}");
            VectorIndex::with_graph(DIMS, *connectivity, *expansion_add).expect("index")
        }
        _ => VectorIndex::new(DIMS).expect("index"),
    };
    let duck = duckdb::Connection::open_in_memory().expect("duckdb");
    duck.execute_batch(&format!("CREATE TABLE v (id BIGINT, embedding FLOAT[{DIMS}]);")).expect("table");
    let started = Instant::now();
    let chunk = 50_000;
    let mut done = 0;
    while done < n {
        let batch: Vec<Vec<f32>> = (0..chunk.min(n - done)).map(|_| point(&mut rng)).collect();
        let pairs: Vec<(u64, &[f32])> =
            batch.iter().enumerate().map(|(i, v)| ((done + i) as u64, v.as_slice())).collect();
        index.upsert(&pairs).expect("add");
        append(&duck, done, &batch);
        done += batch.len();
        eprint!("\rbuilt {done}/{n} ({:.0} vectors/s)", done as f64 / started.elapsed().as_secs_f64());
    }
    eprintln!();
    let build = started.elapsed();
    let queries: Vec<Vec<f32>> = (0..300).map(|_| point(&mut rng)).collect();
    let exact: Vec<Vec<u64>> =
        queries.iter().map(|q| index.exact(q, 10).expect("exact").into_iter().map(|(k, _)| k).collect()).collect();
    println!(
        "{n} vectors × {DIMS} dims, {CLUSTERS} clusters; built in {:.1} s ({:.0} vectors/s, one thread per core but one)",
        build.as_secs_f64(),
        n as f64 / build.as_secs_f64()
    );
    let automatic = index.expansion_search();
    println!("| expansion_search | recall@10 | p50 query | p99 query |");
    println!("|---:|---:|---:|---:|");
    // The automatic breadth (what the aggregator runs with) first, while the index still follows its size.
    for expansion in [automatic, 128, 256, 512, 1024] {
        index.set_expansion_search(expansion);
        let mut hits = 0;
        let mut times = Vec::new();
        for (q, truth) in queries.iter().zip(&exact) {
            let t = Instant::now();
            let found = index.search(q, 10, &|_| true).expect("search");
            times.push(t.elapsed().as_secs_f64() * 1e3);
            hits += found.iter().filter(|(k, _)| truth.contains(k)).count();
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {expansion}{} | {:.3} | {:.2} ms | {:.2} ms |",
            if expansion == automatic { " (automatic)" } else { "" },
            hits as f64 / (10.0 * queries.len() as f64),
            times[times.len() / 2],
            times[times.len() * 99 / 100]
        );
    }

    // The baseline: DuckDB scanning every vector for each query (20 queries: each takes a while).
    index.set_expansion_search(automatic);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut agree = 0;
    let sql = format!("SELECT id FROM v ORDER BY array_cosine_similarity(embedding, ?::FLOAT[{DIMS}]) DESC LIMIT 10");
    let mut stmt = duck.prepare(&sql).expect("prepare");
    for (q, truth) in queries.iter().zip(&exact).take(20) {
        let t = Instant::now();
        let found = index.search(q, 10, &|_| true).expect("search");
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        let literal = duckdb::types::Value::Array(q.iter().map(|x| duckdb::types::Value::Float(*x)).collect());
        let t = Instant::now();
        let ids: Vec<u64> =
            stmt.query_map([literal], |r| r.get::<_, i64>(0)).expect("query").map(|r| r.expect("row") as u64).collect();
        theirs.push(t.elapsed().as_secs_f64() * 1e3);
        agree += ids.iter().filter(|k| truth.contains(k)).count();
        let _ = found;
    }
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    let (ours_p50, theirs_p50) = (ours[ours.len() / 2], theirs[theirs.len() / 2]);
    println!(
        "DuckDB brute force (array_cosine_similarity, {} threads): p50 {:.1} ms, max {:.1} ms, recall {:.3}; \
         HNSW (ef {automatic}) p50 {:.2} ms on the same queries: {:.0}x faster",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        theirs_p50,
        theirs[theirs.len() - 1],
        agree as f64 / (10.0 * ours.len() as f64),
        ours_p50,
        theirs_p50 / ours_p50
    );
}
