//! The history table's rows and the database state derived from them.
//!
//! `schemagate_history` is an append-only log: one row per applied, reverted, failed, stamped
//! or resolved step. Finished rows are never updated or deleted; the only update is the
//! progress of a non-transactional step while it runs (and its outcome when it ends). The
//! state (which versions are applied, whether a step is dirty) is a fold over the rows in
//! insertion order, so the table is the single source of truth.

use std::collections::BTreeMap;

use serde::Serialize;

use super::version::Version;

/// What a history row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The up script ran.
    Up,
    /// The down script ran.
    Down,
    /// `stamp`/`baseline`: recorded as applied without running anything.
    Baseline,
    /// `resolve --applied`: a dirty step was declared fully applied by a person.
    MarkApplied,
    /// `resolve --reverted`: a dirty step was declared not applied (its effects undone).
    MarkReverted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Up => "up",
            Kind::Down => "down",
            Kind::Baseline => "baseline",
            Kind::MarkApplied => "mark_applied",
            Kind::MarkReverted => "mark_reverted",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "up" => Kind::Up,
            "down" => Kind::Down,
            "baseline" => Kind::Baseline,
            "mark_applied" => Kind::MarkApplied,
            "mark_reverted" => Kind::MarkReverted,
            _ => return None,
        })
    }
}

/// One row of the history table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRow {
    pub id: i64,
    pub version: String,
    pub description: String,
    pub kind: Kind,
    /// `Some(true)` succeeded, `Some(false)` failed, `None` still running (or its runner died).
    pub success: Option<bool>,
    pub checksum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum_normalized: Option<String>,
    pub transactional: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statements_total: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statements_done: Option<i64>,
    pub applied_by: String,
    pub applied_at: String,
    pub duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl HistoryRow {
    /// A step that did not end cleanly: a failed non-transactional step, or one still running.
    fn is_unfinished(&self) -> bool {
        match self.kind {
            Kind::Up | Kind::Down => {
                self.success.is_none() || (self.success == Some(false) && !self.transactional)
            }
            _ => false,
        }
    }
}

/// An applied version as the history shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    pub version: String,
    pub description: String,
    pub checksum: Option<String>,
    #[serde(skip)]
    pub checksum_normalized: Option<String>,
    pub applied_at: String,
    pub applied_by: String,
    pub duration_ms: Option<i64>,
    /// Recorded by `stamp` without running.
    pub baseline: bool,
    /// A contract migration (`phase: contract` in its note): app versions below it cannot
    /// run on the schema any more.
    pub contract: bool,
}

/// What a step's history note says of a contract migration.
pub const CONTRACT_NOTE: &str = "phase: contract";

/// A step that started and did not finish cleanly (non-transactional; see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unfinished {
    pub row_id: i64,
    pub version: String,
    pub description: String,
    pub kind: Kind,
    /// `None`: it has no outcome yet (running, or its runner died).
    pub failed: bool,
    pub statements_done: Option<i64>,
    pub statements_total: Option<i64>,
    pub applied_by: String,
    pub applied_at: String,
    pub error: Option<String>,
}

/// The state of a database, derived from its history rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbState {
    /// False when the history table does not exist yet (nothing was ever applied).
    pub initialized: bool,
    pub applied: BTreeMap<Version, Applied>,
    pub unfinished: Option<Unfinished>,
    /// Rows whose version text no longer parses (kept so nothing is silently ignored).
    pub unreadable: Vec<String>,
}

impl DbState {
    /// Folds the rows (in id order) into a state.
    pub fn from_rows(rows: &[HistoryRow]) -> DbState {
        let mut st = DbState {
            initialized: true,
            ..DbState::default()
        };
        for row in rows {
            let Ok(version) = Version::parse(&row.version) else {
                st.unreadable.push(row.version.clone());
                continue;
            };
            if row.is_unfinished() {
                st.unfinished = Some(Unfinished {
                    row_id: row.id,
                    version: row.version.clone(),
                    description: row.description.clone(),
                    kind: row.kind,
                    failed: row.success == Some(false),
                    statements_done: row.statements_done,
                    statements_total: row.statements_total,
                    applied_by: row.applied_by.clone(),
                    applied_at: row.applied_at.clone(),
                    error: row.error.clone(),
                });
                continue;
            }
            if row.success != Some(true) {
                continue; // a rolled-back transactional failure: audit only
            }
            let applied = || Applied {
                version: row.version.clone(),
                description: row.description.clone(),
                checksum: row.checksum.clone(),
                checksum_normalized: row.checksum_normalized.clone(),
                applied_at: row.applied_at.clone(),
                applied_by: row.applied_by.clone(),
                duration_ms: row.duration_ms,
                baseline: row.kind == Kind::Baseline,
                contract: row
                    .note
                    .as_deref()
                    .is_some_and(|n| n.split("; ").any(|p| p == CONTRACT_NOTE)),
            };
            match row.kind {
                Kind::Up | Kind::Baseline => {
                    st.applied.insert(version, applied());
                }
                Kind::Down => {
                    st.applied.remove(&version);
                }
                Kind::MarkApplied => {
                    st.applied.insert(version, applied());
                    st.unfinished = None;
                }
                Kind::MarkReverted => {
                    st.applied.remove(&version);
                    st.unfinished = None;
                }
            }
        }
        st
    }

    /// The highest applied version.
    pub fn current(&self) -> Option<&Version> {
        self.applied.keys().next_back()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(
        id: i64,
        version: &str,
        kind: Kind,
        success: Option<bool>,
        tx: bool,
    ) -> HistoryRow {
        HistoryRow {
            id,
            version: version.into(),
            description: format!("m{version}"),
            kind,
            success,
            checksum: Some(format!("c{version}")),
            checksum_normalized: Some(format!("n{version}")),
            transactional: tx,
            statements_total: None,
            statements_done: None,
            applied_by: "host/1".into(),
            applied_at: "2026-01-01T00:00:00.000Z".into(),
            duration_ms: Some(1),
            error: None,
            note: None,
        }
    }

    fn applied(st: &DbState) -> Vec<String> {
        st.applied.keys().map(|v| v.to_string()).collect()
    }

    #[test]
    fn up_down_and_baseline_fold_into_the_applied_set() {
        let rows = vec![
            row(1, "1", Kind::Baseline, Some(true), true),
            row(2, "2", Kind::Up, Some(true), true),
            row(3, "3", Kind::Up, Some(true), true),
            row(4, "3", Kind::Down, Some(true), true),
            row(5, "10", Kind::Up, Some(true), true),
        ];
        let st = DbState::from_rows(&rows);
        assert_eq!(applied(&st), vec!["1", "2", "10"]);
        assert_eq!(st.current().unwrap().to_string(), "10");
        assert!(st.applied.values().next().unwrap().baseline);
        assert!(st.unfinished.is_none());
    }

    #[test]
    fn rolled_back_failures_change_nothing() {
        let rows = vec![
            row(1, "1", Kind::Up, Some(true), true),
            row(2, "2", Kind::Up, Some(false), true),
        ];
        let st = DbState::from_rows(&rows);
        assert_eq!(applied(&st), vec!["1"]);
        assert!(st.unfinished.is_none());
    }

    #[test]
    fn non_transactional_failures_and_crashes_are_unfinished_until_resolved() {
        let mut rows = vec![
            row(1, "1", Kind::Up, Some(true), true),
            row(2, "2", Kind::Up, None, false),
        ];
        let st = DbState::from_rows(&rows);
        let u = st.unfinished.as_ref().unwrap();
        assert_eq!(u.version, "2");
        assert!(!u.failed);
        rows[1].success = Some(false);
        assert!(
            DbState::from_rows(&rows)
                .unfinished
                .as_ref()
                .unwrap()
                .failed
        );

        rows.push(row(3, "2", Kind::MarkApplied, Some(true), true));
        let st = DbState::from_rows(&rows);
        assert!(st.unfinished.is_none());
        assert_eq!(applied(&st), vec!["1", "2"]);

        rows[2].kind = Kind::MarkReverted;
        let st = DbState::from_rows(&rows);
        assert!(st.unfinished.is_none());
        assert_eq!(applied(&st), vec!["1"]);
    }
}
