//! `migrate convert --from alembic`: an Alembic (Flask-Migrate) project's revisions written
//! as schemagate's own SQL files, one migration per revision, from Alembic's offline SQL
//! mode (nothing connects to a database). The text work is `engine::alembic`'s; this module
//! runs Alembic, checks the directory and writes the files.

use std::path::{Path, PathBuf};

use futures_util::stream::{self, StreamExt};
use serde_json::json;

use super::output::Outcome;
use crate::engine::alembic::{self, Body, Revision, Way};
use crate::engine::redact;
use crate::engine::script::Dialect;
use crate::engine::source::{self, SourceError};
use crate::engine::{MigrationSet, Version};
use crate::runner::exit::{CliError, Exit};

/// What to convert, and where to.
pub struct Request<'a> {
    pub dir: &'a Path,
    pub dialect: Dialect,
    /// The Alembic command prefix (`flask db`, `alembic -c alembic.ini`).
    pub command: &'a [String],
    /// Handed to the command as `DATABASE_URL` when given on schemagate's command line.
    pub database_url: Option<&'a str>,
    pub force: bool,
    pub version_table: &'a str,
}

/// An Alembic command that did not print what was asked.
struct ToolFailure {
    command: String,
    /// Why, from the end of its standard error (scrubbed of secrets).
    detail: String,
    /// It could not even start (not found, not executable).
    not_started: bool,
}

impl ToolFailure {
    fn message(&self) -> String {
        format!("`{}` failed: {}", self.command, self.detail)
    }
}

/// The last lines of a tool's standard error: a Python traceback ends with what went wrong.
fn tail(stderr: &str, lines: usize) -> String {
    let kept: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = kept.len().saturating_sub(lines);
    kept[from..].join("\n")
}

/// Runs `<command> <args>` and returns what it printed on standard output.
async fn run_tool(req: &Request<'_>, args: &[String]) -> Result<String, ToolFailure> {
    let shown =
        redact::redact(&format!("{} {}", req.command.join(" "), args.join(" "))).into_owned();
    let mut c = tokio::process::Command::new(&req.command[0]);
    c.args(&req.command[1..])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // A stopped `convert` (Ctrl-C, SIGTERM) leaves no Alembic process behind.
        .kill_on_drop(true);
    if let Some(url) = req.database_url {
        c.env("DATABASE_URL", url);
    }
    let out = c.output().await.map_err(|e| ToolFailure {
        command: shown.clone(),
        detail: format!("cannot start it: {e}"),
        not_started: true,
    })?;
    if !out.status.success() {
        let how = match out.status.code() {
            Some(code) => format!("exit status {code}"),
            None => "killed by a signal".into(),
        };
        let stderr = redact::redact(&String::from_utf8_lossy(&out.stderr)).into_owned();
        let said = tail(&stderr, 8);
        return Err(ToolFailure {
            command: shown,
            detail: if said.is_empty() {
                how
            } else {
                format!("{how}:\n{said}")
            },
            not_started: false,
        });
    }
    String::from_utf8(out.stdout).map_err(|_| ToolFailure {
        command: shown,
        detail: "it printed something that is not UTF-8 text".into(),
        not_started: false,
    })
}

/// One revision's files, before they are written.
struct Planned<'r> {
    rev: &'r Revision,
    version: String,
    up: String,
    down: String,
}

/// `0001`-style versions, wide enough for every revision.
fn plan_names(revisions: &[Revision]) -> Vec<Planned<'_>> {
    let width = revisions.len().to_string().len().max(4);
    revisions
        .iter()
        .enumerate()
        .map(|(i, rev)| {
            let version = format!("{:0width$}", i + 1);
            let mut slug = super::migrate::slug(&rev.message);
            if slug.is_empty() {
                slug = super::migrate::slug(&rev.id);
            }
            if slug.is_empty() {
                slug = "revision".into();
            }
            Planned {
                up: format!("{version}_{slug}.up.sql"),
                down: format!("{version}_{slug}.down.sql"),
                rev,
                version,
            }
        })
        .collect()
}

/// Refuses to write over anything: files of the same name (unless --force), and other
/// files of the same versions (always: the directory would hold a version twice).
fn check_directory(req: &Request<'_>, planned: &[Planned<'_>]) -> Result<(), CliError> {
    let existing: MigrationSet = match source::load_dir(req.dir) {
        Ok(set) => set,
        Err(SourceError::Empty { .. } | SourceError::DirMissing { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut same_name = Vec::new();
    let mut taken = Vec::new();
    for p in planned {
        let Some(m) = Version::parse(&p.version)
            .ok()
            .and_then(|v| existing.get(&v))
        else {
            continue;
        };
        let files = std::iter::once(&m.up.file).chain(m.down.as_ref().map(|d| &d.file));
        for f in files {
            if *f == p.up || *f == p.down {
                same_name.push(f.clone());
            } else {
                taken.push(format!("{} (version {})", f, p.version));
            }
        }
    }
    let dir = req.dir.display();
    if !taken.is_empty() {
        return Err(CliError::new(
            Exit::Refused,
            "refused",
            format!(
                "the versions convert gives the revisions (1 to {}) are taken in {dir}: {}",
                planned.len(),
                some(&taken)
            ),
        )
        .hint("convert into an empty directory (--dir), or move those files away first"));
    }
    if !same_name.is_empty() && !req.force {
        return Err(CliError::new(
            Exit::Refused,
            "refused",
            format!(
                "{} file(s) already exist in {dir}: {}",
                same_name.len(),
                some(&same_name)
            ),
        )
        .hint(
            "convert never overwrites a migration; --force replaces files it wrote before (only \
             while no database has applied them: their checksums are recorded)",
        ));
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, force: bool) -> Result<(), CliError> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    open.open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(|e| {
            CliError::new(
                Exit::Internal,
                "io",
                format!("cannot write {}: {e}", path.display()),
            )
        })
}

/// A converted revision's files and what the user should know about them.
struct Written {
    version: String,
    revision: String,
    message: String,
    up: String,
    down: Option<String>,
    /// Alembic could not print the up SQL: the file holds only comments.
    unconverted: Option<String>,
    /// Why there is no down script.
    no_down: Option<String>,
    no_transaction: bool,
    allow_destructive: Option<String>,
}

/// Alembic's own directory (`migrations/` in a Flask-Migrate project, also schemagate's
/// default --dir) is no place for the converted files: they would sit among the revisions
/// they replace.
fn refuse_alembic_directory(dir: &Path) -> Result<(), CliError> {
    if dir.join("env.py").is_file() && dir.join("script.py.mako").is_file() {
        return Err(CliError::new(
            Exit::Refused,
            "refused",
            format!(
                "{} is Alembic's own directory (env.py, script.py.mako): convert writes \
                 schemagate's files elsewhere",
                dir.display()
            ),
        )
        .hint(
            "pass another --dir (or SCHEMAGATE_DIR), e.g. --dir db/migrations; once Flask-Migrate \
             is gone, the files can move wherever you like",
        ));
    }
    Ok(())
}

/// At most a few names, for a message.
fn some(names: &[String]) -> String {
    const SHOWN: usize = 6;
    if names.len() <= SHOWN {
        return names.join(", ");
    }
    format!(
        "{} and {} more",
        names[..SHOWN].join(", "),
        names.len() - SHOWN
    )
}

/// Converts every revision the Alembic command lists into `req.dir`.
pub async fn alembic(req: Request<'_>) -> Result<Outcome, CliError> {
    refuse_alembic_directory(req.dir)?;
    let history = run_tool(&req, &["history".into(), "--verbose".into()])
        .await
        .map_err(|f| {
            let hint = if f.not_started {
                "give the Alembic command after `--` as you run it: `-- flask db` (with FLASK_APP \
                 set), `-- alembic -c alembic.ini`; it must be on PATH"
            } else {
                "run `<command> history --verbose` yourself: it must list the revisions (the app \
                 must import, with the environment it needs, e.g. FLASK_APP and DATABASE_URL)"
            };
            CliError::new(Exit::MigrationFailed, "command_failed", f.message()).hint(hint)
        })?;
    let revisions = alembic::parse_history(&history)
        .map_err(|e| CliError::new(Exit::Refused, "refused", e.to_string()).hint(e.hint()))?;
    let planned = plan_names(&revisions);
    check_directory(&req, &planned)?;

    // Alembic starts a Python interpreter per call: run a few at once, in order.
    let parallel = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .clamp(1, 8);
    let calls: Vec<(usize, Way)> = (0..revisions.len())
        .flat_map(|i| [(i, Way::Up), (i, Way::Down)])
        .collect();
    let req_ref = &req;
    let revs = &revisions;
    let outputs: Vec<Result<String, ToolFailure>> = stream::iter(calls)
        .map(|(i, way)| async move { run_tool(req_ref, &way.args(&revs[i])).await })
        .buffered(parallel)
        .collect()
        .await;

    let mut files: Vec<(String, String)> = Vec::new();
    let mut written: Vec<Written> = Vec::new();
    for (p, out) in planned.iter().zip(outputs.chunks(2)) {
        let rev = p.rev;
        let sql = |way: Way, out: &Result<String, ToolFailure>| -> Result<_, String> {
            let text = out.as_ref().map_err(ToolFailure::message)?;
            alembic::revision_sql(text, req.dialect, way, &rev.id, req.version_table)
                .map_err(|e| e.to_string())
        };
        let up = sql(Way::Up, &out[0]);
        let down = sql(Way::Down, &out[1]);
        let up_text = match &up {
            Ok(c) => alembic::render(rev, Way::Up, req.dialect, Body::Sql(c)),
            Err(e) => alembic::render(rev, Way::Up, req.dialect, Body::Failed(e)),
        };
        let directives = crate::engine::script::parse_directives(&up_text).unwrap_or_default();
        files.push((p.up.clone(), up_text));
        if let Ok(c) = &down {
            files.push((
                p.down.clone(),
                alembic::render(rev, Way::Down, req.dialect, Body::Sql(c)),
            ));
        }
        written.push(Written {
            version: p.version.clone(),
            revision: rev.id.clone(),
            message: rev.message.clone(),
            up: p.up.clone(),
            down: down.is_ok().then(|| p.down.clone()),
            unconverted: up.as_ref().err().cloned(),
            no_down: down.as_ref().err().cloned(),
            no_transaction: up.as_ref().is_ok_and(|c| c.no_transaction),
            allow_destructive: directives.allow_destructive,
        });
    }
    // What is written must load as it will be read (directives, names, versions).
    source::load_files("the converted files", files.iter().cloned()).map_err(|e| {
        CliError::new(
            Exit::Internal,
            "internal",
            format!("the converted files would not load: {e}"),
        )
        .hint("this is a bug in schemagate: please report it with Alembic's offline SQL")
    })?;

    std::fs::create_dir_all(req.dir).map_err(|e| {
        CliError::new(
            Exit::Internal,
            "io",
            format!("cannot create {}: {e}", req.dir.display()),
        )
    })?;
    for (name, text) in &files {
        write_file(&req.dir.join(name), text, req.force)?;
    }
    // A down script from an earlier conversion that Alembic can no longer print is stale.
    if req.force {
        for w in written.iter().filter(|w| w.down.is_none()) {
            let stale: PathBuf = req.dir.join(w.up.replace(".up.sql", ".down.sql"));
            if stale.exists() {
                let _ = std::fs::remove_file(&stale);
            }
        }
    }
    Ok(outcome(&req, &written))
}

fn outcome(req: &Request<'_>, written: &[Written]) -> Outcome {
    let dir = req.dir.display();
    let mut human = format!(
        "Converted {} Alembic revision(s) into {dir} ({} SQL):\n",
        written.len(),
        req.dialect.name()
    );
    for w in written {
        let down = match &w.down {
            Some(d) => format!(", {d}"),
            None => " (no down script)".into(),
        };
        human.push_str(&format!(
            "  {}  {} -> {}{down}\n",
            w.version, w.revision, w.up
        ));
        if w.no_transaction {
            human.push_str("        runs without a transaction (Alembic's autocommit_block)\n");
        }
        if let Some(reason) = &w.allow_destructive {
            human.push_str(&format!("        allow-destructive: {reason}\n"));
        }
        if let Some(why) = &w.no_down {
            human.push_str(&format!(
                "        no down script: {}\n",
                why.replace('\n', "\n          ")
            ));
        }
    }
    let unconverted: Vec<&Written> = written.iter().filter(|w| w.unconverted.is_some()).collect();
    for w in &unconverted {
        human.push_str(&format!(
            "Alembic could not print the SQL of revision {} ({}): {}\n  write it into {} by hand; until then upgrade refuses that file\n",
            w.revision,
            w.version,
            w.unconverted.as_deref().unwrap_or_default(),
            w.up
        ));
    }
    human.push_str(
        "Next: a database Alembic already migrated records its versions without running them \
         (`schemagate migrate import --from alembic --apply`); a new one runs them \
         (`schemagate migrate upgrade`).\n",
    );
    let json = json!({
        "from": "alembic",
        "dir": dir.to_string(),
        "dialect": req.dialect.name(),
        "migrations": written.iter().map(|w| json!({
            "version": w.version,
            "revision": w.revision,
            "message": w.message,
            "up": w.up,
            "down": w.down,
            "noTransaction": w.no_transaction,
            "allowDestructive": w.allow_destructive,
            "noDownReason": w.no_down,
            "unconverted": w.unconverted,
        })).collect::<Vec<_>>(),
    });
    Outcome {
        // Files a person must finish: the directory is not a valid source yet.
        exit: if unconverted.is_empty() {
            Exit::Ok
        } else {
            Exit::Source
        },
        json,
        human,
    }
}
