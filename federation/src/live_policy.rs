//! The policy in force, shared by every component that reads it and
//! replaced whole by a reload ([`crate::reload`]).

use std::sync::{Arc, RwLock};

use crate::policy::Policy;

/// A handle on the policy in force. Cheap to clone; every clone sees the
/// same policy.
#[derive(Debug, Clone)]
pub struct LivePolicy(Arc<RwLock<Arc<Policy>>>);

impl LivePolicy {
    /// A handle holding `policy`.
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy in force.
    pub fn get(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the policy (already validated).
    pub(crate) fn replace(&self, policy: Policy) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }
}
