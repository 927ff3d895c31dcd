//! SQL script text: statement splitting, `-- schemagate:` directives, checksums and the
//! body that runs inside the engine's own transaction.
//!
//! The splitter is a lexer, not a parser: it knows where statements end (quotes, comments,
//! dollar quotes, `BEGIN ATOMIC` and trigger bodies, MySQL `DELIMITER`) so that a failure can
//! name the statement and non-transactional migrations can run one statement at a time.

/// The SQL dialects the engine speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Postgres,
    Sqlite,
    MySql,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
            Dialect::MySql => "mysql",
        }
    }
}

/// One statement of a script, as byte offsets into the script text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// Offset of the first significant character (comments before it are skipped).
    pub start: usize,
    /// Offset just past the statement's last significant character (the delimiter excluded).
    pub end: usize,
    /// Offset just past the delimiter (or the end of the text).
    pub after: usize,
    /// 1-based line of `start`.
    pub line: usize,
    /// The first words, upper-cased (at most six), for classifying the statement.
    pub words: Vec<String>,
}

impl Statement {
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        &sql[self.start..self.end]
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// Splits a script into statements. Empty statements (only comments or whitespace) are dropped.
pub fn split(sql: &str, dialect: Dialect) -> Vec<Statement> {
    Splitter {
        b: sql.as_bytes(),
        dialect,
        i: 0,
        line: 1,
        out: Vec::new(),
    }
    .run()
}

struct Splitter<'a> {
    b: &'a [u8],
    dialect: Dialect,
    i: usize,
    line: usize,
    out: Vec<Statement>,
}

#[derive(Default)]
struct Current {
    start: Option<(usize, usize)>,
    end: usize,
    words: Vec<String>,
    depth: usize,
    /// Open parentheses: a `;` inside them (a rule's `DO (a; b)`) does not end a statement.
    parens: usize,
    begin_pending: bool,
    last_word_end: usize,
    last_word: String,
}

impl Current {
    fn mark(&mut self, at: usize, line: usize, end: usize) {
        if self.start.is_none() {
            self.start = Some((at, line));
        }
        self.end = end;
    }
}

impl Splitter<'_> {
    fn peek(&self, off: usize) -> Option<u8> {
        self.b.get(self.i + off).copied()
    }

    fn run(mut self) -> Vec<Statement> {
        let mut cur = Current::default();
        let mut delimiter: Vec<u8> = b";".to_vec();
        while self.i < self.b.len() {
            let c = self.b[self.i];
            if self.dialect == Dialect::MySql
                && cur.start.is_none()
                && self.at_line_start()
                && let Some(new) = self.delimiter_command()
            {
                delimiter = new;
                continue;
            }
            if cur.depth == 0 && cur.parens == 0 && self.b[self.i..].starts_with(&delimiter) {
                self.i += delimiter.len();
                self.finish(&mut cur);
                continue;
            }
            match c {
                b'\n' => {
                    self.line += 1;
                    self.i += 1;
                }
                b'-' if self.peek(1) == Some(b'-') && self.line_comment_ok() => self.skip_line(),
                b'#' if self.dialect == Dialect::MySql => self.skip_line(),
                b'/' if self.peek(1) == Some(b'*') => self.skip_block_comment(),
                b'\'' => {
                    let at = self.i;
                    let backslash = match self.dialect {
                        Dialect::MySql => true,
                        Dialect::Postgres => {
                            cur.last_word_end == at && cur.last_word.eq_ignore_ascii_case("e")
                        }
                        Dialect::Sqlite => false,
                    };
                    self.skip_quoted(b'\'', backslash);
                    cur.mark(at, self.line_of(at), self.i);
                }
                b'"' => {
                    let at = self.i;
                    self.skip_quoted(b'"', self.dialect == Dialect::MySql);
                    cur.mark(at, self.line_of(at), self.i);
                }
                b'`' if self.dialect != Dialect::Postgres => {
                    let at = self.i;
                    self.skip_quoted(b'`', false);
                    cur.mark(at, self.line_of(at), self.i);
                }
                b'[' if self.dialect == Dialect::Sqlite => {
                    let at = self.i;
                    self.skip_until(b']');
                    cur.mark(at, self.line_of(at), self.i);
                }
                // `$` right after a word is part of that identifier (PostgreSQL allows it).
                b'$' if self.dialect == Dialect::Postgres
                    && (cur.last_word.is_empty() || cur.last_word_end != self.i) =>
                {
                    let at = self.i;
                    if let Some(tag) = self.dollar_tag() {
                        self.skip_dollar(&tag);
                    } else {
                        self.i += 1;
                    }
                    cur.mark(at, self.line_of(at), self.i);
                }
                c if is_ident(c) => {
                    let at = self.i;
                    let line = self.line;
                    while self.i < self.b.len()
                        && (is_ident(self.b[self.i])
                            || (self.dialect == Dialect::Postgres && self.b[self.i] == b'$'))
                    {
                        self.i += 1;
                    }
                    let word = String::from_utf8_lossy(&self.b[at..self.i]).to_ascii_uppercase();
                    cur.mark(at, line, self.i);
                    self.on_word(&mut cur, word);
                }
                c if c.is_ascii_whitespace() => self.i += 1,
                b'(' | b')' => {
                    let at = self.i;
                    self.i += 1;
                    cur.parens = if c == b'(' {
                        cur.parens + 1
                    } else {
                        cur.parens.saturating_sub(1)
                    };
                    cur.mark(at, self.line, self.i);
                }
                _ => {
                    let at = self.i;
                    self.i += 1;
                    cur.mark(at, self.line, self.i);
                }
            }
        }
        self.finish(&mut cur);
        self.out
    }

    fn line_of(&self, at: usize) -> usize {
        // Quoted text may span lines; `self.line` is already past it, so count back.
        self.line - self.b[at..self.i].iter().filter(|&&c| c == b'\n').count()
    }

    fn at_line_start(&self) -> bool {
        self.b[..self.i]
            .iter()
            .rev()
            .take_while(|&&c| c != b'\n')
            .all(|c| c.is_ascii_whitespace())
    }

    /// MySQL client `DELIMITER xx` command: changes the statement delimiter, is never sent.
    fn delimiter_command(&mut self) -> Option<Vec<u8>> {
        let rest = &self.b[self.i..];
        let kw = b"DELIMITER";
        if rest.len() <= kw.len()
            || !rest[..kw.len()].eq_ignore_ascii_case(kw)
            || !(rest[kw.len()] == b' ' || rest[kw.len()] == b'\t')
        {
            return None;
        }
        let line_end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        let new = String::from_utf8_lossy(&rest[kw.len()..line_end])
            .trim()
            .as_bytes()
            .to_vec();
        if new.is_empty() {
            return None;
        }
        self.i += line_end;
        Some(new)
    }

    fn line_comment_ok(&self) -> bool {
        // MySQL needs whitespace after `--` (`1--1` is arithmetic there).
        self.dialect != Dialect::MySql
            || self
                .peek(2)
                .is_none_or(|c| c == b' ' || c == b'\t' || c == b'\n' || c == b'\r')
    }

    fn skip_line(&mut self) {
        while self.i < self.b.len() && self.b[self.i] != b'\n' {
            self.i += 1;
        }
    }

    fn skip_block_comment(&mut self) {
        let nested = self.dialect == Dialect::Postgres;
        let mut depth = 0usize;
        while self.i < self.b.len() {
            if self.b[self.i] == b'/' && self.peek(1) == Some(b'*') {
                if depth == 0 || nested {
                    depth += 1;
                }
                self.i += 2;
            } else if self.b[self.i] == b'*' && self.peek(1) == Some(b'/') {
                depth -= 1;
                self.i += 2;
                if depth == 0 {
                    return;
                }
            } else {
                if self.b[self.i] == b'\n' {
                    self.line += 1;
                }
                self.i += 1;
            }
        }
    }

    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        self.i += 1;
        while self.i < self.b.len() {
            let c = self.b[self.i];
            if c == b'\n' {
                self.line += 1;
            }
            if backslash && c == b'\\' {
                if self.peek(1) == Some(b'\n') {
                    self.line += 1;
                }
                self.i = (self.i + 2).min(self.b.len());
                continue;
            }
            self.i += 1;
            if c == quote {
                if self.peek(0) == Some(quote) {
                    self.i += 1;
                    continue;
                }
                return;
            }
        }
    }

    fn skip_until(&mut self, close: u8) {
        while self.i < self.b.len() {
            let c = self.b[self.i];
            self.i += 1;
            if c == b'\n' {
                self.line += 1;
            }
            if c == close {
                return;
            }
        }
    }

    fn dollar_tag(&self) -> Option<Vec<u8>> {
        let rest = &self.b[self.i..];
        let mut j = 1;
        if rest.get(1).is_some_and(|c| c.is_ascii_digit()) {
            return None; // `$1` is a parameter
        }
        while j < rest.len() && (is_ident(rest[j])) {
            j += 1;
        }
        (rest.get(j) == Some(&b'$')).then(|| rest[..=j].to_vec())
    }

    fn skip_dollar(&mut self, tag: &[u8]) {
        self.i += tag.len();
        while self.i < self.b.len() {
            if self.b[self.i..].starts_with(tag) {
                self.i += tag.len();
                return;
            }
            if self.b[self.i] == b'\n' {
                self.line += 1;
            }
            self.i += 1;
        }
    }

    fn on_word(&mut self, cur: &mut Current, word: String) {
        let first = cur.words.is_empty();
        if cur.words.len() < 6 {
            cur.words.push(word.clone());
        }
        match self.dialect {
            Dialect::Postgres => {
                if cur.begin_pending {
                    cur.begin_pending = false;
                    if word == "ATOMIC" {
                        cur.depth += 1;
                    }
                }
                if word == "BEGIN" && !first {
                    cur.begin_pending = true;
                } else if cur.depth > 0 && word == "CASE" {
                    cur.depth += 1;
                } else if cur.depth > 0 && word == "END" {
                    cur.depth -= 1;
                }
            }
            Dialect::Sqlite => {
                let w = &cur.words;
                let trigger = w.first().is_some_and(|x| x == "CREATE")
                    && (w.get(1).is_some_and(|x| x == "TRIGGER")
                        || (w.get(1).is_some_and(|x| x == "TEMP" || x == "TEMPORARY")
                            && w.get(2).is_some_and(|x| x == "TRIGGER")));
                if (trigger && word == "BEGIN") || (cur.depth > 0 && word == "CASE") {
                    cur.depth += 1;
                } else if cur.depth > 0 && word == "END" {
                    cur.depth -= 1;
                }
            }
            Dialect::MySql => {}
        }
        cur.last_word_end = self.i;
        cur.last_word = word;
    }

    fn finish(&mut self, cur: &mut Current) {
        if let Some((start, line)) = cur.start {
            self.out.push(Statement {
                start,
                end: cur.end,
                after: self.i,
                line,
                words: std::mem::take(&mut cur.words),
            });
        }
        *cur = Current::default();
    }
}

/// Transaction-control statements, which must not appear inside the engine's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxControl {
    Begin,
    Commit,
    Rollback,
}

/// Classifies a statement as transaction control by its first words.
pub fn tx_control(stmt: &Statement) -> Option<TxControl> {
    let w: Vec<&str> = stmt.words.iter().map(String::as_str).collect();
    match w.as_slice() {
        // PostgreSQL `BEGIN ATOMIC` only appears inside CREATE FUNCTION, never first.
        ["BEGIN", ..] | ["START", "TRANSACTION", ..] => Some(TxControl::Begin),
        // `ROLLBACK [WORK|TRANSACTION] TO [SAVEPOINT] s` stays inside our transaction.
        ["ROLLBACK", rest @ ..] if rest.iter().take(2).any(|w| *w == "TO") => None,
        // PREPARE TRANSACTION detaches the work from the session: as bad as a COMMIT.
        ["COMMIT", ..] | ["END", ..] | ["PREPARE", "TRANSACTION", ..] => Some(TxControl::Commit),
        ["ROLLBACK", ..] | ["ABORT", ..] => Some(TxControl::Rollback),
        _ => None,
    }
}

/// In a non-transactional script, every `BEGIN` the script opens must be closed by the
/// script: otherwise the engine's progress records would land in a transaction that is
/// never committed.
pub fn check_balanced(sql: &str, statements: &[Statement]) -> Result<(), TxControlError> {
    let mut open: Option<&Statement> = None;
    for s in statements {
        match tx_control(s) {
            Some(TxControl::Begin) => {
                if open.is_some() {
                    return Err(TxControlError {
                        line: s.line,
                        statement: excerpt(s.text(sql), 60),
                        problem: TxProblem::Nested,
                    });
                }
                open = Some(s);
            }
            Some(TxControl::Commit | TxControl::Rollback) => open = None,
            None => {}
        }
    }
    match open {
        Some(s) => Err(TxControlError {
            line: s.line,
            statement: excerpt(s.text(sql), 60),
            problem: TxProblem::NeverClosed,
        }),
        None => Ok(()),
    }
}

/// True when every statement only reads or writes rows: on MySQL (which commits DDL
/// implicitly) only such a script can run in a transaction with its history row.
pub fn dml_only(statements: &[Statement]) -> bool {
    statements.iter().all(|s| {
        matches!(
            s.words.first().map(String::as_str),
            Some("INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "SELECT" | "WITH" | "VALUES" | "DO")
        )
    })
}

/// The part of a script that runs inside the engine's transaction.
#[derive(Clone, Debug)]
pub struct Body {
    /// Byte range of the script that is sent (a `BEGIN; ... COMMIT;` wrapper left out).
    pub start: usize,
    pub end: usize,
    /// The statements of that range.
    pub statements: Vec<Statement>,
}

/// A transaction-control statement where it cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: `{statement}` {problem}")]
pub struct TxControlError {
    pub line: usize,
    pub statement: String,
    pub problem: TxProblem,
}

/// What is wrong with a transaction-control statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxProblem {
    /// Inside a migration that runs in the engine's transaction.
    InsideEngineTransaction,
    /// A `BEGIN` while the script's own transaction is open.
    Nested,
    /// A `BEGIN` the script never commits.
    NeverClosed,
}

impl std::fmt::Display for TxProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxProblem::InsideEngineTransaction => {
                "controls the transaction, but this migration runs inside the engine's \
                 transaction (so that the migration and its history row commit together)"
            }
            TxProblem::Nested => "opens a transaction while the script's previous one is open",
            TxProblem::NeverClosed => "opens a transaction that the script never commits",
        })
    }
}

impl TxProblem {
    /// The next step for the user.
    pub fn hint(self) -> &'static str {
        match self {
            TxProblem::InsideEngineTransaction => {
                "remove the transaction statements (the engine already runs each migration in a \
                 transaction), or make the first line `-- schemagate:no-transaction`"
            }
            TxProblem::Nested | TxProblem::NeverClosed => {
                "in a no-transaction migration, close every transaction the script opens (COMMIT \
                 before the next BEGIN and at the end)"
            }
        }
    }
}

/// Computes the body of a transactional script. A script wrapped in exactly one
/// `BEGIN; ... COMMIT;` (as golang-migrate users write them) runs without the wrapper inside the
/// engine's transaction, which means the same thing. Any other transaction control is refused.
pub fn transactional_body(sql: &str, dialect: Dialect) -> Result<Body, TxControlError> {
    let mut statements = split(sql, dialect);
    let mut start = 0;
    let mut end = sql.len();
    let wrapped = statements.len() >= 2
        && tx_control(&statements[0]) == Some(TxControl::Begin)
        && statements.last().and_then(tx_control) == Some(TxControl::Commit);
    if wrapped {
        let last = statements.pop().expect("len >= 2 checked above");
        let first = statements.remove(0);
        start = first.after;
        end = last.start;
    }
    if let Some(s) = statements.iter().find(|s| tx_control(s).is_some()) {
        return Err(TxControlError {
            line: s.line,
            statement: excerpt(s.text(sql), 60),
            problem: TxProblem::InsideEngineTransaction,
        });
    }
    Ok(Body {
        start,
        end,
        statements,
    })
}

/// A one-line excerpt of a statement for messages.
pub fn excerpt(text: &str, max_chars: usize) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max_chars {
        one_line
    } else {
        let mut s: String = one_line.chars().take(max_chars).collect();
        s.push('…');
        s
    }
}

pub use crate::model::digest::sha256_hex;

/// The text an editor-insensitive checksum is computed over: no byte-order mark, `\n` line
/// endings, no trailing whitespace on any line, no trailing blank lines.
pub fn normalize(text: &str) -> String {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = String::with_capacity(text.len());
    for line in text.split('\n') {
        out.push_str(line.trim_end_matches(['\r', ' ', '\t']));
        out.push('\n');
    }
    let trimmed = out.trim_end_matches('\n').len();
    out.truncate(trimmed);
    out
}

/// Both checksums of a script: strict (every byte) and normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksums {
    pub strict: String,
    pub normalized: String,
}

impl Checksums {
    pub fn of(text: &str) -> Self {
        Checksums {
            strict: sha256_hex(text.as_bytes()),
            normalized: sha256_hex(normalize(text).as_bytes()),
        }
    }
}

/// Options a migration sets for itself in `-- schemagate:` comment lines at its top.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directives {
    /// `-- schemagate:no-transaction`: run statement by statement, recording progress.
    pub no_transaction: bool,
    /// `-- schemagate:lock-timeout 5s`: how long a statement may wait for locks held by
    /// others (so a migration cannot queue behind production traffic forever).
    pub lock_timeout: Option<std::time::Duration>,
    /// `-- schemagate:statement-timeout 10m`: how long a statement may run.
    pub statement_timeout: Option<std::time::Duration>,
    /// `-- schemagate:lock-retry-budget 15m`: how long this step is retried when a
    /// statement times out waiting for a lock (`0`: not retried).
    pub lock_retry_budget: Option<std::time::Duration>,
    /// `-- schemagate:allow-destructive <reason>`: this migration may lose data on purpose.
    pub allow_destructive: Option<String>,
    /// `-- schemagate:empty <reason>`: this script has no statement on purpose. Without
    /// it, a script of only comments is refused: running it would record a step that
    /// changed nothing (and filling it in later would be drift).
    pub empty: Option<String>,
    /// `-- schemagate:phase contract`: the migration removes what older app versions
    /// still read; it waits until none of them runs (see `plan`). `expand` (the default):
    /// it only adds, and runs before the new app version starts.
    pub phase: Phase,
}

/// When in a rollout a migration may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Adds to the schema; old and new app versions both run on the result.
    #[default]
    Expand,
    /// Removes or changes what older app versions read: runs once none of them runs.
    Contract,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::Contract => "contract",
        }
    }
}

/// The directives, for messages.
pub const KNOWN_DIRECTIVES: &str = "no-transaction, lock-timeout <duration>, lock-retry-budget <duration>, statement-timeout <duration>, allow-destructive <reason>, empty <reason>, phase expand|contract, lint-ignore <rule> <reason>";

/// A malformed or misplaced directive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct DirectiveError {
    pub line: usize,
    pub message: String,
}

const DIRECTIVE_PREFIX: &str = "schemagate:";

/// Reads the directives from the comment lines before the first statement. A directive
/// after SQL has started, or one the engine does not know, is an error: a silently
/// ignored `no-transaction` typo would run a migration the wrong way.
pub fn parse_directives(text: &str) -> Result<Directives, DirectiveError> {
    let mut d = Directives::default();
    let mut in_header = true;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let comment = line.strip_prefix("--").map(str::trim_start);
        // Case-insensitive, so `-- SchemaGate:no-transaction` is not silently ignored.
        let body = comment.and_then(|c| {
            c.get(..DIRECTIVE_PREFIX.len())
                .filter(|p| p.eq_ignore_ascii_case(DIRECTIVE_PREFIX))
                .map(|_| &c[DIRECTIVE_PREFIX.len()..])
        });
        let Some(body) = body else {
            if !line.is_empty() && comment.is_none() {
                in_header = false;
            }
            continue;
        };
        let err = |message: String| DirectiveError {
            line: n + 1,
            message,
        };
        let mut parts = body.trim().splitn(2, char::is_whitespace);
        let name = parts.next().unwrap_or_default();
        if name.eq_ignore_ascii_case("lint-ignore") {
            // Anywhere: before a statement it silences a lint rule for that statement (read
            // by `lint::ignores`); it needs a rule and a reason.
            let rest = parts.next().map(str::trim).unwrap_or_default();
            if rest.split_whitespace().count() < 2 {
                return Err(err(
                    "`lint-ignore` needs a rule and a reason, e.g. `-- schemagate:lint-ignore \
                     require-concurrent-index-creation the table has 40 rows`"
                        .into(),
                ));
            }
            continue;
        }
        if !in_header {
            return Err(err(format!(
                "`-- {DIRECTIVE_PREFIX}{body}` comes after SQL; directives must be at the top of \
                 the file, before the first statement"
            )));
        }
        let arg = parts.next().map(str::trim).unwrap_or_default();
        let duration = |what: &str| {
            super::clock::parse_duration(arg).map_err(|e| err(format!("`{what}`: {e}")))
        };
        match (name.to_ascii_lowercase().as_str(), arg) {
            ("no-transaction", "") => d.no_transaction = true,
            ("no-transaction", extra) => {
                return Err(err(format!(
                    "`no-transaction` takes no argument, found {extra:?}"
                )));
            }
            ("lock-timeout", _) => d.lock_timeout = Some(duration("lock-timeout")?),
            ("statement-timeout", _) => d.statement_timeout = Some(duration("statement-timeout")?),
            ("lock-retry-budget", _) => {
                d.lock_retry_budget = Some(duration("lock-retry-budget")?);
            }
            ("allow-destructive", "") => {
                return Err(err(
                    "`allow-destructive` needs a reason, e.g. `-- schemagate:allow-destructive \
                     column unused since v2`"
                        .into(),
                ));
            }
            ("allow-destructive", reason) => d.allow_destructive = Some(reason.to_string()),
            ("empty", "") => {
                return Err(err(
                    "`empty` needs a reason, e.g. `-- schemagate:empty nothing to undo: the up \
                     script only fills a cache`"
                        .into(),
                ));
            }
            ("empty", reason) => d.empty = Some(reason.to_string()),
            ("phase", p) if p.eq_ignore_ascii_case("contract") => d.phase = Phase::Contract,
            ("phase", p) if p.eq_ignore_ascii_case("expand") => d.phase = Phase::Expand,
            ("phase", other) => {
                return Err(err(format!(
                    "`phase` is `expand` (adds; the default) or `contract` (removes what older \
                     app versions read), not {other:?}"
                )));
            }
            (other, _) => {
                return Err(err(format!(
                    "unknown directive `{DIRECTIVE_PREFIX}{other}`; known: {KNOWN_DIRECTIVES}"
                )));
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str, d: Dialect) -> Vec<String> {
        split(sql, d)
            .iter()
            .map(|s| s.text(sql).to_string())
            .collect()
    }

    #[test]
    fn splits_simple_statements_and_drops_empty_ones() {
        let sql =
            "create table a(x int);\n\n-- just a comment\n;insert into a values (1);;\nselect 1";
        assert_eq!(
            texts(sql, Dialect::Postgres),
            vec![
                "create table a(x int)",
                "insert into a values (1)",
                "select 1"
            ]
        );
        let st = split(sql, Dialect::Postgres);
        assert_eq!(st[0].line, 1);
        assert_eq!(st[1].line, 4);
        assert_eq!(st[2].line, 5);
        assert_eq!(st[0].words[..3], ["CREATE", "TABLE", "A"]);
    }

    #[test]
    fn semicolons_in_strings_comments_and_identifiers_do_not_split() {
        let sql = "insert into t values ('a;b', 'it''s; fine');\n\
                   /* block; comment /* nested; */ still; */ select \"we;ird\" from t;\n\
                   -- line; comment\nselect E'back\\'slash;' ;";
        let got = texts(sql, Dialect::Postgres);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[1].starts_with("select \"we;ird\""));
        assert_eq!(got[2], "select E'back\\'slash;'");
    }

    #[test]
    fn dollar_quotes_hold_function_bodies() {
        let sql = "create function f() returns int as $body$\nbegin\n  perform 1; return 2;\nend;\n$body$ language plpgsql;\n\
                   do $$ begin raise notice 'x;'; end $$;\nselect $1::int;";
        let got = texts(sql, Dialect::Postgres);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].ends_with("language plpgsql"));
        assert_eq!(got[2], "select $1::int");
    }

    #[test]
    fn begin_atomic_bodies_stay_whole() {
        let sql = "create function g(a int) returns int language sql begin atomic\n  select case when a > 0 then 1 else 0 end;\n  select 2;\nend;\nselect 3;";
        let got = texts(sql, Dialect::Postgres);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("end"));
    }

    #[test]
    fn sqlite_trigger_bodies_stay_whole() {
        let sql = "CREATE TRIGGER t AFTER INSERT ON a BEGIN\n  UPDATE b SET n = CASE WHEN n > 0 THEN n + 1 ELSE 1 END;\n  DELETE FROM c;\nEND;\nCREATE TABLE [x;y] (z);";
        let got = texts(sql, Dialect::Sqlite);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("END"));
        assert_eq!(got[1], "CREATE TABLE [x;y] (z)");
    }

    #[test]
    fn mysql_delimiter_backslashes_and_hash_comments() {
        let sql = "DELIMITER $$\nCREATE PROCEDURE p() BEGIN SELECT 1; SELECT 'a\\';'; END$$\nDELIMITER ;\n# hash; comment\nSELECT 1--1;\nSELECT `a;b` FROM t;";
        let got = texts(sql, Dialect::MySql);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            "CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 'a\\';'; END"
        );
        assert_eq!(got[1], "SELECT 1--1");
    }

    #[test]
    fn lines_count_through_multiline_strings_and_comments() {
        let sql = "select 'a\nb';\n/*\n\n*/\nselect 2;";
        let st = split(sql, Dialect::Postgres);
        assert_eq!(st[0].line, 1);
        assert_eq!(st[1].line, 6);
    }

    #[test]
    fn unterminated_quotes_do_not_panic() {
        for sql in [
            "select 'abc",
            "select $x$ abc",
            "/* abc",
            "select \"a",
            "select E'\\",
        ] {
            let _ = split(sql, Dialect::Postgres);
            let _ = split(sql, Dialect::MySql);
            let _ = split(sql, Dialect::Sqlite);
        }
    }

    #[test]
    fn wrapper_transaction_is_unwrapped_and_inner_control_refused() {
        let sql = "BEGIN;\ncreate table a(x int);\ninsert into a values (1);\nCOMMIT;\n";
        let body = transactional_body(sql, Dialect::Postgres).unwrap();
        assert_eq!(body.statements.len(), 2);
        assert!(!sql[body.start..body.end].contains("BEGIN"));
        assert!(!sql[body.start..body.end].contains("COMMIT"));

        let bad = "create table a(x int);\ncommit;\ncreate table b(x int);";
        let err = transactional_body(bad, Dialect::Postgres).unwrap_err();
        assert_eq!(err.line, 2);

        let prepared = "create table a(x int);\nprepare transaction 'x';";
        assert_eq!(
            transactional_body(prepared, Dialect::Postgres)
                .unwrap_err()
                .line,
            2
        );
        let savepoints = "savepoint s; create table a(x int); rollback to savepoint s; \
                          rollback transaction to s; rollback work to savepoint s;";
        assert!(transactional_body(savepoints, Dialect::Postgres).is_ok());
        let plain = "create table a(x int)";
        let body = transactional_body(plain, Dialect::Sqlite).unwrap();
        assert_eq!((body.start, body.end), (0, plain.len()));
    }

    proptest::proptest! {
        #[test]
        fn splitting_never_panics_and_statements_are_ordered(
            sql in "[a-zA-Z0-9 ;'\"$`#()\\[\\]\\-/*\n\\\\é]{0,120}",
        ) {
            for d in [Dialect::Postgres, Dialect::Sqlite, Dialect::MySql] {
                let st = split(&sql, d);
                let mut last = 0;
                for s in &st {
                    proptest::prop_assert!(last <= s.start && s.start < s.end && s.end <= s.after);
                    proptest::prop_assert!(s.after <= sql.len());
                    let _ = s.text(&sql); // slicing on char boundaries
                    last = s.after;
                }
                let _ = transactional_body(&sql, d);
                let _ = check_balanced(&sql, &st);
            }
        }

        #[test]
        fn plain_statements_split_one_for_one(words in proptest::collection::vec("[a-z]{1,8}( [a-z0-9]{1,8}){0,4}", 1..8)) {
            let sql = words.join(";\n");
            let got: Vec<String> = split(&sql, Dialect::Postgres).iter().map(|s| s.text(&sql).to_string()).collect();
            proptest::prop_assert_eq!(got, words);
        }
    }

    #[test]
    fn parentheses_hold_rule_bodies() {
        let sql = "create rule r as on insert to a do also (insert into b values (1); insert into c values (2));\nselect 1;";
        assert_eq!(texts(sql, Dialect::Postgres).len(), 2);
    }

    #[test]
    fn non_transactional_scripts_must_close_what_they_open() {
        let ok = "begin;\nupdate a set x = 1;\ncommit;\ncreate index concurrently i on a(x);";
        assert!(check_balanced(ok, &split(ok, Dialect::Postgres)).is_ok());
        let open = "create index concurrently i on a(x);\nbegin;\nupdate a set x = 1;";
        assert_eq!(
            check_balanced(open, &split(open, Dialect::Postgres))
                .unwrap_err()
                .line,
            2
        );
        let nested = "begin;\nbegin;\ncommit;";
        assert_eq!(
            check_balanced(nested, &split(nested, Dialect::Postgres))
                .unwrap_err()
                .line,
            2
        );
    }

    #[test]
    fn directives_are_read_from_the_header_only() {
        assert!(
            parse_directives("-- SchemaGate:no-transaction\nselect 1;")
                .unwrap()
                .no_transaction
        );
        assert!(
            parse_directives("-- schemagate:no-transaction\ncreate index concurrently i on t(x);")
                .unwrap()
                .no_transaction
        );
        assert!(
            parse_directives("-- a comment\n\n--schemagate:no-transaction\nselect 1;")
                .unwrap()
                .no_transaction
        );
        assert!(!parse_directives("select 1;").unwrap().no_transaction);
        let late = parse_directives("select 1;\n-- schemagate:no-transaction\n").unwrap_err();
        assert_eq!(late.line, 2);
        let typo = parse_directives("-- schemagate:no-transactoin\n").unwrap_err();
        assert!(typo.message.contains("unknown directive"));
        let d = parse_directives(
            "-- schemagate:lock-timeout 5s\n-- schemagate:statement-timeout 10m\n\
             -- schemagate:allow-destructive old column, unused since v2\nselect 1;",
        )
        .unwrap();
        assert_eq!(d.lock_timeout, Some(std::time::Duration::from_secs(5)));
        assert_eq!(
            d.statement_timeout,
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(
            d.allow_destructive.as_deref(),
            Some("old column, unused since v2")
        );
        assert!(parse_directives("-- schemagate:allow-destructive\n").is_err());
        assert_eq!(
            parse_directives("-- schemagate:EMPTY  data fix ran by hand in 2024\n")
                .unwrap()
                .empty
                .as_deref(),
            Some("data fix ran by hand in 2024")
        );
        assert!(parse_directives("-- schemagate:empty\n").is_err());
        assert!(parse_directives("-- schemagate:lock-timeout soon\n").is_err());
    }

    #[test]
    fn checksums_normalise_only_whitespace_and_line_endings() {
        let a = Checksums::of("create table a(x int);\nselect 1;\n");
        let b = Checksums::of("\u{feff}create table a(x int);  \r\nselect 1;\r\n\r\n");
        let c = Checksums::of("create table a(y int);\nselect 1;\n");
        assert_ne!(a.strict, b.strict);
        assert_eq!(a.normalized, b.normalized);
        assert_ne!(a.normalized, c.normalized);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
