//! Route changes between two policies (`federation policy diff`).
