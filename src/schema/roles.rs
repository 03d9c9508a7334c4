//! `pg_dumpall --roles-only`, filtered for a destination that already has
//! some roles (at least its bootstrap superuser).
//!
//! A role that exists here before the migration keeps its attributes and
//! password: the statements that create or alter it are dropped. Everything
//! else (new roles, their attributes, settings, comments, and memberships) is
//! kept, one statement per entry so a failure names the statement.

use super::lexer::{leading_tokens, Token};
use super::script::{self, leading_words, ScriptError};
use std::collections::HashSet;

/// The statements of a roles dump that concern roles not in `existing`,
/// each byte for byte (a setting or comment spanning lines stays whole).
/// Session SETs and the `set_config` SELECT are dropped (any SELECT: the
/// dump has no other, and none is needed to create roles); a dump that does not
/// read as pg_dumpall writes it is refused (see `script`).
pub fn statements_for_new_roles(
    dump: &str,
    existing: &HashSet<String>,
) -> Result<Vec<String>, ScriptError> {
    let mut out = Vec::new();
    for statement in script::statements(dump)? {
        let words = leading_words(&statement, 4);
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        if matches!(
            words.as_slice(),
            ["SET", ..] | ["RESET", ..] | ["SELECT", ..]
        ) {
            continue;
        }
        if let Some(role) = subject_role(&statement) {
            if existing.contains(&role) {
                continue;
            }
        }
        out.push(statement);
    }
    Ok(out)
}

/// The role names a roles dump creates.
pub fn created_roles(dump: &str) -> Result<Vec<String>, ScriptError> {
    Ok(script::statements(dump)?
        .iter()
        .filter_map(|statement| match leading_tokens(statement, 3).as_slice() {
            [Token::Word(create), Token::Word(role), name]
                if create.eq_ignore_ascii_case("CREATE") && role.eq_ignore_ascii_case("ROLE") =>
            {
                identifier(name)
            }
            _ => None,
        })
        .collect())
}

/// The role a `CREATE ROLE`, `ALTER ROLE` or `COMMENT ON ROLE` statement
/// is about.
fn subject_role(statement: &str) -> Option<String> {
    let tokens = leading_tokens(statement, 4);
    let is = |i: usize, word: &str| matches!(tokens.get(i), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word));
    let at = if (is(0, "CREATE") || is(0, "ALTER")) && is(1, "ROLE") {
        2
    } else if is(0, "COMMENT") && is(1, "ON") && is(2, "ROLE") {
        3
    } else {
        return None;
    };
    tokens.get(at).and_then(identifier)
}

/// The name a token stands for as an identifier: a quoted one as written, a
/// plain one folded to lower case as the server folds it (ASCII only, in a
/// multi-byte encoding).
fn identifier(token: &Token) -> Option<String> {
    match token {
        Token::QuotedIdent(name) => Some(name.clone()),
        Token::Word(word) => Some(word.to_ascii_lowercase()),
        _ => None,
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
        let statements = statements_for_new_roles(DUMP, &existing).unwrap();
        assert_eq!(statements.len(), 6, "{statements:#?}");
        assert!(statements.iter().all(|s| !s.contains("ROLE postgres")));
        assert!(statements.contains(&"GRANT alice TO postgres GRANTED BY postgres;".to_string()));
        assert!(statements
            .iter()
            .all(|s| !s.starts_with('\\') && !s.starts_with("SET ")));
    }

    #[test]
    fn identifiers_parse_like_the_server() {
        assert_eq!(
            subject_role("ALTER ROLE Alice WITH LOGIN;").as_deref(),
            Some("alice")
        );
        assert_eq!(
            subject_role("COMMENT ON ROLE \"Bob \"\"the\"\" Builder\" IS 'x';").as_deref(),
            Some("Bob \"the\" Builder")
        );
        assert_eq!(subject_role("GRANT a TO b;"), None);
        assert_eq!(
            created_roles(DUMP).unwrap(),
            vec!["alice", "Bob \"the\" Builder", "postgres"]
        );
    }

    /// Settings and comments spanning lines, holding quotes, backslashes and
    /// psql syntax, come out whole; one about an existing role is dropped
    /// whole, not line by line.
    #[test]
    fn multi_line_settings_and_comments_stay_whole() {
        let setting = "ALTER ROLE alice SET search_path TO 'a''\\b\n\\c x\n;c', '$$';";
        let comment =
            "COMMENT ON ROLE alice IS 'line1\n\\restrict k\nALTER ROLE alice SUPERUSER;\n''';";
        let theirs = "COMMENT ON ROLE postgres IS 'x\nCREATE ROLE sneaky;\n';";
        let dump = format!(
            "\\restrict k\nSET standard_conforming_strings = on;\n\
             CREATE ROLE alice;\n{setting}\n{comment}\n{theirs}\n\\unrestrict k\n"
        );
        let existing: HashSet<String> = ["postgres".to_string()].into();
        assert_eq!(
            statements_for_new_roles(&dump, &existing).unwrap(),
            vec!["CREATE ROLE alice;", setting, comment]
        );
        assert_eq!(created_roles(&dump).unwrap(), vec!["alice"]);
    }

    #[test]
    fn a_dump_with_other_meta_commands_is_refused() {
        let existing = HashSet::new();
        assert!(statements_for_new_roles("CREATE ROLE a;\n\\! id\n", &existing).is_err());
        assert!(statements_for_new_roles("COMMENT ON ROLE a IS 'x;\n", &existing).is_err());
    }
}
