//! Static audit of a policy (`federation policy check`).
