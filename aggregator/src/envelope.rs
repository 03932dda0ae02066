//! Envelope encryption at rest for cold objects and backups: AES-256-GCM everywhere.
//!
//! Every object (or backup file) gets its own random 256-bit data key (DEK). The DEK encrypts the data; a
//! key-encryption key (KEK) from the configuration wraps the DEK. What is stored beside the data is only the
//! wrapped DEK and the KEK's id, so rotating the KEK means unwrapping and re-wrapping 60-byte DEKs — the data is
//! never rewritten, and a leaked DEK exposes one object.
//!
//! ```text
//!  sealed data  = header ‖ chunk₀ ‖ chunk₁ ‖ … ‖ chunkₙ (the last one marked, possibly empty)
//!  header       = "AKOSHA-SEALED-1\n" (16 bytes) ‖ chunk size (u32 little endian)
//!  chunkᵢ       = AES-256-GCM(DEK, nonce = i (u64 big endian) ‖ 0 0 0 ‖ last?1:0, aad = header)
//!  wrapped DEK  = base64(nonce (12 random bytes) ‖ AES-256-GCM(KEK, DEK, aad = "akosha-dek:" ‖ KEK id))
//! ```
//!
//! Chunks let files of any size be sealed and opened as streams; the counter nonce is safe because a DEK seals
//! exactly one stream, and the `last` flag means a truncated object fails to open instead of reading short.
//! Chunks cannot be reordered (the counter) or moved between objects (different DEKs).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The first bytes of sealed data.
pub const MAGIC: &[u8; 16] = b"AKOSHA-SEALED-1\n";
const HEADER_LEN: usize = MAGIC.len() + 4;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
const TAG: usize = 16;
const KEY_LEN: usize = 32;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The data was sealed under a KEK this configuration does not have.
    #[error(
        "the data key is wrapped with key-encryption key `{0}`, which is not in `encryption.keys`; add it back (rotation keeps old keys until nothing uses them)"
    )]
    UnknownKey(String),
    /// Authentication failed: the wrong key, or the bytes were altered.
    #[error("{0} does not authenticate: the key is wrong or the data was altered")]
    Tampered(&'static str),
    /// Not sealed data, or cut short.
    #[error("{0}")]
    Format(String),
    /// A key in the configuration is unusable.
    #[error("{0}")]
    BadKey(String),
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A DEK wrapped by a KEK, as stored beside the data (catalog rows, backup manifests).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Id of the KEK that wraps it.
    pub kek_id: String,
    /// base64 of nonce ‖ ciphertext ‖ tag.
    pub wrapped: String,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({})", self.kek_id)
    }
}

/// The key-encryption keys: the active one wraps new DEKs; the others still unwrap old ones.
#[derive(Clone)]
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, [u8; KEY_LEN]>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key bytes.
        f.debug_struct("Keyring").field("active", &self.active).field("ids", &self.ids()).finish()
    }
}

/// A fresh random key as base64, for `keys generate`.
pub fn generate_key() -> Result<String, EnvelopeError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new().fill(&mut key).map_err(|_| EnvelopeError::Random)?;
    Ok(BASE64.encode(key))
}

fn aead(key: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is a valid AES-256 key"))
}

fn dek_aad(kek_id: &str) -> Vec<u8> {
    [b"akosha-dek:".as_slice(), kek_id.as_bytes()].concat()
}

impl Keyring {
    /// Builds the keyring from `(id, base64 key)` pairs; `active` names the KEK that wraps new data keys.
    pub fn new(active: &str, keys: &[(String, String)]) -> Result<Keyring, EnvelopeError> {
        let mut parsed = BTreeMap::new();
        for (id, text) in keys {
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(EnvelopeError::BadKey(format!(
                    "key id `{id}` must be 1 to 64 letters, digits, `-`, `_` or `.`"
                )));
            }
            let bytes = BASE64.decode(text.trim()).map_err(|_| {
                EnvelopeError::BadKey(format!(
                    "key `{id}` is not base64 (make one with `akosha-aggregator keys generate`)"
                ))
            })?;
            let key: [u8; KEY_LEN] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| EnvelopeError::BadKey(format!("key `{id}` is {} bytes; AES-256 needs 32", bytes.len())))?;
            parsed.insert(id.clone(), key);
        }
        if !parsed.contains_key(active) {
            return Err(EnvelopeError::BadKey(format!(
                "the active key `{active}` is not among the keys ({})",
                parsed.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(Keyring { active: active.to_owned(), keys: parsed })
    }

    /// The id of the KEK new data keys are wrapped with.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Every KEK id.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    fn kek(&self, id: &str) -> Result<LessSafeKey, EnvelopeError> {
        self.keys.get(id).map(aead).ok_or_else(|| EnvelopeError::UnknownKey(id.to_owned()))
    }

    /// A new random DEK, and its wrapping under the active KEK.
    pub fn new_data_key(&self) -> Result<(DataKey, WrappedKey), EnvelopeError> {
        let mut dek = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut dek).map_err(|_| EnvelopeError::Random)?;
        let wrapped = self.wrap(&dek, &self.active)?;
        Ok((DataKey(dek), wrapped))
    }

    fn wrap(&self, dek: &[u8; KEY_LEN], kek_id: &str) -> Result<WrappedKey, EnvelopeError> {
        let mut nonce = [0u8; 12];
        SystemRandom::new().fill(&mut nonce).map_err(|_| EnvelopeError::Random)?;
        let mut body = dek.to_vec();
        self.kek(kek_id)?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(dek_aad(kek_id)), &mut body)
            .map_err(|_| EnvelopeError::Format("cannot wrap a data key".into()))?;
        Ok(WrappedKey { kek_id: kek_id.to_owned(), wrapped: BASE64.encode([nonce.as_slice(), &body].concat()) })
    }

    /// The DEK inside `wrapped`.
    pub fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, EnvelopeError> {
        let kek = self.kek(&wrapped.kek_id)?;
        let raw = BASE64.decode(&wrapped.wrapped).map_err(|_| {
            EnvelopeError::Format(format!("the wrapped data key under `{}` is not base64", wrapped.kek_id))
        })?;
        if raw.len() != 12 + KEY_LEN + TAG {
            return Err(EnvelopeError::Format(format!(
                "the wrapped data key under `{}` is {} bytes, not {}",
                wrapped.kek_id,
                raw.len(),
                12 + KEY_LEN + TAG
            )));
        }
        let (nonce, body) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| EnvelopeError::Format("short nonce".into()))?;
        let mut body = body.to_vec();
        let dek = kek
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(dek_aad(&wrapped.kek_id)), &mut body)
            .map_err(|_| EnvelopeError::Tampered("the wrapped data key"))?;
        let dek: [u8; KEY_LEN] = (&*dek).try_into().map_err(|_| EnvelopeError::Format("short data key".into()))?;
        Ok(DataKey(dek))
    }

    /// `wrapped` re-wrapped under the active KEK, or `None` when it already is.
    pub fn rewrap(&self, wrapped: &WrappedKey) -> Result<Option<WrappedKey>, EnvelopeError> {
        if wrapped.kek_id == self.active {
            return Ok(None);
        }
        let dek = self.unwrap(wrapped)?;
        self.wrap(&dek.0, &self.active).map(Some)
    }

    /// Seals a whole buffer under a new DEK.
    pub fn seal(&self, plaintext: &[u8]) -> Result<(Vec<u8>, WrappedKey), EnvelopeError> {
        let (dek, wrapped) = self.new_data_key()?;
        let mut sealer = Sealer::new(&dek);
        let mut out = sealer.push(plaintext)?;
        out.extend(sealer.finish()?);
        Ok((out, wrapped))
    }

    /// Opens a whole sealed buffer.
    pub fn open(&self, wrapped: &WrappedKey, sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let dek = self.unwrap(wrapped)?;
        let mut opener = Opener::new(&dek);
        let mut out = opener.push(sealed)?;
        out.extend(opener.finish()?);
        out.shrink_to_fit();
        Ok(out)
    }
}

/// An unwrapped data key (kept in memory only while data is sealed or opened).
pub struct DataKey([u8; KEY_LEN]);

fn chunk_nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()..].copy_from_slice(&(CHUNK as u32).to_le_bytes());
    h
}

/// Seals a stream: feed plaintext with [`Sealer::push`], end with [`Sealer::finish`]; the outputs, concatenated,
/// are the sealed data.
pub struct Sealer {
    key: LessSafeKey,
    index: u64,
    pending: Vec<u8>,
    started: bool,
}

impl Sealer {
    /// A sealer with `dek`.
    pub fn new(dek: &DataKey) -> Sealer {
        Sealer { key: aead(&dek.0), index: 0, pending: Vec::with_capacity(CHUNK), started: false }
    }

    fn seal_chunk(&mut self, mut chunk: Vec<u8>, last: bool, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        self.key
            .seal_in_place_append_tag(chunk_nonce(self.index, last), Aad::from(header()), &mut chunk)
            .map_err(|_| EnvelopeError::Format("cannot seal a chunk".into()))?;
        self.index += 1;
        out.extend_from_slice(&chunk);
        Ok(())
    }

    /// Sealed bytes for `plaintext` (whole chunks only; the rest waits for more input or `finish`).
    pub fn push(&mut self, mut plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(plaintext.len() + TAG * (plaintext.len() / CHUNK + 1) + HEADER_LEN);
        if !self.started {
            out.extend_from_slice(&header());
            self.started = true;
        }
        // A full chunk is only sealed once more input follows: the last chunk must carry the `last` flag.
        while !plaintext.is_empty() {
            if self.pending.len() == CHUNK {
                let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
                self.seal_chunk(chunk, false, &mut out)?;
            }
            let take = (CHUNK - self.pending.len()).min(plaintext.len());
            self.pending.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
        Ok(out)
    }

    /// The rest of the sealed data, ending with the `last` chunk.
    pub fn finish(mut self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::new();
        if !self.started {
            out.extend_from_slice(&header());
        }
        if self.pending.len() == CHUNK {
            let chunk = std::mem::take(&mut self.pending);
            self.seal_chunk(chunk, false, &mut out)?;
        }
        let last = std::mem::take(&mut self.pending);
        self.seal_chunk(last, true, &mut out)?;
        Ok(out)
    }
}

/// Opens a stream sealed by [`Sealer`]; [`Opener::finish`] fails unless the last chunk was seen.
pub struct Opener {
    key: LessSafeKey,
    index: u64,
    pending: Vec<u8>,
    header_seen: bool,
    done: bool,
}

impl Opener {
    /// An opener with `dek`.
    pub fn new(dek: &DataKey) -> Opener {
        Opener { key: aead(&dek.0), index: 0, pending: Vec::new(), header_seen: false, done: false }
    }

    /// Opens `pending[from..from + len]` into `out`.
    fn open_chunk(&mut self, from: usize, len: usize, last: bool, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
        let chunk = &mut self.pending[from..from + len];
        let plain = self
            .key
            .open_in_place(chunk_nonce(self.index, last), Aad::from(header()), chunk)
            .map_err(|_| EnvelopeError::Tampered("sealed data"))?;
        out.extend_from_slice(plain);
        self.index += 1;
        Ok(())
    }

    /// Plaintext for the sealed bytes so far. A full-size chunk is held back until more input shows it is not
    /// the last.
    pub fn push(&mut self, sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        if self.done && !sealed.is_empty() {
            return Err(EnvelopeError::Format("bytes follow the last chunk of sealed data".into()));
        }
        self.pending.extend_from_slice(sealed);
        let mut out = Vec::new();
        if !self.header_seen {
            if self.pending.len() < HEADER_LEN {
                return Ok(out);
            }
            if &self.pending[..MAGIC.len()] != MAGIC {
                return Err(EnvelopeError::Format("not sealed data (the header is missing)".into()));
            }
            let chunk = u32::from_le_bytes(self.pending[MAGIC.len()..HEADER_LEN].try_into().unwrap_or_default());
            if chunk as usize != CHUNK {
                return Err(EnvelopeError::Format(format!(
                    "sealed with {chunk}-byte chunks; this build reads {CHUNK}"
                )));
            }
            self.pending.drain(..HEADER_LEN);
            self.header_seen = true;
        }
        // One pass with a cursor: a whole object pushed at once is not shifted down once per chunk.
        let mut pos = 0;
        while self.pending.len() - pos > CHUNK + TAG {
            self.open_chunk(pos, CHUNK + TAG, false, &mut out)?;
            pos += CHUNK + TAG;
        }
        self.pending.drain(..pos);
        Ok(out)
    }

    /// The last chunk's plaintext; an error if the data stopped short.
    pub fn finish(mut self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::new();
        if !self.header_seen {
            return Err(EnvelopeError::Format("sealed data cut short (no header)".into()));
        }
        if self.pending.len() == CHUNK + TAG {
            // A sealer never marks a full chunk last (an empty last chunk follows it): this is a middle chunk.
            return Err(EnvelopeError::Format("sealed data cut short (the last chunk is missing)".into()));
        }
        if self.pending.len() < TAG {
            return Err(EnvelopeError::Format("sealed data cut short (a partial chunk)".into()));
        }
        let len = self.pending.len();
        self.open_chunk(0, len, true, &mut out).map_err(|e| match e {
            // The usual cause: chunks are missing and a middle chunk was taken for the last.
            EnvelopeError::Tampered(_) => EnvelopeError::Tampered("sealed data (or it was cut short)"),
            e => e,
        })?;
        self.done = true;
        Ok(out)
    }
}

/// Whether `bytes` start like sealed data.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn keyring(active: &str) -> Keyring {
        let keys = vec![("k1".to_owned(), BASE64.encode([1u8; 32])), ("k2".to_owned(), BASE64.encode([2u8; 32]))];
        Keyring::new(active, &keys).unwrap()
    }

    #[test]
    fn sealed_data_opens_and_only_with_its_key() {
        let ring = keyring("k1");
        let (sealed, wrapped) = ring.seal(b"hello cold tier").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(wrapped.kek_id, "k1");
        assert_eq!(ring.open(&wrapped, &sealed).unwrap(), b"hello cold tier");
        // Another object's data key does not open it.
        let (_, other) = ring.seal(b"x").unwrap();
        assert_eq!(
            ring.open(&other, &sealed).unwrap_err(),
            EnvelopeError::Tampered("sealed data (or it was cut short)")
        );
        // A keyring without k1 names the missing key.
        let without = Keyring::new("k2", &[("k2".into(), BASE64.encode([2u8; 32]))]).unwrap();
        assert_eq!(without.open(&wrapped, &sealed).unwrap_err(), EnvelopeError::UnknownKey("k1".into()));
        // The same id with different key bytes does not unwrap.
        let impostor = Keyring::new("k1", &[("k1".into(), BASE64.encode([9u8; 32]))]).unwrap();
        assert_eq!(impostor.open(&wrapped, &sealed).unwrap_err(), EnvelopeError::Tampered("the wrapped data key"));
    }

    #[test]
    fn rotation_rewraps_the_data_key_and_the_data_stays_as_it_is() {
        let old = keyring("k1");
        let (sealed, wrapped) = old.seal(b"years of sessions").unwrap();
        let new = keyring("k2");
        let rewrapped = new.rewrap(&wrapped).unwrap().expect("k1 is not active any more");
        assert_eq!(rewrapped.kek_id, "k2");
        assert_eq!(new.rewrap(&rewrapped).unwrap(), None);
        // Only k2 is needed now.
        let only_new = Keyring::new("k2", &[("k2".into(), BASE64.encode([2u8; 32]))]).unwrap();
        assert_eq!(only_new.open(&rewrapped, &sealed).unwrap(), b"years of sessions");
        // A wrapped key cannot be relabelled as another KEK's.
        let relabelled = WrappedKey { kek_id: "k1".into(), wrapped: rewrapped.wrapped.clone() };
        assert!(matches!(new.unwrap(&relabelled), Err(EnvelopeError::Tampered(_))));
    }

    #[test]
    fn bad_keys_are_named() {
        let err = |active: &str, keys: &[(&str, &str)]| {
            let keys: Vec<(String, String)> = keys.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect();
            Keyring::new(active, &keys).unwrap_err().to_string()
        };
        assert!(err("a", &[("a", "not base64!")]).contains("key `a` is not base64"));
        assert!(err("a", &[("a", &BASE64.encode([0u8; 16]))]).contains("16 bytes; AES-256 needs 32"));
        assert!(err("b", &[("a", &BASE64.encode([0u8; 32]))]).contains("active key `b` is not among the keys (a)"));
        assert!(err("a b", &[("a b", &BASE64.encode([0u8; 32]))]).contains("key id `a b`"));
        assert!(Keyring::new("g", &[("g".into(), generate_key().unwrap())]).is_ok());
        // Debug output never shows key bytes.
        assert!(!format!("{:?}", keyring("k1")).contains("AQEB"));
    }

    #[test]
    fn truncated_extended_or_altered_data_is_refused() {
        let ring = keyring("k1");
        let plain: Vec<u8> = (0..(2 * CHUNK + 10)).map(|i| (i % 251) as u8).collect();
        let (sealed, wrapped) = ring.seal(&plain).unwrap();
        assert_eq!(ring.open(&wrapped, &sealed).unwrap(), plain);
        // Cut after the second chunk: the remaining chunk is not marked last.
        let cut = HEADER_LEN + 2 * (CHUNK + TAG);
        assert!(ring.open(&wrapped, &sealed[..cut]).is_err());
        assert!(ring.open(&wrapped, &sealed[..sealed.len() - 1]).is_err());
        assert!(ring.open(&wrapped, &sealed[..HEADER_LEN - 1]).is_err());
        let mut longer = sealed.clone();
        longer.extend_from_slice(&[0; 40]);
        assert!(ring.open(&wrapped, &longer).is_err());
        let mut flipped = sealed.clone();
        flipped[HEADER_LEN + CHUNK + 5] ^= 1;
        assert!(ring.open(&wrapped, &flipped).is_err());
        assert!(matches!(ring.open(&wrapped, b"PAR1 not sealed at all, just parquet"), Err(EnvelopeError::Format(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any split of the input into pushes, on either side, gives the same bytes back; sizes around the chunk
        /// boundary included.
        #[test]
        fn streams_round_trip_in_any_pieces(
            len in prop_oneof![0usize..3000, (CHUNK - 2)..(CHUNK + 3), (2 * CHUNK - 1)..(2 * CHUNK + 2)],
            cuts in proptest::collection::vec(1usize..(CHUNK + 7), 0..4),
        ) {
            let ring = keyring("k2");
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let (dek, wrapped) = ring.new_data_key().unwrap();
            let mut sealer = Sealer::new(&dek);
            let mut sealed = Vec::new();
            let mut rest = plain.as_slice();
            for cut in &cuts {
                let (a, b) = rest.split_at((*cut).min(rest.len()));
                sealed.extend(sealer.push(a).unwrap());
                rest = b;
            }
            sealed.extend(sealer.push(rest).unwrap());
            sealed.extend(sealer.finish().unwrap());
            prop_assert_eq!(sealed.len(), HEADER_LEN + len + TAG * (len / CHUNK + 1));
            let mut opener = Opener::new(&ring.unwrap(&wrapped).unwrap());
            let mut back = Vec::new();
            let mut rest = sealed.as_slice();
            for cut in cuts.iter().rev() {
                let (a, b) = rest.split_at((*cut).min(rest.len()));
                back.extend(opener.push(a).unwrap());
                rest = b;
            }
            back.extend(opener.push(rest).unwrap());
            back.extend(opener.finish().unwrap());
            prop_assert_eq!(back, plain);
        }
    }
}
