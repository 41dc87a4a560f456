//! The compression pipeline of the snapshot envelope: plaintext → zstd (or
//! plain) → chunk-sized pieces with room for the tag, on the calling thread
//! or on kept helper threads ([`Pipeline`], [`Sink`]). Owns compression only:
//! no encryption, header or nonces (those are the envelope's, `super`).

use std::io::Write as _;
use std::sync::mpsc;

use super::{EnvelopeError, SealParams, TAG_LEN};

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

/// Where [`seal_streamed`](super::seal_streamed) compresses.
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
/// An `io::Write` cutting what it is given into pieces of `chunk_size`
/// bytes, each allocated once with room for the tag.
#[derive(Debug)]
pub(super) struct Pieces {
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
pub(super) enum Packer {
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
    pub(super) fn new(
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

    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), EnvelopeError> {
        match self {
            Self::Plain(p) => p.write_all(data),
            Self::Zstd(z) => z.write_all(data),
        }
        .map_err(zstd_error)
    }

    pub(super) fn finish(self) -> Result<Vec<Vec<u8>>, EnvelopeError> {
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

/// Where [`seal_streamed`](super::seal_streamed)'s caller writes the plaintext: append to
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
    pub(super) fn new(params: &SealParams, pipeline: Pipeline, block_size: usize) -> Self {
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
    pub(super) fn finish(mut self) -> Result<(Vec<Vec<u8>>, u64), EnvelopeError> {
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
