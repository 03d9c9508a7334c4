//! pg_dump's plain-format output, made runnable inside the server.
//!
//! pg_dump writes a psql script: SQL statements plus a few psql
//! meta-commands (`\connect`, preceded by `\encoding SQL_ASCII` when the
//! database name is more than ASCII letters, digits, `_` and `.`; and since
//! 15.14 `\restrict`/`\unrestrict` around the whole script). The script is
//! cut by [`super::lexer`], which reads it as psql and the server do, so text
//! inside a literal, identifier, comment or function body is never taken for
//! a meta-command or a statement end, whatever an object's owner put there.
//! Then:
//! * `\restrict`/`\unrestrict` and `\encoding SQL_ASCII` are dropped (the
//!   latter only makes psql pass the next `\connect`'s name through as is;
//!   the script is UTF-8 and read as such); the first `\connect` marks where
//!   the statements about the database itself (run in the control database)
//!   end and those inside it begin; a later `\connect` to the same target
//!   (pg_dump reconnects after ALTER DATABASE ... SET, so the settings apply
//!   to the rest) changes nothing and is dropped;
//! * any other meta-command, a `\connect` elsewhere, or a statement turning
//!   standard_conforming_strings off is refused: pg_dump writes none of them
//!   here (the dump runs with standard_conforming_strings on, see `dump`),
//!   so one appearing means the script is not what it seems;
//! * statements are kept byte for byte, one per line break.

use super::lexer::{self, Item, LexError, Token};

/// Why a script from pg_dump or pg_dumpall was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("could not read the script: {0}")]
    Lex(#[from] LexError),
    #[error("unexpected psql meta-command \\{name} at line {line}")]
    UnexpectedMetaCommand { name: String, line: usize },
    #[error("unexpected \\connect to another database at line {line}")]
    SecondConnect { line: usize },
    #[error("the script turns standard_conforming_strings off")]
    StandardStringsOff,
    #[error("unexpected statement in the script: {statement} ...")]
    UnexpectedStatement { statement: String },
}

impl ScriptError {
    /// What to do about it, for the task's error hint.
    pub fn hint(&self) -> &'static str {
        match self {
            ScriptError::StandardStringsOff => {
                "cloudmig runs dumps with standard_conforming_strings on; check that no \
                 connection option of the migration account turns it off"
            }
            _ => {
                "the dump does not read as pg_dump writes it, and nothing of it was run; \
                 look for objects on the source whose names, comments or bodies hold psql \
                 syntax, and report the case"
            }
        }
    }
}

/// One step of a pg_dump script (`--use-set-session-authorization`), read
/// as the server would run it: who each statement runs as is what the
/// `SET SESSION AUTHORIZATION` before it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// pg_dump's own session settings (`SET name = value`, `SELECT
    /// pg_catalog.set_config('search_path', ...)`): they run no code of the
    /// source and must outlive the statement, so they run as they are.
    Setting(String),
    /// A statement to run as `owner`, the role pg_dump named last (`None`:
    /// `SET SESSION AUTHORIZATION DEFAULT`, the objects pg_dump gives no
    /// owner: extensions and their comments).
    Run {
        owner: Option<String>,
        kind: StepKind,
        statement: String,
    },
}

/// What a [`Step::Run`] statement needs beyond its owner's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// An object's DDL: its owner's rights are enough where PostgreSQL
    /// lets a non-superuser create it at all.
    Object,
    /// A statement that runs no code but often needs more than its owner's
    /// rights: database-level settings (`ALTER DATABASE ... SET`, `ALTER ROLE
    /// ... IN DATABASE ... SET`) and `ALTER ... OWNER TO` (pg_dump's way for
    /// schema `public`). A superuser caller's migration runs it as the
    /// bootstrap superuser; otherwise it is left out if its owner may not.
    NoCode,
    /// pg_dump's `CREATE SCHEMA name;`: the owner needs `CREATE` on the
    /// database, which a superuser's dump often never granted. It runs no
    /// code, so a superuser caller's migration runs it as the bootstrap
    /// superuser with `AUTHORIZATION` the owner.
    Schema,
    /// An object only a superuser may create (event trigger, operator class
    /// or family, text search parser or template, foreign-data wrapper,
    /// procedural language): created as its owner when that role may, else
    /// left out with a warning instead of failing the whole step.
    SuperuserOnly,
}

/// The statements of a script without meta-commands (what follows the
/// `\connect` of a split script), each with its class; a meta-command, or a
/// statement that reads differently with standard_conforming_strings off,
/// refuses the whole script.
fn classified(script: &str) -> Result<Vec<(String, Class)>, ScriptError> {
    lexer::lex(script)?
        .into_iter()
        .map(|item| match item {
            Item::Statement(statement) => {
                refuse_standard_strings_off(&statement)?;
                let class = classify(&statement);
                Ok((statement, class))
            }
            Item::MetaCommand { name, line, .. } => {
                Err(ScriptError::UnexpectedMetaCommand { name, line })
            }
        })
        .collect()
}

/// The steps of a script without meta-commands (`SplitScript::after_connect`):
/// `SET SESSION AUTHORIZATION 'x'` / `DEFAULT` and `RESET SESSION
/// AUTHORIZATION` (pg_dump's grantor switches around GRANTs) are read, not
/// run. Any other statement that would change who runs what (`SET ROLE`,
/// `SET session_authorization`, `RESET ALL`, `set_config` of anything but
/// search_path...) is refused: pg_dump writes none of them, and every
/// statement of the script is pg_dump's own (the lexer keeps what an object's
/// owner wrote inside its literals and bodies).
pub fn steps(script: &str) -> Result<Vec<Step>, ScriptError> {
    let mut owner: Option<String> = None;
    let mut out = Vec::new();
    for (statement, class) in classified(script)? {
        match class {
            Class::Authorization(role) => owner = role,
            Class::Unexpected => {
                return Err(ScriptError::UnexpectedStatement {
                    statement: leading_words(&statement, 4).join(" "),
                })
            }
            Class::Setting => out.push(Step::Setting(statement)),
            Class::Run(kind) => out.push(Step::Run {
                owner: owner.clone(),
                kind,
                statement,
            }),
        }
    }
    Ok(schema_privileges_first(out))
}

/// Moves the `GRANT`/`REVOKE ... ON SCHEMA` steps (each with its own
/// grantor) to right after the last `CREATE SCHEMA`, or before the first
/// other statement. pg_dump puts privileges last, which is right when a
/// superuser creates everything; run as their owners, objects in a schema
/// someone else owns (`public`, say) need its `CREATE` or `USAGE` first.
/// The end state is the same: these steps only change schemas' ACLs.
fn schema_privileges_first(steps: Vec<Step>) -> Vec<Step> {
    let is_schema_privilege = |step: &Step| match step {
        Step::Run { statement, .. } => {
            let tokens = lexer::leading_tokens(statement, 12);
            matches!(tokens.first(), Some(Token::Word(w))
                if w.eq_ignore_ascii_case("GRANT") || w.eq_ignore_ascii_case("REVOKE"))
                && tokens.windows(2).any(|pair| {
                    matches!(pair, [Token::Word(a), Token::Word(b)]
                        if a.eq_ignore_ascii_case("ON") && b.eq_ignore_ascii_case("SCHEMA"))
                })
        }
        Step::Setting(_) => false,
    };
    let (privileges, rest): (Vec<Step>, Vec<Step>) =
        steps.into_iter().partition(is_schema_privilege);
    if privileges.is_empty() {
        return rest;
    }
    let creates_schema = |step: &Step| match step {
        Step::Run { statement, .. } => leading_words(statement, 2) == ["CREATE", "SCHEMA"],
        Step::Setting(_) => false,
    };
    let at = match rest.iter().rposition(creates_schema) {
        Some(last) => last + 1,
        None => rest
            .iter()
            .position(|step| {
                matches!(
                    step,
                    Step::Run {
                        kind: StepKind::Object,
                        ..
                    }
                )
            })
            .unwrap_or(rest.len()),
    };
    let mut out = rest;
    out.splice(at..at, privileges);
    out
}

/// A statement as [`steps`] sorts it.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    Authorization(Option<String>),
    /// Something pg_dump does not write that would change who runs what,
    /// or a setting in a form pg_dump does not use.
    Unexpected,
    Setting,
    Run(StepKind),
}

/// The settings through which identity changes (`SET ROLE` is `role`).
const IDENTITY_SETTINGS: [&str; 2] = ["role", "session_authorization"];

fn classify(statement: &str) -> Class {
    let tokens = lexer::leading_tokens(statement, 12);
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => w.to_ascii_uppercase(),
        _ => String::new(),
    };
    // A setting's name, quoted or not, lower-cased as the server folds it.
    let name = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => w.to_ascii_lowercase(),
        Some(Token::QuotedIdent(q)) => q.clone(),
        _ => String::new(),
    };
    match word(0).as_str() {
        "SET" | "RESET" => {
            let reset = word(0) == "RESET";
            // SET [SESSION | LOCAL] ...
            let mut at = 1;
            if matches!(word(1).as_str(), "SESSION" | "LOCAL")
                && !(word(1) == "SESSION" && word(2) == "AUTHORIZATION")
            {
                at = 2;
            }
            if word(at) == "SESSION" && word(at + 1) == "AUTHORIZATION" {
                if at != 1 {
                    return Class::Unexpected;
                }
                if reset {
                    return Class::Authorization(None);
                }
                return match (tokens.get(at + 2), tokens.get(at + 3)) {
                    (Some(Token::Word(w)), None | Some(Token::Symbol(';')))
                        if w.eq_ignore_ascii_case("DEFAULT") =>
                    {
                        Class::Authorization(None)
                    }
                    (
                        Some(Token::Literal(role) | Token::QuotedIdent(role)),
                        None | Some(Token::Symbol(';')),
                    ) => Class::Authorization(Some(role.clone())),
                    (Some(Token::Word(role)), None | Some(Token::Symbol(';'))) => {
                        Class::Authorization(Some(role.to_ascii_lowercase()))
                    }
                    _ => Class::Unexpected,
                };
            }
            let setting = name(at);
            if IDENTITY_SETTINGS.contains(&setting.as_str()) || (reset && word(at) == "ALL") {
                return Class::Unexpected;
            }
            if reset || word(1) == "SESSION" || word(1) == "LOCAL" || setting.is_empty() {
                // pg_dump writes only plain `SET name = value`.
                return Class::Unexpected;
            }
            Class::Setting
        }
        "SELECT" => {
            let calls_set_config = name(1) == "pg_catalog"
                && tokens.get(2) == Some(&Token::Symbol('.'))
                && name(3) == "set_config";
            let unqualified_set_config = name(1) == "set_config";
            match (calls_set_config, tokens.get(5)) {
                (true, Some(Token::Literal(setting))) if setting == "search_path" => Class::Setting,
                _ if calls_set_config || unqualified_set_config => Class::Unexpected,
                _ => Class::Run(StepKind::Object),
            }
        }
        "ALTER" if word(1) == "DATABASE" => Class::Run(StepKind::NoCode),
        "ALTER"
            if tokens.windows(2).any(|pair| {
                matches!(pair, [Token::Word(a), Token::Word(b)]
                    if a.eq_ignore_ascii_case("OWNER") && b.eq_ignore_ascii_case("TO"))
            }) =>
        {
            Class::Run(StepKind::NoCode)
        }
        "ALTER" if matches!(word(1).as_str(), "ROLE" | "USER") => Class::Run(StepKind::NoCode),
        "CREATE"
            if word(1) == "SCHEMA"
                && tokens.len() == 4
                && matches!(tokens[2], Token::Word(_) | Token::QuotedIdent(_))
                && tokens[3] == Token::Symbol(';') =>
        {
            Class::Run(StepKind::Schema)
        }
        "CREATE" => {
            let mut at = 1;
            if word(1) == "OR" && word(2) == "REPLACE" {
                at = 3;
            }
            if matches!(word(at).as_str(), "TRUSTED" | "PROCEDURAL") {
                at += 1;
            }
            if word(at) == "PROCEDURAL" {
                at += 1;
            }
            let superuser_only = matches!(
                (
                    word(at).as_str(),
                    word(at + 1).as_str(),
                    word(at + 2).as_str()
                ),
                ("EVENT", "TRIGGER", _)
                    | ("OPERATOR", "CLASS" | "FAMILY", _)
                    | ("TEXT", "SEARCH", "PARSER" | "TEMPLATE")
                    | ("FOREIGN", "DATA", "WRAPPER")
                    | ("LANGUAGE", _, _)
            );
            Class::Run(if superuser_only {
                StepKind::SuperuserOnly
            } else {
                StepKind::Object
            })
        }
        _ => Class::Run(StepKind::Object),
    }
}

/// A script split at its first `\connect`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SplitScript {
    /// Statements before the first `\connect` (with `--create`: CREATE
    /// DATABASE and ALTER DATABASE ... OWNER), each byte for byte.
    pub before_connect: Vec<String>,
    /// The statements after it (or of the whole script when there is none),
    /// each byte for byte and followed by a line break.
    pub after_connect: String,
}

/// Splits at the first `\connect` and drops `\restrict`/`\unrestrict`.
pub fn split(script: &str) -> Result<SplitScript, ScriptError> {
    let mut before = Vec::new();
    let mut after = Vec::new();
    // The first \connect's arguments: where the statements after it run.
    let mut connected_to: Option<String> = None;
    for item in lexer::lex(script)? {
        match item {
            Item::Statement(statement) => {
                refuse_standard_strings_off(&statement)?;
                if connected_to.is_some() {
                    after.push(statement);
                } else {
                    before.push(statement);
                }
            }
            Item::MetaCommand { name, args, line } => match name.as_str() {
                "restrict" | "unrestrict" => {}
                "encoding" if args == "SQL_ASCII" => {}
                "connect" | "c" => match &connected_to {
                    None => connected_to = Some(args),
                    Some(target) if *target == args => {}
                    Some(_) => return Err(ScriptError::SecondConnect { line }),
                },
                _ => return Err(ScriptError::UnexpectedMetaCommand { name, line }),
            },
        }
    }
    if connected_to.is_none() {
        after = std::mem::take(&mut before);
    }
    Ok(SplitScript {
        before_connect: before,
        after_connect: join(&after),
    })
}

/// A post-data script cut in two: what belongs to one copied table alone,
/// run right after its rows are in, and the rest, run once every table is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PostDataSplit {
    /// Per table (schema, name), a script of its own: pg_dump's settings and
    /// `SET SESSION AUTHORIZATION` in force at each statement, then the
    /// statement, so it runs as the same owner with the same settings.
    pub tables: Vec<((String, String), String)>,
    /// Every other statement, in pg_dump's order (settings and
    /// authorizations kept as they are).
    pub rest: String,
}

/// Cuts a post-data script (`SplitScript::after_connect`) as `pg_restore -j`
/// schedules it: a table's indexes, its primary key, unique and exclusion
/// constraints and its `CHECK ... NOT VALID` constraints need only that
/// table, so they go to `tables` for the tables of `copied`; foreign keys
/// (which need the referenced table's key), triggers, rules, policies,
/// comments, index attachments and the objects of tables not copied stay in
/// `rest`, in their order. A statement is placed by its leading tokens; one
/// that does not read as one of those forms stays in `rest`.
pub fn split_post_data(
    after_connect: &str,
    copied: &std::collections::HashSet<(String, String)>,
) -> Result<PostDataSplit, ScriptError> {
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut authorization: Option<String> = None;
    let mut tables: Vec<((String, String), Vec<String>)> = Vec::new();
    let mut rest = Vec::new();
    for (statement, class) in classified(after_connect)? {
        match class {
            Class::Authorization(_) => authorization = Some(statement.clone()),
            Class::Setting => {
                // The latest value of each setting is the one in force.
                let key = lexer::leading_tokens(&statement, 2)
                    .into_iter()
                    .map(|t| format!("{t:?}").to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(" ");
                settings.retain(|(k, _)| *k != key);
                settings.push((key, statement.clone()));
            }
            _ => {
                if let Some(target) = table_of(&statement).filter(|t| copied.contains(t)) {
                    let mut script: Vec<String> = settings.iter().map(|(_, s)| s.clone()).collect();
                    script.extend(authorization.clone());
                    script.push(statement);
                    match tables.iter_mut().find(|(name, _)| *name == target) {
                        Some((_, statements)) => statements.extend(script),
                        None => tables.push((target, script)),
                    }
                    continue;
                }
            }
        }
        rest.push(statement);
    }
    Ok(PostDataSplit {
        tables: tables
            .into_iter()
            .map(|(name, statements)| (name, join(&statements)))
            .collect(),
        rest: join(&rest),
    })
}

/// The table a post-data statement concerns when it needs that table alone:
/// `CREATE [UNIQUE] INDEX name ON [ONLY] schema.table ...` and `ALTER TABLE
/// [ONLY] schema.table ADD CONSTRAINT name {PRIMARY KEY | UNIQUE | EXCLUDE |
/// CHECK}`, as pg_dump writes them (schema-qualified).
fn table_of(statement: &str) -> Option<(String, String)> {
    let tokens = lexer::leading_tokens(statement, 16);
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => w.to_ascii_uppercase(),
        _ => String::new(),
    };
    let name = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => Some(w.to_ascii_lowercase()),
        Some(Token::QuotedIdent(q)) => Some(q.clone()),
        _ => None,
    };
    let qualified = |i: usize| -> Option<(String, String)> {
        match (name(i), tokens.get(i + 1), name(i + 2)) {
            (Some(schema), Some(Token::Symbol('.')), Some(table)) => Some((schema, table)),
            _ => None,
        }
    };
    match (word(0).as_str(), word(1).as_str()) {
        ("CREATE", "INDEX" | "UNIQUE") => {
            let mut at = if word(1) == "UNIQUE" { 2 } else { 1 };
            if word(at) != "INDEX" {
                return None;
            }
            at += 1;
            name(at)?; // pg_dump always names the index
            at += 1;
            if word(at) != "ON" {
                return None;
            }
            at += 1;
            if word(at) == "ONLY" {
                at += 1;
            }
            qualified(at)
        }
        ("ALTER", "TABLE") => {
            let mut at = 2;
            if word(at) == "ONLY" {
                at += 1;
            }
            let table = qualified(at)?;
            at += 3;
            if word(at) != "ADD" || word(at + 1) != "CONSTRAINT" {
                return None;
            }
            name(at + 2)?;
            match (word(at + 3).as_str(), word(at + 4).as_str()) {
                ("PRIMARY", "KEY") | ("UNIQUE", _) | ("EXCLUDE", _) | ("CHECK", _) => Some(table),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The statements of a script that holds no `\connect` (pg_dumpall
/// `--roles-only`), `\restrict`/`\unrestrict` dropped, with the same checks
/// as [`split`].
pub fn statements(script: &str) -> Result<Vec<String>, ScriptError> {
    let mut out = Vec::new();
    for item in lexer::lex(script)? {
        match item {
            Item::Statement(statement) => {
                refuse_standard_strings_off(&statement)?;
                out.push(statement);
            }
            Item::MetaCommand { name, .. } if name == "restrict" || name == "unrestrict" => {}
            Item::MetaCommand { name, line, .. } => {
                return Err(ScriptError::UnexpectedMetaCommand { name, line })
            }
        }
    }
    Ok(out)
}

/// The statements of `before_connect` that are worth running: pg_dump starts
/// every script with session SETs and a `set_config` of search_path, which
/// mean nothing for the single CREATE DATABASE run at top level. A statement
/// is chosen by its leading keywords (after any comment), never by how its
/// lines look.
pub fn database_statements(before_connect: &[String]) -> Vec<String> {
    before_connect
        .iter()
        .filter(|statement| {
            let words = leading_words(statement, 3);
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            matches!(
                words.as_slice(),
                ["CREATE", "DATABASE", ..]
                    | ["ALTER", "DATABASE", ..]
                    | ["COMMENT", "ON", "DATABASE"]
            )
        })
        .cloned()
        .collect()
}

/// The owner pg_dump `--use-set-session-authorization` gives the database
/// it creates: the session authorization in force at `CREATE DATABASE`
/// (there is no `ALTER DATABASE ... OWNER TO` in that mode).
pub fn database_owner(before_connect: &[String]) -> Option<String> {
    let mut owner = None;
    for statement in before_connect {
        match classify(statement) {
            Class::Authorization(role) => owner = role,
            _ if leading_words(statement, 2) == ["CREATE", "DATABASE"] => return owner,
            _ => {}
        }
    }
    None
}

/// What a statement does, for messages: its leading words and names up to
/// the first value (a literal, a parenthesis), so nothing an option or a
/// setting holds (a user mapping's password) is repeated.
pub fn describe(statement: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for token in lexer::leading_tokens(statement, 16) {
        match token {
            Token::Word(word) => out.push(word),
            Token::QuotedIdent(name) => out.push(format!("\"{}\"", name.replace('"', "\"\""))),
            Token::Symbol('.') => out.push(".".into()),
            _ => break,
        }
    }
    out.join(" ").replace(" . ", ".")
}

/// The first `max` unquoted words of a statement, upper-cased; stops at the
/// first token that is not one.
pub fn leading_words(statement: &str, max: usize) -> Vec<String> {
    lexer::leading_tokens(statement, max)
        .into_iter()
        .map_while(|token| match token {
            Token::Word(word) => Some(word.to_ascii_uppercase()),
            _ => None,
        })
        .collect()
}

/// The server parses a whole script with one setting of
/// standard_conforming_strings (on, see `execute`), so a script may not
/// switch it off half-way, as the lexer would follow and the server not.
fn refuse_standard_strings_off(statement: &str) -> Result<(), ScriptError> {
    match lexer::standard_strings_setting(statement, 0)? {
        Some(false) => Err(ScriptError::StandardStringsOff),
        _ => Ok(()),
    }
}

fn join(statements: &[String]) -> String {
    let mut out = String::with_capacity(statements.iter().map(|s| s.len() + 1).sum());
    for statement in statements {
        out.push_str(statement);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_data_is_cut_per_table() {
        let script = "SET statement_timeout = 0;\n\
            SELECT pg_catalog.set_config('search_path', '', false);\n\
            SET default_tablespace = '';\n\
            SET SESSION AUTHORIZATION 'alice';\n\
            --\n-- Name: t t_pkey; Type: CONSTRAINT\n--\n\
            ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\
            SET SESSION AUTHORIZATION \"Bob\";\n\
            CREATE UNIQUE INDEX \"U\" ON \"My\".\"T 2\" USING btree (a);\n\
            SET default_tablespace = fast;\n\
            CREATE INDEX t_a ON ONLY public.t USING btree (a);\n\
            CREATE INDEX p_a ON ONLY public.parent USING btree (a);\n\
            ALTER TABLE public.t\n    ADD CONSTRAINT c CHECK ((a > 0)) NOT VALID;\n\
            ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_fk FOREIGN KEY (a) REFERENCES public.u(id);\n\
            ALTER INDEX public.p_a ATTACH PARTITION public.t_a;\n";
        let copied: std::collections::HashSet<(String, String)> = [
            ("public".to_string(), "t".to_string()),
            ("My".to_string(), "T 2".to_string()),
            ("public".to_string(), "u".to_string()),
        ]
        .into();
        let split = split_post_data(script, &copied).unwrap();
        let names: Vec<_> = split.tables.iter().map(|(n, _)| n.1.as_str()).collect();
        assert_eq!(names, ["t", "T 2"]);
        let t = steps(&split.tables[0].1).unwrap();
        let runs: Vec<(Option<String>, String)> = t
            .iter()
            .filter_map(|s| match s {
                Step::Run {
                    owner, statement, ..
                } => Some((owner.clone(), leading_words(statement, 2).join(" "))),
                Step::Setting(_) => None,
            })
            .collect();
        assert_eq!(
            runs,
            [
                (Some("alice".to_string()), "ALTER TABLE".to_string()),
                (Some("Bob".to_string()), "CREATE INDEX".to_string()),
                (Some("Bob".to_string()), "ALTER TABLE".to_string()),
            ]
        );
        // The tablespace in force at the index is the one it is built with.
        assert!(split.tables[0].1.contains(
            "SET default_tablespace = fast;\nSET SESSION AUTHORIZATION \"Bob\";\nCREATE INDEX t_a"
        ));
        let rest = steps(&split.rest).unwrap();
        let rest: Vec<String> = rest
            .iter()
            .filter_map(|s| match s {
                Step::Run { statement, .. } => Some(describe(statement)),
                Step::Setting(_) => None,
            })
            .collect();
        assert_eq!(
            rest,
            [
                "CREATE INDEX p_a ON ONLY public.parent USING btree",
                "ALTER TABLE ONLY public.t ADD CONSTRAINT t_fk FOREIGN KEY",
                "ALTER INDEX public.p_a ATTACH PARTITION public.t_a",
            ]
        );
    }

    const CREATE_DUMP: &str = "\\restrict abc123\n\
        --\n-- PostgreSQL database dump\n--\n\
        SET statement_timeout = 0;\n\
        SELECT pg_catalog.set_config('search_path', '', false);\n\
        CREATE DATABASE \"Sales & Ops\" WITH TEMPLATE = template0 ENCODING = 'UTF8' LOCALE_PROVIDER = libc LOCALE = 'C';\n\
        ALTER DATABASE \"Sales & Ops\" OWNER TO alice;\n\
        \\unrestrict abc123\n\
        \\encoding SQL_ASCII\n\
        \\connect -reuse-previous=on \"dbname='Sales & Ops'\"\n\
        \\restrict abc123\n\
        SET statement_timeout = 0;\n\
        ALTER DATABASE \"Sales & Ops\" SET work_mem TO '12MB';\n\
        \\unrestrict abc123\n\
        \\encoding SQL_ASCII\n\
        \\connect -reuse-previous=on \"dbname='Sales & Ops'\"\n\
        \\restrict abc123\n\
        CREATE TABLE public.t (\n    id integer\n);\n\
        \\unrestrict abc123\n";

    #[test]
    fn the_database_owner_is_the_authorization_at_create_database() {
        let before = vec![
            "SET statement_timeout = 0;".to_string(),
            "SET SESSION AUTHORIZATION 'Alice';".to_string(),
            "CREATE DATABASE app WITH TEMPLATE = template0;".to_string(),
        ];
        assert_eq!(database_owner(&before), Some("Alice".to_string()));
        assert_eq!(database_owner(&before[2..]), None);
        assert_eq!(
            describe("CREATE USER MAPPING FOR \"a b\" SERVER s OPTIONS (\n password 'secret'\n);"),
            "CREATE USER MAPPING FOR \"a b\" SERVER s OPTIONS"
        );
        assert_eq!(
            describe("ALTER TABLE ONLY s.t\n    ADD CONSTRAINT c CHECK (x);"),
            "ALTER TABLE ONLY s.t ADD CONSTRAINT c CHECK"
        );
    }

    #[test]
    fn splits_at_connect_and_drops_meta_commands() {
        let split = split(CREATE_DUMP).unwrap();
        assert_eq!(split.before_connect.len(), 4, "{:?}", split.before_connect);
        assert!(split.before_connect[2].starts_with("CREATE DATABASE"));
        assert_eq!(
            split.after_connect,
            "SET statement_timeout = 0;\n\
             ALTER DATABASE \"Sales & Ops\" SET work_mem TO '12MB';\n\
             CREATE TABLE public.t (\n    id integer\n);\n"
        );
    }

    #[test]
    fn a_function_body_line_starting_with_a_backslash_is_kept() {
        let body = "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$\n\\x41 is not a command\n\
                    \\c nor is this\n\\restrict x\n$$;\n";
        assert_eq!(split(body).unwrap().after_connect, body);
    }

    #[test]
    fn a_script_without_connect_is_all_inside() {
        let split = split("\\restrict k\nCREATE TABLE a (b int);\n\\unrestrict k\n").unwrap();
        assert!(split.before_connect.is_empty());
        assert_eq!(split.after_connect, "CREATE TABLE a (b int);\n");
    }

    #[test]
    fn database_statements_keep_only_the_database_ones() {
        let split = split(CREATE_DUMP).unwrap();
        let statements = database_statements(&split.before_connect);
        assert_eq!(statements.len(), 2, "{statements:?}");
        assert!(statements[0].starts_with("CREATE DATABASE \"Sales & Ops\""));
        assert_eq!(
            statements[1],
            "ALTER DATABASE \"Sales & Ops\" OWNER TO alice;"
        );
        // Classified by keywords, not by how the text starts.
        let commented = vec![
            "/* x */ COMMENT\n  ON DATABASE d IS 'a;\nCREATE DATABASE e;';".to_string(),
            "CREATE TABLE database (a int);".to_string(),
            "SELECT 'CREATE DATABASE x';".to_string(),
        ];
        assert_eq!(database_statements(&commented), commented[..1].to_vec());
    }

    /// The release-blocking attack: a comment whose last line looks like
    /// `\c`, and a second comment holding SQL. Only the two COMMENT
    /// statements come out, their literals intact.
    #[test]
    fn the_comment_attack_is_two_comments() {
        let first = "COMMENT ON TABLE public.t IS 'innocent\n\\c x''';";
        let second = "COMMENT ON COLUMN public.t.a IS '''; ALTER ROLE evil SUPERUSER; --''';";
        let dump = format!(
            "\\restrict k\nSET standard_conforming_strings = on;\n\
             CREATE TABLE public.t (\n    a integer\n);\n\n\
             ALTER TABLE public.t OWNER TO evil;\n\n\
             --\n-- Name: TABLE t; Type: COMMENT; Schema: public; Owner: evil\n--\n\n\
             {first}\n\n\
             --\n-- Name: COLUMN t.a; Type: COMMENT; Schema: public; Owner: evil\n--\n\n\
             {second}\n\n\\unrestrict k\n"
        );
        let split = split(&dump).unwrap();
        assert_eq!(
            split.after_connect,
            format!(
                "SET standard_conforming_strings = on;\nCREATE TABLE public.t (\n    a integer\n);\n\
                 ALTER TABLE public.t OWNER TO evil;\n{first}\n{second}\n"
            )
        );
    }

    #[test]
    fn hostile_scripts_are_refused() {
        for (script, expected) in [
            (
                "SELECT 1;\n\\! touch /tmp/x\n",
                ScriptError::UnexpectedMetaCommand {
                    name: "!".into(),
                    line: 2,
                },
            ),
            (
                "\\encoding SJIS\n\\connect a\nSELECT 1;\n",
                ScriptError::UnexpectedMetaCommand {
                    name: "encoding".into(),
                    line: 1,
                },
            ),
            (
                "\\connect a\nSELECT 1;\n\\connect a\n\\connect b\nSELECT 2;\n",
                ScriptError::SecondConnect { line: 4 },
            ),
            (
                "SET standard_conforming_strings = off;\nSELECT 'a\\'';\n",
                ScriptError::StandardStringsOff,
            ),
            (
                "COMMENT ON TABLE t IS 'open\n\\c x\n",
                ScriptError::Lex(LexError::Unterminated {
                    what: "quoted string",
                    line: 1,
                }),
            ),
        ] {
            assert_eq!(split(script), Err(expected), "{script}");
        }
        assert!(matches!(
            statements("\\connect x\nCREATE ROLE a;\n"),
            Err(ScriptError::UnexpectedMetaCommand { .. })
        ));
    }

    fn run(owner: Option<&str>, kind: StepKind, statement: &str) -> Step {
        Step::Run {
            owner: owner.map(str::to_string),
            kind,
            statement: statement.to_string(),
        }
    }

    /// pg_dump 15's `--use-set-session-authorization` output, as it reads.
    #[test]
    fn steps_follow_the_session_authorization() {
        let script = "SET statement_timeout = 0;\n\
            SELECT pg_catalog.set_config('search_path', '', false);\n\
            SET SESSION AUTHORIZATION 'alice';\n\
            ALTER DATABASE app SET work_mem TO '12MB';\n\
            ALTER SCHEMA public OWNER TO alice;\n\
            ALTER ROLE bob IN DATABASE app SET work_mem TO '3MB';\n\
            CREATE SCHEMA s;\n\
            SET SESSION AUTHORIZATION DEFAULT;\n\
            CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public;\n\
            SET SESSION AUTHORIZATION 'O''Brien \"x\"';\n\
            SET default_tablespace = '';\n\
            CREATE TABLE s.t (\n    a integer\n);\n\
            SET SESSION AUTHORIZATION bob;\n\
            GRANT SELECT ON TABLE s.t TO PUBLIC;\n\
            RESET SESSION AUTHORIZATION;\n\
            SET SESSION AUTHORIZATION \"Postgres\";\n\
            CREATE EVENT TRIGGER et ON ddl_command_end\n   EXECUTE FUNCTION public.evt();\n\
            CREATE OR REPLACE PROCEDURAL LANGUAGE plperlu;\n";
        assert_eq!(
            steps(script).unwrap(),
            vec![
                Step::Setting("SET statement_timeout = 0;".into()),
                Step::Setting("SELECT pg_catalog.set_config('search_path', '', false);".into()),
                run(
                    Some("alice"),
                    StepKind::NoCode,
                    "ALTER DATABASE app SET work_mem TO '12MB';"
                ),
                run(
                    Some("alice"),
                    StepKind::NoCode,
                    "ALTER SCHEMA public OWNER TO alice;"
                ),
                run(
                    Some("alice"),
                    StepKind::NoCode,
                    "ALTER ROLE bob IN DATABASE app SET work_mem TO '3MB';"
                ),
                run(Some("alice"), StepKind::Schema, "CREATE SCHEMA s;"),
                run(
                    None,
                    StepKind::Object,
                    "CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public;"
                ),
                Step::Setting("SET default_tablespace = '';".into()),
                run(
                    Some("O'Brien \"x\""),
                    StepKind::Object,
                    "CREATE TABLE s.t (\n    a integer\n);"
                ),
                run(
                    Some("bob"),
                    StepKind::Object,
                    "GRANT SELECT ON TABLE s.t TO PUBLIC;"
                ),
                run(
                    Some("Postgres"),
                    StepKind::SuperuserOnly,
                    "CREATE EVENT TRIGGER et ON ddl_command_end\n   EXECUTE FUNCTION public.evt();"
                ),
                run(
                    Some("Postgres"),
                    StepKind::SuperuserOnly,
                    "CREATE OR REPLACE PROCEDURAL LANGUAGE plperlu;"
                ),
            ]
        );
    }

    #[test]
    fn schema_privileges_come_before_the_objects() {
        let script = "SET SESSION AUTHORIZATION 'alice';\nCREATE SCHEMA s;\n\
            SET SESSION AUTHORIZATION 'carol';\nCREATE TABLE public.t (a integer);\n\
            GRANT SELECT ON TABLE public.t TO bob;\n\
            SET SESSION AUTHORIZATION 'pg_database_owner';\n\
            GRANT CREATE ON SCHEMA public TO carol;\n\
            SET SESSION AUTHORIZATION 'alice';\nREVOKE ALL ON SCHEMA s FROM PUBLIC;\n";
        let order: Vec<(Option<String>, String)> = steps(script)
            .unwrap()
            .into_iter()
            .filter_map(|step| match step {
                Step::Run {
                    owner, statement, ..
                } => Some((owner, statement)),
                Step::Setting(_) => None,
            })
            .collect();
        let owner = |o: &str| Some(o.to_string());
        assert_eq!(
            order,
            vec![
                (owner("alice"), "CREATE SCHEMA s;".to_string()),
                (
                    owner("pg_database_owner"),
                    "GRANT CREATE ON SCHEMA public TO carol;".to_string()
                ),
                (
                    owner("alice"),
                    "REVOKE ALL ON SCHEMA s FROM PUBLIC;".to_string()
                ),
                (
                    owner("carol"),
                    "CREATE TABLE public.t (a integer);".to_string()
                ),
                (
                    owner("carol"),
                    "GRANT SELECT ON TABLE public.t TO bob;".to_string()
                ),
            ]
        );
    }

    /// Text of an object's owner never becomes a step of its own, and every
    /// other way to change identity is refused.
    #[test]
    fn identity_changes_pg_dump_does_not_write_are_refused() {
        let inside_a_literal = "SET SESSION AUTHORIZATION 'evil';\n\
            COMMENT ON TABLE t IS 'x;\nRESET SESSION AUTHORIZATION;\nSET ROLE postgres;';\n";
        assert_eq!(
            steps(inside_a_literal).unwrap(),
            vec![run(
                Some("evil"),
                StepKind::Object,
                "COMMENT ON TABLE t IS 'x;\nRESET SESSION AUTHORIZATION;\nSET ROLE postgres;';"
            )]
        );
        for hostile in [
            "SET ROLE postgres;",
            "set role 'postgres';",
            "SET SESSION ROLE postgres;",
            "SET LOCAL ROLE postgres;",
            "RESET ROLE;",
            "RESET ALL;",
            "SET \"role\" = 'postgres';",
            "SET session_authorization = 'postgres';",
            "SET LOCAL SESSION AUTHORIZATION 'postgres';",
            "SET SESSION AUTHORIZATION 'a' || 'b';",
            "/* x */ SET\n ROLE\n postgres;",
            "SELECT pg_catalog.set_config('role', 'postgres', false);",
            "SELECT set_config('search_path', 'evil', false);",
            "SET LOCAL search_path = evil;",
            "RESET search_path;",
        ] {
            assert!(
                matches!(steps(hostile), Err(ScriptError::UnexpectedStatement { .. })),
                "{hostile}"
            );
        }
        assert!(matches!(
            steps("SELECT 1;\n\\connect x\n"),
            Err(ScriptError::UnexpectedMetaCommand { .. })
        ));
    }
}
