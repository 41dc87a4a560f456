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
//! Owns the byte format only: no policy, no files, no network.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use federation_api as api;
use ring::aead;

use super::keyring::{Key, KeyRing};

/// Domain separation for the associated data.
const AAD_TAG: &[u8] = b"federation.v1.snapshot\0";
/// Domain separation for change batches.
const CHANGES_AAD_TAG: &[u8] = b"federation.v1.changes\0";
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// AES-GCM nonce length.
const NONCE_LEN: usize = 12;
/// Plaintext bytes a [`Sink`] collects before handing them to the compressor.
pub const BLOCK_SIZE: usize = 128 << 10;
/// zstd window (log2 bytes) of a stream of unknown size. zstd's default at
/// level 3 is 2 MiB; a stream copies its input into a buffer of window +
/// block size and, once the input is larger, wraps around it and matches
/// across the seam on a slower path ("extDict"), while one-shot compression
/// of a whole buffer never wraps. 8 MiB keeps snapshots up to that size on
/// the one-shot path's speed (measured: 0.84-0.96x of one-shot zstd with the
/// default window at 2.5 MB, 0.99-1.02x with this one). Decoders accept
/// windows up to 128 MiB by default; ours decompresses in one call.
const STREAM_WINDOW_LOG: u32 = 23;
/// Blocks in flight between the serializer and the compressor thread.
const BLOCKS_IN_FLIGHT: usize = 2;

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

/// Where [`seal_streamed`] compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    /// On the calling thread, block by block as the blocks fill.
    Off,
    /// On a helper thread, overlapped with serialization, once the plaintext
    /// exceeds one block. The same work either way: the wall time drops by
    /// up to the serialization time, the CPU time rises by the hand-over
    /// (one thread start, a channel message per block).
    On,
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

/// An `io::Write` cutting what it is given into pieces of `chunk_size`
/// bytes, each allocated once with room for the tag.
#[derive(Debug)]
struct Pieces {
    pieces: Vec<Vec<u8>>,
    chunk_size: usize,
    /// Capacity of the first piece (a small snapshot needs less than a chunk).
    first: usize,
}

impl Pieces {
    fn new(chunk_size: usize, expected: Option<u64>) -> Self {
        let chunk_size = chunk_size.max(1);
        let first = expected
            .and_then(|n| usize::try_from(n).ok())
            .map_or(chunk_size, |n| n.clamp(1, chunk_size));
        Self {
            pieces: Vec::new(),
            chunk_size,
            first,
        }
    }
}

impl std::io::Write for Pieces {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let piece = match self.pieces.last_mut() {
                Some(p) if p.len() < self.chunk_size => p,
                _ => {
                    let capacity = if self.pieces.is_empty() {
                        self.first
                    } else {
                        self.chunk_size
                    };
                    self.pieces.push(Vec::with_capacity(capacity + TAG_LEN));
                    let last = self.pieces.len() - 1;
                    &mut self.pieces[last]
                }
            };
            let take = (self.chunk_size - piece.len()).min(data.len());
            piece.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A zstd compressor writing into chunk-sized pieces.
type ZstdWriter = zstd::stream::zio::Writer<Pieces, zstd::stream::raw::Encoder<'static>>;

thread_local! {
    /// This thread's zstd context, kept between snapshots: a fresh one would
    /// allocate its tables and window buffer again, and fault them in again.
    static ZSTD_CONTEXT: std::cell::RefCell<Option<zstd::stream::raw::Encoder<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses (or not) into chunk-sized pieces.
enum Packer {
    Plain(Pieces),
    Zstd(Box<ZstdWriter>),
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain(_) => "Packer::Plain",
            Self::Zstd(_) => "Packer::Zstd",
        })
    }
}

fn zstd_error(e: std::io::Error) -> EnvelopeError {
    EnvelopeError::Invalid(format!("zstd: {e}"))
}

impl Packer {
    /// `size`: the plaintext size when known up front (recorded in the
    /// zstd frame, and lets zstd size its tables as one-shot compression does).
    fn new(
        compression: Option<i32>,
        chunk_size: usize,
        size: Option<u64>,
    ) -> Result<Self, EnvelopeError> {
        use zstd::stream::raw::{CParameter, Encoder, Operation as _};
        let Some(level) = compression else {
            return Ok(Self::Plain(Pieces::new(chunk_size, size)));
        };
        let mut encoder = match ZSTD_CONTEXT.with(|c| c.borrow_mut().take()) {
            Some(mut e) => {
                e.reinit().map_err(zstd_error)?;
                e.set_parameter(CParameter::CompressionLevel(level))
                    .map_err(zstd_error)?;
                e
            }
            None => Encoder::new(level).map_err(zstd_error)?,
        };
        // A stream of unknown size gets a window of STREAM_WINDOW_LOG, so
        // that it does not wrap around zstd's input buffer (see there); a
        // known size lets zstd pick the window, as one-shot compression does.
        let window = if size.is_some() { 0 } else { STREAM_WINDOW_LOG };
        encoder
            .set_parameter(CParameter::WindowLog(window))
            .map_err(zstd_error)?;
        encoder.set_pledged_src_size(size).map_err(zstd_error)?;
        Ok(Self::Zstd(Box::new(zstd::stream::zio::Writer::new(
            Pieces::new(chunk_size, size),
            encoder,
        ))))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), EnvelopeError> {
        match self {
            Self::Plain(p) => p.write_all(data),
            Self::Zstd(z) => z.write_all(data),
        }
        .map_err(zstd_error)
    }

    fn finish(self) -> Result<Vec<Vec<u8>>, EnvelopeError> {
        match self {
            Self::Plain(p) => Ok(p.pieces),
            Self::Zstd(mut z) => {
                z.finish().map_err(zstd_error)?;
                let (pieces, encoder) = z.into_inner();
                // Only a context that finished its frame is kept.
                ZSTD_CONTEXT.with(|c| *c.borrow_mut() = Some(encoder));
                Ok(pieces.pieces)
            }
        }
    }
}

/// What a helper thread compresses: the blocks of one snapshot.
struct Job {
    compression: Option<i32>,
    chunk_size: usize,
    blocks: mpsc::Receiver<Vec<u8>>,
    /// Emptied blocks go back to the serializer.
    recycle: mpsc::Sender<Vec<u8>>,
    done: mpsc::SyncSender<Result<Vec<Vec<u8>>, EnvelopeError>>,
}

/// Idle helper threads, kept between snapshots (each with its zstd context)
/// so that a snapshot pays neither for a thread start nor for a fresh
/// context. At most [`MAX_IDLE_HELPERS`] are kept; more exit when released.
static IDLE_HELPERS: std::sync::Mutex<Vec<mpsc::Sender<Job>>> = std::sync::Mutex::new(Vec::new());
const MAX_IDLE_HELPERS: usize = 2;

fn idle_helpers() -> std::sync::MutexGuard<'static, Vec<mpsc::Sender<Job>>> {
    IDLE_HELPERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An idle helper thread, or a new one.
fn helper() -> std::io::Result<mpsc::Sender<Job>> {
    if let Some(h) = idle_helpers().pop() {
        return Ok(h);
    }
    let (jobs, incoming) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("snapshot-zstd".into())
        .spawn(move || {
            // Ends when every sender is gone (not kept idle, or process exit).
            for job in incoming {
                let result = compress_blocks(&job);
                let _ = job.done.send(result);
            }
        })?;
    Ok(jobs)
}

fn release(helper: mpsc::Sender<Job>) {
    let mut idle = idle_helpers();
    if idle.len() < MAX_IDLE_HELPERS {
        idle.push(helper);
    }
}

fn compress_blocks(job: &Job) -> Result<Vec<Vec<u8>>, EnvelopeError> {
    let mut packer = Packer::new(job.compression, job.chunk_size, None)?;
    for mut block in &job.blocks {
        packer.write(&block)?;
        block.clear();
        let _ = job.recycle.send(block);
    }
    packer.finish()
}

/// Where [`seal_streamed`]'s caller writes the plaintext: append to
/// [`Sink::buf`], and call [`Sink::flush_if_full`] at record boundaries.
#[derive(Debug)]
pub struct Sink {
    block: Vec<u8>,
    block_size: usize,
    total: u64,
    compression: Option<i32>,
    chunk_size: usize,
    pipeline: Pipeline,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    /// Still in the first block: a snapshot that fits in one is compressed
    /// in one go at the end, its size known.
    First,
    /// Compressing on this thread, block by block.
    Here(Packer),
    /// Compressing on a helper thread.
    Piped {
        blocks: mpsc::SyncSender<Vec<u8>>,
        spare: mpsc::Receiver<Vec<u8>>,
        helper: Helper,
    },
    /// The helper stopped early (its error is reported by `finish`).
    Stopped(Helper),
    /// No compressor could be made.
    Failed(EnvelopeError),
}

/// A helper thread at work on our job.
#[derive(Debug)]
struct Helper {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Result<Vec<Vec<u8>>, EnvelopeError>>,
}

impl Helper {
    /// Waits for the result; the helper goes back to the idle list.
    fn join(self) -> Result<Vec<Vec<u8>>, EnvelopeError> {
        let result = self
            .done
            .recv()
            .map_err(|_| EnvelopeError::Invalid("the compression thread stopped".into()))?;
        release(self.jobs);
        result
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Sink {
    fn new(params: &SealParams, pipeline: Pipeline, block_size: usize) -> Self {
        let block_size = block_size.max(1);
        Self {
            block: Vec::with_capacity(block_size + block_size / 8),
            block_size,
            total: 0,
            compression: params.compression,
            chunk_size: params.chunk_size.max(1),
            pipeline,
            stage: Stage::First,
        }
    }

    /// The block being filled.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.block
    }

    /// Hands the block to the compressor once it holds [`BLOCK_SIZE`] bytes.
    pub fn flush_if_full(&mut self) -> Result<(), EnvelopeError> {
        if self.block.len() < self.block_size {
            return Ok(());
        }
        self.total += self.block.len() as u64;
        if matches!(self.stage, Stage::First) {
            self.stage = self.start();
        }
        match &mut self.stage {
            Stage::First | Stage::Stopped(_) => Err(stopped()),
            Stage::Failed(e) => Err(e.clone()),
            Stage::Here(packer) => {
                packer.write(&self.block)?;
                self.block.clear();
                Ok(())
            }
            Stage::Piped { blocks, spare, .. } => {
                let next = spare
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(self.block.capacity()));
                let full = std::mem::replace(&mut self.block, next);
                if blocks.send(full).is_ok() {
                    return Ok(());
                }
                if let Stage::Piped { helper, .. } =
                    std::mem::replace(&mut self.stage, Stage::First)
                {
                    self.stage = Stage::Stopped(helper);
                }
                Err(stopped())
            }
        }
    }

    /// Leaves the first block: hands the rest to a helper thread (or,
    /// without pipelining or when no thread can be had, compresses here).
    fn start(&self) -> Stage {
        let here = || match Packer::new(self.compression, self.chunk_size, None) {
            Ok(p) => Stage::Here(p),
            Err(e) => Stage::Failed(e),
        };
        if self.pipeline == Pipeline::Off || self.compression.is_none() {
            return here();
        }
        let jobs = match helper() {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::debug!(error = %e, "no compression thread; compressing inline");
                return here();
            }
        };
        let (blocks, incoming) = mpsc::sync_channel(BLOCKS_IN_FLIGHT);
        let (recycle, spare) = mpsc::channel();
        let (done_tx, done) = mpsc::sync_channel(1);
        let job = Job {
            compression: self.compression,
            chunk_size: self.chunk_size,
            blocks: incoming,
            recycle,
            done: done_tx,
        };
        if jobs.send(job).is_err() {
            // That helper had exited; do without.
            return here();
        }
        Stage::Piped {
            blocks,
            spare,
            helper: Helper { jobs, done },
        }
    }

    /// The pieces and the plaintext size.
    fn finish(mut self) -> Result<(Vec<Vec<u8>>, u64), EnvelopeError> {
        self.total += self.block.len() as u64;
        let pieces = match self.stage {
            Stage::First => {
                let mut packer = Packer::new(self.compression, self.chunk_size, Some(self.total))?;
                packer.write(&self.block)?;
                packer.finish()?
            }
            Stage::Here(mut packer) => {
                packer.write(&self.block)?;
                packer.finish()?
            }
            Stage::Piped { blocks, helper, .. } => {
                // A send fails only when the helper stopped; join reports why.
                if !self.block.is_empty() {
                    let _ = blocks.send(std::mem::take(&mut self.block));
                }
                drop(blocks);
                helper.join()?
            }
            Stage::Stopped(helper) => helper.join()?,
            Stage::Failed(e) => return Err(e),
        };
        Ok((pieces, self.total))
    }
}

fn stopped() -> EnvelopeError {
    EnvelopeError::Invalid("the compression thread stopped".into())
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
