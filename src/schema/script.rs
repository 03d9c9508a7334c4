//! pg_dump's plain-format output, made runnable inside the server.
//!
//! pg_dump writes a psql script: SQL statements plus a few psql
//! meta-commands, each alone on its line (`\connect`, and since 15.14
//! `\restrict`/`\unrestrict` around the whole script). The server runs the
//! SQL; the meta-commands are dropped, and a `\connect` marks where the
//! statements about the database itself (run in the control database) end
//! and those inside it begin.

/// A script split at its first `\connect`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SplitScript {
    /// Statements before the first `\connect` (with `--create`: CREATE
    /// DATABASE and ALTER DATABASE ... OWNER).
    pub before_connect: String,
    /// Everything after it (or the whole script when there is none).
    pub after_connect: String,
}

/// Whether a line is one of the psql meta-commands pg_dump writes into a
/// schema dump: `\connect` and, since 15.14, `\restrict`/`\unrestrict`.
/// Matching those by name (rather than any line starting with a backslash)
/// keeps a function body line that happens to start with one intact.
fn is_meta_command(line: &str) -> bool {
    ["\\connect ", "\\c ", "\\restrict ", "\\unrestrict "]
        .iter()
        .any(|command| line.starts_with(command))
}

/// Splits at the first `\connect` and drops meta-commands.
pub fn split(script: &str) -> SplitScript {
    let mut out = SplitScript::default();
    let mut seen_connect = false;
    for line in script.lines() {
        if is_meta_command(line) {
            if line.starts_with("\\connect ") || line.starts_with("\\c ") {
                seen_connect = true;
            }
            continue;
        }
        let target = if seen_connect {
            &mut out.after_connect
        } else {
            &mut out.before_connect
        };
        target.push_str(line);
        target.push('\n');
    }
    if !seen_connect {
        out.after_connect = std::mem::take(&mut out.before_connect);
    }
    out
}

/// Statements of `before_connect` that are worth running: pg_dump starts
/// every script with session SETs and a `set_config` of search_path, which
/// mean nothing for the single CREATE DATABASE run at top level.
pub fn database_statements(before_connect: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in before_connect.lines() {
        if current.is_empty() && (line.is_empty() || line.starts_with("--")) {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            let statement = std::mem::take(&mut current);
            let head = statement.trim_start().to_ascii_uppercase();
            if head.starts_with("CREATE DATABASE")
                || head.starts_with("ALTER DATABASE")
                || head.starts_with("COMMENT ON DATABASE")
            {
                statements.push(statement.trim().to_string());
            }
        }
    }
    statements
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
        \\connect -reuse-previous=on \"dbname='Sales & Ops'\"\n\
        \\restrict abc123\n\
        SET statement_timeout = 0;\n\
        CREATE TABLE public.t (\n    id integer\n);\n\
        \\unrestrict abc123\n";

    #[test]
    fn splits_at_connect_and_drops_meta_commands() {
        let split = split(CREATE_DUMP);
        assert!(split.before_connect.contains("CREATE DATABASE"));
        assert!(!split.before_connect.contains("CREATE TABLE"));
        assert!(split.after_connect.contains("CREATE TABLE public.t"));
        assert!(
            !split.after_connect.contains("\\"),
            "{}",
            split.after_connect
        );
        assert!(!split.before_connect.contains("\\"));
    }

    #[test]
    fn a_function_body_line_starting_with_a_backslash_is_kept() {
        let body =
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$\n\\x41 is not a command\n$$;\n";
        assert_eq!(split(body).after_connect, body);
    }

    #[test]
    fn a_script_without_connect_is_all_inside() {
        let split = split("\\restrict k\nCREATE TABLE a (b int);\n\\unrestrict k\n");
        assert_eq!(split.before_connect, "");
        assert_eq!(split.after_connect, "CREATE TABLE a (b int);\n");
    }

    #[test]
    fn database_statements_keep_only_the_database_ones() {
        let split = split(CREATE_DUMP);
        let statements = database_statements(&split.before_connect);
        assert_eq!(statements.len(), 2, "{statements:?}");
        assert!(statements[0].starts_with("CREATE DATABASE \"Sales & Ops\""));
        assert_eq!(
            statements[1],
            "ALTER DATABASE \"Sales & Ops\" OWNER TO alice;"
        );
    }
}
