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
}
