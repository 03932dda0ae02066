//! Envelope encryption throughput against sha256 of the same bytes (which every cold upload computes anyway),
//! measured in the same run: what sealing adds to a warm→cold move and opening to a cold-cache fill.
//!
//! `cargo bench --bench envelope` (release profile, `CARGO_TARGET_DIR` as in README).

use std::time::Instant;

use akosha_aggregator::envelope::{Keyring, generate_key};
use sha2::{Digest, Sha256};

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (best, out.expect("runs > 0"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keyring = Keyring::new("k", &[("k".into(), generate_key()?)])?;
    // Parquet-like input: not all zeros, not random.
    let data: Vec<u8> = (0..(256usize << 20)).map(|i| ((i * 2_654_435_761) >> 13) as u8).collect();
    let mib = data.len() as f64 / (1 << 20) as f64;
    let (sha_s, _) = best_of(3, || Sha256::digest(&data));
    let (seal_s, (sealed, wrapped)) = best_of(3, || keyring.seal(&data).expect("seal"));
    let (open_s, opened) = best_of(3, || keyring.open(&wrapped, &sealed).expect("open"));
    assert_eq!(opened, data);
    println!("input {mib:.0} MiB, best of 3");
    println!("sha256   {:>8.0} MiB/s", mib / sha_s);
    println!("seal     {:>8.0} MiB/s  ({:.2}x the sha256 time)", mib / seal_s, seal_s / sha_s);
    println!("open     {:>8.0} MiB/s  ({:.2}x the sha256 time)", mib / open_s, open_s / sha_s);
    println!("overhead {:.4} % bytes", (sealed.len() - data.len()) as f64 * 100.0 / data.len() as f64);
    Ok(())
}
