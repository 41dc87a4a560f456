//! How the agent reads a controller's gRPC `Status` (lease gone, unknown agent,
//! worth retrying, as text); pure, no calls.

use tonic::{Code, Status};

pub(super) fn status_text(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The controller no longer considers this agent the lease holder.
pub(super) fn lease_gone(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::NotFound | Code::FailedPrecondition | Code::Aborted | Code::PermissionDenied
    )
}

/// The controller does not know this agent id.
pub(super) fn unknown_agent(status: &Status) -> bool {
    status.code() == Code::NotFound || status.message().contains("unknown agent")
}

/// Worth retrying: the controller is down, restarting or overloaded.
pub(super) fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Internal
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        assert!(lease_gone(&Status::failed_precondition(
            "lease held by another agent"
        )));
        assert!(lease_gone(&Status::not_found("no such task")));
        assert!(!lease_gone(&Status::unavailable("down")));
        assert!(transient(&Status::unavailable("down")));
        assert!(!transient(&Status::invalid_argument("region mismatch")));
        assert!(unknown_agent(&Status::not_found("unknown agent a1")));
    }
}
