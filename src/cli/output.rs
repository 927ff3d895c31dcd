//! Rendering results: human text or one JSON document on standard output, errors on
//! standard error (human) or as `{"error": ...}` (JSON), the one-line run summary. Every
//! byte written passes through the secret scrubber.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use super::OutputFormat;
use crate::engine::dialect::sql::{self, Slot};
use crate::engine::dialect::{Flavor, HistoryTable};
use crate::engine::history::{DbState, HistoryRow, Kind};
use crate::engine::plan::{Direction, Drift, EmptyScript, Plan};
use crate::engine::runner::{Prepared, RunReport, StepFindings, Work};
use crate::engine::sent::StepScript;
use crate::engine::status::{StatusReport, Verdict};
use crate::model::redact::redact;
use crate::runner::exit::{CliError, Exit};
use crate::runner::summary::{RunResult, RunSummary, SummaryError};

/// A command's result in both forms.
pub struct Outcome {
    pub exit: Exit,
    pub json: serde_json::Value,
    pub human: String,
}

impl Outcome {
    pub fn ok(json: serde_json::Value, human: String) -> Self {
        Outcome {
            exit: Exit::Ok,
            json,
            human,
        }
    }
}

fn write_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(redact(text).as_bytes());
    let _ = out.flush();
}

pub fn print_outcome(format: OutputFormat, o: &Outcome) {
    match format {
        OutputFormat::Human => write_out(&o.human),
        OutputFormat::Json => write_out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&o.json).unwrap_or_default()
        )),
    }
}

pub fn print_error(format: OutputFormat, e: &CliError) {
    match format {
        OutputFormat::Human => {
            let mut text = format!("error: {}\n", e.message);
            if let Some(h) = &e.hint {
                text.push_str(&format!("hint: {h}\n"));
            }
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(redact(&text).as_bytes());
        }
        OutputFormat::Json => {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("exitCode".into(), json!(e.exit.code()));
            }
            write_out(&format!(
                "{}\n",
                serde_json::to_string_pretty(&json!({ "error": v })).unwrap_or_default()
            ));
        }
    }
}

/// The one-line JSON run summary (see [`RunSummary`]), always under
/// [`crate::runner::summary::SUMMARY_MAX`] bytes.
pub fn summary_line(
    command: &str,
    result: &Result<Outcome, CliError>,
    elapsed: Duration,
) -> String {
    run_summary(command, result, elapsed).to_line()
}

/// The typed summary of a command's outcome.
pub fn run_summary(
    command: &str,
    result: &Result<Outcome, CliError>,
    elapsed: Duration,
) -> RunSummary {
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(|x| match x {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let mut s = RunSummary {
        command: command.into(),
        duration_ms: Some(elapsed.as_millis() as u64),
        ..Default::default()
    };
    match result {
        Ok(o) => {
            let noop = o.json.get("noop").and_then(|n| n.as_bool()) == Some(true);
            s.result = if noop {
                RunResult::Noop
            } else {
                RunResult::Success
            };
            s.exit_code = Some(i32::from(o.exit.code()));
            s.from = text(o.json.get("from"));
            s.to = text(o.json.get("to"));
            s.current = text(o.json.get("current"));
            s.target = text(o.json.get("target"));
            s.ahead = o.json.get("ahead").and_then(|a| a.as_bool());
            s.lock_wait_ms = o.json.get("lockWaitMs").and_then(|w| w.as_u64());
            s.plan_hash = text(o.json.get("planHash"));
            // A fleet that did not finish: the failed databases, each with why.
            if o.exit.code() != 0
                && let Some(results) = o.json.get("results").and_then(|r| r.as_array())
            {
                s.result = RunResult::Failed;
                let failed: Vec<String> = results
                    .iter()
                    .filter(|r| r["result"] == "failed")
                    .map(|r| {
                        format!(
                            "{}: {}",
                            r["name"].as_str().unwrap_or("?"),
                            r["error"]["message"].as_str().unwrap_or("failed")
                        )
                    })
                    .collect();
                s.error = Some(SummaryError {
                    kind: "fleet_incomplete".into(),
                    message: failed.join("; "),
                });
            }
            s.applied = versions_of(o.json.get("steps"))
                .or_else(|| strings(o.json.get("stamped")))
                .or_else(|| strings(o.json.get("applied")))
                .unwrap_or_default();
        }
        Err(e) => {
            s.result = if e.exit == super::exit::Exit::Stopped {
                RunResult::Stopped
            } else {
                RunResult::Failed
            };
            s.exit_code = Some(i32::from(e.exit.code()));
            s.applied = versions_of(e.details.as_ref().and_then(|d| d.get("completedSteps")))
                .unwrap_or_default();
            if let Some(d) = &e.details {
                s.failed_version = text(d.get("version"));
                s.failed_file = text(d.get("file"));
                s.failed_line = d.get("line").and_then(|x| x.as_u64());
                s.failed_statement_number = d.get("statementNumber").and_then(|x| x.as_u64());
                s.plan_hash = text(d.get("planHash"));
            }
            s.error = Some(SummaryError {
                kind: e.kind.to_string(),
                message: e.message.clone(),
            });
        }
    }
    s
}

/// The `version` of each step in a JSON array of steps.
fn versions_of(steps: Option<&serde_json::Value>) -> Option<Vec<String>> {
    steps.and_then(|s| s.as_array()).map(|steps| {
        steps
            .iter()
            .filter_map(|s| s.get("version").and_then(|v| v.as_str()).map(String::from))
            .collect()
    })
}

/// A JSON array of strings.
fn strings(v: Option<&serde_json::Value>) -> Option<Vec<String>> {
    v.and_then(|s| s.as_array()).map(|a| {
        a.iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect()
    })
}

pub fn human_run(r: &RunReport) -> String {
    let none = "none";
    let from = r.from.as_deref().unwrap_or(none);
    let to = r.to.as_deref().unwrap_or(none);
    if r.ahead {
        return format!(
            "The database is at {from}, above the requested target; nothing to do \
             (use `downgrade` to go back).\n"
        );
    }
    let held = if r.held.is_empty() {
        String::new()
    } else {
        format!(
            "Held (contract: runs with --phase contract once no older app version runs): {}\n",
            r.held.join(", ")
        )
    };
    if r.noop {
        return match r.direction {
            Direction::Up => format!("Already up to date at {to}.\n{held}"),
            Direction::Down => format!("Nothing to downgrade; the database is at {to}.\n"),
        };
    }
    let verb = if r.direction == Direction::Up {
        "Upgraded"
    } else {
        "Downgraded"
    };
    let mut s = format!(
        "{verb} {from} -> {to}: {} step(s) in {} ms{}\n",
        r.steps.len(),
        r.duration_ms,
        if r.lock_wait_ms > 100 {
            format!(" (waited {} ms for the lock)", r.lock_wait_ms)
        } else {
            String::new()
        }
    );
    for step in &r.steps {
        let what = if step.direction == Direction::Up {
            "applied "
        } else {
            "reverted"
        };
        s.push_str(&format!(
            "  {what} {} {} ({}, {} ms)\n",
            step.version, step.description, step.file, step.duration_ms
        ));
    }
    s.push_str(&held);
    s
}

pub fn human_current(state: &DbState) -> String {
    let mut s = match state.current() {
        Some(v) => format!(
            "{} {}\n",
            state.applied[v].version, state.applied[v].description
        ),
        None if state.initialized => "none (every migration has been reverted)\n".to_string(),
        None => "none (no migration has been applied; the history table does not exist yet)\n"
            .to_string(),
    };
    if let Some(u) = &state.unfinished {
        s.push_str(&format!(
            "dirty: step {} ({}) did not finish; see `schemagate migrate status`\n",
            u.version,
            u.kind.as_str()
        ));
    }
    s
}

fn outcome_word(r: &HistoryRow) -> &'static str {
    match (r.kind, r.success, r.transactional) {
        (_, Some(true), _) => "ok",
        (_, Some(false), true) => "failed (rolled back)",
        (_, Some(false), false) => "FAILED (dirty)",
        (_, None, _) => "unfinished",
    }
}

pub fn human_history(rows: &[HistoryRow], initialized: bool) -> String {
    if !initialized {
        return "No history: nothing has been applied to this database yet.\n".into();
    }
    if rows.is_empty() {
        return "The history table is empty.\n".into();
    }
    let mut s = format!(
        "{:>5}  {:<16} {:<13} {:<20} {:<24} {:>8}  {:<24} {}\n",
        "id", "version", "kind", "result", "at (UTC)", "ms", "by", "description"
    );
    for r in rows {
        s.push_str(&format!(
            "{:>5}  {:<16} {:<13} {:<20} {:<24} {:>8}  {:<24} {}\n",
            r.id,
            r.version,
            r.kind.as_str(),
            outcome_word(r),
            r.applied_at,
            r.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
            r.applied_by,
            r.description
        ));
        if let Some(e) = &r.error {
            s.push_str(&format!("{:>7}error: {e}\n", ""));
        }
        if let Some(n) = &r.note
            && r.kind != Kind::Baseline
        {
            s.push_str(&format!("{:>7}note: {n}\n", ""));
        }
    }
    s
}

fn human_drift(d: &Drift, s: &mut String) {
    for c in &d.changed {
        s.push_str(&format!(
            "  changed: {} ({}) checksum {} but {} was recorded when it was applied{}\n",
            c.version,
            c.file,
            c.actual,
            c.recorded,
            if c.whitespace_only {
                " (only line endings or whitespace differ)"
            } else {
                ""
            }
        ));
    }
    for m in &d.missing {
        s.push_str(&format!(
            "  missing: {} ({}) is applied but has no file\n",
            m.version, m.description
        ));
    }
    for hint in drift_hints(d) {
        s.push_str(&format!("hint: {hint}\n"));
    }
}

/// What to do about drift.
pub fn drift_hints(d: &Drift) -> Vec<&'static str> {
    let mut out = Vec::new();
    if d.changed.iter().any(|c| c.whitespace_only) {
        out.push(
            "only line endings or whitespace changed (an editor, git's autocrlf): restore the \
             file, or compare with --checksum normalized (SCHEMAGATE_CHECKSUM=normalized)",
        );
    }
    if d.changed.iter().any(|c| !c.whitespace_only) {
        out.push(
            "an applied migration must not change: restore it from version control (`git \
             diff` shows what changed) and put the new change in a new migration",
        );
    }
    if !d.missing.is_empty() {
        out.push(
            "restore the missing files, or pass --ignore-missing if they were removed on \
             purpose (their history stays)",
        );
    }
    out
}

pub fn human_status(r: &StatusReport) -> String {
    let mut s = format!("database: {} ({}), connected\n", r.database, r.dialect);
    s.push_str(&format!(
        "current:  {}\nhead:     {}\n",
        r.current.as_deref().unwrap_or("none"),
        r.head.as_deref().unwrap_or("none")
    ));
    if !r.initialized {
        s.push_str("history:  none yet (the first upgrade creates the history table)\n");
    }
    if r.pending.is_empty() {
        s.push_str("pending:  none\n");
    } else {
        s.push_str(&format!("pending:  {}\n", r.pending.len()));
        for p in &r.pending {
            s.push_str(&format!(
                "  {} {} ({}){}\n",
                p.version,
                p.description,
                p.file,
                if p.out_of_order {
                    " [older than current: needs --out-of-order]"
                } else if p.held {
                    " [contract, held: runs with --phase contract once no older app version runs]"
                } else if p.phase == crate::engine::script::Phase::Contract {
                    " [contract]"
                } else {
                    ""
                }
            ));
        }
    }
    if r.drift.is_empty() {
        s.push_str("drift:    none\n");
    } else {
        s.push_str("drift:\n");
        human_drift(&r.drift, &mut s);
    }
    if !r.empty_scripts.is_empty() {
        s.push_str("empty scripts:\n");
        human_empty(&r.empty_scripts, &mut s);
    }
    if let Some(u) = &r.unfinished {
        let progress = match (u.statements_done, u.statements_total) {
            (Some(d), Some(t)) => format!(", {d} of {t} statements ran"),
            _ => String::new(),
        };
        if r.running {
            s.push_str(&format!(
                "running:  {} ({}) by {}{progress}\n",
                u.version,
                u.kind.as_str(),
                u.applied_by
            ));
        } else {
            s.push_str(&format!(
                "dirty:    {} ({}) by {} at {} did not finish{progress}{}\n          \
                 resolve with `schemagate migrate resolve {} --applied|--reverted`\n",
                u.version,
                u.kind.as_str(),
                u.applied_by,
                u.applied_at,
                u.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                u.version
            ));
        }
    }
    if let Some(h) = &r.lock_holder {
        s.push_str(&format!("lock:     held by {h}\n"));
    }
    let verdict = match r.verdict {
        Verdict::UpToDate => "up to date",
        Verdict::Pending => "migrations pending",
        Verdict::Drift => "DRIFT: applied migrations differ from the files",
        Verdict::Dirty => "DIRTY: a step did not finish",
    };
    s.push_str(&format!("status:   {verdict}\n"));
    s
}

/// Lines naming the scripts `upgrade`/`downgrade` would refuse for being empty.
fn human_empty(empty: &[EmptyScript], s: &mut String) {
    for e in empty {
        let (command, what) = match e.direction {
            Direction::Up => ("upgrade", "write its SQL"),
            Direction::Down => ("downgrade", "write the SQL that undoes it"),
        };
        s.push_str(&format!(
            "  {}: no SQL statement; {command} refuses it: {what}, or mark it \
             `-- schemagate:empty <reason>`\n",
            e.file
        ));
    }
}

pub fn human_verify(verified: usize, d: &Drift, empty: &[EmptyScript]) -> String {
    let mut s = if d.is_empty() {
        format!("OK: {verified} applied migration(s) match their files.\n")
    } else {
        let mut s = format!(
            "DRIFT: {} changed, {} missing; {verified} match.\n",
            d.changed.len(),
            d.missing.len()
        );
        human_drift(d, &mut s);
        s
    };
    if !empty.is_empty() {
        s.push_str(&format!(
            "EMPTY: {} script(s) without SQL statements:\n",
            empty.len()
        ));
        human_empty(empty, &mut s);
    }
    s
}

/// A plan in both forms.
pub struct RenderedPlan {
    pub json: serde_json::Value,
    pub human: String,
}

/// What a plan is rendered against.
pub struct PlanContext<'a> {
    pub flavor: Flavor,
    pub table: &'a HistoryTable,
    /// The first step creates the history table.
    pub create_table: bool,
    pub destructive: &'a [StepFindings],
}

/// The note on the values `plan` cannot show (those in `scripts`), if any.
fn placeholder_note(scripts: &[StepScript]) -> Option<String> {
    let mut seen: Vec<Slot> = Vec::new();
    for slot in scripts.iter().flat_map(StepScript::slots) {
        if !seen.contains(&slot) {
            seen.push(slot);
        }
    }
    if seen.is_empty() {
        return None;
    }
    let what: Vec<String> = Slot::ALL
        .into_iter()
        .filter(|s| seen.contains(s))
        .map(|s| {
            let why = match s {
                Slot::DurationMs => "measured",
                Slot::RowId => "the id of the step's history row",
                Slot::RunnerId => "this host and the runner's pid; pass --runner-id to set it",
                Slot::LeaseToken => "random per run",
            };
            format!("<{}> ({why})", s.name())
        })
        .collect();
    Some(format!(
        "-- Values in <angle brackets> are only known when the step runs: {}.\n",
        what.join(", ")
    ))
}

/// Renders exactly what the runner sends on its connection, step by step (`scripts`,
/// one per prepared step, from `engine::sent`): the statements of a run that succeeds,
/// after the lock is taken and the history read.
pub fn render_plan(
    plan: &Plan<'_>,
    prepared: &[Prepared<'_>],
    scripts: &[StepScript],
    cx: &PlanContext<'_>,
) -> RenderedPlan {
    let dialect = cx.flavor.dialect();
    let from = plan.from.as_ref().map(|v| v.to_string());
    let to = plan.to.as_ref().map(|v| v.to_string());
    let mut human = String::new();
    let mut steps_json = Vec::new();
    let dir = match plan.direction {
        Direction::Up => "upgrade",
        Direction::Down => "downgrade",
    };
    let create_table =
        (cx.create_table && !prepared.is_empty()).then(|| sql::create_history(dialect, cx.table));
    if prepared.is_empty() {
        human.push_str(&if plan.ahead {
            "-- The database is above the requested target: an upgrade would do nothing.\n"
                .to_string()
        } else {
            format!(
                "-- Nothing to {dir}: the database is at {}.\n",
                to.as_deref().unwrap_or("none")
            )
        });
    } else {
        human.push_str(&format!(
            "-- Plan: {dir} {} -> {} in {} step(s), under the migration lock ({}).\n",
            from.as_deref().unwrap_or("none"),
            to.as_deref().unwrap_or("none"),
            prepared.len(),
            cx.flavor.name(),
        ));
        if let Some(note) = placeholder_note(scripts) {
            human.push_str(&note);
        }
        human.push('\n');
        if let Some(create) = &create_table {
            human.push_str(&format!("{create};\n\n"));
        }
    }
    for (p, script) in prepared.iter().zip(scripts) {
        let m = p.step.migration;
        let findings = cx
            .destructive
            .iter()
            .find(|f| f.version == m.version.to_string() && f.direction == p.step.direction);
        let how = match &p.work {
            Work::Transactional { .. } => "in one transaction with its history row",
            Work::NonTransactional {
                requested: true, ..
            } => "no transaction (as the file asks): statement by statement, progress recorded",
            Work::NonTransactional {
                requested: false, ..
            } => {
                "no transaction (MySQL commits DDL implicitly): statement by statement, progress \
                 recorded"
            }
        };
        human.push_str(&format!(
            "-- {} {} ({}, {}, {how})\n",
            m.version,
            m.description,
            match (p.step.direction, p.script.directives.phase) {
                (Direction::Up, crate::engine::script::Phase::Contract) => "up, contract",
                (Direction::Up, _) => "up",
                (Direction::Down, _) => "down",
            },
            p.script.file,
        ));
        if let Some(f) = findings {
            for finding in &f.findings {
                human.push_str(&format!(
                    "-- DESTRUCTIVE: statement {} (line {}) {}{}; {}\n",
                    finding.statement_number,
                    finding.line,
                    finding.loss.describe(),
                    finding
                        .detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default(),
                    match &f.allowed {
                        Some(reason) => format!("allowed: {reason}"),
                        None => "NOT allowed: upgrade refuses it without `-- schemagate:allow-destructive <reason>` (or --destructive allow)".into(),
                    }
                ));
            }
        }
        for sent in &script.statements {
            human.push_str(&sent.shown());
            human.push_str(";\n");
        }
        human.push('\n');
        steps_json.push(json!({
            "version": m.version.to_string(),
            "description": m.description,
            "direction": p.step.direction,
            "file": p.script.file,
            "transactional": matches!(p.work, Work::Transactional { .. }),
            "statements": p.work.statements().iter().map(|s| s.text(&p.script.sql)).collect::<Vec<_>>(),
            "sent": script.statements,
            "destructive": findings.map(|f| &f.findings),
            "allowDestructive": p.script.directives.allow_destructive,
            "phase": if p.step.direction == Direction::Up { Some(p.script.directives.phase) } else { None },
        }));
    }
    let json = json!({
        "direction": plan.direction,
        "from": from,
        "to": to,
        "ahead": plan.ahead,
        "server": cx.flavor,
        "createsHistoryTable": create_table.is_some(),
        "createHistoryTable": create_table,
        "steps": steps_json,
        "held": plan.held.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
    });
    if !plan.held.is_empty() {
        human.push_str(&format!(
            "-- Held (contract, runs with --phase contract once no older app version runs): {}\n",
            plan.held
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    RenderedPlan { json, human }
}

/// A plan's hash and what of it needs approving.
pub fn human_approval(a: &crate::engine::approval::PlanApproval) -> String {
    let mut s = format!("plan hash: {}\n", a.plan_hash);
    for m in &a.marks {
        let state = match (a.required.contains(&m.kind), a.approved) {
            (false, _) => "",
            (true, true) => " (approved)",
            (true, false) => " (NEEDS APPROVAL)",
        };
        s.push_str(&format!("  {}: {}{state}\n", m.kind, m.detail));
    }
    if !a.approved {
        s.push_str(&format!(
            "This plan runs only once approved: --approve {} (in a cluster: spec.approvedPlans).\n",
            a.plan_hash
        ));
    }
    s
}

/// `drift`: the verdict, then each difference.
pub fn human_schema_drift(c: &crate::engine::schema::DriftCheck) -> String {
    use crate::engine::schema::DriftCheck;
    match c {
        DriftCheck::Drifted {
            version,
            recorded_at,
            recorded_by,
            differences,
            ..
        } => {
            let mut s = format!(
                "The live schema differs from what the migrations left at {} (recorded {} by \
                 {}): {} difference(s)\n",
                version
                    .as_deref()
                    .map(|v| format!("version {v}"))
                    .unwrap_or_else(|| "no version".into()),
                recorded_at,
                recorded_by,
                differences.len()
            );
            for d in differences {
                s.push_str(&format!("  {d}\n"));
            }
            s.push_str(
                "Write a migration that makes the change (or reverts it), or keep it with \
                 `schemagate migrate drift --accept --reason <why>`.\n",
            );
            s
        }
        other => format!("{}\n", capitalized(&other.summary())),
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_stay_under_the_termination_message_limit() {
        let huge = "x".repeat(50_000);
        let err = CliError::new(Exit::MigrationFailed, "migration_failed", huge).details(json!({
            "completedSteps": (0..2000).map(|i| json!({ "version": i.to_string() })).collect::<Vec<_>>(),
            "version": "2001",
            "file": "2001_x.up.sql",
            "line": 3,
        }));
        let line = summary_line("upgrade", &Err(err), Duration::from_millis(5));
        assert!(
            line.len() <= crate::runner::summary::SUMMARY_MAX,
            "{}",
            line.len()
        );
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"], "failed");
        assert_eq!(v["appliedCount"], 2000);
        assert_eq!(v["failedFile"], "2001_x.up.sql");
        assert_eq!(v["exitCode"], 12);
    }

    #[test]
    fn success_summary_lists_applied_versions() {
        let ok = Outcome::ok(
            json!({ "from": "1", "to": "3", "noop": false, "steps": [{ "version": "2" }, { "version": "3" }] }),
            String::new(),
        );
        let line = summary_line("upgrade", &Ok(ok), Duration::from_millis(7));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"], "success");
        assert_eq!(v["applied"], json!(["2", "3"]));
        assert_eq!(v["from"], "1");
        assert_eq!(v["durationMs"], 7);
    }
}
