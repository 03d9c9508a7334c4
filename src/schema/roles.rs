//! `pg_dumpall --roles-only`, filtered for a destination that already has
//! some roles (at least its bootstrap superuser).
//!
//! A role that exists here before the migration keeps its attributes and
//! password: the statements that create or alter it are dropped. Everything
//! else (new roles, their attributes, settings, comments, and memberships) is
//! kept, one statement per entry so a failure names the statement.

use std::collections::HashSet;

/// The statements of a roles dump that concern roles not in `existing`.
pub fn statements_for_new_roles(dump: &str, existing: &HashSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for line in dump.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("--") || line.starts_with('\\') {
            continue;
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("SET ") || upper.starts_with("SELECT PG_CATALOG.SET_CONFIG") {
            continue;
        }
        let subject = ["CREATE ROLE ", "ALTER ROLE ", "COMMENT ON ROLE "]
            .iter()
            .find(|prefix| upper.starts_with(*prefix))
            .and_then(|prefix| parse_identifier(&line[prefix.len()..]));
        if let Some(role) = subject {
            if existing.contains(&role) {
                continue;
            }
        }
        out.push(line.to_string());
    }
    out
}

/// The role names a roles dump creates.
pub fn created_roles(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|line| line.trim().strip_prefix("CREATE ROLE "))
        .filter_map(parse_identifier)
        .collect()
}

/// Reads one SQL identifier at the start of `text`: a double-quoted one
/// (with `""` escapes) or a plain one (folded to lower case, as the server does).
pub fn parse_identifier(text: &str) -> Option<String> {
    let text = text.trim_start();
    if let Some(rest) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let name: String = text
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
            .collect();
        (!name.is_empty()).then(|| name.to_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\\restrict key\n\
        SET default_transaction_read_only = off;\n\
        --\n-- Roles\n--\n\
        CREATE ROLE alice;\n\
        ALTER ROLE alice WITH NOSUPERUSER INHERIT NOCREATEROLE LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';\n\
        CREATE ROLE \"Bob \"\"the\"\" Builder\";\n\
        ALTER ROLE \"Bob \"\"the\"\" Builder\" WITH LOGIN;\n\
        CREATE ROLE postgres;\n\
        ALTER ROLE postgres WITH SUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:y';\n\
        ALTER ROLE alice SET work_mem TO '64MB';\n\
        GRANT alice TO postgres GRANTED BY postgres;\n\
        \\unrestrict key\n";

    #[test]
    fn existing_roles_are_left_alone() {
        let existing: HashSet<String> = ["postgres".to_string()].into();
        let statements = statements_for_new_roles(DUMP, &existing);
        assert_eq!(statements.len(), 6, "{statements:#?}");
        assert!(statements.iter().all(|s| !s.contains("ROLE postgres")));
        assert!(statements.contains(&"GRANT alice TO postgres GRANTED BY postgres;".to_string()));
        assert!(statements
            .iter()
            .all(|s| !s.starts_with('\\') && !s.starts_with("SET ")));
    }

    #[test]
    fn identifiers_parse_like_the_server() {
        assert_eq!(parse_identifier("Alice;").as_deref(), Some("alice"));
        assert_eq!(
            parse_identifier("\"Bob \"\"the\"\" Builder\";").as_deref(),
            Some("Bob \"the\" Builder")
        );
        assert_eq!(parse_identifier("\"unterminated"), None);
        assert_eq!(
            created_roles(DUMP),
            vec!["alice", "Bob \"the\" Builder", "postgres"]
        );
    }
}
