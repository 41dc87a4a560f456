//! Decision log (in progress).
