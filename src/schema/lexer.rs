//! A psql script cut into its statements and meta-commands, the way psql and
//! the server would cut it.
//!
//! pg_dump and pg_dumpall write psql scripts. Their text is built from
//! catalog contents that any owner of an object controls (comments, names,
//! function bodies, role settings), so the only safe way to find where a
//! statement ends, or whether a backslash starts a meta-command, is to lex
//! the script as PostgreSQL does: a `;` or a `\` means something only outside
//! string literals, quoted identifiers, comments and dollar quotes.
//!
//! The rules mirror psql's `psqlscan.l` (itself a copy of the backend's
//! `scan.l`): standard strings `'...'` (backslash-escape mode after
//! `SET standard_conforming_strings = off`), `E'...'`, `B'...'`, `X'...'`,
//! `N'...'`, `U&'...'`, string continuation across a newline, dollar quotes,
//! quoted identifiers, `--` and nested `/* */` comments, parenthesis depth,
//! and the `BEGIN ... END` depth psql 14+ tracks in `CREATE FUNCTION` and
//! `CREATE PROCEDURE` (SQL-standard bodies), where a `;` ends nothing.
//!
//! Where psql and the server differ, this follows the server, which runs the
//! text: psql feeds its lexer one line at a time and so misses a string
//! continued on the next line (`E'a'` newline `'b'`), which the server joins.
//!
//! Invariants:
//! * every [`Item::Statement`] is a slice of the input, byte for byte, from
//!   its first token (leading whitespace and `--` comments are dropped, as
//!   psql does) through its terminating `;`;
//! * a meta-command is recognised only where psql recognises one: a `\`
//!   outside any literal, identifier, comment or dollar quote; it runs to the
//!   end of its line;
//! * anything unterminated at the end of the input (literal, identifier,
//!   comment, dollar quote, statement) is an error, never silently accepted.

/// One piece of a psql script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// One complete SQL statement with its terminating `;`, exactly as in the
    /// script.
    Statement(String),
    /// A psql meta-command: `\name args`, up to the end of its line.
    MetaCommand {
        /// The command's name without the backslash (`connect`, `c`, `restrict`).
        name: String,
        /// The rest of the line, trimmed.
        args: String,
        /// The 1-based line of the script it is on.
        line: usize,
    },
}

/// Why a script could not be lexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    /// A literal, quoted identifier, comment or dollar quote never closes.
    #[error("unterminated {what} starting at line {line}")]
    Unterminated { what: &'static str, line: usize },
    /// Text after the last `;` that is more than whitespace and comments.
    #[error("statement starting at line {line} has no terminating semicolon")]
    UnterminatedStatement { line: usize },
    /// A meta-command in the middle of a statement: psql would run it and
    /// keep collecting the statement, which pg_dump never asks for.
    #[error("psql meta-command \\{name} at line {line} interrupts a statement")]
    MetaCommandInStatement { name: String, line: usize },
    /// `\;` or `\:`: psql rewrites those bytes before sending them, so the
    /// statement could not be kept byte for byte.
    #[error("unsupported psql escape \\{escaped} at line {line}")]
    UnsupportedEscape { escaped: char, line: usize },
    /// Arguments of a meta-command psql would read differently from a plain
    /// line: an unquoted backslash (another command, or `\\` back to SQL) or
    /// an unterminated quote.
    #[error("unexpected arguments of psql meta-command \\{name} at line {line}")]
    MetaCommandArguments { name: String, line: usize },
    /// A `SET standard_conforming_strings` whose value is not a plain on/off:
    /// the lexing mode of what follows would be a guess.
    #[error("unrecognised value of standard_conforming_strings at line {line}")]
    StandardStringsValue { line: usize },
}

/// Splits `script` into statements and meta-commands, starting with
/// standard_conforming_strings on (the server's default, and what pg_dump
/// writes at the top of every script).
pub fn lex(script: &str) -> Result<Vec<Item>, LexError> {
    Lexer::new(script).run()
}

/// What a statement does to standard_conforming_strings: `Some(true)` or
/// `Some(false)` for a `SET` or `RESET` of it (`RESET`/`DEFAULT` mean on, the
/// server's default), `None` for any other statement. An unrecognisable
/// value is an error. `line` is only for the error.
pub fn standard_strings_setting(statement: &str, line: usize) -> Result<Option<bool>, LexError> {
    let tokens = leading_tokens(statement, 6);
    let mut words = tokens.iter();
    let is = |token: Option<&Token>, word: &str| matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(word));
    let first = words.next();
    if is(first, "RESET") {
        let name = words.next();
        return Ok(is(name, "standard_conforming_strings").then_some(true));
    }
    if !is(first, "SET") {
        return Ok(None);
    }
    let mut name = words.next();
    if is(name, "SESSION") || is(name, "LOCAL") {
        name = words.next();
    }
    if !is(name, "standard_conforming_strings") {
        return Ok(None);
    }
    let separator = words.next();
    if !(is(separator, "TO") || matches!(separator, Some(Token::Symbol('=')))) {
        return Err(LexError::StandardStringsValue { line });
    }
    let value = match words.next() {
        Some(Token::Word(w)) | Some(Token::Literal(w)) => w.to_ascii_lowercase(),
        _ => return Err(LexError::StandardStringsValue { line }),
    };
    // The boolean spellings parse_bool accepts (unique prefixes aside).
    match value.as_str() {
        "on" | "true" | "yes" | "1" | "default" => Ok(Some(true)),
        "off" | "false" | "no" | "0" => Ok(Some(false)),
        _ => Err(LexError::StandardStringsValue { line }),
    }
}

/// A token at the start of a statement, as [`leading_tokens`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An unquoted word (keyword or identifier), as written.
    Word(String),
    /// A double-quoted identifier, unescaped (`""` made `"`).
    QuotedIdent(String),
    /// A standard string literal `'...'`, unescaped (`''` made `'`); other
    /// literals (E'', dollar quotes) end the reading.
    Literal(String),
    /// Any other single character: punctuation or an operator character.
    Symbol(char),
}

/// The first `max` tokens of a statement, skipping whitespace and comments:
/// enough to classify a statement by its leading keywords and read the
/// object it names. Reading stops early at anything it does not model
/// (E'' strings, dollar quotes, numbers), so callers must not expect `max`.
pub fn leading_tokens(statement: &str, max: usize) -> Vec<Token> {
    let bytes = statement.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() && tokens.len() < max {
        let c = bytes[i];
        if is_space(c) {
            i += 1;
        } else if bytes[i..].starts_with(b"--") {
            i = line_end(bytes, i);
        } else if bytes[i..].starts_with(b"/*") {
            match block_comment_end(bytes, i) {
                Some(end) => i = end,
                None => break,
            }
        } else if c == b'"' {
            match quoted_end(bytes, i + 1, b'"') {
                Some(end) => {
                    let inner = &statement[i + 1..end - 1];
                    tokens.push(Token::QuotedIdent(inner.replace("\"\"", "\"")));
                    i = end;
                }
                None => break,
            }
        } else if c == b'\'' {
            match quoted_end(bytes, i + 1, b'\'') {
                Some(end) => {
                    let inner = &statement[i + 1..end - 1];
                    tokens.push(Token::Literal(inner.replace("''", "'")));
                    i = end;
                }
                None => break,
            }
        } else if is_ident_start(c) {
            if matches!(bytes.get(i + 1), Some(b'\'' | b'&')) {
                break; // E'', B'', X'', N'', U&'': not modelled here
            }
            let end = ident_end(bytes, i);
            tokens.push(Token::Word(statement[i..end].to_string()));
            i = end;
        } else if c.is_ascii_digit() {
            let end = i + bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
            tokens.push(Token::Word(statement[i..end].to_string()));
            i = end;
        } else if c.is_ascii() && c != b'$' && c != b'\\' {
            tokens.push(Token::Symbol(c as char));
            i += 1;
        } else {
            break;
        }
    }
    tokens
}

/// How a single-quoted string treats backslashes and doubled quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringKind {
    /// `'...'` with standard_conforming_strings on, `U&'...'`: `''` is a quote.
    Standard,
    /// `E'...'`, or `'...'` with standard_conforming_strings off: a
    /// backslash escapes the next byte, `''` is a quote.
    Escape,
    /// `B'...'`, `X'...'`: nothing is escaped, the first quote ends it.
    Bits,
}

struct Lexer<'a> {
    text: &'a str,
    bytes: &'a [u8],
    /// standard_conforming_strings as the statements so far left it.
    standard_strings: bool,
    /// Parenthesis depth of the statement being read (psql's paren_depth).
    paren_depth: u32,
    /// BEGIN/CASE ... END depth inside CREATE FUNCTION/PROCEDURE (psql's begin_depth).
    begin_depth: u32,
    /// The first identifiers of the statement, as psql records them to spot
    /// CREATE [OR REPLACE] {FUNCTION|PROCEDURE}: the first letter of each
    /// keyword of interest, 0 for any other identifier.
    identifiers: [u8; 4],
    identifier_count: usize,
    /// Where the statement being read starts, once it has a first token.
    statement_start: Option<usize>,
    /// Whether that statement holds more than block comments.
    statement_has_code: bool,
    /// Line counting, done forwards only (positions asked are increasing).
    counted_to: usize,
    line: usize,
    items: Vec<Item>,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer {
            text,
            bytes: text.as_bytes(),
            standard_strings: true,
            paren_depth: 0,
            begin_depth: 0,
            identifiers: [0; 4],
            identifier_count: 0,
            statement_start: None,
            statement_has_code: false,
            counted_to: 0,
            line: 1,
            items: Vec::new(),
        }
    }

    /// The 1-based line of byte `position`: counted on from the last
    /// position asked, since positions mostly come in order.
    fn line_at(&mut self, position: usize) -> usize {
        let position = position.min(self.bytes.len());
        if position < self.counted_to {
            self.counted_to = 0;
            self.line = 1;
        }
        if position > self.counted_to {
            self.line += self.bytes[self.counted_to..position]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            self.counted_to = position;
        }
        self.line
    }

    /// Notes that a token starts at `position`: the statement starts there
    /// if it had not yet. `code` is false for a block comment.
    fn token(&mut self, position: usize, code: bool) {
        if self.statement_start.is_none() {
            self.statement_start = Some(position);
        }
        self.statement_has_code |= code;
    }

    fn unterminated(&mut self, what: &'static str, start: usize) -> LexError {
        LexError::Unterminated {
            what,
            line: self.line_at(start),
        }
    }

    fn run(mut self) -> Result<Vec<Item>, LexError> {
        let bytes = self.bytes;
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            let next = bytes.get(i + 1).copied();
            match c {
                _ if is_space(c) => i += 1,
                // A `--` comment: dropped before a statement starts, as psql
                // does; inside one it stays in the slice.
                b'-' if next == Some(b'-') => i = line_end(bytes, i),
                b'/' if next == Some(b'*') => {
                    self.token(i, false);
                    i = block_comment_end(bytes, i)
                        .ok_or_else(|| self.unterminated("comment", i))?;
                }
                b'\'' => {
                    self.token(i, true);
                    let kind = if self.standard_strings {
                        StringKind::Standard
                    } else {
                        StringKind::Escape
                    };
                    i = self.string(i, i + 1, kind)?;
                }
                b'"' => {
                    self.token(i, true);
                    i = quoted_end(bytes, i + 1, b'"')
                        .ok_or_else(|| self.unterminated("quoted identifier", i))?;
                }
                b'$' => {
                    self.token(i, true);
                    i = self.dollar(i)?;
                }
                b'(' => {
                    self.token(i, true);
                    self.paren_depth += 1;
                    i += 1;
                }
                b')' => {
                    self.token(i, true);
                    self.paren_depth = self.paren_depth.saturating_sub(1);
                    i += 1;
                }
                b';' => {
                    self.token(i, true);
                    i += 1;
                    if self.paren_depth == 0 && self.begin_depth == 0 {
                        self.end_statement(i)?;
                    }
                }
                b'\\' => i = self.backslash(i)?,
                _ if is_ident_start(c) => {
                    self.token(i, true);
                    i = self.word(i)?;
                }
                _ if c.is_ascii_digit() => {
                    // A number; what follows it is lexed afresh, as psql does
                    // (the server rejects a number glued to a word).
                    self.token(i, true);
                    i += bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                }
                _ => {
                    // Operators and other punctuation, one ASCII byte at a
                    // time: a comment start inside an operator is still seen.
                    self.token(i, true);
                    i += 1;
                }
            }
        }
        if let Some(start) = self.statement_start {
            if self.statement_has_code {
                return Err(LexError::UnterminatedStatement {
                    line: self.line_at(start),
                });
            }
        }
        Ok(self.items)
    }

    /// Ends the statement at `end` (just past its `;`).
    fn end_statement(&mut self, end: usize) -> Result<(), LexError> {
        let start = self.statement_start.take().unwrap_or(end - 1);
        let statement = &self.text[start..end];
        self.statement_has_code = false;
        self.identifier_count = 0;
        let line = self.line_at(start);
        if let Some(on) = standard_strings_setting(statement, line)? {
            self.standard_strings = on;
        }
        self.items.push(Item::Statement(statement.to_string()));
        Ok(())
    }

    /// A word starting at `start` (an identifier start byte): a string
    /// prefix (`E'`, `B'`, `X'`, `N'`, `U&'`, `U&"`) or an identifier.
    fn word(&mut self, start: usize) -> Result<usize, LexError> {
        let bytes = self.bytes;
        let c = bytes[start].to_ascii_lowercase();
        let next = bytes.get(start + 1).copied();
        match (c, next) {
            (b'e', Some(b'\'')) => self.string(start, start + 2, StringKind::Escape),
            (b'b' | b'x', Some(b'\'')) => self.string(start, start + 2, StringKind::Bits),
            // N'...' is an ordinary string after the N (psql eats only the N).
            (b'n', Some(b'\'')) => Ok(start + 1),
            (b'u', Some(b'&')) => match bytes.get(start + 2) {
                Some(b'\'') => self.string(start, start + 3, StringKind::Standard),
                Some(b'"') => quoted_end(bytes, start + 3, b'"')
                    .ok_or_else(|| self.unterminated("quoted identifier", start)),
                // `U&` not followed by a quote: the U alone, not an identifier.
                _ => Ok(start + 1),
            },
            _ => {
                let end = ident_end(bytes, start);
                let text = self.text;
                self.identifier(&text[start..end]);
                Ok(end)
            }
        }
    }

    /// psql's BEGIN ... END tracking: inside CREATE [OR REPLACE]
    /// {FUNCTION|PROCEDURE}, outside parentheses, BEGIN opens a block, CASE
    /// opens one inside a block, END closes one; a `;` ends the statement
    /// only outside every block (SQL-standard bodies, BEGIN ATOMIC).
    fn identifier(&mut self, word: &str) {
        if self.identifier_count == 0 {
            self.identifiers = [0; 4];
        }
        let lower = word.to_ascii_lowercase();
        if matches!(
            lower.as_str(),
            "create" | "function" | "procedure" | "or" | "replace"
        ) && self.identifier_count < self.identifiers.len()
        {
            self.identifiers[self.identifier_count] = lower.as_bytes()[0];
        }
        self.identifier_count += 1;
        let ids = self.identifiers;
        let creates_routine = ids[0] == b'c'
            && (matches!(ids[1], b'f' | b'p')
                || (ids[1] == b'o' && ids[2] == b'r' && matches!(ids[3], b'f' | b'p')));
        if creates_routine && self.paren_depth == 0 {
            match lower.as_str() {
                "begin" => self.begin_depth += 1,
                "case" if self.begin_depth >= 1 => self.begin_depth += 1,
                "end" => self.begin_depth = self.begin_depth.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// A single-quoted string whose opening quote is just before `body`
    /// (`start` is where its token starts, for errors); returns the position
    /// after it, following continuations (`'a'` newline `'b'` is one string,
    /// in the mode of the first part, as the server's xqs state has it).
    fn string(&mut self, start: usize, body: usize, kind: StringKind) -> Result<usize, LexError> {
        let bytes = self.bytes;
        let mut i = body;
        loop {
            match bytes.get(i) {
                None => return Err(self.unterminated("quoted string", start)),
                Some(b'\\') if kind == StringKind::Escape => {
                    if i + 1 >= bytes.len() {
                        return Err(self.unterminated("quoted string", start));
                    }
                    i += 2;
                }
                Some(b'\'') => {
                    if kind != StringKind::Bits && bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                    } else {
                        match continuation(bytes, i + 1) {
                            Some(resume) => i = resume,
                            None => return Ok(i + 1),
                        }
                    }
                }
                Some(_) => i += 1,
            }
        }
    }

    /// At a `$`: a parameter (`$1`), a dollar quote (`$$...$$`,
    /// `$tag$...$tag$`), or a lone `$`. Returns the position after it.
    fn dollar(&mut self, start: usize) -> Result<usize, LexError> {
        let bytes = self.bytes;
        let mut j = start + 1;
        if bytes.get(j).is_some_and(u8::is_ascii_digit) {
            return Ok(j + bytes[j..].iter().take_while(|b| b.is_ascii_digit()).count());
        }
        // The tag: an identifier that may not contain `$` nor start with a digit.
        if bytes.get(j).is_some_and(|&b| is_ident_start(b)) {
            j += bytes[j..]
                .iter()
                .take_while(|&&b| is_ident_start(b) || b.is_ascii_digit())
                .count();
        }
        if bytes.get(j) != Some(&b'$') {
            // psql's dolqfailed: only the `$` is taken; the rest is lexed anew.
            return Ok(start + 1);
        }
        let delimiter = &bytes[start..=j];
        let body = j + 1;
        match find(&bytes[body..], delimiter) {
            Some(at) => Ok(body + at + delimiter.len()),
            None => Err(self.unterminated("dollar-quoted string", start)),
        }
    }

    /// At a `\` outside any literal: a meta-command running to the end of
    /// the line. Returns the position of that line's end.
    fn backslash(&mut self, start: usize) -> Result<usize, LexError> {
        let bytes = self.bytes;
        let line = self.line_at(start);
        if let Some(&escaped @ (b';' | b':')) = bytes.get(start + 1) {
            return Err(LexError::UnsupportedEscape {
                escaped: escaped as char,
                line,
            });
        }
        let end = line_end_newline(bytes, start);
        let name_start = start + 1;
        let mut name_end = name_start
            + bytes[name_start..end]
                .iter()
                .take_while(|&&b| is_ident_start(b) || b.is_ascii_digit())
                .count();
        if name_end == name_start && name_end < end {
            // A one-character command such as `\!`, `\?`, `\\`; a
            // multi-byte character counts whole.
            name_end += self.text[name_start..end]
                .chars()
                .next()
                .map_or(1, char::len_utf8);
        }
        let name = self.text[name_start..name_end].to_string();
        if self.statement_start.is_some() {
            return Err(LexError::MetaCommandInStatement { name, line });
        }
        let args = &self.text[name_end..end];
        if !plain_arguments(args.as_bytes()) {
            return Err(LexError::MetaCommandArguments { name, line });
        }
        let args = args.trim().to_string();
        self.items.push(Item::MetaCommand { name, args, line });
        Ok(end)
    }
}

/// Whether psql would read `args` as the arguments of one command: every
/// quote closed on the line and no unquoted backslash (which would start
/// another command, or with `\\` return to SQL on the same line).
fn plain_arguments(args: &[u8]) -> bool {
    let mut i = 0;
    while i < args.len() {
        match args[i] {
            b'\\' => return false,
            b'\'' => {
                // psql's single-quoted option: `''` and backslash escapes.
                i += 1;
                loop {
                    match args.get(i) {
                        None => return false,
                        Some(b'\\') => i += 2,
                        Some(b'\'') if args.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => break,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            quote @ (b'"' | b'`') => match quoted_end(args, i + 1, quote) {
                Some(end) => i = end,
                None => return false,
            },
            _ => i += 1,
        }
    }
    true
}

/// Where a string that closed just before `from` continues, if it does: the
/// server's `{whitespace_with_newline}{quote}`, i.e. horizontal whitespace or
/// `--` comments, at least one newline, any whitespace or newline-terminated
/// `--` comments, then a quote. Returns the position after that quote.
fn continuation(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let mut newline = false;
    loop {
        match bytes.get(i) {
            Some(b' ' | b'\t' | 0x0c) => i += 1,
            Some(b'\n' | b'\r') => {
                newline = true;
                i += 1;
            }
            Some(b'-') if bytes.get(i + 1) == Some(&b'-') => {
                let end = line_end(bytes, i);
                if newline && end >= bytes.len() {
                    // After the newline, a comment must itself end in one.
                    return None;
                }
                i = end;
            }
            Some(b'\'') if newline => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The end of a `/* */` comment starting at `start` (comments nest), or None.
fn block_comment_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start + 2;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"*/") {
            if depth == 0 {
                return Some(i + 2);
            }
            depth -= 1;
            i += 2;
        } else if bytes[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

/// The position after the closing `quote` of a quoted run whose body starts
/// at `body`, where a doubled quote stands for itself; None if unclosed.
fn quoted_end(bytes: &[u8], body: usize, quote: u8) -> Option<usize> {
    let mut i = body;
    while i < bytes.len() {
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// The end of an identifier starting at `start`: letters, digits, `_`, `$`
/// and any non-ASCII byte.
fn ident_end(bytes: &[u8], start: usize) -> usize {
    start
        + bytes[start..]
            .iter()
            .take_while(|&&b| is_ident_start(b) || b.is_ascii_digit() || b == b'$')
            .count()
}

/// The position of the next `\n` or `\r` from `from` (a `--` comment's end).
fn line_end(bytes: &[u8], from: usize) -> usize {
    from + bytes[from..]
        .iter()
        .take_while(|&&b| b != b'\n' && b != b'\r')
        .count()
}

/// The position of the next `\n` from `from` (a meta-command's end: psql
/// reads its input in lines split at `\n`).
fn line_end_newline(bytes: &[u8], from: usize) -> usize {
    from + bytes[from..].iter().take_while(|&&b| b != b'\n').count()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The server's whitespace: space, tab, newline, carriage return, form feed.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

/// `[A-Za-z\200-\377_]`: what may start an identifier (every byte of a
/// multi-byte UTF-8 character is in the high range).
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements(script: &str) -> Vec<String> {
        lex(script)
            .unwrap_or_else(|e| panic!("{e}: {script:?}"))
            .into_iter()
            .filter_map(|item| match item {
                Item::Statement(s) => Some(s),
                Item::MetaCommand { .. } => None,
            })
            .collect()
    }

    fn meta(name: &str, args: &str, line: usize) -> Item {
        Item::MetaCommand {
            name: name.into(),
            args: args.into(),
            line,
        }
    }

    fn st(text: &str) -> Item {
        Item::Statement(text.into())
    }

    /// The attack of the release-blocking report: a first comment whose
    /// last line looks like `\c`, then a second comment that would run as
    /// SQL if that line were dropped.
    #[test]
    fn the_comment_attack_yields_exactly_the_two_comments() {
        let first = "COMMENT ON TABLE public.t IS 'innocent\n\\c x''';";
        let second = "COMMENT ON COLUMN public.t.a IS '''; ALTER ROLE evil SUPERUSER; --''';";
        let script = format!(
            "\\restrict k\nSET standard_conforming_strings = on;\n{first}\n\n\
             --\n-- Name: t a\n--\n\n{second}\n\\unrestrict k\n"
        );
        assert_eq!(
            lex(&script).unwrap(),
            vec![
                meta("restrict", "k", 1),
                st("SET standard_conforming_strings = on;"),
                st(first),
                st(second),
                meta("unrestrict", "k", 11),
            ]
        );
    }

    #[test]
    fn backslash_lines_inside_literals_are_text() {
        for body in [
            "'\n\\c postgres\n'",
            "'\n\\restrict abc\n\\unrestrict abc\n'",
            "E'\n\\c x\\'\n\\connect y\n'",
            "$$\n\\c x\n;\n$$",
            "$fn$\n\\restrict k\n$$ ; $fn$",
            "\"\n\\c x\n\"",
        ] {
            let statement = format!("SELECT {body};");
            assert_eq!(statements(&statement), vec![statement.clone()], "{body}");
        }
        let commented = "/* \n\\c x\n */ SELECT 1;";
        assert_eq!(statements(commented), vec![commented]);
    }

    #[test]
    fn meta_commands_are_recognised_outside_literals_only() {
        let script = "\\connect -reuse-previous=on \"dbname='a\\\\b ''c'''\"\n\
                      SELECT 1;\n\\c db\r\nSELECT ';\n\\c no';\n";
        assert_eq!(
            lex(script).unwrap(),
            vec![
                meta("connect", "-reuse-previous=on \"dbname='a\\\\b ''c'''\"", 1),
                st("SELECT 1;"),
                meta("c", "db", 3),
                st("SELECT ';\n\\c no';"),
            ]
        );
    }

    #[test]
    fn suspicious_meta_commands_are_errors() {
        assert!(matches!(
            lex("SELECT 1\n\\c x\n;"),
            Err(LexError::MetaCommandInStatement { line: 2, .. })
        ));
        assert!(matches!(
            lex("SELECT 1 \\; SELECT 2;"),
            Err(LexError::UnsupportedEscape { escaped: ';', .. })
        ));
        assert!(matches!(
            lex("\\c x \\\\ DROP TABLE t;\n"),
            Err(LexError::MetaCommandArguments { .. })
        ));
        assert!(matches!(
            lex("\\c 'x\n"),
            Err(LexError::MetaCommandArguments { .. })
        ));
        // Any other command is lexed; refusing it is the caller's choice.
        assert_eq!(lex("\\! rm -rf /").unwrap(), vec![meta("!", "rm -rf /", 1)]);
    }

    #[test]
    fn unterminated_input_is_an_error() {
        for (script, what) in [
            ("COMMENT ON TABLE t IS 'never closed;\n", "quoted string"),
            ("SELECT E'\\';", "quoted string"),
            ("SELECT E'\\", "quoted string"),
            ("SELECT \"x;", "quoted identifier"),
            ("SELECT U&\"x;", "quoted identifier"),
            ("SELECT $a$ x $b$;", "dollar-quoted string"),
            ("SELECT 1 /* /* */;", "comment"),
            ("SELECT B'01;", "quoted string"),
        ] {
            match lex(script) {
                Err(LexError::Unterminated { what: got, line: 1 }) => {
                    assert_eq!(got, what, "{script}")
                }
                other => panic!("{script}: {other:?}"),
            }
        }
        assert_eq!(
            lex("SELECT 1;\nSELECT 2"),
            Err(LexError::UnterminatedStatement { line: 2 })
        );
        assert_eq!(
            lex("SELECT (1;"),
            Err(LexError::UnterminatedStatement { line: 1 })
        );
        // Trailing comments alone are no statement.
        assert_eq!(lex("SELECT 1;\n-- end\n/* done */\n").unwrap().len(), 1);
    }

    #[test]
    fn quotes_and_escapes() {
        let cases = [
            "SELECT 'it''s; \\';",
            "SELECT E'it\\'s; '';';",
            "SELECT e'\\\\';",
            "SELECT U&'d\\0061t''a;';",
            "SELECT N'x;''y';",
            "SELECT B'01', X'1F';",
            "SELECT \"a\"\"b;\" FROM \"x\"\"\";",
            "SELECT U&\"d;\"\"\";",
            "SELECT 'a' -- ;\n  'b;' ;",
        ];
        for case in cases {
            assert_eq!(statements(case), vec![case], "{case}");
        }
        // A word ending in e is no E'' prefix: the quote is a standard string.
        assert_eq!(statements("SELECT somE'\\';"), vec!["SELECT somE'\\';"]);
        // U& alone is no prefix either.
        assert_eq!(
            statements("SELECT u&'x'; SELECT 1 u &2;").len(),
            2,
            "u& then a string"
        );
    }

    #[test]
    fn a_continued_string_keeps_its_escape_mode() {
        // The server joins E'a' and the next line's '...' into one E string,
        // so `\'` there escapes the quote and the `;` is text.
        let script = "SELECT E'a'\n'\\'; DROP TABLE t; --';";
        assert_eq!(statements(script), vec![script]);
        // With a comment between the parts.
        let script = "SELECT E'a' -- note\n  -- more\n'\\'; x';";
        assert_eq!(statements(script), vec![script]);
        // Without a newline there is no continuation: two strings.
        let script = "SELECT E'a' '\\'; SELECT 2;";
        assert_eq!(statements(script), vec!["SELECT E'a' '\\';", "SELECT 2;"]);
    }

    #[test]
    fn dollar_quotes() {
        let cases = [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT ';'; $$;",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ $$ ; $b$ $body$;",
            "SELECT $_x1$;$_x1$;",
            "SELECT $a$ $ab$ ; $a$;",
            "SELECT $é$;$é$;",
        ];
        for case in cases {
            assert_eq!(statements(case), vec![case], "{case}");
        }
        // Not delimiters: a parameter, a word containing `$`, a `$` before a digit.
        assert_eq!(
            statements("PREPARE p AS SELECT $1; SELECT a$b$; SELECT 1 $1;").len(),
            3
        );
        // $1a is no tag; $a b is a lone `$` then a word.
        assert_eq!(statements("SELECT $a b; SELECT 2;").len(), 2);
    }

    #[test]
    fn comments_nest_and_hide_everything() {
        let script = "/* a /* b ; */ ' */ SELECT 1 /* ; */;";
        assert_eq!(statements(script), vec![script]);
        let script = "SELECT 1 +-- ;\n 2;";
        assert_eq!(statements(script), vec![script]);
        let script = "SELECT 2 */* ; */ 3;";
        assert_eq!(statements(script), vec![script]);
        // Leading `--` comments are not part of the statement, block ones are.
        assert_eq!(
            statements("-- Name: t\n\n/* c */ SELECT 1;"),
            vec!["/* c */ SELECT 1;"]
        );
    }

    #[test]
    fn parentheses_hold_semicolons() {
        let script = "CREATE RULE r AS ON INSERT TO t DO ALSO (SELECT 1; SELECT 2);";
        assert_eq!(statements(script), vec![script]);
        // An unmatched `)` does not go below zero.
        assert_eq!(statements("SELECT 1); SELECT 2;").len(), 2);
    }

    #[test]
    fn begin_atomic_bodies_hold_semicolons() {
        let function = "CREATE FUNCTION public.f(a integer) RETURNS integer\n    LANGUAGE sql\n\
                        BEGIN ATOMIC\n SELECT CASE WHEN a > 0 THEN 1 ELSE 2 END;\n \
                        SELECT ';\n\\c x';\nEND;";
        let procedure = "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END;";
        let script = format!("{function}\n{procedure}\nSELECT 1;\n");
        assert_eq!(statements(&script), vec![function, procedure, "SELECT 1;"]);
        // Outside CREATE FUNCTION, BEGIN is a transaction start.
        assert_eq!(statements("BEGIN; SELECT 1; END;").len(), 3);
        // In parentheses (argument names), BEGIN counts for nothing.
        let script = "CREATE FUNCTION f(begin int) RETURNS int LANGUAGE sql AS 'SELECT 1';";
        assert_eq!(statements(script), vec![script]);
    }

    #[test]
    fn standard_conforming_strings_off_switches_to_escapes() {
        let script = "SET standard_conforming_strings = off;\n\
                      SELECT 'a\\'; b';\n\
                      SET standard_conforming_strings TO 'on';\n\
                      SELECT '\\';\n";
        assert_eq!(
            statements(script),
            vec![
                "SET standard_conforming_strings = off;",
                "SELECT 'a\\'; b';",
                "SET standard_conforming_strings TO 'on';",
                "SELECT '\\';",
            ]
        );
        assert_eq!(
            standard_strings_setting("SET SESSION standard_conforming_strings = false;", 1),
            Ok(Some(false))
        );
        assert_eq!(
            standard_strings_setting("RESET standard_conforming_strings;", 1),
            Ok(Some(true))
        );
        assert_eq!(
            standard_strings_setting("SET search_path = '';", 1),
            Ok(None)
        );
        assert!(standard_strings_setting("SET standard_conforming_strings = maybe;", 1).is_err());
    }

    #[test]
    fn leading_tokens_skip_comments() {
        assert_eq!(
            leading_tokens(
                "/* x */ -- y\n ALTER ROLE \"a \"\"b\"\" c\" SET x TO 'it''s';",
                8
            ),
            vec![
                Token::Word("ALTER".into()),
                Token::Word("ROLE".into()),
                Token::QuotedIdent("a \"b\" c".into()),
                Token::Word("SET".into()),
                Token::Word("x".into()),
                Token::Word("TO".into()),
                Token::Literal("it's".into()),
                Token::Symbol(';'),
            ]
        );
        assert_eq!(leading_tokens("SELECT E'x'", 5).len(), 1);
    }

    #[test]
    fn multi_byte_text_is_kept_whole() {
        let script = "COMMENT ON TABLE \"tåble\" IS 'ünïcödé ; \\c ☃';\nSELECT ☃;";
        assert_eq!(
            statements(script),
            vec![
                "COMMENT ON TABLE \"tåble\" IS 'ünïcödé ; \\c ☃';",
                "SELECT ☃;"
            ]
        );
        assert_eq!(lex("\\é x\n").unwrap(), vec![meta("é", "x", 1)]);
    }

    /// Cheap fuzzing: no input makes the lexer panic, and statements are
    /// always slices that end with `;`.
    #[test]
    fn arbitrary_input_never_panics() {
        let alphabet: &[&str] = &[
            "'",
            "\"",
            "$",
            "$a$",
            "\\",
            "\n",
            ";",
            "(",
            ")",
            "--",
            "/*",
            "*/",
            "E",
            "U&",
            "x",
            " ",
            "é",
            "begin",
            "create function",
            "end",
            "\r",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut script = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                script.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            if let Ok(items) = lex(&script) {
                for item in items {
                    if let Item::Statement(s) = item {
                        assert!(s.ends_with(';') && script.contains(&s), "{script:?}");
                    }
                }
            }
        }
    }
}
