//! `status`: how the database compares with the migration files, as one report.

use serde::Serialize;

use super::dialect::LockHolder;
use super::history::{DbState, Unfinished};
use super::plan::{self, Drift, EmptyScript, PlanOptions};
use super::script::Dialect;
use super::source::MigrationSet;

/// The overall verdict, which decides `status`'s exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every migration is applied and matches its file.
    UpToDate,
    /// Migrations are waiting to be applied (or a runner is applying them now).
    Pending,
    /// Applied migrations differ from the files, or are missing from them.
    Drift,
    /// A step did not finish; a person must resolve it.
    Dirty,
}

/// A migration that is not applied.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingMigration {
    pub version: String,
    pub description: String,
    pub file: String,
    /// Older than the current version: `upgrade` needs --out-of-order to apply it.
    pub out_of_order: bool,
    /// `expand` or `contract` (see `plan::PhaseFilter`).
    pub phase: crate::engine::script::Phase,
    /// A contract migration below the current version: an expand run held it; it runs
    /// with `--phase contract` (or `all`) once no older app version runs.
    pub held: bool,
}

/// The whole status.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub verdict: Verdict,
    /// The database URL with its password masked.
    pub database: String,
    pub dialect: &'static str,
    /// False when the history table does not exist yet.
    pub initialized: bool,
    pub current: Option<String>,
    pub head: Option<String>,
    pub applied_count: usize,
    pub pending: Vec<PendingMigration>,
    pub drift: Drift,
    /// Scripts `upgrade`/`downgrade` would refuse: no statement, and no
    /// `-- schemagate:empty <reason>` (pending up scripts and down scripts).
    pub empty_scripts: Vec<EmptyScript>,
    pub unfinished: Option<Unfinished>,
    /// True when the unfinished step's runner still holds the lock (it is running now).
    pub running: bool,
    pub lock_holder: Option<LockHolder>,
}

/// Compares the state with the files (pure).
pub fn status(
    set: &MigrationSet,
    state: &DbState,
    opts: &PlanOptions,
    database: String,
    dialect: Dialect,
    lock_holder: Option<LockHolder>,
) -> StatusReport {
    let current = state.current().cloned();
    let pending: Vec<PendingMigration> = plan::pending(set, state)
        .into_iter()
        .map(|m| PendingMigration {
            version: m.version.to_string(),
            description: m.description.clone(),
            file: m.up.file.clone(),
            out_of_order: !m.is_contract() && current.as_ref().is_some_and(|c| m.version < *c),
            phase: m.up.directives.phase,
            held: m.is_contract() && current.as_ref().is_some_and(|c| m.version < *c),
        })
        .collect();
    let mut drift = plan::drift(set, state, opts.checksum);
    if opts.ignore_missing {
        drift.missing.clear();
    }
    let running = state
        .unfinished
        .as_ref()
        .is_some_and(|u| !u.failed && lock_holder.is_some());
    let verdict = if state.unfinished.is_some() && !running {
        Verdict::Dirty
    } else if !drift.is_empty() {
        Verdict::Drift
    } else if !pending.is_empty() || running {
        Verdict::Pending
    } else {
        Verdict::UpToDate
    };
    StatusReport {
        verdict,
        database,
        dialect: dialect.name(),
        initialized: state.initialized,
        current: current.map(|v| v.to_string()),
        head: set.head().map(|m| m.version.to_string()),
        applied_count: state.applied.len(),
        pending,
        drift,
        empty_scripts: plan::empty_scripts(set, state, dialect),
        unfinished: state.unfinished.clone(),
        running,
        lock_holder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::history::Kind;
    use crate::engine::history::tests::row;
    use crate::engine::source::load_files;
    use crate::engine::version::Version;

    fn set() -> MigrationSet {
        load_files(
            "t",
            (1..=3).map(|i| (format!("{i}_m.up.sql"), format!("select {i};"))),
        )
        .unwrap()
    }

    fn applied(set: &MigrationSet, vs: &[&str]) -> Vec<crate::engine::history::HistoryRow> {
        vs.iter()
            .enumerate()
            .map(|(i, v)| {
                let mut r = row(i as i64 + 1, v, Kind::Up, Some(true), true);
                let m = set.get(&Version::parse(v).unwrap()).unwrap();
                r.checksum = Some(m.up.checksum().to_string());
                r
            })
            .collect()
    }

    fn verdict(rows: &[crate::engine::history::HistoryRow], holder: Option<LockHolder>) -> Verdict {
        let s = set();
        status(
            &s,
            &DbState::from_rows(rows),
            &PlanOptions::default(),
            "db".into(),
            Dialect::Sqlite,
            holder,
        )
        .verdict
    }

    #[test]
    fn verdicts() {
        let s = set();
        assert_eq!(
            status(
                &s,
                &DbState::default(),
                &PlanOptions::default(),
                "db".into(),
                Dialect::Sqlite,
                None
            )
            .verdict,
            Verdict::Pending
        );
        assert_eq!(
            verdict(&applied(&s, &["1", "2", "3"]), None),
            Verdict::UpToDate
        );
        assert_eq!(verdict(&applied(&s, &["1"]), None), Verdict::Pending);
        let mut rows = applied(&s, &["1", "2", "3"]);
        rows[1].checksum = Some("changed".into());
        assert_eq!(verdict(&rows, None), Verdict::Drift);
        let mut rows = applied(&s, &["1", "2"]);
        rows.push(row(3, "3", Kind::Up, None, false));
        assert_eq!(verdict(&rows, None), Verdict::Dirty);
        let holder = LockHolder {
            who: "pod/1".into(),
            since: None,
            age_seconds: None,
        };
        assert_eq!(verdict(&rows, Some(holder)), Verdict::Pending);
    }

    #[test]
    fn out_of_order_pending_is_flagged() {
        let s = set();
        let st = DbState::from_rows(&applied(&s, &["1", "3"]));
        let r = status(
            &s,
            &st,
            &PlanOptions::default(),
            "db".into(),
            Dialect::Sqlite,
            None,
        );
        assert_eq!(r.pending.len(), 1);
        assert!(r.pending[0].out_of_order);
        assert_eq!(r.current.as_deref(), Some("3"));
    }
}
