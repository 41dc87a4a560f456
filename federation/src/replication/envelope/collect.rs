//! Collection of a pushed stream: chunks accumulated as they arrive, within
//! the receiving [`Limits`] before anything is buffered past them. Owns the
//! limits on arrival only: no decryption, decompression or decoding (`super::open`).

use federation_api as api;

use super::{EnvelopeError, Limits, TAG_LEN};

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
