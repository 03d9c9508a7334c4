//! `pg_dumpall --roles-only`, filtered for a destination that already has
//! some roles (at least its bootstrap superuser).
//!
//! A role that exists here before the migration keeps its attributes and
//! password: the statements that create or alter it are dropped. Everything
//! else (new roles, their attributes, settings, comments, and memberships) is
//! kept, one statement per entry so a failure names the statement.
//!
//! The statements run as the bootstrap superuser, but on behalf of whoever
//! called `cloudmig.start()`: [`restrict`] keeps a non-superuser caller from
//! handing out, through a source of their choosing, what they could not grant
//! by hand (PostgreSQL 15's own rules for `CREATE ROLE` and `GRANT`):
//! `SUPERUSER`, `REPLICATION` and `BYPASSRLS` (superusers only), `CREATEROLE`
//! and `CREATEDB` (only if the caller has them), memberships in roles that
//! exist here (superuser roles never; others with `CREATEROLE` or `ADMIN
//! OPTION`), and role settings other than user-settable ones (a superuser's
//! `ALTER ROLE ... SET session_preload_libraries` would load any library at
//! that role's login). Each thing left out is reported with its fix.

use super::lexer::{leading_tokens, Token};
use super::script::{self, leading_words, ScriptError};
use crate::source::quote_ident;
use std::collections::{BTreeMap, HashSet};

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

/// What the role that started a migration may itself grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerRights {
    pub superuser: bool,
    pub createrole: bool,
    pub createdb: bool,
}

/// Role attributes that only a superuser (or a holder, for the last two)
/// may give, as `pg_dumpall` spells them.
const PRIVILEGED_ATTRIBUTES: [&str; 5] = [
    "SUPERUSER",
    "REPLICATION",
    "BYPASSRLS",
    "CREATEROLE",
    "CREATEDB",
];

impl CallerRights {
    /// Whether the caller may give a role `attribute` (upper case).
    fn may_give(&self, attribute: &str) -> bool {
        self.superuser
            || match attribute {
                "CREATEROLE" => self.createrole,
                "CREATEDB" => self.createdb,
                _ => false,
            }
    }
}

/// Something of the source's roles a migration did not carry over because
/// its caller could not have granted it; [`Withheld::message`] says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withheld {
    /// A new role created without these attributes.
    Attributes {
        role: String,
        attributes: Vec<&'static str>,
    },
    /// `GRANT role TO member` left out.
    Membership { role: String, member: String },
    /// `ALTER ROLE role SET setting ...` left out.
    Setting {
        role: String,
        setting: String,
        statement: String,
    },
    /// A statement about new roles whose form this filter does not know.
    Statement { statement: String },
}

impl Withheld {
    /// The warning event, with its fix, for a caller named `caller`.
    pub fn message(&self, caller: &str) -> String {
        match self {
            Withheld::Attributes { role, attributes } => format!(
                "role {role} was created without {}: {caller}, who started the migration, \
                 cannot grant {}; fix: if {role} needs {}, a superuser runs ALTER ROLE {} WITH {}",
                attributes.join(", "),
                if attributes.len() == 1 { "it" } else { "them" },
                if attributes.len() == 1 { "it" } else { "them" },
                quote_ident(role),
                attributes.join(" ")
            ),
            Withheld::Membership { role, member } => format!(
                "role {member} was not made a member of {role}: {caller}, who started the \
                 migration, cannot grant {role}; fix: if it should be, a superuser (or a role \
                 with ADMIN OPTION on {role}) runs GRANT {} TO {}",
                quote_ident(role),
                quote_ident(member)
            ),
            Withheld::Setting {
                role,
                setting,
                statement,
            } => format!(
                "setting {setting} of role {role} was not copied: {caller}, who started the \
                 migration, is not a superuser and {setting} is not a user setting; fix: if it \
                 should be, a superuser runs {statement}"
            ),
            Withheld::Statement { statement } => format!(
                "a statement of the roles dump was not run: {caller}, who started the migration, \
                 is not a superuser and cloudmig cannot tell what it grants; fix: a superuser \
                 reviews and runs it: {statement}"
            ),
        }
    }
}

/// The statements to run, and what was left out.
#[derive(Debug, Default)]
pub struct Restricted {
    pub statements: Vec<String>,
    pub withheld: Vec<Withheld>,
}

/// Limits `statements` (from [`statements_for_new_roles`]) to what `caller`
/// could do by hand. `created` are the roles the dump creates here;
/// `may_grant(role)` says whether the caller may grant membership in a role
/// that exists here already; `user_setting(name)` whether a setting is one
/// any user may set (pg_settings' `context = 'user'`).
///
/// Attributes are not edited out of `ALTER ROLE ... WITH` (whose password
/// literal this reader need not understand): a corrective `ALTER ROLE ...
/// WITH NOSUPERUSER ...` for every new role follows the dump's statements, in
/// the same transaction, so no login ever sees the attribute. The warnings
/// name the attributes the dump asked for.
pub fn restrict(
    statements: Vec<String>,
    created: &[String],
    caller: &CallerRights,
    may_grant: impl Fn(&str) -> bool,
    user_setting: impl Fn(&str) -> bool,
) -> Restricted {
    if caller.superuser {
        return Restricted {
            statements,
            withheld: Vec::new(),
        };
    }
    let created_set: HashSet<&str> = created.iter().map(String::as_str).collect();
    let mut out = Restricted::default();
    let mut asked: BTreeMap<String, Vec<&'static str>> = BTreeMap::new();
    for statement in statements {
        let tokens = leading_tokens(&statement, 64);
        let word = |i: usize| match tokens.get(i) {
            Some(Token::Word(w)) => Some(w.to_ascii_uppercase()),
            _ => None,
        };
        match (word(0).as_deref(), word(1).as_deref()) {
            (Some("CREATE" | "ALTER"), Some("ROLE")) => {
                let Some(role) = tokens.get(2).and_then(identifier) else {
                    out.withheld.push(Withheld::Statement { statement });
                    continue;
                };
                let setting_at = match (word(3).as_deref(), word(4).as_deref()) {
                    (Some("SET"), _) => Some(4),
                    (Some("IN"), Some("DATABASE")) if word(6).as_deref() == Some("SET") => Some(7),
                    _ => None,
                };
                if let Some(at) = setting_at {
                    match setting_name(&tokens, at) {
                        Some(name) if user_setting(&name) => out.statements.push(statement),
                        Some(setting) => out.withheld.push(Withheld::Setting {
                            role,
                            setting,
                            statement,
                        }),
                        None => out.withheld.push(Withheld::Statement { statement }),
                    }
                    continue;
                }
                for i in 3..tokens.len() {
                    if let Some(attribute) = word(i)
                        .and_then(|w| PRIVILEGED_ATTRIBUTES.into_iter().find(|a| *a == w))
                        .filter(|a| !caller.may_give(a))
                    {
                        let list = asked.entry(role.clone()).or_default();
                        if !list.contains(&attribute) {
                            list.push(attribute);
                        }
                    }
                }
                out.statements.push(statement);
            }
            (Some("COMMENT"), _) => out.statements.push(statement),
            (Some("GRANT"), _) => {
                let grant = match (
                    tokens.get(1).and_then(identifier),
                    word(2).as_deref(),
                    tokens.get(3).and_then(identifier),
                ) {
                    (Some(role), Some("TO"), Some(member)) => Some((role, member)),
                    _ => None,
                };
                match grant {
                    Some((role, _)) if created_set.contains(role.as_str()) || may_grant(&role) => {
                        out.statements.push(statement)
                    }
                    Some((role, member)) => {
                        out.withheld.push(Withheld::Membership { role, member })
                    }
                    None => out.withheld.push(Withheld::Statement { statement }),
                }
            }
            _ => out.withheld.push(Withheld::Statement { statement }),
        }
    }
    let denied: Vec<&'static str> = PRIVILEGED_ATTRIBUTES
        .into_iter()
        .filter(|a| !caller.may_give(a))
        .collect();
    for role in created {
        out.statements.push(format!(
            "ALTER ROLE {} WITH {};",
            quote_ident(role),
            denied
                .iter()
                .map(|a| format!("NO{a}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    for (role, mut attributes) in asked {
        attributes.sort_by_key(|a| PRIVILEGED_ATTRIBUTES.iter().position(|p| p == a));
        if created_set.contains(role.as_str()) {
            out.withheld
                .insert(0, Withheld::Attributes { role, attributes });
        }
    }
    out
}

/// The (possibly qualified) setting name at `tokens[at]`, lower case as the
/// server folds it.
fn setting_name(tokens: &[Token], at: usize) -> Option<String> {
    let mut name = identifier(tokens.get(at)?)?;
    if tokens.get(at + 1) == Some(&Token::Symbol('.')) {
        name = format!("{name}.{}", identifier(tokens.get(at + 2)?)?);
    }
    Some(name)
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

    fn restricted(statements: &[&str], created: &[&str]) -> Restricted {
        restrict(
            statements.iter().map(|s| s.to_string()).collect(),
            &created.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &CallerRights::default(),
            |role| role == "app_reader",
            |setting| setting == "work_mem",
        )
    }

    #[test]
    fn a_non_superuser_caller_hands_out_nothing_it_lacks() {
        let out = restricted(
            &[
                "CREATE ROLE boss;",
                "ALTER ROLE boss WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION \
                 BYPASSRLS PASSWORD 'SUPERUSER';",
                "CREATE ROLE \"Plain\";",
                "ALTER ROLE \"Plain\" WITH NOSUPERUSER LOGIN PASSWORD 'x';",
                "ALTER ROLE boss SET work_mem TO '64MB';",
                "ALTER ROLE boss SET session_preload_libraries TO '/tmp/evil';",
                "ALTER ROLE boss IN DATABASE app SET my.secret TO 'x';",
                "COMMENT ON ROLE boss IS 'the boss';",
                "GRANT pg_execute_server_program TO boss GRANTED BY postgres;",
                "GRANT postgres TO \"Plain\";",
                "GRANT app_reader TO \"Plain\";",
                "GRANT boss TO \"Plain\" WITH ADMIN OPTION;",
            ],
            &["boss", "Plain"],
        );
        assert_eq!(
            out.statements,
            vec![
                "CREATE ROLE boss;",
                "ALTER ROLE boss WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION \
                 BYPASSRLS PASSWORD 'SUPERUSER';",
                "CREATE ROLE \"Plain\";",
                "ALTER ROLE \"Plain\" WITH NOSUPERUSER LOGIN PASSWORD 'x';",
                "ALTER ROLE boss SET work_mem TO '64MB';",
                "COMMENT ON ROLE boss IS 'the boss';",
                "GRANT app_reader TO \"Plain\";",
                "GRANT boss TO \"Plain\" WITH ADMIN OPTION;",
                "ALTER ROLE \"boss\" WITH NOSUPERUSER NOREPLICATION NOBYPASSRLS NOCREATEROLE NOCREATEDB;",
                "ALTER ROLE \"Plain\" WITH NOSUPERUSER NOREPLICATION NOBYPASSRLS NOCREATEROLE NOCREATEDB;",
            ]
        );
        assert_eq!(
            out.withheld[0],
            Withheld::Attributes {
                role: "boss".into(),
                attributes: vec![
                    "SUPERUSER",
                    "REPLICATION",
                    "BYPASSRLS",
                    "CREATEROLE",
                    "CREATEDB"
                ],
            }
        );
        let settings: Vec<&str> = out
            .withheld
            .iter()
            .filter_map(|w| match w {
                Withheld::Setting { setting, .. } => Some(setting.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(settings, vec!["session_preload_libraries", "my.secret"]);
        let memberships: Vec<(&str, &str)> = out
            .withheld
            .iter()
            .filter_map(|w| match w {
                Withheld::Membership { role, member } => Some((role.as_str(), member.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            memberships,
            vec![("pg_execute_server_program", "boss"), ("postgres", "Plain")]
        );
        let message = out.withheld[0].message("mallory");
        assert!(
            message.contains("ALTER ROLE \"boss\" WITH SUPERUSER REPLICATION BYPASSRLS"),
            "{message}"
        );
    }

    #[test]
    fn a_caller_keeps_what_it_may_give_and_a_superuser_everything() {
        let statements = vec![
            "CREATE ROLE maker;".to_string(),
            "ALTER ROLE maker WITH CREATEDB CREATEROLE;".to_string(),
            "GRANT postgres TO maker;".to_string(),
        ];
        let creator = CallerRights {
            createrole: true,
            createdb: true,
            ..CallerRights::default()
        };
        let out = restrict(
            statements.clone(),
            &["maker".to_string()],
            &creator,
            |_| false,
            |_| true,
        );
        assert!(!out
            .withheld
            .iter()
            .any(|w| matches!(w, Withheld::Attributes { .. })));
        assert_eq!(
            out.statements.last().map(String::as_str),
            Some("ALTER ROLE \"maker\" WITH NOSUPERUSER NOREPLICATION NOBYPASSRLS;")
        );
        let superuser = CallerRights {
            superuser: true,
            ..CallerRights::default()
        };
        let out = restrict(
            statements.clone(),
            &["maker".to_string()],
            &superuser,
            |_| false,
            |_| false,
        );
        assert_eq!(out.statements, statements);
        assert!(out.withheld.is_empty());
    }

    #[test]
    fn statements_of_an_unknown_form_are_withheld() {
        let out = restricted(&["GRANT a, b TO c;", "DROP ROLE x;"], &[]);
        assert!(out.statements.is_empty());
        assert_eq!(out.withheld.len(), 2);
    }
}
