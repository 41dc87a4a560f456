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
//!   indexes, policy hash) and `i`, after a [`Domain`] tag: a chunk moved to
//!   another position, another snapshot or another source fails
//!   authentication, and so does a change batch offered as a snapshot or
//!   the reverse.
//! * **Cost.** The plaintext can be streamed in ([`seal_streamed`]): the
//!   caller serializes record by record into a [`Sink`], and once more than
//!   one block ([`BLOCK_SIZE`]) has been written a helper thread compresses
//!   blocks while the caller serializes the next ones ([`Pipeline::On`];
//!   with [`Pipeline::Off`] blocks are compressed on the calling thread as
//!   they fill). Helper threads stay alive between snapshots (at most two
//!   idle), and every thread keeps its zstd context: a snapshot pays neither
//!   for a thread start nor for allocating and faulting in zstd's tables and
//!   window again. Compressed bytes go straight into chunk-sized
//!   buffers with room for the tag, and each is encrypted in place (`ring`'s
//!   AES-256-GCM, which uses AES-NI/VAES and carry-less multiplication where
//!   the CPU has them). Encryption waits for the end of compression: the chunk
//!   count is in every chunk's associated data. On receipt, ciphertext is
//!   copied once into one buffer, opened in place chunk by chunk, then
//!   decompressed.
//!
//! This file owns the format and the AEAD (header, associated data, nonces,
//! sealing and opening); `pipeline` owns compression into chunk-sized pieces
//! and `collect` the receiving limits on chunks as they arrive.
//!
//! Owns the byte format only: no policy, no files, no network.

use std::sync::atomic::{AtomicU64, Ordering};

use federation_api as api;
use ring::aead;

use super::keyring::{Key, KeyRing};

mod collect;
mod pipeline;

pub use collect::Collector;
pub use pipeline::{BLOCK_SIZE, Pipeline, Sink};

use pipeline::Packer;

/// Domain separation for the associated data.
const AAD_TAG: &[u8] = b"federation.v1.snapshot\0";
/// Domain separation for change batches.
const CHANGES_AAD_TAG: &[u8] = b"federation.v1.changes\0";
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// AES-GCM nonce length.
const NONCE_LEN: usize = 12;

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

    fn next(&self) -> Result<[u8; NONCE_LEN], EnvelopeError> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        if n == u64::MAX {
            return Err(EnvelopeError::Invalid("nonce counter exhausted".into()));
        }
        let mut nonce = [0u8; NONCE_LEN];
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

/// What a sealed stream is: its associated data starts with the domain's
/// tag, so a change batch never opens as a snapshot nor the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// A full snapshot (`PushSnapshot`).
    Snapshot,
    /// A batch of changes between snapshots (`PushChanges`).
    Changes,
}

impl Domain {
    fn tag(self) -> &'static [u8] {
        match self {
            Domain::Snapshot => AAD_TAG,
            Domain::Changes => CHANGES_AAD_TAG,
        }
    }
}

/// The associated data of chunk `index` under `header` (a snapshot).
pub fn associated_data(header: &api::SnapshotHeader, index: u32) -> Vec<u8> {
    associated_data_in(Domain::Snapshot, header, index)
}

/// The associated data of chunk `index` under `header` in `domain`.
pub fn associated_data_in(domain: Domain, header: &api::SnapshotHeader, index: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(domain.tag());
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

/// The AES-256-GCM key of `key`.
fn aead_key(key: &Key) -> Result<aead::LessSafeKey, EnvelopeError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, key.bytes())
        .map(aead::LessSafeKey::new)
        .map_err(|_| EnvelopeError::Invalid("unusable AES-256 key".into()))
}

/// Compresses (if asked) and seals `plaintext` into chunks; the first chunk
/// carries the header. There is always at least one chunk.
pub fn seal(
    plaintext: &[u8],
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    seal_in(Domain::Snapshot, plaintext, params, key, nonces)
}

/// [`seal`] in `domain`.
pub fn seal_in(
    domain: Domain,
    plaintext: &[u8],
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    let size = plaintext.len() as u64;
    let mut packer = Packer::new(params.compression, params.chunk_size, Some(size))?;
    packer.write(plaintext)?;
    seal_pieces(domain, packer.finish()?, size, params, key, nonces)
}

/// Seals the plaintext `produce` writes into the [`Sink`] (for example a
/// snapshot body, record by record), compressing as it comes (see the
/// module notes). The envelope has [`seal`]'s format; the zstd frame may
/// differ in its bytes (a frame compressed in a stream does not announce its
/// size, and zstd then picks its parameters for an input of unknown size).
pub fn seal_streamed(
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
    pipeline: Pipeline,
    produce: impl FnOnce(&mut Sink) -> Result<(), EnvelopeError>,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    seal_streamed_in_blocks(params, key, nonces, pipeline, BLOCK_SIZE, produce)
}

fn seal_streamed_in_blocks(
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
    pipeline: Pipeline,
    block_size: usize,
    produce: impl FnOnce(&mut Sink) -> Result<(), EnvelopeError>,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    let mut sink = Sink::new(params, pipeline, block_size);
    let produced = produce(&mut sink);
    // Always finish (joins the helper thread); its error is the cause when
    // the producer only saw the thread stop.
    let finished = sink.finish();
    let (pieces, size) = match (produced, finished) {
        (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
        (Ok(()), Ok(v)) => v,
    };
    seal_pieces(Domain::Snapshot, pieces, size, params, key, nonces)
}

/// Seals pieces already compressed as `params.compression` says (or
/// plain), each at most `params.chunk_size` bytes, whose plaintext is
/// `plaintext_bytes` long: encrypts each in place and appends its tag.
fn seal_pieces(
    domain: Domain,
    mut pieces: Vec<Vec<u8>>,
    plaintext_bytes: u64,
    params: &SealParams,
    key: &Key,
    nonces: &NonceSource,
) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
    if pieces.is_empty() {
        pieces.push(Vec::with_capacity(TAG_LEN));
    }
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
    let cipher = aead_key(key)?;
    let mut out = Vec::with_capacity(pieces.len());
    for (i, mut piece) in pieces.into_iter().enumerate() {
        let index = i as u32;
        let nonce = nonces.next()?;
        let aad = associated_data_in(domain, &header, index);
        let tag = cipher
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad.as_slice()),
                &mut piece,
            )
            .map_err(|_| EnvelopeError::Invalid("encryption failed".into()))?;
        piece.extend_from_slice(tag.as_ref());
        out.push(api::SnapshotChunk {
            header: (i == 0).then(|| header.clone()),
            index,
            ciphertext: piece,
            nonce: nonce.to_vec(),
        });
    }
    Ok(out)
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
    open_in(Domain::Snapshot, chunks, ring, limits)
}

/// [`open`] in `domain`: a stream sealed in another domain fails
/// authentication.
pub fn open_in(
    domain: Domain,
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
    let cipher = aead_key(key)?;
    // One buffer for the whole compressed body; each chunk is copied in
    // once and opened in place there.
    let mut body = Vec::with_capacity(
        chunks
            .iter()
            .map(|c| c.ciphertext.len().saturating_sub(TAG_LEN))
            .sum(),
    );
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
        let nonce = <[u8; NONCE_LEN]>::try_from(chunk.nonce.as_slice()).map_err(|_| {
            EnvelopeError::Invalid(format!("chunk {position}: nonce must be 12 bytes"))
        })?;
        // Shorter than a tag: cannot authenticate.
        let Some(split) = chunk.ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(EnvelopeError::Auth(chunk.index));
        };
        let (ciphertext, tag) = chunk.ciphertext.split_at(split);
        let tag = aead::Tag::try_from(tag).map_err(|_| EnvelopeError::Auth(chunk.index))?;
        let aad = associated_data_in(domain, &header, chunk.index);
        let start = body.len();
        body.extend_from_slice(ciphertext);
        cipher
            .open_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad.as_slice()),
                tag,
                &mut body[start..],
                0..,
            )
            .map_err(|_| EnvelopeError::Auth(chunk.index))?;
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

    /// Seals `data` streamed in records of `record` bytes.
    fn seal_records(
        data: &[u8],
        record: usize,
        block: usize,
        params: &SealParams,
        pipeline: Pipeline,
        key: &Key,
    ) -> Result<Vec<api::SnapshotChunk>, EnvelopeError> {
        seal_streamed_in_blocks(params, key, &NonceSource::new(), pipeline, block, |sink| {
            for r in data.chunks(record.max(1)) {
                sink.buf().extend_from_slice(r);
                sink.flush_if_full()?;
            }
            Ok(())
        })
    }

    /// The previous implementation's sealing (RustCrypto `aes-gcm`, bulk
    /// zstd): what peers running it send.
    fn seal_with_aes_gcm(data: &[u8], p: &SealParams, k: &Key) -> Vec<api::SnapshotChunk> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let body = match p.compression {
            Some(level) => zstd::bulk::compress(data, level).expect("zstd"),
            None => data.to_vec(),
        };
        let pieces: Vec<&[u8]> = if body.is_empty() {
            vec![&[][..]]
        } else {
            body.chunks(p.chunk_size).collect()
        };
        let header = api::SnapshotHeader {
            source_region: p.source.clone(),
            epoch: p.epoch,
            sequence: p.sequence,
            key_id: k.id().to_string(),
            chunk_count: pieces.len() as u32,
            compression: if p.compression.is_some() {
                "zstd"
            } else {
                "none"
            }
            .into(),
            rule_indexes: p.rule_indexes.clone(),
            policy_hash: p.policy_hash.clone(),
            plaintext_bytes: data.len() as u64,
        };
        let cipher = aes_gcm::Aes256Gcm::new(k.bytes().into());
        let nonces = NonceSource::new();
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                let nonce = nonces.next().expect("nonce");
                let aad = associated_data(&header, i as u32);
                let ciphertext = cipher
                    .encrypt(
                        aes_gcm::Nonce::from_slice(&nonce),
                        Payload {
                            msg: piece,
                            aad: &aad,
                        },
                    )
                    .expect("encrypts");
                api::SnapshotChunk {
                    header: (i == 0).then(|| header.clone()),
                    index: i as u32,
                    ciphertext,
                    nonce: nonce.to_vec(),
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn streamed_round_trips(data in proptest::collection::vec(any::<u8>(), 0..20_000),
                                chunk in 1usize..5000, record in 1usize..3000,
                                block in 1usize..8000, zstd in any::<bool>(),
                                pipeline in any::<bool>()) {
            let k = key("k1", 1);
            let ring = KeyRing::from_keys(vec![k.clone()], None);
            let p = params(chunk, zstd.then_some(3));
            let pipeline = if pipeline { Pipeline::On } else { Pipeline::Off };
            let chunks = seal_records(&data, record, block, &p, pipeline, &k).expect("seals");
            prop_assert!(!chunks.is_empty());
            prop_assert!(chunks.iter().all(|c| c.ciphertext.len() <= chunk + TAG_LEN));
            let limits = Limits { max_chunks: 1 << 20, ..Limits::default() };
            let (header, back) = open(&chunks, &ring, &limits).expect("opens");
            prop_assert_eq!(header.plaintext_bytes, data.len() as u64);
            prop_assert_eq!(back, data);
        }

        #[test]
        fn compatible_with_the_aes_gcm_crate(data in proptest::collection::vec(any::<u8>(), 0..5_000),
                                             chunk in 1usize..2000, zstd in any::<bool>()) {
            use aes_gcm::aead::{Aead, KeyInit, Payload};
            let k = key("k1", 9);
            let ring = KeyRing::from_keys(vec![k.clone()], None);
            let p = params(chunk, zstd.then_some(3));
            // What the previous implementation sealed opens here.
            let old = seal_with_aes_gcm(&data, &p, &k);
            let limits = Limits { max_chunks: 1 << 20, ..Limits::default() };
            let (_, back) = open(&old, &ring, &limits).expect("opens");
            prop_assert_eq!(&back, &data);
            // What we seal opens with the aes-gcm crate, chunk by chunk.
            let new = seal(&data, &p, &k, &NonceSource::new()).expect("seals");
            let header = header_of(&new).expect("header").clone();
            let cipher = aes_gcm::Aes256Gcm::new(k.bytes().into());
            let mut body = Vec::new();
            for c in &new {
                let aad = associated_data(&header, c.index);
                body.extend(cipher.decrypt(aes_gcm::Nonce::from_slice(&c.nonce),
                    Payload { msg: &c.ciphertext, aad: &aad }).expect("aes-gcm opens"));
            }
            let plain = if zstd { zstd::stream::decode_all(body.as_slice()).expect("unzstd") } else { body };
            prop_assert_eq!(plain, data);
        }
    }

    #[test]
    fn large_streams_are_compressed_on_a_helper_thread_and_round_trip() {
        let k = key("k1", 3);
        let ring = KeyRing::from_keys(vec![k.clone()], None);
        // Compressible but not trivially: 1.5 MB of numbered records.
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("record {i:08} {}\n", i.wrapping_mul(2_654_435_761)).into_bytes())
            .collect();
        for pipeline in [Pipeline::On, Pipeline::Off] {
            let p = params(64 << 10, Some(3));
            let chunks = seal_records(&data, 300, BLOCK_SIZE, &p, pipeline, &k).expect("seals");
            assert!(chunks.len() > 2, "{} chunks", chunks.len());
            let (header, back) = open(&chunks, &ring, &Limits::default()).expect("opens");
            assert_eq!(header.plaintext_bytes, data.len() as u64);
            assert!(back == data, "round trip ({pipeline:?})");
        }
    }

    #[test]
    fn a_producer_error_is_returned_and_the_helper_stops() {
        let k = key("k1", 3);
        let p = params(1024, Some(3));
        let err = seal_streamed_in_blocks(&p, &k, &NonceSource::new(), Pipeline::On, 16, |sink| {
            for _ in 0..100 {
                sink.buf().extend_from_slice(&[7u8; 10]);
                sink.flush_if_full()?;
            }
            Err(EnvelopeError::Invalid("producer gave up".into()))
        })
        .expect_err("fails");
        assert_eq!(err, EnvelopeError::Invalid("producer gave up".into()));
        // The helper went back to the idle list and serves the next one.
        let ring = KeyRing::from_keys(vec![k.clone()], None);
        let data: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for _ in 0..3 {
            let chunks = seal_records(&data, 100, 1000, &p, Pipeline::On, &k).expect("seals");
            let (_, back) = open(&chunks, &ring, &Limits::default()).expect("opens");
            assert!(back == data);
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
