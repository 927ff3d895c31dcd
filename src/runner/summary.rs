//! The run summary: one line of JSON that every runner (`schemagate migrate ...` in a Job
//! or an init container) writes to its termination log, and that the controller reads back
//! from the pod's status. One typed struct for both sides, so a field the CLI writes is a
//! field the controller can read.

use serde::{Deserialize, Serialize};

use crate::model::redact::redact;

/// Kubernetes cuts termination messages at 4096 bytes; a summary stays below this.
pub const SUMMARY_MAX: usize = 4000;

/// The summary format's version (the `schemagate` field).
pub const SUMMARY_FORMAT: u32 = 1;

/// How a run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    /// Something was applied (or the command did what it was asked).
    Success,
    /// Nothing to do: the database was already there.
    Noop,
    /// The command failed; `error` says why.
    Failed,
    /// Stopped on request between steps (exit 18); `applied` lists what finished.
    Stopped,
    /// A result this version does not know (a newer runner).
    #[default]
    #[serde(other)]
    Unknown,
}

/// The error of a failed run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryError {
    /// A stable machine-readable kind (`migration_failed`, `connect`, ...).
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// What a runner reports about its run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// The format version, [`SUMMARY_FORMAT`].
    #[serde(default)]
    pub schemagate: u32,
    /// The `migrate` command that ran (`upgrade`, `wait`, `exec`, ...).
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub result: RunResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How long the run waited for the database lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_wait_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The database was above the requested target (nothing was done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<bool>,
    /// The versions applied (reverted, stamped) by this run, in order.
    #[serde(default)]
    pub applied: Vec<String>,
    /// Set when `applied` was cut to its first and last entry to fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_line: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_statement_number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SummaryError>,
    /// The hash of the plan that ran, or of the plan refused for want of an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
}

impl Default for RunSummary {
    fn default() -> Self {
        RunSummary {
            schemagate: SUMMARY_FORMAT,
            command: String::new(),
            result: RunResult::Unknown,
            exit_code: None,
            duration_ms: None,
            lock_wait_ms: None,
            from: None,
            to: None,
            current: None,
            target: None,
            ahead: None,
            applied: Vec::new(),
            applied_count: None,
            applied_truncated: None,
            failed_version: None,
            failed_file: None,
            failed_line: None,
            failed_statement_number: None,
            error: None,
            plan_hash: None,
        }
    }
}

impl RunSummary {
    /// The version the database reached, as the runner saw it.
    pub fn reached(&self) -> Option<&str> {
        self.to.as_deref().or(self.current.as_deref())
    }

    /// One line for `lastRun.message`.
    pub fn describe(&self) -> String {
        match (&self.error, self.result) {
            (Some(e), _) => e.message.clone(),
            (None, RunResult::Noop) => {
                format!("already at {}", self.reached().unwrap_or("the target"))
            }
            (None, _) if self.applied.is_empty() => "nothing to apply".into(),
            (None, _) => format!(
                "applied {} ({} -> {})",
                self.applied.join(", "),
                self.from.as_deref().unwrap_or("none"),
                self.reached().unwrap_or("?")
            ),
        }
    }

    /// The summary as one line of JSON, scrubbed of secrets and at most [`SUMMARY_MAX`]
    /// bytes: a long error message is shortened first, then the applied list (keeping its
    /// count), then the message is replaced by a pointer to the log.
    pub fn to_line(&self) -> String {
        let text = |s: &RunSummary| {
            let json = serde_json::to_string(s).unwrap_or_else(|_| "{}".into());
            redact(&json).into_owned()
        };
        let mut s = self.clone();
        let mut line = text(&s);
        if line.len() <= SUMMARY_MAX {
            return line;
        }
        if let Some(e) = s.error.as_mut() {
            let keep: String = e.message.chars().take(1000).collect();
            e.message = format!("{keep}…");
        }
        line = text(&s);
        if line.len() > SUMMARY_MAX && s.applied.len() > 2 {
            let n = s.applied.len();
            let first = s.applied.first().cloned().unwrap_or_default();
            let last = s.applied.last().cloned().unwrap_or_default();
            s.applied = vec![first, last];
            s.applied_count = Some(n);
            s.applied_truncated = Some(true);
            line = text(&s);
        }
        if line.len() > SUMMARY_MAX {
            if let Some(e) = s.error.as_mut() {
                e.message = "(message too long; see the runner's log)".into();
            }
            s.failed_file = s.failed_file.map(|f| f.chars().take(200).collect());
            line = text(&s);
        }
        line
    }

    /// The summary in a termination message: its last line that parses.
    pub fn from_message(message: &str) -> Option<RunSummary> {
        message
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<RunSummary>(l.trim()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_round_trips_through_its_line() {
        let s = RunSummary {
            command: "upgrade".into(),
            result: RunResult::Success,
            exit_code: Some(0),
            from: Some("1".into()),
            to: Some("3".into()),
            applied: vec!["2".into(), "3".into()],
            ..Default::default()
        };
        let back = RunSummary::from_message(&format!("log line\n{}\n", s.to_line())).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.describe(), "applied 2, 3 (1 -> 3)");
    }

    #[test]
    fn unknown_results_and_fields_of_newer_runners_still_parse() {
        let s =
            RunSummary::from_message(r#"{"result":"paused","applied":[],"newField":1}"#).unwrap();
        assert_eq!(s.result, RunResult::Unknown);
    }

    #[test]
    fn summaries_stay_under_the_termination_message_limit() {
        let s = RunSummary {
            result: RunResult::Failed,
            applied: (0..2000).map(|i| i.to_string()).collect(),
            error: Some(SummaryError {
                kind: "migration_failed".into(),
                message: "x".repeat(50_000),
            }),
            ..Default::default()
        };
        let line = s.to_line();
        assert!(line.len() <= SUMMARY_MAX, "{}", line.len());
        let back = RunSummary::from_message(&line).unwrap();
        assert_eq!(back.applied_count, Some(2000));
        assert_eq!(back.applied, vec!["0".to_string(), "1999".to_string()]);
    }
}
