//! How structured log fields carry collections: one plain string, items
//! separated by commas (`GDPR,SOX`), so that JSON logs hold values rather
//! than Rust debug text (`{"GDPR", "SOX"}`). Owns formatting only.

use std::fmt::Display;

/// `a,b,c` from any list of displayable items; empty for none.
pub fn list<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn joins_with_commas() {
        assert_eq!(super::list(["GDPR", "SOX"]), "GDPR,SOX");
        assert_eq!(super::list(Vec::<String>::new()), "");
    }
}
