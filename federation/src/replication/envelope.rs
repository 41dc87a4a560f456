//! The snapshot envelope: plaintext bytes → zstd (optional) → chunks, each
//! sealed with AES-256-GCM, and back.
//!
//! * **Nonces** are never reused under a key: each is a random 32-bit prefix
//!   drawn once per process ([`NonceSource::new`]) followed by a 64-bit
//!   counter incremented for every chunk the process seals. Two processes
//!   collide only if they draw the same prefix *and* reach the same counter;
//!   the epoch and sequence in the associated data additionally make every
//!   sealed message distinct. The counter refuses to wrap.
//! * **Associated data** of chunk `i` binds the whole header (source region,
//!   epoch, sequence, key id, chunk count, compression, plaintext size, rule
//!   indexes, policy hash) and `i`: a chunk moved to another position,
//!   another snapshot or another source fails authentication.
//!
//! Owns the byte format only: no policy, no files, no network.

use std::sync::atomic::{AtomicU64, Ordering};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use federation_api as api;

use super::keyring::{Key, KeyRing};

/// Domain separation for the associated data.
const AAD_TAG: &[u8] = b"federation.v1.snapshot\0";
/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// Where nonces come from: a random per-process prefix and a counter.
#[derive(Debug)]
pub struct NonceSource {
    prefix: [u8; 4],
    counter: AtomicU64,
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceSource {
    /// A fresh source with a random prefix.
    pub fn new() -> Self {
        Self {
            prefix: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> Result<[u8; 12], EnvelopeError> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        if n == u64::MAX {
            return Err(EnvelopeError::Invalid("nonce counter exhausted".into()));
        }
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        Ok(nonce)
    }
}

/// Receiving limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest ciphertext of one chunk, bytes.
    pub max_chunk_bytes: usize,
    /// Most chunks in one snapshot.
    pub max_chunks: u32,
    /// Most ciphertext bytes in one snapshot.
    pub max_total_bytes: usize,
    /// Largest plaintext (after decompression), bytes.
    pub max_plaintext_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_chunk_bytes: 1 << 20,
            max_chunks: 4096,
            max_total_bytes: 256 << 20,
            max_plaintext_bytes: 1 << 30,
        }
    }
}

/// What the sealer needs besides the bytes.
#[derive(Debug, Clone)]
pub struct SealParams {
    /// The region whose state this is.
    pub source: String,
    /// Its epoch.
    pub epoch: u64,
    /// Sequence within the epoch.
    pub sequence: u64,
    /// The residency scope.
    pub rule_indexes: Vec<u32>,
    /// The source's policy hash.
    pub policy_hash: String,
    /// zstd level, or `None` for no compression.
    pub compression: Option<i32>,
    /// Plaintext (compressed) bytes per chunk.
    pub chunk_size: usize,
}

/// Why an envelope could not be sealed or opened. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A receiving limit was exceeded.
    #[error("{limit} exceeded: {why}")]
    Limit {
        /// Which limit (`max_chunk_bytes`, `max_chunks`, `max_total_bytes`, `max_plaintext_bytes`).
        limit: &'static str,
        /// Details.
        why: String,
    },
    /// The first chunk has no header, or a later one has one.
    #[error("malformed stream: {0}")]
    Malformed(String),
    /// Fewer chunks than the header announced.
    #[error("truncated: {got} of {expected} chunks received")]
    Truncated {
        /// Chunks received.
        got: usize,
        /// Chunks announced.
        expected: u32,
    },
    /// A chunk arrived out of order.
    #[error("chunk out of order: position {position} carries index {index}")]
    OutOfOrder {
        /// Where it arrived.
        position: usize,
        /// The index it carries.
        index: u32,
    },
    /// The key id is not in our ring.
    #[error("unknown key id `{0}`")]
    UnknownKey(String),
    /// AES-GCM authentication failed.
    #[error("authentication failed at chunk {0} (wrong key, or the data or header was altered)")]
    Auth(u32),
    /// Decompression failed or the size does not match the header.
    #[error("decompression: {0}")]
    Decompress(String),
    /// Anything else (bad nonce length, unknown compression…).
    #[error("invalid snapshot: {0}")]
    Invalid(String),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The associated data of chunk `index` under `header`.
pub fn associated_data(header: &api::SnapshotHeader, index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(AAD_TAG);
    put_str(&mut out, &header.source_region);
    out.extend_from_slice(&header.epoch.to_be_bytes());
    out.extend_from_slice(&header.sequence.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&header.chunk_count.to_be_bytes());
    put_str(&mut out, &header.key_id);
    put_str(&mut out, &header.compression);
    out.extend_from_slice(&header.plaintext_bytes.to_be_bytes());
    out.extend_from_slice(&(header.rule_indexes.len() as u64).to_be_bytes());
    for r in &header.rule_indexes {
        out.extend_from_slice(&r.to_be_bytes());
    }
    put_str(&mut out, &header.policy_hash);
    out
}

/// Compresses (if asked) and seals `plaintext` into chunks; the first chunk
/// carries the header. There is always at least one chunk.
pub fn seal(
    plaintext: &[u8],
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    let body = match params.compression {
        Some(level) => zstd::bulk::compress(plaintext, level)
            .map_err(|e| EnvelopeError::Invalid(format!("zstd: {e}")))?,
        None => plaintext.to_vec(),
    };
    seal_prepared(&body, plaintext.len() as u64, params, key, nonces)
}

/// Seals bytes already compressed as `params.compression` says (or plain),
/// whose plaintext is `plaintext_bytes` long.
pub fn seal_prepared(
    body: &[u8],
    plaintext_bytes: u64,
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    let chunk_size = params.chunk_size.max(1);
    let pieces: Vec<&[u8]> = if body.is_empty() {
        vec![&[][..]]
    } else {
        body.chunks(chunk_size).collect()
    };
    let chunk_count = u32::try_from(pieces.len())
        .map_err(|_| EnvelopeError::Invalid("too many chunks".into()))?;
    let header = api::SnapshotHeader {
        source_region: params.source.clone(),
        epoch: params.epoch,
        sequence: params.sequence,
        key_id: key.id().to_string(),
        chunk_count,
        compression: if params.compression.is_some() {
            "zstd"
        } else {
            "none"
        }
        .to_string(),
        rule_indexes: params.rule_indexes.clone(),
        policy_hash: params.policy_hash.clone(),
        plaintext_bytes,
    };
    let cipher = Aes256Gcm::new(key.bytes().into());
    let mut out = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.into_iter().enumerate() {
        let index = i as u32;
        let nonce = nonces.next()?;
        let aad = associated_data(&header, index);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: piece,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::Invalid("encryption failed".into()))?;
        out.push(api::SnapshotChunk {
            header: (i == 0).then(|| header.clone()),
            index,
            ciphertext,
            nonce: nonce.to_vec(),
        });
    }
    Ok(out)
}

/// Accumulates chunks as they arrive, enforcing the limits before anything
/// is buffered past them.
#[derive(Debug)]
pub struct Collector {
    limits: Limits,
    chunks: Vec<api::SnapshotChunk>,
    total: usize,
}

impl Collector {
    /// An empty collector.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            chunks: Vec::new(),
            total: 0,
        }
    }

    /// Adds one chunk.
    pub fn push(&mut self, chunk: api::SnapshotChunk) -> Result<(), EnvelopeError> {
        if chunk.ciphertext.len() > self.limits.max_chunk_bytes + TAG_LEN {
            return Err(EnvelopeError::Limit {
                limit: "max_chunk_bytes",
                why: format!(
                    "chunk {} has {} bytes, limit {}",
                    chunk.index,
                    chunk.ciphertext.len(),
                    self.limits.max_chunk_bytes + TAG_LEN
                ),
            });
        }
        let announced = self
            .chunks
            .first()
            .or(Some(&chunk))
            .and_then(|c| c.header.as_ref())
            .map(|h| h.chunk_count);
        if self.chunks.len() as u64 >= u64::from(self.limits.max_chunks)
            || announced.is_some_and(|n| n > self.limits.max_chunks)
        {
            return Err(EnvelopeError::Limit {
                limit: "max_chunks",
                why: format!("more than {} chunks", self.limits.max_chunks),
            });
        }
        self.total = self.total.saturating_add(chunk.ciphertext.len());
        if self.total > self.limits.max_total_bytes {
            return Err(EnvelopeError::Limit {
                limit: "max_total_bytes",
                why: format!("more than {} ciphertext bytes", self.limits.max_total_bytes),
            });
        }
        self.chunks.push(chunk);
        Ok(())
    }

    /// The chunks received.
    pub fn into_chunks(self) -> Vec<api::SnapshotChunk> {
        self.chunks
    }
}

/// The header of a stream (first chunk), unauthenticated until [`open`].
pub fn header_of(chunks: &[api::SnapshotChunk]) -> Result<&api::SnapshotHeader, EnvelopeError> {
    chunks
        .first()
        .and_then(|c| c.header.as_ref())
        .ok_or_else(|| EnvelopeError::Malformed("the first chunk carries no header".into()))
}

/// Verifies and decrypts every chunk, then decompresses: the plaintext and
/// the (now authenticated) header.
pub fn open(
    chunks: &[api::SnapshotChunk],
    ring: &KeyRing,
    limits: &Limits,
) -> Result<(api::SnapshotHeader, Vec<u8>), EnvelopeError> {
    let header = header_of(chunks)?.clone();
    if header.chunk_count > limits.max_chunks {
        return Err(EnvelopeError::Limit {
            limit: "max_chunks",
            why: format!(
                "header announces {} chunks, limit {}",
                header.chunk_count, limits.max_chunks
            ),
        });
    }
    if header.plaintext_bytes > limits.max_plaintext_bytes {
        return Err(EnvelopeError::Limit {
            limit: "max_plaintext_bytes",
            why: format!(
                "header announces {} bytes, limit {}",
                header.plaintext_bytes, limits.max_plaintext_bytes
            ),
        });
    }
    if (chunks.len() as u64) < u64::from(header.chunk_count) {
        return Err(EnvelopeError::Truncated {
            got: chunks.len(),
            expected: header.chunk_count,
        });
    }
    if chunks.len() as u64 > u64::from(header.chunk_count) {
        return Err(EnvelopeError::Malformed(format!(
            "{} chunks, header announces {}",
            chunks.len(),
            header.chunk_count
        )));
    }
    let key = ring
        .get(&header.key_id)
        .ok_or_else(|| EnvelopeError::UnknownKey(header.key_id.clone()))?;
    let cipher = Aes256Gcm::new(key.bytes().into());
    let mut body = Vec::new();
    for (position, chunk) in chunks.iter().enumerate() {
        if chunk.index as usize != position {
            return Err(EnvelopeError::OutOfOrder {
                position,
                index: chunk.index,
            });
        }
        if position > 0 && chunk.header.is_some() {
            return Err(EnvelopeError::Malformed(format!(
                "chunk {position} carries a header"
            )));
        }
        if chunk.nonce.len() != 12 {
            return Err(EnvelopeError::Invalid(format!(
                "chunk {position}: nonce must be 12 bytes"
            )));
        }
        let aad = associated_data(&header, chunk.index);
        let piece = cipher
            .decrypt(
                Nonce::from_slice(&chunk.nonce),
                Payload {
                    msg: &chunk.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::Auth(chunk.index))?;
        body.extend_from_slice(&piece);
    }
    let plaintext = match header.compression.as_str() {
        // The header is authenticated by now (every chunk's tag covers it),
        // and its size is within the limit: decompress in one call into a
        // buffer of exactly that size (more output is an error).
        "zstd" => zstd::bulk::decompress(&body, header.plaintext_bytes as usize)
            .map_err(|e| EnvelopeError::Decompress(e.to_string()))?,
        "none" => body,
        other => {
            return Err(EnvelopeError::Invalid(format!(
                "unknown compression `{other}`"
            )));
        }
    };
    if plaintext.len() as u64 != header.plaintext_bytes {
        return Err(EnvelopeError::Decompress(format!(
            "{} bytes, header says {}",
            plaintext.len(),
            header.plaintext_bytes
        )));
    }
    Ok((header, plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(id: &str, b: u8) -> Key {
        Key::new(id, [b; 32])
    }

    fn params(chunk_size: usize, compression: Option<i32>) -> SealParams {
        SealParams {
            source: "europe".into(),
            epoch: 7,
            sequence: 3,
            rule_indexes: vec![1],
            policy_hash: "abc".into(),
            compression,
            chunk_size,
        }
    }

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..20_000),
                       chunk in 1usize..5000, zstd in any::<bool>()) {
            let k = key("k1", 1);
            let ring = KeyRing::from_keys(vec![k.clone()], None);
            let chunks = seal(&data, &params(chunk, zstd.then_some(3)), &k, &NonceSource::new())
                .expect("seals");
            prop_assert!(!chunks.is_empty());
            let limits = Limits { max_chunks: 1 << 20, ..Limits::default() };
            let (header, back) = open(&chunks, &ring, &limits).expect("opens");
            prop_assert_eq!(back, data);
            prop_assert_eq!(header.chunk_count as usize, chunks.len());
        }
    }

    #[test]
    fn nonces_are_unique_and_chunks_bound_to_position() {
        let k = key("k1", 1);
        let ring = KeyRing::from_keys(vec![k.clone()], None);
        let nonces = NonceSource::new();
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let a = seal(&data, &params(1000, None), &k, &nonces).expect("seals");
        let b = seal(&data, &params(1000, None), &k, &nonces).expect("seals");
        let mut seen = std::collections::HashSet::new();
        for c in a.iter().chain(&b) {
            assert!(seen.insert(c.nonce.clone()), "nonce reused");
        }
        // Swap two chunks' payloads but keep indexes in order: auth fails.
        let mut swapped = a.clone();
        let (x, y) = (swapped[1].clone(), swapped[2].clone());
        swapped[1].ciphertext = y.ciphertext;
        swapped[1].nonce = y.nonce;
        swapped[2].ciphertext = x.ciphertext;
        swapped[2].nonce = x.nonce;
        assert_eq!(
            open(&swapped, &ring, &Limits::default()),
            Err(EnvelopeError::Auth(1))
        );
        // Header changed (a later sequence claimed): auth fails.
        let mut replayed = a.clone();
        if let Some(h) = replayed[0].header.as_mut() {
            h.sequence = 99;
        }
        assert_eq!(
            open(&replayed, &ring, &Limits::default()),
            Err(EnvelopeError::Auth(0))
        );
    }
}
