//! Migration sources: a directory (or any list of named files) in one of the formats teams
//! already use, read as they are, without conversion.
//!
//! | format        | up                          | down                          |
//! |---------------|-----------------------------|-------------------------------|
//! | native / golang-migrate / sqlx reversible | `<ver>_<desc>.up.sql` | `<ver>_<desc>.down.sql` |
//! | sqlx simple   | `<ver>_<desc>.sql`          | none (irreversible)           |
//! | dbmate        | `<ver>_<desc>.sql` with `-- migrate:up` | its `-- migrate:down` section |
//! | Flyway        | `V<ver>__<desc>.sql`        | `U<ver>__<desc>.sql`          |
//!
//! Files that do not end in `.sql` and hidden files are ignored (a README may live beside
//! the migrations); a `.sql` file whose name fits no format is an error, as are duplicate
//! versions and an empty source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::script::{
    Checksums, DirectiveError, Directives, normalize, parse_directives, sha256_hex,
};
use super::version::Version;

/// Which naming convention a migration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `<ver>_<desc>.up.sql` + `.down.sql` (schemagate, golang-migrate, sqlx reversible).
    Native,
    /// `<ver>_<desc>.sql` (sqlx simple migrations).
    SqlxSimple,
    /// `<ver>_<desc>.sql` with `-- migrate:up` / `-- migrate:down` sections.
    Dbmate,
    /// `V<ver>__<desc>.sql` / `U<ver>__<desc>.sql`.
    Flyway,
}

/// One script of a migration (its up or its down part).
#[derive(Clone, Debug)]
pub struct Script {
    /// File name, relative to the source (what messages show).
    pub file: String,
    /// The SQL text (for dbmate: the section only).
    pub sql: String,
    /// 1-based line of the file where `sql` starts (dbmate sections start below their marker).
    pub first_line: usize,
    pub directives: Directives,
    /// The checksums, each hashed on first use: a run with nothing to do compares only the
    /// applied migrations' recorded checksums, so it hashes nothing else.
    strict: OnceLock<String>,
    normalized: OnceLock<String>,
}

impl Script {
    fn new(file: &str, sql: String, first_line: usize, directives: Directives) -> Self {
        Script {
            file: file.to_string(),
            sql,
            first_line,
            directives,
            strict: OnceLock::new(),
            normalized: OnceLock::new(),
        }
    }

    /// The strict checksum ([`Checksums::strict`]): every byte counts.
    pub fn checksum(&self) -> &str {
        self.strict.get_or_init(|| sha256_hex(self.sql.as_bytes()))
    }

    /// The normalized checksum ([`Checksums::normalized`]): line endings, trailing
    /// whitespace and a byte-order mark do not count.
    pub fn checksum_normalized(&self) -> &str {
        self.normalized
            .get_or_init(|| sha256_hex(normalize(&self.sql).as_bytes()))
    }

    /// Both checksums, as a history row records them.
    pub fn checksums(&self) -> Checksums {
        Checksums {
            strict: self.checksum().to_string(),
            normalized: self.checksum_normalized().to_string(),
        }
    }
}

/// A versioned migration with its up script and, when one exists, its down script.
#[derive(Clone, Debug)]
pub struct Migration {
    pub version: Version,
    pub description: String,
    pub format: Format,
    pub up: Script,
    pub down: Option<Script>,
}

/// The migrations of a source, ordered by version, with unique versions.
#[derive(Clone, Debug, Default)]
pub struct MigrationSet {
    pub migrations: Vec<Migration>,
}

impl Migration {
    /// `-- schemagate:phase contract` in its up script.
    pub fn is_contract(&self) -> bool {
        self.up.directives.phase == super::script::Phase::Contract
    }
}

impl MigrationSet {
    /// The newest migration that is not a contract one: what an app version needs before
    /// it starts (its contract migrations wait for older versions to go).
    pub fn expand_head(&self) -> Option<&Migration> {
        self.migrations.iter().rev().find(|m| !m.is_contract())
    }

    pub fn get(&self, v: &Version) -> Option<&Migration> {
        self.migrations
            .binary_search_by(|m| m.version.cmp(v))
            .ok()
            .map(|i| &self.migrations[i])
    }

    pub fn head(&self) -> Option<&Migration> {
        self.migrations.last()
    }

    /// The format most files use, for `new` to follow.
    pub fn dominant_format(&self) -> Option<Format> {
        let mut counts: Vec<(Format, usize)> = Vec::new();
        for m in &self.migrations {
            match counts.iter_mut().find(|(f, _)| *f == m.format) {
                Some((_, n)) => *n += 1,
                None => counts.push((m.format, 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(f, _)| f)
    }
}

/// What is wrong with a migration source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("migrations directory {dir} does not exist")]
    DirMissing { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a file, not a directory", .path.display())]
    NotADirectory { path: std::path::PathBuf },
    #[error("{file} is not valid UTF-8 text")]
    NotUtf8 { file: String },
    #[error("no migrations found in {origin}")]
    Empty { origin: String },
    #[error("{file}: file name fits no migration format ({reason})")]
    UnparseableName { file: String, reason: String },
    #[error("{file}: {reason}")]
    Unsupported { file: String, reason: String },
    #[error("version {version} is defined twice: {first} and {second}")]
    DuplicateVersion {
        version: String,
        first: String,
        second: String,
    },
    #[error("{file} is a down script without an up script for version {version}")]
    OrphanDown { file: String, version: String },
    #[error("{file}: has no `-- migrate:up` section")]
    DbmateNoUp { file: String },
    #[error("{file}: {source}")]
    Directive {
        file: String,
        #[source]
        source: DirectiveError,
    },
}

impl SourceError {
    /// The next step for the user.
    pub fn hint(&self) -> String {
        match self {
            SourceError::DirMissing { .. } => {
                "pass --dir (or SCHEMAGATE_DIR) pointing at your migrations, or create one with \
                 `schemagate migrate new -m \"init\"`"
                    .into()
            }
            SourceError::Read { .. } => "check the file's permissions".into(),
            SourceError::NotADirectory { .. } => {
                "--dir (SCHEMAGATE_DIR) names the directory that holds the migration files, \
                 not a file: pass its parent directory"
                    .into()
            }
            SourceError::NotUtf8 { .. } => "save the file as UTF-8".into(),
            SourceError::Empty { .. } => {
                "add a migration with `schemagate migrate new -m \"init\"`, or point --dir at the \
                 right directory"
                    .into()
            }
            SourceError::UnparseableName { .. } => format!(
                "rename it to one of: {}; or give it another extension if it is not a migration",
                NAME_FORMATS
            ),
            SourceError::Unsupported { .. } => {
                "convert it to a versioned migration, or keep it outside the migrations directory"
                    .into()
            }
            SourceError::DuplicateVersion { .. } => {
                "give one of them a new version (versions compare numerically: 001 equals 1)".into()
            }
            SourceError::OrphanDown { .. } => {
                "add the matching .up.sql file or remove the down script".into()
            }
            SourceError::DbmateNoUp { .. } => "add a `-- migrate:up` line before the SQL".into(),
            SourceError::Directive { .. } => format!(
                "fix the `-- schemagate:` line (known: {})",
                super::script::KNOWN_DIRECTIVES
            ),
        }
    }
}

const NAME_FORMATS: &str = "<version>_<description>.up.sql / .down.sql, <version>_<description>.sql \
     (sqlx, or dbmate with -- migrate:up), V<version>__<description>.sql / U<version>__<description>.sql (Flyway)";

/// A file name taken apart.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Up {
        version: Version,
        description: String,
        format: Format,
    },
    Down {
        version: Version,
        description: String,
    },
    /// `<ver>_<desc>.sql`: sqlx simple or dbmate, decided by its content.
    Single {
        version: Version,
        description: String,
    },
}

/// A name fitting no format; the string says why.
type NameError = String;

fn description_of(raw: &str) -> String {
    raw.replace('_', " ").trim().to_string()
}

fn parse_name(name: &str) -> Result<Option<Parsed>, NameError> {
    let Some(stem) = name
        .strip_suffix(".sql")
        .or_else(|| name.strip_suffix(".SQL"))
    else {
        return Ok(None);
    };
    // Flyway: V1__x.sql, U1__x.sql (version segments separated by `.` or `_`).
    let mut chars = stem.chars();
    if let Some(prefix @ ('V' | 'U' | 'R' | 'B')) = chars.next() {
        let rest = chars.as_str();
        if prefix == 'R' && rest.starts_with("__") {
            return Err(
                "Flyway repeatable migrations (R__) are not supported: they re-run on every change"
                    .into(),
            );
        }
        if let Some((ver, desc)) = rest.split_once("__") {
            if prefix == 'R' {
                return Err(
                    "`R` is not a Flyway prefix for versioned files (use V for up, U for \
                            down)"
                        .into(),
                );
            }
            if prefix == 'B' {
                return Err(
                    "Flyway baseline migrations (B<version>__) are not supported; use \
                            `schemagate migrate stamp`"
                        .into(),
                );
            }
            let version = Version::parse(&ver.replace('_', "."))
                .map_err(|e| format!("Flyway version: {}", e.reason))?;
            let description = description_of(desc);
            return Ok(Some(if prefix == 'V' {
                Parsed::Up {
                    version,
                    description,
                    format: Format::Flyway,
                }
            } else {
                Parsed::Down {
                    version,
                    description,
                }
            }));
        }
    }
    // `.up`/`.down` in any case: `1_x.UP.sql` is an up script, not a one-way `x.UP`.
    let lower = stem.to_ascii_lowercase();
    let (stem, direction) = if lower.ends_with(".up") {
        (&stem[..stem.len() - 3], Some(true))
    } else if lower.ends_with(".down") {
        (&stem[..stem.len() - 5], Some(false))
    } else {
        (stem, None)
    };
    let digits_end = stem
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(stem.len());
    if digits_end == 0 {
        return Err("it does not start with a version number".into());
    }
    let (ver, rest) = stem.split_at(digits_end);
    let description = match rest.strip_prefix('_') {
        Some(d) => description_of(d),
        None if rest.is_empty() => String::new(),
        None => return Err("the version must be followed by `_` and a description".into()),
    };
    let version = Version::parse(ver).map_err(|e| e.reason.to_string())?;
    Ok(Some(match direction {
        Some(true) => Parsed::Up {
            version,
            description,
            format: Format::Native,
        },
        Some(false) => Parsed::Down {
            version,
            description,
        },
        None => Parsed::Single {
            version,
            description,
        },
    }))
}

fn script(file: &str, sql: String, first_line: usize) -> Result<Script, SourceError> {
    let directives = parse_directives(&sql).map_err(|source| SourceError::Directive {
        file: file.to_string(),
        source: DirectiveError {
            line: source.line + first_line - 1,
            message: source.message,
        },
    })?;
    Ok(Script::new(file, sql, first_line, directives))
}

/// A dbmate section marker: `-- migrate:up` or `-- migrate:down`, with options.
fn dbmate_marker(line: &str) -> Option<(bool, bool)> {
    let rest = line.trim().strip_prefix("--")?.trim_start();
    let rest = rest.strip_prefix("migrate:")?;
    let (dir, opts) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let up = match dir {
        "up" => true,
        "down" => false,
        _ => return None,
    };
    let no_tx = opts.split_whitespace().any(|o| o == "transaction:false");
    Some((up, no_tx))
}

fn dbmate_sections(file: &str, text: &str) -> Result<(Script, Option<Script>), SourceError> {
    // (is_up, no_tx, first content line, content)
    let mut sections: Vec<(bool, bool, usize, String)> = Vec::new();
    let unsupported = |reason: String| SourceError::Unsupported {
        file: file.to_string(),
        reason,
    };
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if let Some((up, no_tx)) = dbmate_marker(line) {
            if sections.iter().any(|s| s.0 == up) {
                let which = if up { "up" } else { "down" };
                return Err(unsupported(format!(
                    "line {}: a second `-- migrate:{which}` section (dbmate allows one of each)",
                    n + 1
                )));
            }
            sections.push((up, no_tx, n + 2, String::new()));
        } else if let Some(s) = sections.last_mut() {
            s.3.push_str(line);
        } else if !line.trim().is_empty() && !line.trim_start().starts_with("--") {
            return Err(unsupported(format!(
                "line {}: SQL before the first `-- migrate:up`/`-- migrate:down` marker would \
                 never run",
                n + 1
            )));
        }
    }
    let mut up = None;
    let mut down = None;
    for (is_up, no_tx, first_line, sql) in sections {
        let mut s = script(file, sql, first_line)?;
        s.directives.no_transaction |= no_tx;
        if is_up {
            up = Some(s);
        } else {
            down = Some(s);
        }
    }
    let up = up.ok_or_else(|| SourceError::DbmateNoUp {
        file: file.to_string(),
    })?;
    // An empty down section means "no down script", as in dbmate itself.
    let down = down.filter(|d| !d.sql.trim().is_empty());
    Ok((up, down))
}

#[derive(Default)]
struct Pending {
    up: Option<(Script, String, Format)>,
    down: Option<(Script, String)>,
}

/// Builds a migration set from named files (a directory listing, a ConfigMap, inline text).
/// `origin` names the source in messages.
pub fn load_files<I>(origin: &str, files: I) -> Result<MigrationSet, SourceError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut by_version: BTreeMap<Version, Pending> = BTreeMap::new();
    for (name, text) in files {
        if name.starts_with('.') {
            continue;
        }
        let parsed = parse_name(&name).map_err(|reason| SourceError::UnparseableName {
            file: name.clone(),
            reason,
        })?;
        let Some(parsed) = parsed else { continue };
        let dup = |version: &Version, first: &str| SourceError::DuplicateVersion {
            version: version.to_string(),
            first: first.to_string(),
            second: name.clone(),
        };
        match parsed {
            Parsed::Up {
                version,
                description,
                format,
            } => {
                let entry = by_version.entry(version.clone()).or_default();
                if let Some((s, _, _)) = &entry.up {
                    return Err(dup(&version, &s.file));
                }
                entry.up = Some((script(&name, text, 1)?, description, format));
            }
            Parsed::Down {
                version,
                description,
            } => {
                let entry = by_version.entry(version.clone()).or_default();
                if let Some((s, _)) = &entry.down {
                    return Err(dup(&version, &s.file));
                }
                entry.down = Some((script(&name, text, 1)?, description));
            }
            Parsed::Single {
                version,
                description,
            } => {
                let entry = by_version.entry(version.clone()).or_default();
                if let Some((s, _, _)) = &entry.up {
                    return Err(dup(&version, &s.file));
                }
                let is_dbmate = text.lines().any(|l| dbmate_marker(l).is_some());
                if is_dbmate {
                    if let Some((s, _)) = &entry.down {
                        return Err(dup(&version, &s.file));
                    }
                    let (up, down) = dbmate_sections(&name, &text)?;
                    entry.up = Some((up, description.clone(), Format::Dbmate));
                    entry.down = down.map(|d| (d, description));
                } else {
                    entry.up = Some((script(&name, text, 1)?, description, Format::SqlxSimple));
                }
            }
        }
    }
    let mut migrations = Vec::with_capacity(by_version.len());
    for (version, p) in by_version {
        let Some((up, description, format)) = p.up else {
            let (down, _) = p
                .down
                .expect("an entry is only created with an up or a down");
            return Err(SourceError::OrphanDown {
                file: down.file,
                version: version.to_string(),
            });
        };
        migrations.push(Migration {
            version,
            description,
            format,
            up,
            down: p.down.map(|(s, _)| s),
        });
    }
    if migrations.is_empty() {
        return Err(SourceError::Empty {
            origin: origin.to_string(),
        });
    }
    Ok(MigrationSet { migrations })
}

/// Reads the migrations in `dir` (not recursive).
pub fn load_dir(dir: &Path) -> Result<MigrationSet, SourceError> {
    let files = sql_files(dir)?
        .into_iter()
        .map(|name| read_sql(dir, name))
        .collect::<Result<Vec<_>, _>>()?;
    load_files(&dir.display().to_string(), files)
}

/// How many files [`load_dir_async`] reads before it lets other work on its thread go on.
const FILES_PER_TURN: usize = 16;

/// [`load_dir`] for a task that shares its thread with a connection being made: it steps
/// aside every few files, so the connection's messages go out (and the server works on
/// them) while the files are read and hashed, and the server never waits for the whole
/// directory.
pub async fn load_dir_async(dir: &Path) -> Result<MigrationSet, SourceError> {
    let names = sql_files(dir)?;
    let mut files = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        if i % FILES_PER_TURN == FILES_PER_TURN - 1 {
            tokio::task::yield_now().await;
        }
        files.push(read_sql(dir, name)?);
    }
    let set = load_files(&dir.display().to_string(), files)?;
    // The first thing a command does with the history is compare the applied migrations'
    // checksums: hashed now, they are ready when the history arrives.
    for (i, m) in set.migrations.iter().enumerate() {
        if i % FILES_PER_TURN == FILES_PER_TURN - 1 {
            tokio::task::yield_now().await;
        }
        m.up.checksum();
    }
    Ok(set)
}

/// The names of the files in `dir` that may be migrations (`.sql`, not hidden, a file or a
/// link to one), sorted: so that "defined twice" always names the same pair first.
fn sql_files(dir: &Path) -> Result<Vec<String>, SourceError> {
    if dir.exists() && !dir.is_dir() {
        return Err(SourceError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SourceError::DirMissing {
                dir: dir.to_path_buf(),
            }
        } else {
            SourceError::Read {
                path: dir.to_path_buf(),
                source,
            }
        }
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SourceError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !name.to_ascii_lowercase().ends_with(".sql") || name.starts_with('.') {
            continue;
        }
        // The listing says what a name is, without a lookup per file; only a symbolic
        // link (how Kubernetes mounts the keys of a ConfigMap) is followed.
        let is_file = match entry.file_type() {
            Ok(t) if !t.is_symlink() => t.is_file(),
            _ => entry.path().is_file(),
        };
        if is_file {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The text of `dir/name`, which must be UTF-8.
fn read_sql(dir: &Path, name: String) -> Result<(String, String), SourceError> {
    let path = dir.join(&name);
    let bytes = std::fs::read(&path).map_err(|source| SourceError::Read { path, source })?;
    let text = String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8 { file: name.clone() })?;
    Ok((name, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<MigrationSet, SourceError> {
        load_files(
            "test",
            files.iter().map(|(n, t)| (n.to_string(), t.to_string())),
        )
    }

    fn versions(set: &MigrationSet) -> Vec<String> {
        set.migrations
            .iter()
            .map(|m| m.version.to_string())
            .collect()
    }

    #[test]
    fn native_pairs_and_numeric_order() {
        let set = load(&[
            ("10_later.up.sql", "select 10;"),
            ("2_add_users.up.sql", "create table users(id int);"),
            ("2_add_users.down.sql", "drop table users;"),
            ("1.10_x.up.sql", "select 1;"),
            ("1.2_y.up.sql", "select 1;"),
            ("README.md", "not sql"),
            (".hidden.sql", "ignored"),
        ])
        .unwrap();
        assert_eq!(versions(&set), vec!["1.2", "1.10", "2", "10"]);
        let m = set.get(&Version::parse("2").unwrap()).unwrap();
        assert_eq!(m.description, "add users");
        assert_eq!(m.format, Format::Native);
        assert_eq!(m.down.as_ref().unwrap().sql, "drop table users;");
        assert!(set.migrations[0].down.is_none());
    }

    #[test]
    fn flyway_names() {
        let set = load(&[
            ("V1__init.sql", "create table a(x int);"),
            ("V1_1__add_column.sql", "alter table a add y int;"),
            ("U1_1__add_column.sql", "alter table a drop column y;"),
        ])
        .unwrap();
        assert_eq!(versions(&set), vec!["1", "1.1"]);
        assert_eq!(set.migrations[1].description, "add column");
        assert!(set.migrations[1].down.is_some());
        assert_eq!(set.migrations[0].format, Format::Flyway);
        let err = load(&[("R2__cleanup.sql", "x"), ("V2__x.sql", "y")]).unwrap_err();
        assert!(matches!(err, SourceError::UnparseableName { .. }), "{err}");
        let err = load(&[("R__views.sql", "x")]).unwrap_err();
        assert!(matches!(err, SourceError::UnparseableName { .. }), "{err}");
        assert!(err.to_string().contains("repeatable"));
    }

    #[test]
    fn sqlx_simple_and_dbmate() {
        let set = load(&[
            ("20240101000000_init.sql", "create table a(x int);"),
            (
                "20240102000000_users.sql",
                "-- migrate:up transaction:false\ncreate index concurrently i on a(x);\n\n-- migrate:down\ndrop index i;\n",
            ),
            ("20240103000000_no_down.sql", "-- migrate:up\nselect 1;\n-- migrate:down\n\n"),
        ])
        .unwrap();
        assert_eq!(set.migrations[0].format, Format::SqlxSimple);
        assert!(set.migrations[0].down.is_none());
        let dbm = &set.migrations[1];
        assert_eq!(dbm.format, Format::Dbmate);
        assert!(dbm.up.directives.no_transaction);
        assert_eq!(dbm.up.first_line, 2);
        assert_eq!(dbm.up.sql.trim(), "create index concurrently i on a(x);");
        assert_eq!(dbm.down.as_ref().unwrap().sql.trim(), "drop index i;");
        assert_eq!(dbm.down.as_ref().unwrap().first_line, 5);
        assert!(set.migrations[2].down.is_none());
    }

    #[test]
    fn clear_errors() {
        let e = load(&[("1_a.up.sql", "x"), ("001_b.up.sql", "y")]).unwrap_err();
        assert!(matches!(e, SourceError::DuplicateVersion { .. }), "{e}");
        assert!(e.to_string().contains("001_b.up.sql") && e.to_string().contains("1_a.up.sql"));
        let e = load(&[("1_a.up.sql", "x"), ("1_b.sql", "y")]).unwrap_err();
        assert!(matches!(e, SourceError::DuplicateVersion { .. }), "{e}");
        let e = load(&[("init.sql", "x")]).unwrap_err();
        assert!(matches!(e, SourceError::UnparseableName { .. }), "{e}");
        let e = load(&[("1-init.up.sql", "x")]).unwrap_err();
        assert!(matches!(e, SourceError::UnparseableName { .. }), "{e}");
        let e = load(&[("1..2_x.up.sql", "x")]).unwrap_err();
        assert!(matches!(e, SourceError::UnparseableName { .. }), "{e}");
        let e = load(&[("2_x.down.sql", "x")]).unwrap_err();
        assert!(matches!(e, SourceError::OrphanDown { .. }), "{e}");
        let e = load(&[("README.md", "x")]).unwrap_err();
        assert!(matches!(e, SourceError::Empty { .. }), "{e}");
        let e = load(&[("1_x.up.sql", "select 1;\n-- schemagate:no-transaction\n")]).unwrap_err();
        assert!(matches!(e, SourceError::Directive { .. }), "{e}");
        assert!(e.to_string().contains("line 2"));
        assert!(!e.hint().is_empty());
    }

    #[test]
    fn dbmate_files_that_dbmate_itself_rejects_are_errors() {
        let e = load(&[(
            "1_a.sql",
            "create table x(i int);\n-- migrate:up\nselect 1;\n",
        )])
        .unwrap_err();
        assert!(e.to_string().contains("before the first"), "{e}");
        let e = load(&[(
            "1_a.sql",
            "-- migrate:up\nselect 1;\n-- migrate:up\nselect 2;\n",
        )])
        .unwrap_err();
        assert!(e.to_string().contains("second `-- migrate:up`"), "{e}");
        assert!(load(&[("1_a.sql", "-- a comment\n\n-- migrate:up\nselect 1;\n")]).is_ok());
    }

    #[test]
    fn dominant_format_follows_the_majority() {
        let set = load(&[("V1__a.sql", "x"), ("V2__b.sql", "x"), ("3_c.up.sql", "x")]).unwrap();
        assert_eq!(set.dominant_format(), Some(Format::Flyway));
    }

    #[test]
    fn checksums_hashed_on_use_are_the_scripts_checksums() {
        let text = "\u{feff}create table a(x int);  \r\nselect 1;\r\n\r\n";
        let set = load(&[
            ("1_a.up.sql", text),
            ("1_a.down.sql", "drop table a;\n"),
            (
                "2_b.sql",
                "-- migrate:up\nselect 2;\n-- migrate:down\nselect 3;\n",
            ),
        ])
        .unwrap();
        let up = &set.migrations[0].up;
        assert_eq!(up.checksums(), Checksums::of(text));
        assert_eq!(up.checksum(), Checksums::of(text).strict);
        assert_eq!(up.checksum_normalized(), Checksums::of(text).normalized);
        let dbmate = &set.migrations[1];
        assert_eq!(dbmate.up.checksums(), Checksums::of(&dbmate.up.sql));
        let down = dbmate.down.as_ref().unwrap();
        assert_eq!(down.checksums(), Checksums::of(&down.sql));
    }

    #[test]
    fn directory_entries_are_files_or_links_to_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("1_a.up.sql"), "select 1;").unwrap();
        // Kubernetes mounts ConfigMap keys as links into a hidden directory.
        std::fs::create_dir(d.join("..data")).unwrap();
        std::fs::write(d.join("..data/2_b.up.sql"), "select 2;").unwrap();
        std::os::unix::fs::symlink("..data/2_b.up.sql", d.join("2_b.up.sql")).unwrap();
        // Neither a directory nor a link to one is a migration, whatever its name.
        std::fs::create_dir(d.join("3_c.up.sql")).unwrap();
        std::os::unix::fs::symlink("..data", d.join("4_d.up.sql")).unwrap();
        std::os::unix::fs::symlink("missing.sql", d.join("5_e.up.sql")).unwrap();
        std::fs::write(d.join("README.md"), "not sql").unwrap();
        let set = load_dir(d).unwrap();
        assert_eq!(versions(&set), vec!["1", "2"]);
        assert_eq!(set.migrations[1].up.sql, "select 2;");
    }

    #[test]
    fn the_async_reading_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        // More files than one turn reads, and a problem in the last one.
        for i in 1..=2 * FILES_PER_TURN + 1 {
            std::fs::write(
                dir.path().join(format!("{i}_t.up.sql")),
                format!("select {i};"),
            )
            .unwrap();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let set = runtime.block_on(load_dir_async(dir.path())).unwrap();
        let sync = load_dir(dir.path()).unwrap();
        assert_eq!(versions(&set), versions(&sync));
        assert_eq!(set.migrations.len(), 2 * FILES_PER_TURN + 1);
        std::fs::write(dir.path().join("99_t.up.sql"), [0xff, 0xfe]).unwrap();
        let e = runtime.block_on(load_dir_async(dir.path())).unwrap_err();
        assert!(
            matches!(e, SourceError::NotUtf8 { ref file } if file == "99_t.up.sql"),
            "{e}"
        );
    }
}
