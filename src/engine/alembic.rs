//! Alembic (Flask-Migrate) revisions as schemagate migrations: the revision chain read from
//! `history --verbose`, each revision's offline SQL (`upgrade P:R --sql`) cleaned of
//! Alembic's own bookkeeping (its `alembic_version` table, its `BEGIN`/`COMMIT`), the text of
//! the converted files with a header naming their revision, and that header read back to
//! adopt a database Alembic migrated.
//!
//! Pure functions over text: running Alembic is the CLI's job.

use std::collections::{BTreeSet, HashMap};

use super::guard;
use super::script::{self, Dialect, TxControl};
use super::version::Version;

/// The header line naming the revision a file was converted from.
pub const REVISION_KEY: &str = "-- alembic-revision:";
/// The header line naming that revision's down revisions (`base` for a first one).
pub const PARENTS_KEY: &str = "-- alembic-parents:";
/// Alembic's own default name for its version table.
pub const VERSION_TABLE: &str = "alembic_version";

/// One revision as `history --verbose` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub id: String,
    /// Its down revisions: none for a first revision, two or more for a merge.
    pub parents: Vec<String>,
    /// The first line of its docstring (the message it was created with).
    pub message: String,
    /// `depends_on` revisions, which must come earlier too.
    pub depends_on: Vec<String>,
}

impl Revision {
    /// How Alembic names the state before this revision in a range (`P:R`): its first
    /// down revision, or `base`.
    pub fn before(&self) -> &str {
        self.parents.first().map_or("base", String::as_str)
    }
}

/// Why the revisions cannot become one numbered sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("Alembic's history lists no revision (is this the right migrations directory?)")]
    Empty,
    #[error(
        "Alembic's history has {} heads ({}): one schema needs one line of revisions ending in one head",
        .0.len(),
        .0.join(", ")
    )]
    MultipleHeads(Vec<String>),
    #[error("revision {revision} is listed twice in Alembic's history")]
    Duplicate { revision: String },
    #[error("revision {revision} revises {parent}, which Alembic's history does not list")]
    UnknownParent { revision: String, parent: String },
    #[error("revisions {} depend on each other in a cycle", .0.join(", "))]
    Cycle(Vec<String>),
}

impl ChainError {
    /// The next step for the user.
    pub fn hint(&self) -> &'static str {
        match self {
            ChainError::MultipleHeads(_) => {
                "merge the heads first (`flask db merge heads -m \"merge\"` or `alembic merge \
                 heads`), apply the merge where the branches ran, then convert again"
            }
            ChainError::Empty => {
                "check the command after `--` (e.g. `flask db` with FLASK_APP set, or `alembic \
                 -c alembic.ini`): `<command> history --verbose` must list the revisions"
            }
            _ => {
                "`<command> heads` and `<command> history --verbose` show how Alembic sees the chain"
            }
        }
    }
}

fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "<base>")
        .map(str::to_string)
        .collect()
}

/// Reads `history --verbose` (newest first, as Alembic prints it) and returns the revisions
/// oldest first, every revision after its down revisions and dependencies. Unmerged
/// branches (more than one head) are refused; merged ones become one sequence, each
/// branch's revisions in Alembic's own order.
pub fn parse_history(text: &str) -> Result<Vec<Revision>, ChainError> {
    let mut listed: Vec<Revision> = Vec::new();
    let mut in_doc = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Rev: ") {
            let id = rest.split_whitespace().next().unwrap_or_default();
            listed.push(Revision {
                id: id.to_string(),
                parents: Vec::new(),
                message: String::new(),
                depends_on: Vec::new(),
            });
            in_doc = false;
            continue;
        }
        let Some(rev) = listed.last_mut() else {
            continue;
        };
        if let Some(p) = line
            .strip_prefix("Parent: ")
            .or_else(|| line.strip_prefix("Merges: "))
        {
            rev.parents = names(p);
        } else if let Some(d) = line.strip_prefix("Also depends on: ") {
            rev.depends_on = names(d);
        } else if line.starts_with("Path: ") {
            in_doc = true;
        } else if in_doc && rev.message.is_empty() {
            // The docstring follows, indented by four spaces; its first line is the message.
            if let Some(doc) = line.strip_prefix("    ") {
                rev.message = doc.trim().to_string();
            }
        }
    }
    if listed.is_empty() {
        return Err(ChainError::Empty);
    }
    // Oldest first: Alembic prints each revision before its ancestors.
    listed.reverse();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, r) in listed.iter().enumerate() {
        if index.insert(&r.id, i).is_some() {
            return Err(ChainError::Duplicate {
                revision: r.id.clone(),
            });
        }
    }
    let mut has_child = vec![false; listed.len()];
    for r in &listed {
        for p in &r.parents {
            let Some(&i) = index.get(p.as_str()) else {
                return Err(ChainError::UnknownParent {
                    revision: r.id.clone(),
                    parent: p.clone(),
                });
            };
            has_child[i] = true;
        }
    }
    let heads: Vec<String> = listed
        .iter()
        .zip(&has_child)
        .filter(|(_, child)| !**child)
        .map(|(r, _)| r.id.clone())
        .collect();
    if heads.len() > 1 {
        return Err(ChainError::MultipleHeads(heads));
    }
    // A stable topological order: the earliest listed revision whose predecessors are all
    // placed goes next. (Dependencies Alembic names by branch label are not revisions here.)
    let before = |r: &Revision| -> Vec<usize> {
        r.parents
            .iter()
            .chain(&r.depends_on)
            .filter_map(|p| index.get(p.as_str()).copied())
            .collect()
    };
    let mut placed = vec![false; listed.len()];
    let mut order = Vec::with_capacity(listed.len());
    while order.len() < listed.len() {
        let next = (0..listed.len())
            .find(|&i| !placed[i] && before(&listed[i]).iter().all(|&p| placed[p]));
        let Some(i) = next else {
            let stuck = (0..listed.len())
                .filter(|&i| !placed[i])
                .map(|i| listed[i].id.clone())
                .collect();
            return Err(ChainError::Cycle(stuck));
        };
        placed[i] = true;
        order.push(i);
    }
    Ok(order.into_iter().map(|i| listed[i].clone()).collect())
}

/// Which way a revision's SQL goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    Up,
    Down,
}

impl Way {
    fn word(self) -> &'static str {
        match self {
            Way::Up => "upgrade",
            Way::Down => "downgrade",
        }
    }

    /// The Alembic arguments printing `rev`'s SQL this way: `upgrade P:R --sql` or
    /// `downgrade R:P --sql` (for a merge, P is its first down revision; the output then
    /// holds the other branches too, and [`revision_sql`] picks `rev`'s part).
    pub fn args(self, rev: &Revision) -> Vec<String> {
        let range = match self {
            Way::Up => format!("{}:{}", rev.before(), rev.id),
            Way::Down => format!("{}:{}", rev.id, rev.before()),
        };
        vec![self.word().to_string(), range, "--sql".to_string()]
    }
}

/// One revision's SQL, as a schemagate script body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// The statements, each ending with `;`, separated by blank lines.
    pub sql: String,
    pub statements: usize,
    /// Alembic ran some of them outside its transaction (an `autocommit_block()`, for
    /// `CREATE INDEX CONCURRENTLY`): the script must run without schemagate's transaction,
    /// and keeps Alembic's transaction boundaries around the rest.
    pub no_transaction: bool,
}

/// Why a revision's SQL could not be picked out of Alembic's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Alembic's output has no `-- Running {way} ...` section for revision {revision} (does \
     env.py run migrations in offline mode?)"
)]
pub struct NoSection {
    pub way: &'static str,
    pub revision: String,
}

/// `-- Running upgrade A, B -> C`: the direction and both sides, as Alembic marks the start
/// of each revision in offline SQL.
fn section_marker(line: &str) -> Option<(&'static str, Vec<String>, Vec<String>)> {
    let rest = line.trim_end().strip_prefix("-- Running ")?;
    let (way, rest) = if let Some(r) = rest.strip_prefix("upgrade ") {
        ("upgrade", r)
    } else {
        ("downgrade", rest.strip_prefix("downgrade ")?)
    };
    // `upgrade  -> 1` (from base) and `downgrade 1 -> ` (to base) have an empty side.
    let (from, to) = format!("{rest} ")
        .split_once(" -> ")
        .map(|(a, b)| (names(a), names(b)))?;
    Some((way, from, to))
}

/// Alembic's own statements on its version table: creating it, and recording, moving or
/// removing a revision in it.
fn is_bookkeeping(text: &str, version_table: &str) -> bool {
    let mut words = text
        .split_whitespace()
        .map(|w| w.split('(').next().unwrap_or_default());
    let mut next_upper = || {
        words
            .next()
            .map(str::to_ascii_uppercase)
            .unwrap_or_default()
    };
    let first = next_upper();
    let second = next_upper();
    let mut table = match (first.as_str(), second.as_str()) {
        ("INSERT", "INTO") | ("DELETE", "FROM") | ("CREATE", "TABLE") | ("DROP", "TABLE") => {
            next_upper()
        }
        ("UPDATE", t) => t.to_string(),
        _ => return false,
    };
    // `CREATE TABLE IF NOT EXISTS t`, `DROP TABLE IF EXISTS t`.
    if table == "IF" {
        table = loop {
            let w = next_upper();
            if w != "NOT" && w != "EXISTS" {
                break w;
            }
        };
    }
    // `"schema"."alembic_version"`, `` `alembic_version` ``, `[alembic_version]`.
    let last = table.rsplit('.').next().unwrap_or_default();
    let unquoted = last.trim_matches(|c| matches!(c, '"' | '`' | '[' | ']'));
    unquoted.eq_ignore_ascii_case(version_table)
}

/// Picks `revision`'s statements out of Alembic's offline SQL for `way`, leaving out its
/// bookkeeping: the version table's statements and its `BEGIN`/`COMMIT` (schemagate runs
/// each migration in its own transaction).
pub fn revision_sql(
    output: &str,
    dialect: Dialect,
    way: Way,
    revision: &str,
    version_table: &str,
) -> Result<Converted, NoSection> {
    let statements = script::split(output, dialect);
    // Section markers are comment lines outside any statement.
    let mut markers: Vec<(usize, bool)> = Vec::new();
    let mut offset = 0;
    for line in output.split_inclusive('\n') {
        let inside = statements
            .iter()
            .any(|s| s.start <= offset && offset < s.end);
        if !inside && let Some((w, from, to)) = section_marker(line) {
            let side = if way == Way::Up { &to } else { &from };
            let ours = w == way.word() && side.len() == 1 && side[0] == revision;
            markers.push((offset, ours));
        }
        offset += line.len();
    }
    if !markers.iter().any(|(_, ours)| *ours) {
        return Err(NoSection {
            way: way.word(),
            revision: revision.to_string(),
        });
    }
    // Alembic on a dialect with transactional DDL wraps the run in BEGIN ... COMMIT, and
    // an autocommit_block() commits before its statements and begins again after them.
    let wrapped = statements.iter().any(|s| script::tx_control(s).is_some());
    let mut in_tx = false;
    let mut ours: Vec<(&str, bool)> = Vec::new();
    for s in &statements {
        match script::tx_control(s) {
            Some(TxControl::Begin) => in_tx = true,
            Some(TxControl::Commit | TxControl::Rollback) => in_tx = false,
            None => {
                let section = markers.iter().rev().find(|(at, _)| *at < s.start);
                let text = s.text(output);
                if section.is_some_and(|(_, o)| *o) && !is_bookkeeping(text, version_table) {
                    ours.push((text, in_tx));
                }
            }
        }
    }
    let no_transaction = wrapped && ours.iter().any(|(_, in_tx)| !in_tx);
    let mut parts: Vec<String> = Vec::new();
    let mut open = false;
    for (text, in_tx) in &ours {
        if no_transaction && *in_tx != open {
            parts.push(if *in_tx { "BEGIN;" } else { "COMMIT;" }.to_string());
            open = *in_tx;
        }
        parts.push(format!("{text};"));
    }
    if open {
        parts.push("COMMIT;".to_string());
    }
    Ok(Converted {
        sql: parts.join("\n\n"),
        statements: ours.len(),
        no_transaction,
    })
}

/// What a converted file holds.
pub enum Body<'a> {
    /// The revision's SQL.
    Sql(&'a Converted),
    /// Alembic could not print it (a revision that reads the database, or raises): the
    /// file says so and holds no statement, so `upgrade` refuses it until someone writes
    /// the SQL.
    Failed(&'a str),
}

/// The text of one converted file: a header naming the revision (read back by
/// [`origin`]), the directives the SQL needs, and the SQL.
pub fn render(rev: &Revision, way: Way, dialect: Dialect, body: Body<'_>) -> String {
    let mut out = Vec::new();
    let message = if rev.message.is_empty() {
        String::new()
    } else {
        format!(": {}", rev.message)
    };
    out.push(match way {
        Way::Up => format!("-- Alembic revision {}{message}", rev.id),
        Way::Down => format!("-- Reverts Alembic revision {}{message}", rev.id),
    });
    out.push(format!("{REVISION_KEY} {}", rev.id));
    out.push(format!(
        "{PARENTS_KEY} {}",
        if rev.parents.is_empty() {
            "base".to_string()
        } else {
            rev.parents.join(", ")
        }
    ));
    out.push(format!(
        "-- Converted by `schemagate migrate convert --from alembic` from Alembic's offline SQL \
         for {}",
        dialect.name()
    ));
    out.push(format!(
        "-- (`{}`), without Alembic's bookkeeping (its version table, BEGIN/COMMIT).",
        way.args(rev).join(" ")
    ));
    match body {
        Body::Failed(error) => {
            out.push("--".into());
            out.push("-- Alembic's offline SQL mode could not print this revision:".into());
            // Quoted, so that no line of it can read as a directive.
            for line in error.lines().filter(|l| !l.trim().is_empty()) {
                out.push(format!("-- > {}", line.trim_end()));
            }
            out.push(format!(
                "-- Write what its {}() does as SQL below. Until then schemagate refuses to run \
                 this file (it has no statement).",
                way.word()
            ));
        }
        Body::Sql(c) => {
            if c.no_transaction {
                out.push(
                    "-- Alembic ran part of it outside a transaction (autocommit_block), so it \
                     runs statement by statement, with Alembic's transactions kept."
                        .into(),
                );
                out.push("-- schemagate:no-transaction".into());
            }
            if c.statements == 0 {
                out.push(format!(
                    "-- schemagate:empty Alembic revision {} has no SQL to {}",
                    rev.id,
                    match way {
                        Way::Up => "apply",
                        Way::Down => "revert",
                    }
                ));
            } else if way == Way::Up {
                let losses = destructive(&c.sql, dialect);
                if !losses.is_empty() {
                    out.push(format!(
                        "-- schemagate:allow-destructive as written in Alembic revision {} ({})",
                        rev.id,
                        losses.join(", ")
                    ));
                }
            }
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    if let Body::Sql(c) = body
        && !c.sql.is_empty()
    {
        text.push('\n');
        text.push_str(&c.sql);
        text.push('\n');
    }
    text
}

/// What the destructive-change guard would refuse in `sql`: these statements were reviewed
/// and run when the revision was written, so the converted file carries the permission.
fn destructive(sql: &str, dialect: Dialect) -> Vec<&'static str> {
    let statements = script::split(sql, dialect);
    let analysis = guard::analyse(sql, &statements, dialect, 1);
    let mut losses: Vec<&'static str> = Vec::new();
    let found = analysis.findings.iter().map(|f| f.loss.describe());
    let changes = analysis
        .type_changes
        .iter()
        .map(|_| "changes a column's type");
    for loss in found.chain(changes) {
        if !losses.contains(&loss) {
            losses.push(loss);
        }
    }
    losses
}

/// The revision a converted file came from, as its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub revision: String,
    pub parents: Vec<String>,
}

/// Reads a converted file's header (the comment lines before its first statement).
pub fn origin(text: &str) -> Option<Origin> {
    let mut revision = None;
    let mut parents = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            continue;
        }
        if !line.starts_with("--") {
            break;
        }
        if let Some(r) = line.strip_prefix(REVISION_KEY) {
            revision = Some(r.trim().to_string());
        } else if let Some(p) = line.strip_prefix(PARENTS_KEY) {
            parents = names(p).into_iter().filter(|p| p != "base").collect();
        }
    }
    revision
        .filter(|r| !r.is_empty())
        .map(|revision| Origin { revision, parents })
}

/// Why a database Alembic migrated cannot be matched with the converted files.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "Alembic's revision {revision} has no converted file (no `{REVISION_KEY} {revision}` header) in the directory"
    )]
    NoFile { revision: String },
    #[error("revision {parent} (below {revision}) has no converted file in the directory")]
    MissingAncestor { revision: String, parent: String },
}

/// The versions a database at Alembic revision `head` has applied: the file converted from
/// that revision and those of all its ancestors, per the files' headers (`files`: each
/// version with its header).
pub fn applied_versions(
    files: &[(Version, Origin)],
    head: &str,
) -> Result<Vec<Version>, AdoptError> {
    let by_revision: HashMap<&str, &(Version, Origin)> =
        files.iter().map(|f| (f.1.revision.as_str(), f)).collect();
    if !by_revision.contains_key(head) {
        return Err(AdoptError::NoFile {
            revision: head.to_string(),
        });
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut todo = vec![(head, head)];
    let mut versions = Vec::new();
    while let Some((rev, child)) = todo.pop() {
        if !seen.insert(rev) {
            continue;
        }
        let Some((version, origin)) = by_revision.get(rev) else {
            return Err(AdoptError::MissingAncestor {
                revision: child.to_string(),
                parent: rev.to_string(),
            });
        };
        versions.push(version.clone());
        todo.extend(origin.parents.iter().map(|p| (p.as_str(), rev)));
    }
    versions.sort();
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `flask db history --verbose` prints for the fixture app (newest first).
    const LINEAR: &str = "\
Rev: 0003_add_total (head)
Parent: 0002_seed_status
Path: /app/migrations/versions/0003_add_total.py

    add orders.total
    
    Revision ID: 0003_add_total
    Revises: 0002_seed_status
    Create Date: 2024-01-01 00:00:03

Rev: 0002_seed_status
Parent: 0001_create_orders
Path: /app/migrations/versions/0002_seed_status.py

    seed order_status (data migration)
    
    Revision ID: 0002_seed_status

Rev: 0001_create_orders
Parent: <base>
Path: /app/migrations/versions/0001_create_orders.py

    create orders
    
    Revision ID: 0001_create_orders
    Revises:
";

    fn ids(revs: &[Revision]) -> Vec<&str> {
        revs.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_linear_history_comes_out_oldest_first_with_its_messages() {
        let revs = parse_history(LINEAR).unwrap();
        assert_eq!(
            ids(&revs),
            ["0001_create_orders", "0002_seed_status", "0003_add_total"]
        );
        assert_eq!(revs[0].parents, Vec::<String>::new());
        assert_eq!(revs[0].before(), "base");
        assert_eq!(revs[1].parents, ["0001_create_orders"]);
        assert_eq!(revs[1].message, "seed order_status (data migration)");
        assert_eq!(
            Way::Up.args(&revs[0]),
            ["upgrade", "base:0001_create_orders", "--sql"]
        );
        assert_eq!(
            Way::Down.args(&revs[2]),
            ["downgrade", "0003_add_total:0002_seed_status", "--sql"]
        );
    }

    #[test]
    fn unmerged_heads_are_refused_merged_branches_are_ordered() {
        let two_heads = "\
Rev: b2 (head)
Parent: a1
Path: x

Rev: b1 (head)
Parent: a1
Path: x

Rev: a1 (branchpoint)
Parent: <base>
Branches into: b1, b2
Path: x
";
        let err = parse_history(two_heads).unwrap_err();
        assert_eq!(
            err,
            ChainError::MultipleHeads(vec!["b1".into(), "b2".into()])
        );
        assert!(err.to_string().contains("2 heads (b1, b2)"), "{err}");
        assert!(err.hint().contains("merge heads"));

        let merged = "\
Rev: m (head) (mergepoint)
Merges: b1, b2
Path: x

    merge heads

Rev: b2
Parent: a1
Path: x

Rev: b1
Parent: a1
Path: x

Rev: a1 (branchpoint)
Parent: <base>
Branches into: b1, b2
Path: x
";
        let revs = parse_history(merged).unwrap();
        assert_eq!(ids(&revs), ["a1", "b1", "b2", "m"]);
        assert_eq!(revs[3].parents, ["b1", "b2"]);
        assert_eq!(Way::Up.args(&revs[3]), ["upgrade", "b1:m", "--sql"]);
    }

    #[test]
    fn histories_that_make_no_chain_are_refused() {
        assert_eq!(parse_history("nothing here\n"), Err(ChainError::Empty));
        let unknown = "Rev: b (head)\nParent: a\nPath: x\n";
        assert!(matches!(
            parse_history(unknown),
            Err(ChainError::UnknownParent { .. })
        ));
        let twice = "Rev: a (head)\nParent: <base>\nRev: a\nParent: <base>\n";
        assert!(matches!(
            parse_history(twice),
            Err(ChainError::Duplicate { .. })
        ));
    }

    #[test]
    fn dependencies_come_first() {
        let h = "\
Rev: c (head)
Parent: b
Path: x
Rev: b
Parent: a
Also depends on: d
Path: x
Rev: d
Parent: a
Path: x
Rev: a
Parent: <base>
Path: x
";
        // d is no head: c depends on it through b; b must come after d.
        let err = parse_history(h).unwrap_err();
        assert!(matches!(err, ChainError::MultipleHeads(_)), "{err}");
        let h = h.replace("Rev: c (head)\nParent: b", "Rev: c (head)\nMerges: b, d");
        let revs = parse_history(&h).unwrap();
        assert_eq!(ids(&revs), ["a", "d", "b", "c"]);
    }

    const PG_FIRST: &str = "\
BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001_create_orders

SELECT pg_sleep(1);

CREATE TABLE orders (
    id SERIAL NOT NULL, 
    customer TEXT, 
    PRIMARY KEY (id)
);

INSERT INTO alembic_version (version_num) VALUES ('0001_create_orders') RETURNING alembic_version.version_num;

COMMIT;

";

    #[test]
    fn bookkeeping_and_the_transaction_wrapper_are_left_out() {
        let c = revision_sql(
            PG_FIRST,
            Dialect::Postgres,
            Way::Up,
            "0001_create_orders",
            VERSION_TABLE,
        )
        .unwrap();
        assert_eq!(
            c.sql,
            "SELECT pg_sleep(1);\n\nCREATE TABLE orders (\n    id SERIAL NOT NULL, \n    \
             customer TEXT, \n    PRIMARY KEY (id)\n);"
        );
        assert_eq!(c.statements, 2);
        assert!(!c.no_transaction);

        let down = "BEGIN;\n\n-- Running downgrade 0001_create_orders -> \n\nDROP TABLE orders;\n\n\
                    DELETE FROM alembic_version WHERE alembic_version.version_num = '0001_create_orders';\n\n\
                    DROP TABLE alembic_version;\n\nCOMMIT;\n\n";
        let c = revision_sql(
            down,
            Dialect::Postgres,
            Way::Down,
            "0001_create_orders",
            VERSION_TABLE,
        )
        .unwrap();
        assert_eq!(c.sql, "DROP TABLE orders;");
    }

    #[test]
    fn a_merge_keeps_only_its_own_section() {
        // `upgrade b1:m --sql` also prints the other branch.
        let out = "BEGIN;\n\n-- Running upgrade a1 -> b2\n\nALTER TABLE t ADD COLUMN b INTEGER;\n\n\
                   INSERT INTO alembic_version (version_num) VALUES ('b2') RETURNING alembic_version.version_num;\n\n\
                   -- Running upgrade b1, b2 -> m\n\n\
                   DELETE FROM alembic_version WHERE alembic_version.version_num = 'b1';\n\n\
                   UPDATE alembic_version SET version_num='m' WHERE alembic_version.version_num = 'b2';\n\n\
                   COMMIT;\n";
        let m = revision_sql(out, Dialect::Postgres, Way::Up, "m", VERSION_TABLE).unwrap();
        assert_eq!((m.sql.as_str(), m.statements), ("", 0));
        let b2 = revision_sql(out, Dialect::Postgres, Way::Up, "b2", VERSION_TABLE).unwrap();
        assert_eq!(b2.sql, "ALTER TABLE t ADD COLUMN b INTEGER;");
        let err = revision_sql(out, Dialect::Postgres, Way::Down, "m", VERSION_TABLE).unwrap_err();
        assert!(err.to_string().contains("-- Running downgrade"), "{err}");
    }

    #[test]
    fn an_autocommit_block_makes_a_no_transaction_script_with_alembics_transactions() {
        let out = "BEGIN;\n\n-- Running upgrade 1 -> 2\n\nALTER TABLE t ADD COLUMN c INT;\n\n\
                   COMMIT;\n\nCREATE INDEX CONCURRENTLY ix_c ON t (c);\n\nBEGIN;\n\n\
                   UPDATE t SET c = 0 WHERE c IS NULL;\n\n\
                   UPDATE alembic_version SET version_num='2' WHERE alembic_version.version_num = '1';\n\n\
                   COMMIT;\n";
        let c = revision_sql(out, Dialect::Postgres, Way::Up, "2", VERSION_TABLE).unwrap();
        assert!(c.no_transaction);
        assert_eq!(
            c.sql,
            "BEGIN;\n\nALTER TABLE t ADD COLUMN c INT;\n\nCOMMIT;\n\n\
             CREATE INDEX CONCURRENTLY ix_c ON t (c);\n\nBEGIN;\n\n\
             UPDATE t SET c = 0 WHERE c IS NULL;\n\nCOMMIT;"
        );
        // The engine accepts it: balanced transactions in a no-transaction script.
        let text = render(
            &Revision {
                id: "2".into(),
                parents: vec!["1".into()],
                message: "index c".into(),
                depends_on: vec![],
            },
            Way::Up,
            Dialect::Postgres,
            Body::Sql(&c),
        );
        let d = script::parse_directives(&text).unwrap();
        assert!(d.no_transaction);
        script::check_balanced(&text, &script::split(&text, Dialect::Postgres)).unwrap();
    }

    #[test]
    fn sqlite_and_mysql_output_has_no_wrapper_and_custom_version_tables_are_known() {
        let out = "CREATE TABLE IF NOT EXISTS \"audit\".\"my_versions\" (version_num VARCHAR(32) NOT NULL);\n\n\
                   -- Running upgrade  -> 1\n\nCREATE TABLE orders (id INTEGER NOT NULL);\n\n\
                   INSERT INTO `my_versions` (version_num) VALUES ('1');\n\n";
        let c = revision_sql(out, Dialect::Sqlite, Way::Up, "1", "my_versions").unwrap();
        assert_eq!(c.sql, "CREATE TABLE orders (id INTEGER NOT NULL);");
        assert!(!c.no_transaction);
        // Statements that only mention the table in passing are the revision's own.
        assert!(!is_bookkeeping(
            "UPDATE orders SET note = 'alembic_version'",
            VERSION_TABLE
        ));
        assert!(!is_bookkeeping(
            "ALTER TABLE alembic_version ALTER COLUMN version_num TYPE VARCHAR(64)",
            VERSION_TABLE
        ));
        assert!(is_bookkeeping(
            "DROP TABLE IF EXISTS public.alembic_version",
            VERSION_TABLE
        ));
    }

    fn rev(id: &str, parents: &[&str], message: &str) -> Revision {
        Revision {
            id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            message: message.into(),
            depends_on: vec![],
        }
    }

    #[test]
    fn files_carry_their_revision_and_the_directives_their_sql_needs() {
        let r = rev("0003_drop_note", &["0002_x"], "drop orders.note");
        let c = Converted {
            sql: "ALTER TABLE orders DROP COLUMN note;".into(),
            statements: 1,
            no_transaction: false,
        };
        let up = render(&r, Way::Up, Dialect::Postgres, Body::Sql(&c));
        assert!(up.starts_with("-- Alembic revision 0003_drop_note: drop orders.note\n"));
        let d = script::parse_directives(&up).unwrap();
        assert_eq!(
            d.allow_destructive.as_deref(),
            Some("as written in Alembic revision 0003_drop_note (drops a column)")
        );
        assert_eq!(
            origin(&up),
            Some(Origin {
                revision: "0003_drop_note".into(),
                parents: vec!["0002_x".into()]
            })
        );
        // Down scripts are never refused for losing data: no permission needed.
        let down = render(&r, Way::Down, Dialect::Postgres, Body::Sql(&c));
        assert!(
            script::parse_directives(&down)
                .unwrap()
                .allow_destructive
                .is_none()
        );

        let empty = Converted {
            sql: String::new(),
            statements: 0,
            no_transaction: false,
        };
        let text = render(
            &rev("m", &["a", "b"], ""),
            Way::Up,
            Dialect::Sqlite,
            Body::Sql(&empty),
        );
        assert!(script::parse_directives(&text).unwrap().empty.is_some());
        assert_eq!(origin(&text).unwrap().parents, ["a", "b"]);

        let failed = render(
            &rev("1", &[], "reads data"),
            Way::Up,
            Dialect::Postgres,
            Body::Failed("NotImplementedError: offline\nschemagate:no-transaction\n"),
        );
        assert!(script::split(&failed, Dialect::Postgres).is_empty());
        assert_eq!(
            script::parse_directives(&failed).unwrap(),
            Default::default()
        );
        assert!(
            failed.contains("-- > NotImplementedError: offline"),
            "{failed}"
        );
        assert_eq!(origin(&failed).unwrap().parents, Vec::<String>::new());
    }

    #[test]
    fn a_database_at_a_revision_has_applied_its_ancestors() {
        let v = |s: &str| Version::parse(s).unwrap();
        let o = |r: &str, p: &[&str]| Origin {
            revision: r.into(),
            parents: p.iter().map(|s| s.to_string()).collect(),
        };
        let files = vec![
            (v("1"), o("a", &[])),
            (v("2"), o("b1", &["a"])),
            (v("3"), o("b2", &["a"])),
            (v("4"), o("m", &["b1", "b2"])),
        ];
        assert_eq!(
            applied_versions(&files, "m").unwrap(),
            [v("1"), v("2"), v("3"), v("4")]
        );
        // On the second branch only: the first branch's file is not applied.
        assert_eq!(applied_versions(&files, "b2").unwrap(), [v("1"), v("3")]);
        assert_eq!(
            applied_versions(&files, "zz"),
            Err(AdoptError::NoFile {
                revision: "zz".into()
            })
        );
        assert_eq!(
            applied_versions(&files[1..], "b1"),
            Err(AdoptError::MissingAncestor {
                revision: "b1".into(),
                parent: "a".into()
            })
        );
    }
}
