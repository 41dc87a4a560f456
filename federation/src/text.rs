//! Cutting text from the network or a file down to what a message, a log
//! line or a record may carry. Owns string shortening only; knows nothing of
//! the API or the policy.

/// Cuts `s` to at most `max` bytes (on a character boundary), marking the
/// cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
