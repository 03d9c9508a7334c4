//! Quoting helpers for building SQL text sent to the source with the simple query protocol
//! (which has no parameters).
//!
//! Both assume `standard_conforming_strings = on` (the default since PostgreSQL 9.1) only where
//! it is safe either way: a literal containing a backslash uses the `E''` form, exactly as
//! PostgreSQL's own `quote_literal()` does.

/// Quotes a string as an SQL literal: `'it''s'`, or `E'a\\b'` when it contains a backslash.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes an identifier, always: `"My Table"`, `"a""b"`. Unlike PostgreSQL's `quote_ident()`
/// we never leave it bare, so the result needs no keyword list and is correct for every
/// server version.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(quote_literal(""), "''");
        assert_eq!(quote_literal("abc"), "'abc'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'c"), "E'a\\\\b''c'");
        assert_eq!(quote_literal("é"), "'é'");
    }

    #[test]
    fn identifiers() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("My \"Table\""), "\"My \"\"Table\"\"\"");
        assert_eq!(quote_ident(""), "\"\"");
    }
}
