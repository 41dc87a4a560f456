//! Why a received snapshot or change batch was refused: the receiver's
//! verdict, shared by decoding (`restore`) and storing (`receiver`). A leaf.

use super::envelope::EnvelopeError;

/// Why a snapshot was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The envelope did not verify (or a limit was hit).
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// Not newer than the last accepted snapshot from the source.
    #[error(
        "replayed or older snapshot: epoch {epoch} sequence {sequence}, last accepted epoch {last_epoch} sequence {last_sequence}"
    )]
    Replay {
        /// Offered epoch.
        epoch: u64,
        /// Offered sequence.
        sequence: u64,
        /// Last accepted epoch.
        last_epoch: u64,
        /// Last accepted sequence.
        last_sequence: u64,
    },
    /// The source may not send us snapshots.
    #[error("{0}")]
    NotPermitted(String),
    /// The snapshot holds a task we may not hold.
    #[error("residency: {0}")]
    Residency(String),
    /// The body does not decode or disagrees with the header.
    #[error("malformed body: {0}")]
    Body(String),
    /// Writing the snapshot failed.
    #[error("storing: {0}")]
    Storage(String),
}
