//! The controller's one error type and its mapping to gRPC status codes.
//! Handlers return [`Error`]; this is the only place a `tonic::Status` is built
//! from an internal error.

use tonic::{Code, Status};

/// Everything a controller call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed: `INVALID_ARGUMENT`.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// The field, as the API names it.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A request exceeds a configured limit: `RESOURCE_EXHAUSTED`.
    #[error("{field} over limit: {why}")]
    Limit {
        /// The field.
        field: String,
        /// Which limit.
        why: String,
    },
    /// No such task (or agent): `NOT_FOUND`.
    #[error("{what} not found: {id}")]
    NotFound {
        /// "task" or "agent".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// No rule matched, or no region of the rule is compliant:
    /// `FAILED_PRECONDITION`. The message names the rule and each candidate.
    #[error("{0}")]
    NotRoutable(String),
    /// Every compliant region is down, full or draining: `UNAVAILABLE`.
    #[error("{0}")]
    Unavailable(String),
    /// The caller may not do this (wrong region, not the lease holder):
    /// `FAILED_PRECONDITION`.
    #[error("{0}")]
    Precondition(String),
    /// The caller's identity does not allow it: `PERMISSION_DENIED`.
    #[error("{0}")]
    Denied(String),
    /// No (valid) credentials: `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// A peer could not be reached in time: `UNAVAILABLE`.
    #[error("peer {region}: {why}")]
    Peer {
        /// The peer region.
        region: String,
        /// What happened.
        why: String,
    },
    /// Storage failed: `INTERNAL` (the request had no effect or is durable;
    /// never acknowledged half-done).
    #[error("storage: {0}")]
    Storage(String),
    /// An idempotency key reused for other content: `ALREADY_EXISTS`. The
    /// message names the key, the task it names and what differs.
    #[error("{0}")]
    AlreadyExists(String),
    /// Shutting down: `UNAVAILABLE`.
    #[error("controller is shutting down")]
    ShuttingDown,
    /// A task of ours this region no longer holds because `by` took it over
    /// (its notice was applied here): `NOT_FOUND`, with `by` in the
    /// [`TAKEN_OVER_BY`] metadata so a relaying controller asks `by`.
    #[error("task not found: {id}")]
    TakenOver {
        /// The task id.
        id: String,
        /// The region that took it over.
        by: String,
    },
    /// Something of ours failed that is neither storage nor input:
    /// `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

/// Metadata key of a NOT_FOUND answer naming the region that took the task
/// over (the owner no longer holds it but applied that region's notice).
pub const TAKEN_OVER_BY: &str = "x-federation-taken-over-by";

impl Error {
    /// `INVALID_ARGUMENT` naming `field`.
    pub fn invalid(field: &str, why: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.to_string(),
            why: why.into(),
        }
    }

    /// `RESOURCE_EXHAUSTED` naming `field`.
    pub fn limit(field: &str, why: impl Into<String>) -> Self {
        Error::Limit {
            field: field.to_string(),
            why: why.into(),
        }
    }

    /// `NOT_FOUND` for a task.
    pub fn task_not_found(id: &str) -> Self {
        Error::NotFound {
            what: "task",
            id: id.to_string(),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::Limit { .. } => Code::ResourceExhausted,
            Error::NotFound { .. } => Code::NotFound,
            Error::NotRoutable(_) | Error::Precondition(_) => Code::FailedPrecondition,
            Error::Denied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Unavailable(_) | Error::Peer { .. } | Error::ShuttingDown => Code::Unavailable,
            Error::Storage(_) | Error::Internal(_) => Code::Internal,
            Error::TakenOver { .. } => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let Error::TakenOver { by, .. } = &e {
            if let Ok(v) = by.parse() {
                status.metadata_mut().insert(TAKEN_OVER_BY, v);
            }
        }
        status
    }
}

/// Result of a handler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::tasks::StoreError> for Error {
    fn from(e: crate::tasks::StoreError) -> Self {
        use crate::tasks::StoreError as S;
        match e {
            S::NotFound(id) => Error::task_not_found(&id),
            S::NotLeaseHolder { .. } | S::Terminal { .. } => Error::Precondition(e.to_string()),
            S::Invalid(why) => Error::invalid("task", why),
            S::KeyReused { .. } => Error::AlreadyExists(e.to_string()),
            S::Closed => Error::ShuttingDown,
            S::Unavailable(_) | S::NotLeader(_) => Error::Unavailable(e.to_string()),
            S::ReplicaInUse(_) => Error::Precondition(e.to_string()),
            S::Corrupt { .. } | S::Db(_) | S::Damaged { .. } | S::Lost { .. } => {
                Error::Storage(e.to_string())
            }
        }
    }
}

/// A relayed error as the client sees it (the region named unless the code
/// speaks for itself).
pub fn relayed(region: &str, status: Status) -> Status {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            status
        }
        code => Status::new(code, format!("relayed to {region}: {}", status.message())),
    }
}
