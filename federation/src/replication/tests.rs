//! Receiver rejection cases, in process: each one is refused with its
//! counter, and the previous good snapshot stays.
