//! What each step sends to the database, assembled once: the runner executes it and
//! `plan` prints it, so the two cannot disagree.
//!
//! A [`StepScript`] lists, in order, the statements a step sends on the runner's
//! connection when it succeeds: session settings (timeouts), transaction control, the
//! fence that proves the lock is still held, the migration's statements, the history
//! writes, the lease renewal and the session reset, grouped into round trips. What goes
//! where differs by dialect (PostgreSQL sets its timeouts inside the transaction and sends
//! BEGIN with the statements in one message; MySQL sets them for the session before the
//! transaction, checks its fence before the statements run, and runs only data-only
//! migrations in a transaction); all of that is decided here and nowhere else.
//!
//! Values known only while a step runs are [`Slot`]s: the runner fills in the measured
//! duration and the history row's id as it goes; `plan` shows them as `<duration_ms>` and
//! `<row_id>`, and shows the runner's id and the lease token as `<runner_id>` and
//! `<lease_token>` when it cannot know them.
//!
//! A script is the path of a step that succeeds. When one fails, the runner also sends
//! `ROLLBACK`, records the failure ([`failed_insert`], [`failed_finish`]) and resets the
//! session ([`reset`]).

use serde::Serialize;
use serde::ser::SerializeStruct;

use super::dialect::sql::{self, Guard, Int, Slot};
use super::dialect::{DbError, Done, HistoryTable, NewRow, Session, StepTimeouts, lock_lost};
use super::runner::{Prepared, Work, step_row, step_timeouts};
use super::script::Dialect;

/// What a statement is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A timeout for the step (its transaction, or the session until the reset).
    Setting,
    /// Opens the step's transaction.
    Begin,
    /// Proves that this runner still holds the lock before the migration runs.
    Fence,
    /// A statement of the migration file.
    Migration,
    /// Records the step in the history (inside its transaction, or as running).
    HistoryInsert,
    /// Records how many statements of a non-transactional step ran.
    HistoryProgress,
    /// Records the outcome of a non-transactional step.
    HistoryFinish,
    /// Extends the lease inside the step's transaction, so it cannot lapse at the commit.
    LeaseRenewal,
    Commit,
    /// Restores what the migration may have changed for the session.
    Reset,
}

/// What the runner checks in a statement's result beyond its success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Nothing,
    /// A fence query: 1 while this runner holds the lock.
    One,
    /// A guarded insert: the new row's id (no row: the guard refused it).
    RowId,
    /// A lease-guarded update: no row updated means the lease is no longer ours.
    Updated,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Slot(Slot),
}

/// One statement a step sends.
#[derive(Clone, Debug)]
pub struct Sent {
    pub role: Role,
    /// Statements with the same number go to the server in one round trip (numbered
    /// from 1 within a script).
    pub round_trip: usize,
    pieces: Vec<Piece>,
    expect: Expect,
}

/// The slot values known now; the rest are shown as `<name>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fill {
    pub row_id: Option<i64>,
    pub duration_ms: Option<i64>,
}

impl Sent {
    /// A statement the engine wrote; its slot markers become slots.
    fn template(role: Role, round_trip: usize, expect: Expect, text: &str) -> Sent {
        let mut pieces = Vec::new();
        // Markers are `\0name\0`: odd parts are slot names.
        for (i, part) in text.split('\0').enumerate() {
            let slot = (i % 2 == 1)
                .then(|| Slot::ALL.into_iter().find(|s| s.name() == part))
                .flatten();
            match slot {
                Some(s) => pieces.push(Piece::Slot(s)),
                None if part.is_empty() => {}
                None => pieces.push(Piece::Text(part.to_string())),
            }
        }
        Sent {
            role,
            round_trip,
            pieces,
            expect,
        }
    }

    /// A statement of the migration file, as it is.
    fn verbatim(round_trip: usize, text: &str) -> Sent {
        Sent {
            role: Role::Migration,
            round_trip,
            pieces: vec![Piece::Text(text.to_string())],
            expect: Expect::Nothing,
        }
    }

    /// The statement's text with the slots `fill` knows filled in, the others as
    /// `<name>`. (The runner knows its own id and lease token: they are never slots in
    /// its scripts.)
    pub fn sql(&self, fill: &Fill) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(s) => {
                    let value = match s {
                        Slot::RowId => fill.row_id,
                        Slot::DurationMs => fill.duration_ms,
                        Slot::RunnerId | Slot::LeaseToken => None,
                    };
                    match value {
                        Some(v) => out.push_str(&v.to_string()),
                        None => out.push_str(&format!("<{}>", s.name())),
                    }
                }
            }
        }
        out
    }

    /// The statement as `plan` shows it.
    pub fn shown(&self) -> String {
        self.sql(&Fill::default())
    }

    /// The values of the statement only known while the step runs.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Slot(s) => Some(*s),
            Piece::Text(_) => None,
        })
    }

    /// Checks the statement's result: the lock guard may have refused it.
    pub fn check(&self, done: &Done) -> Result<(), DbError> {
        let held = match self.expect {
            Expect::Nothing => true,
            Expect::One => done.value == Some(1),
            Expect::RowId => row_id(done).is_some(),
            Expect::Updated => done.rows > 0,
        };
        if held { Ok(()) } else { Err(lock_lost()) }
    }
}

/// The id of the row an insert made: `RETURNING id` (PostgreSQL, SQLite), or MySQL's
/// insert id when it inserted a row.
pub fn row_id(done: &Done) -> Option<i64> {
    done.value.or(done.insert_id.filter(|_| done.rows == 1))
}

impl Serialize for Sent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Sent", 3)?;
        st.serialize_field("role", &self.role)?;
        st.serialize_field("roundTrip", &self.round_trip)?;
        st.serialize_field("sql", &self.shown())?;
        st.end()
    }
}

/// Everything one step sends when it succeeds, in order.
#[derive(Clone, Debug, Default)]
pub struct StepScript {
    pub statements: Vec<Sent>,
}

impl StepScript {
    /// The statements grouped by round trip, in order.
    pub fn round_trips(&self) -> impl Iterator<Item = &[Sent]> {
        self.statements
            .chunk_by(|a, b| a.round_trip == b.round_trip)
    }

    /// The values of the script only known while the step runs.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.statements.iter().flat_map(Sent::slots)
    }
}

/// A step's history row, with the run's note.
fn row_of(p: &Prepared<'_>, cx: &Context<'_>) -> crate::engine::dialect::NewRow {
    let mut row = step_row(p, cx.runner_id);
    if let Some(n) = cx.note {
        row.note = Some(match row.note.take() {
            Some(own) => format!("{own}; {n}"),
            None => n.to_string(),
        });
    }
    row
}

/// What a script depends on besides the step.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub session: &'a Session,
    /// The history table as the database resolved it.
    pub table: &'a HistoryTable,
    /// The condition every history write carries (see [`Guard`]).
    pub guard: &'a Guard,
    /// Recorded in `applied_by`; `plan` passes [`Slot::RunnerId`]'s marker when it does
    /// not know it.
    pub runner_id: &'a str,
    /// Added to each step row's note (the approval a plan ran with).
    pub note: Option<&'a str>,
}

impl Context<'_> {
    fn dialect(&self) -> Dialect {
        self.session.flavor.dialect()
    }

    fn insert(&self, row: &NewRow) -> String {
        sql::insert_row(self.dialect(), self.table, row, self.guard)
    }

    /// Updates of a running row are checked only under a lease (a session lock cannot
    /// change hands while the session lives).
    fn update_expect(&self) -> Expect {
        match self.guard {
            Guard::Lease { .. } => Expect::Updated,
            _ => Expect::Nothing,
        }
    }
}

struct Builder {
    out: Vec<Sent>,
    trip: usize,
}

impl Builder {
    fn new() -> Self {
        Builder {
            out: Vec::new(),
            trip: 1,
        }
    }

    /// Starts a new round trip (unless the current one is still empty).
    fn next_trip(&mut self) {
        if self.out.last().is_some_and(|s| s.round_trip == self.trip) {
            self.trip += 1;
        }
    }

    fn add(&mut self, role: Role, expect: Expect, text: &str) {
        self.out.push(Sent::template(role, self.trip, expect, text));
    }

    fn statement(&mut self, text: &str) {
        self.out.push(Sent::verbatim(self.trip, text));
    }

    fn settings(&mut self, texts: Vec<String>) {
        for t in texts {
            self.add(Role::Setting, Expect::Nothing, &t);
        }
    }

    fn reset(&mut self, cx: &Context<'_>) {
        for r in sql::reset(cx.session) {
            self.add(Role::Reset, Expect::Nothing, &r);
        }
    }

    fn finish(self) -> StepScript {
        StepScript {
            statements: self.out,
        }
    }
}

/// Opens the engine's transaction: the timeouts, BEGIN and the fence, in the order and
/// round trips each dialect needs. The statements that follow share BEGIN's round trip on
/// PostgreSQL and SQLite; on MySQL they follow once the fence's answer is checked.
fn open(b: &mut Builder, cx: &Context<'_>, timeouts: &StepTimeouts) {
    let d = cx.dialect();
    match d {
        Dialect::Postgres => {
            b.add(Role::Begin, Expect::Nothing, sql::begin(d));
            // Raises (and so fails the round trip) when the lease is not ours.
            if let Some(fence) = sql::fence(d, cx.guard) {
                b.add(Role::Fence, Expect::Nothing, &fence);
            }
            b.settings(sql::timeouts(cx.session.flavor, timeouts, true));
        }
        Dialect::MySql | Dialect::Sqlite => {
            // For the session, before the transaction: SQLite's busy timeout must be in
            // place before BEGIN IMMEDIATE waits on it.
            b.settings(sql::timeouts(cx.session.flavor, timeouts, false));
            b.next_trip();
            b.add(Role::Begin, Expect::Nothing, sql::begin(d));
            if d == Dialect::MySql {
                if let Some(fence) = sql::fence_query(d, cx.guard) {
                    b.add(Role::Fence, Expect::One, &fence);
                }
                b.next_trip();
            }
        }
    }
}

/// Commits: the lease renewal, COMMIT and the session reset, in one round trip.
fn close(b: &mut Builder, cx: &Context<'_>) {
    b.next_trip();
    if let Guard::Lease { table, token, ttl } = cx.guard {
        let renew = sql::lease_renew(cx.dialect(), table, token, *ttl);
        b.add(Role::LeaseRenewal, Expect::Nothing, &renew);
    }
    b.add(Role::Commit, Expect::Nothing, sql::COMMIT);
    b.reset(cx);
}

/// The script of one step, with the step's own timeouts (`timeouts`).
pub fn step(p: &Prepared<'_>, timeouts: &StepTimeouts, cx: &Context<'_>) -> StepScript {
    let d = cx.dialect();
    let text = |st: &super::script::Statement| st.text(&p.script.sql).to_string();
    let mut b = Builder::new();
    let mut row = row_of(p, cx);
    match &p.work {
        Work::Transactional { statements } => {
            open(&mut b, cx, timeouts);
            for st in statements {
                b.statement(&text(st));
            }
            b.next_trip();
            row.duration_ms = Some(Int::Slot(Slot::DurationMs));
            b.add(Role::HistoryInsert, Expect::RowId, &cx.insert(&row));
            close(&mut b, cx);
        }
        Work::NonTransactional { statements, .. } => {
            // The running row claims the step (the claim is what the lock guards); its id
            // is in every later update.
            row.success = None;
            row.transactional = false;
            row.statements_done = Some(0);
            b.add(Role::HistoryInsert, Expect::RowId, &cx.insert(&row));
            b.next_trip();
            b.settings(sql::timeouts(cx.session.flavor, timeouts, false));
            let id = Int::Slot(Slot::RowId);
            for (i, st) in statements.iter().enumerate() {
                // Each alone: PostgreSQL runs a multi-statement message as one transaction,
                // where CREATE INDEX CONCURRENTLY and the like cannot run.
                b.next_trip();
                b.statement(&text(st));
                b.next_trip();
                let progress = sql::progress(d, cx.table, id, i as i64 + 1, cx.guard);
                b.add(Role::HistoryProgress, cx.update_expect(), &progress);
            }
            b.next_trip();
            let finish = sql::finish(
                d,
                cx.table,
                id,
                true,
                Int::Slot(Slot::DurationMs),
                None,
                statements.len() as i64,
                cx.guard,
            );
            b.add(Role::HistoryFinish, cx.update_expect(), &finish);
            b.next_trip();
            b.reset(cx);
        }
    }
    b.finish()
}

/// The scripts of every step of a prepared plan; `defaults` are the run's timeouts for
/// steps without their own.
pub fn steps(
    prepared: &[Prepared<'_>],
    defaults: &StepTimeouts,
    cx: &Context<'_>,
) -> Vec<StepScript> {
    prepared
        .iter()
        .map(|p| step(p, &step_timeouts(p.script, defaults), cx))
        .collect()
}

/// Records `rows` (decisions such as stamp or import, not runs) in one transaction.
pub fn record(rows: &[NewRow], cx: &Context<'_>) -> StepScript {
    let mut b = Builder::new();
    open(&mut b, cx, &StepTimeouts::default());
    for row in rows {
        b.next_trip();
        b.add(Role::HistoryInsert, Expect::RowId, &cx.insert(row));
    }
    close(&mut b, cx);
    b.finish()
}

/// Records one row on its own (autocommit).
pub fn insert(row: &NewRow, cx: &Context<'_>) -> Sent {
    Sent::template(Role::HistoryInsert, 1, Expect::RowId, &cx.insert(row))
}

/// The history row of a transactional step that failed (after its ROLLBACK): how many of
/// its statements ran, how long, and why it failed.
pub fn failed_insert(
    p: &Prepared<'_>,
    cx: &Context<'_>,
    done: usize,
    duration_ms: i64,
    error: String,
) -> Sent {
    let mut row = row_of(p, cx);
    row.success = Some(false);
    row.statements_done = Some(done as i64);
    row.duration_ms = Some(duration_ms.into());
    row.error = Some(error);
    insert(&row, cx)
}

/// Ends the running row `id` of a non-transactional step that failed after `done`
/// statements.
pub fn failed_finish(
    cx: &Context<'_>,
    id: i64,
    duration_ms: i64,
    error: &str,
    done: usize,
) -> Sent {
    let text = sql::finish(
        cx.dialect(),
        cx.table,
        id.into(),
        false,
        duration_ms.into(),
        Some(error),
        done as i64,
        cx.guard,
    );
    Sent::template(Role::HistoryFinish, 1, cx.update_expect(), &text)
}

/// The session reset on its own (after a failed step).
pub fn reset(cx: &Context<'_>) -> Vec<Sent> {
    let mut b = Builder::new();
    b.reset(cx);
    b.finish().statements
}

#[cfg(test)]
mod tests;
