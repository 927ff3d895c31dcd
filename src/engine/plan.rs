//! Planning: available migrations + database state + target -> the steps to run.
//!
//! Pure functions, no I/O: everything the runner does is decided here first, so that
//! `plan` can print exactly what `upgrade`/`downgrade` would run, and so the rules are
//! tested exhaustively without a database.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::history::{DbState, Unfinished};
use super::script::{self, Dialect};
use super::source::{Migration, MigrationSet, Script};
use super::version::{Version, VersionError};

/// Where an upgrade or downgrade should end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The newest migration.
    Head,
    /// Nothing applied (downgrade only).
    Base,
    Version(Version),
    /// `+N` (upgrade N steps) or `-N` (downgrade N steps).
    Relative(i64),
}

impl FromStr for Target {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "head" | "heads" | "latest" => Ok(Target::Head),
            "base" => Ok(Target::Base),
            _ => {
                if let Some(n) = s.strip_prefix(['+', '-'])
                    && let Ok(n) = n.parse::<i64>()
                    && n > 0
                {
                    return Ok(Target::Relative(if s.starts_with('-') { -n } else { n }));
                }
                Version::parse(s).map(Target::Version)
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Head => f.write_str("head"),
            Target::Base => f.write_str("base"),
            Target::Version(v) => write!(f, "{v}"),
            Target::Relative(n) if *n > 0 => write!(f, "+{n}"),
            Target::Relative(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
}

/// How applied checksums are compared with the files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChecksumMode {
    /// Every byte counts.
    #[default]
    Strict,
    /// Line endings, trailing whitespace and a byte-order mark are ignored.
    Normalized,
}

/// Options that relax the planning rules, each an explicit user choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// Apply pending migrations older than the current version.
    pub out_of_order: bool,
    /// Go on although applied migrations have no file any more.
    pub ignore_missing: bool,
    pub checksum: ChecksumMode,
    /// Which migrations an upgrade runs (see [`PhaseFilter`]).
    pub phase: PhaseFilter,
}

/// Which migrations an upgrade runs, by their `phase` directive.
///
/// The ordering rule: an `expand` run applies every pending expand migration up to its
/// target and holds each contract migration it passes (it stays pending: "held"). Expand
/// migrations newer than a held contract migration are applied, so the database's
/// version can be above a held contract migration; a contract run (or `all`) applies the
/// held ones later, in version order, and they are never out-of-order errors. Pending
/// *expand* migrations below the current version still are (as without phases).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseFilter {
    /// Every pending migration in version order (the CLI's default outside a cluster).
    #[default]
    All,
    /// Pending expand migrations only; contract migrations are held.
    Expand,
    /// Pending contract migrations only (those expand runs held).
    Contract,
}

impl PhaseFilter {
    fn runs(self, m: &Migration) -> bool {
        match self {
            PhaseFilter::All => true,
            PhaseFilter::Expand => !m.is_contract(),
            PhaseFilter::Contract => m.is_contract(),
        }
    }
}

/// An applied migration whose file changed since it ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChecksumMismatch {
    pub version: String,
    pub file: String,
    pub recorded: String,
    pub actual: String,
    /// Only line endings, trailing whitespace or a byte-order mark differ (the normalized
    /// checksums match): `--checksum normalized` accepts it.
    pub whitespace_only: bool,
}

/// An applied migration with no file in the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MissingFile {
    pub version: String,
    pub description: String,
}

/// Differences between the database's history and the migration files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    pub changed: Vec<ChecksumMismatch>,
    pub missing: Vec<MissingFile>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.missing.is_empty()
    }
}

/// Compares applied checksums with the files.
pub fn drift(set: &MigrationSet, state: &DbState, mode: ChecksumMode) -> Drift {
    let mut d = Drift::default();
    for (version, applied) in &state.applied {
        let Some(m) = set.get(version) else {
            d.missing.push(MissingFile {
                version: applied.version.clone(),
                description: applied.description.clone(),
            });
            continue;
        };
        let (recorded, actual) = match (mode, &applied.checksum_normalized) {
            (ChecksumMode::Normalized, Some(n)) => (Some(n), m.up.checksum_normalized()),
            _ => (applied.checksum.as_ref(), m.up.checksum()),
        };
        // Baselines of versions whose file did not exist when stamped carry no checksum.
        if let Some(recorded) = recorded
            && recorded != actual
        {
            let whitespace_only = mode == ChecksumMode::Strict
                && applied.checksum_normalized.as_deref() == Some(m.up.checksum_normalized());
            d.changed.push(ChecksumMismatch {
                version: applied.version.clone(),
                file: m.up.file.clone(),
                recorded: recorded.clone(),
                actual: actual.to_string(),
                whitespace_only,
            });
        }
    }
    d
}

/// Migrations in the source that the database has not applied, in version order.
pub fn pending<'a>(set: &'a MigrationSet, state: &DbState) -> Vec<&'a Migration> {
    set.migrations
        .iter()
        .filter(|m| !state.applied.contains_key(&m.version))
        .collect()
}

/// A script with no SQL statement that does not say it is empty on purpose: running it
/// would record a step that changed nothing, so `upgrade` and `downgrade` refuse it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmptyScript {
    pub version: String,
    pub file: String,
    pub direction: Direction,
}

/// True when `script` has no statement (only comments and blank lines) and no
/// `-- schemagate:empty <reason>` line.
pub fn unmarked_empty(script: &Script, dialect: Dialect) -> bool {
    script.directives.empty.is_none() && script::split(&script.sql, dialect).is_empty()
}

/// The empty scripts a run could still refuse: pending up scripts and every down script
/// (an applied up script cannot be filled in any more: that would be drift).
pub fn empty_scripts(set: &MigrationSet, state: &DbState, dialect: Dialect) -> Vec<EmptyScript> {
    let mut out = Vec::new();
    for m in &set.migrations {
        let scripts = [
            (!state.applied.contains_key(&m.version)).then_some((&m.up, Direction::Up)),
            m.down.as_ref().map(|d| (d, Direction::Down)),
        ];
        for (s, direction) in scripts.into_iter().flatten() {
            if unmarked_empty(s, dialect) {
                out.push(EmptyScript {
                    version: m.version.to_string(),
                    file: s.file.clone(),
                    direction,
                });
            }
        }
    }
    out
}

/// One step of a plan.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    pub direction: Direction,
    pub migration: &'a Migration,
}

/// The steps an upgrade or downgrade runs, in order.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    pub direction: Direction,
    pub from: Option<Version>,
    /// The current version once every step has run.
    pub to: Option<Version>,
    pub steps: Vec<Step<'a>>,
    /// Upgrade to a version below the current one: nothing runs, the database stays ahead.
    pub ahead: bool,
    /// Contract migrations this (expand) upgrade passed and holds (see [`PhaseFilter`]).
    pub held: Vec<Version>,
}

/// Why no plan can be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlanError {
    #[error("step {} ({}) of an earlier run did not finish{}", .0.version, .0.kind.as_str(), progress(.0))]
    Unfinished(Box<Unfinished>),
    #[error("{}", drift_message(.0))]
    Drift(Drift),
    #[error("target {target} is not a known migration version")]
    UnknownTarget { target: String },
    #[error("pending migrations {} are older than the current version {current}", list(.versions))]
    OutOfOrder {
        versions: Vec<String>,
        current: String,
    },
    #[error("{what} is not a valid {direction} target")]
    WrongDirection {
        what: String,
        direction: &'static str,
    },
    #[error("target {target} is above the current version {current}; use `upgrade`")]
    TargetAboveCurrent { target: String, current: String },
    #[error("cannot go back {steps} step(s): only {applied} migration(s) are applied")]
    NotEnoughApplied { steps: i64, applied: usize },
    #[error("cannot downgrade: {}", missing_down_list(.0))]
    MissingDown(Vec<(String, String)>),
}

/// How to resolve an unfinished step: the verdict names the state of the *version* (are
/// its changes in the schema?), whichever way the step was going.
pub fn resolve_hint(version: &str, kind: super::history::Kind) -> String {
    if kind == super::history::Kind::Down {
        format!(
            "the down script of {version} stopped part-way: inspect the database and finish or \
             undo it by hand, then `schemagate migrate resolve {version} --reverted` if \
             {version}'s changes are now all gone, or `--applied` if they are all still there"
        )
    } else {
        format!(
            "inspect the database and finish or undo the step by hand, then `schemagate migrate \
             resolve {version} --applied` if all of {version}'s changes are there, or \
             `--reverted` if none are"
        )
    }
}

fn list(v: &[String]) -> String {
    v.join(", ")
}

fn progress(u: &Unfinished) -> String {
    let state = if u.failed {
        format!(
            ": it failed ({})",
            u.error.as_deref().unwrap_or("no message")
        )
    } else {
        " (its runner stopped or died while it ran)".to_string()
    };
    match (u.statements_done, u.statements_total) {
        (Some(done), Some(total)) => format!("{state}; {done} of {total} statements had run"),
        _ => state,
    }
}

fn drift_message(d: &Drift) -> String {
    let mut parts = Vec::new();
    for c in &d.changed {
        parts.push(format!(
            "applied migration {} changed since it ran: {} has checksum {} but {} was recorded",
            c.version, c.file, c.actual, c.recorded
        ));
    }
    for m in &d.missing {
        parts.push(format!(
            "applied migration {} ({}) has no file in the migrations source",
            m.version, m.description
        ));
    }
    parts.join("; ")
}

fn missing_down_list(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(ver, why)| format!("{ver} {why}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl PlanError {
    /// The next step for the user.
    pub fn hint(&self) -> String {
        match self {
            PlanError::Unfinished(u) => resolve_hint(&u.version, u.kind),
            PlanError::Drift(d) if !d.changed.is_empty() => "restore the applied file (`git diff` it), \
                 or if only line endings/whitespace changed, pass --checksum normalized"
                .into(),
            PlanError::Drift(_) => {
                "restore the missing files, or pass --ignore-missing if they were removed on purpose"
                    .into()
            }
            PlanError::UnknownTarget { .. } => {
                "run `schemagate migrate heads` / `status` to see the known versions".into()
            }
            PlanError::OutOfOrder { .. } => {
                "give the new migrations versions above the current one, or pass --out-of-order to \
                 apply them anyway"
                    .into()
            }
            PlanError::WrongDirection { .. } => {
                "upgrade takes head, a version or +N; downgrade takes base, a version or -N".into()
            }
            PlanError::TargetAboveCurrent { .. } => "use `schemagate migrate upgrade`".into(),
            PlanError::NotEnoughApplied { .. } => {
                "use `schemagate migrate downgrade base` to revert everything".into()
            }
            PlanError::MissingDown(_) => {
                "write the missing down scripts; nothing was reverted (a downgrade never skips a step)"
                    .into()
            }
        }
    }
}

fn check(set: &MigrationSet, state: &DbState, opts: &PlanOptions) -> Result<(), PlanError> {
    if let Some(u) = &state.unfinished {
        return Err(PlanError::Unfinished(Box::new(u.clone())));
    }
    let mut d = drift(set, state, opts.checksum);
    if opts.ignore_missing {
        d.missing.clear();
    }
    if !d.is_empty() {
        return Err(PlanError::Drift(d));
    }
    Ok(())
}

/// Plans an upgrade to `target`.
///
/// Applied versions above the newest file are the database being ahead (a newer release
/// migrated it: an app rolled back with its migrations), not drift: an upgrade then does
/// nothing. Applied versions missing below the newest file are drift, as always.
pub fn plan_upgrade<'a>(
    set: &'a MigrationSet,
    state: &DbState,
    target: &Target,
    opts: &PlanOptions,
) -> Result<Plan<'a>, PlanError> {
    let head = set.head().map(|m| m.version.clone());
    let ahead_only = |d: &Drift| {
        d.changed.is_empty()
            && !d.missing.is_empty()
            && d.missing.iter().all(|m| {
                let v = Version::parse(&m.version).ok();
                head.as_ref().is_some_and(|h| v.is_some_and(|v| v > *h))
            })
    };
    match check(set, state, opts) {
        Err(PlanError::Drift(d)) if ahead_only(&d) => {
            let current = state.current().cloned();
            return Ok(Plan {
                direction: Direction::Up,
                from: current.clone(),
                to: current,
                steps: Vec::new(),
                ahead: true,
                held: Vec::new(),
            });
        }
        other => other?,
    }
    let current = state.current().cloned();
    let pending = pending(set, state);
    // Contract migrations an expand run passes: held, not run.
    let held_by = |limit: Option<&Version>| -> Vec<Version> {
        if opts.phase != PhaseFilter::Expand {
            return Vec::new();
        }
        pending
            .iter()
            .filter(|m| m.is_contract() && limit.is_none_or(|l| m.version <= *l))
            .map(|m| m.version.clone())
            .collect()
    };
    let limit: Option<&Version> = match target {
        Target::Head => None,
        Target::Version(v) => {
            if set.get(v).is_none() && !state.applied.contains_key(v) {
                return Err(PlanError::UnknownTarget {
                    target: v.to_string(),
                });
            }
            Some(v)
        }
        Target::Relative(n) if *n > 0 => None,
        other => {
            return Err(PlanError::WrongDirection {
                what: other.to_string(),
                direction: "upgrade",
            });
        }
    };
    // Below the current version there is nothing to do, unless the user asked to apply
    // older pending migrations (up to that version).
    let older_pending = |l: &Version| pending.iter().any(|m| m.version <= *l);
    // Held contract migrations below the target: what a contract (or full) run is for.
    let deferred = |l: &Version| {
        opts.phase != PhaseFilter::Expand
            && pending.iter().any(|m| m.is_contract() && m.version <= *l)
    };
    if let (Some(limit), Some(cur)) = (limit, &current)
        && limit < cur
        && !(opts.out_of_order && older_pending(limit))
        && !deferred(limit)
    {
        return Ok(Plan {
            direction: Direction::Up,
            from: current.clone(),
            to: current,
            steps: Vec::new(),
            ahead: true,
            held: held_by(Some(limit)),
        });
    }
    let held = held_by(limit);
    // A contract migration never runs before the expand migrations below it (it removes
    // what they replace): a contract run stops at the first pending expand migration.
    let first_expand = pending
        .iter()
        .find(|m| !m.is_contract())
        .map(|m| &m.version);
    let mut steps: Vec<&Migration> = pending
        .iter()
        .copied()
        .filter(|m| limit.is_none_or(|l| m.version <= *l) && opts.phase.runs(m))
        .filter(|m| {
            opts.phase != PhaseFilter::Contract || first_expand.is_none_or(|e| m.version < *e)
        })
        .collect();
    if let Some(cur) = &current {
        // Contract migrations below the current version were held by expand runs.
        let older: Vec<String> = steps
            .iter()
            .filter(|m| m.version < *cur && !m.is_contract())
            .map(|m| m.version.to_string())
            .collect();
        if !older.is_empty() && !opts.out_of_order {
            return Err(PlanError::OutOfOrder {
                versions: older,
                current: cur.to_string(),
            });
        }
    }
    if let Target::Relative(n) = target {
        steps.truncate(usize::try_from(*n).unwrap_or(usize::MAX));
    }
    let to = steps
        .iter()
        .map(|m| m.version.clone())
        .chain(current.clone())
        .max();
    Ok(Plan {
        direction: Direction::Up,
        from: current,
        to,
        steps: steps
            .into_iter()
            .map(|migration| Step {
                direction: Direction::Up,
                migration,
            })
            .collect(),
        ahead: false,
        held,
    })
}

/// Plans a downgrade to `target`. Every step needs a down script; if any is missing, nothing
/// is planned (a downgrade never skips a step).
pub fn plan_downgrade<'a>(
    set: &'a MigrationSet,
    state: &DbState,
    target: &Target,
    opts: &PlanOptions,
) -> Result<Plan<'a>, PlanError> {
    check(set, state, opts)?;
    let current = state.current().cloned();
    let applied_desc: Vec<&Version> = state.applied.keys().rev().collect();
    let revert: Vec<&Version> = match target {
        Target::Base => applied_desc,
        Target::Version(v) => {
            if set.get(v).is_none() && !state.applied.contains_key(v) {
                return Err(PlanError::UnknownTarget {
                    target: v.to_string(),
                });
            }
            if let Some(cur) = &current
                && v > cur
            {
                return Err(PlanError::TargetAboveCurrent {
                    target: v.to_string(),
                    current: cur.to_string(),
                });
            }
            applied_desc.into_iter().filter(|a| *a > v).collect()
        }
        Target::Relative(n) if *n < 0 => {
            let steps = usize::try_from(-n).unwrap_or(usize::MAX);
            if steps > applied_desc.len() {
                return Err(PlanError::NotEnoughApplied {
                    steps: -n,
                    applied: applied_desc.len(),
                });
            }
            applied_desc.into_iter().take(steps).collect()
        }
        other => {
            return Err(PlanError::WrongDirection {
                what: other.to_string(),
                direction: "downgrade",
            });
        }
    };
    let mut missing = Vec::new();
    let mut steps = Vec::new();
    for v in &revert {
        match set.get(v) {
            None => missing.push((v.to_string(), "has no file".to_string())),
            Some(m) if m.down.is_none() => {
                missing.push((v.to_string(), format!("has no down script ({})", m.up.file)))
            }
            Some(m) => steps.push(Step {
                direction: Direction::Down,
                migration: m,
            }),
        }
    }
    if !missing.is_empty() {
        return Err(PlanError::MissingDown(missing));
    }
    let to = state.applied.keys().rfind(|a| !revert.contains(a)).cloned();
    Ok(Plan {
        direction: Direction::Down,
        from: current,
        to,
        steps,
        ahead: false,
        held: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::history::tests::row;
    use crate::engine::history::{HistoryRow, Kind};
    use crate::engine::source::load_files;

    fn set(specs: &[(&str, bool)]) -> MigrationSet {
        let mut files = Vec::new();
        for (v, down) in specs {
            files.push((format!("{v}_m.up.sql"), format!("select {v};")));
            if *down {
                files.push((format!("{v}_m.down.sql"), format!("select -{v};")));
            }
        }
        load_files("test", files).unwrap()
    }

    fn applied_rows(set: &MigrationSet, versions: &[&str]) -> Vec<HistoryRow> {
        versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut r = row(i as i64 + 1, v, Kind::Up, Some(true), true);
                if let Some(m) = set.get(&Version::parse(v).unwrap()) {
                    r.checksum = Some(m.up.checksum().to_string());
                    r.checksum_normalized = Some(m.up.checksum_normalized().to_string());
                }
                r
            })
            .collect()
    }

    fn state(set: &MigrationSet, versions: &[&str]) -> DbState {
        DbState::from_rows(&applied_rows(set, versions))
    }

    fn t(s: &str) -> Target {
        s.parse().unwrap()
    }

    fn versions(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .map(|s| s.migration.version.to_string())
            .collect()
    }

    const OPTS: PlanOptions = PlanOptions {
        out_of_order: false,
        ignore_missing: false,
        checksum: ChecksumMode::Strict,
        phase: PhaseFilter::All,
    };

    #[test]
    fn targets_parse() {
        assert_eq!(t("head"), Target::Head);
        assert_eq!(t("base"), Target::Base);
        assert_eq!(t("-2"), Target::Relative(-2));
        assert_eq!(t("+1"), Target::Relative(1));
        assert_eq!(t("0003"), Target::Version(Version::parse("3").unwrap()));
        assert!("-0".parse::<Target>().is_err());
        assert!("x".parse::<Target>().is_err());
    }

    #[test]
    fn upgrade_from_empty_to_head_and_to_a_target() {
        let s = set(&[("1", true), ("2", true), ("10", true)]);
        let empty = DbState::default();
        let p = plan_upgrade(&s, &empty, &Target::Head, &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["1", "2", "10"]);
        assert_eq!(p.to.unwrap().to_string(), "10");
        let p = plan_upgrade(&s, &empty, &t("2"), &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["1", "2"]);
        let p = plan_upgrade(&s, &empty, &t("+1"), &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["1"]);
        let p = plan_upgrade(&s, &state(&s, &["1", "2", "10"]), &Target::Head, &OPTS).unwrap();
        assert!(p.steps.is_empty());
        assert_eq!(p.to.unwrap().to_string(), "10");
    }

    #[test]
    fn upgrade_to_a_lower_target_leaves_the_database_ahead() {
        let s = set(&[("1", true), ("2", true)]);
        let p = plan_upgrade(&s, &state(&s, &["1", "2"]), &t("1"), &OPTS).unwrap();
        assert!(p.ahead && p.steps.is_empty());
    }

    #[test]
    fn upgrade_refuses_unknown_targets_and_wrong_directions() {
        let s = set(&[("1", true)]);
        let e = plan_upgrade(&s, &DbState::default(), &t("7"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::UnknownTarget { .. }));
        let e = plan_upgrade(&s, &DbState::default(), &t("base"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::WrongDirection { .. }));
        let e = plan_upgrade(&s, &DbState::default(), &t("-1"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::WrongDirection { .. }));
    }

    #[test]
    fn out_of_order_needs_permission() {
        let s = set(&[("1", true), ("2", true), ("3", true)]);
        let st = state(&s, &["1", "3"]);
        let e = plan_upgrade(&s, &st, &Target::Head, &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::OutOfOrder { .. }), "{e}");
        let opts = PlanOptions {
            out_of_order: true,
            ..OPTS
        };
        let p = plan_upgrade(&s, &st, &Target::Head, &opts).unwrap();
        assert_eq!(versions(&p), vec!["2"]);
        assert_eq!(p.to.unwrap().to_string(), "3");
        let p = plan_upgrade(&s, &st, &t("2"), &opts).unwrap();
        assert_eq!(
            versions(&p),
            vec!["2"],
            "a version target below current applies older ones"
        );
        assert!(!p.ahead);
        let p = plan_upgrade(&s, &st, &t("2"), &OPTS).unwrap();
        assert!(p.ahead && p.steps.is_empty());
    }

    #[test]
    fn drift_and_unfinished_steps_block_every_plan() {
        let s = set(&[("1", true), ("2", true)]);
        let mut rows = applied_rows(&s, &["1"]);
        rows[0].checksum = Some("0000".into());
        let st = DbState::from_rows(&rows);
        let e = plan_upgrade(&s, &st, &Target::Head, &OPTS).unwrap_err();
        let PlanError::Drift(d) = &e else {
            panic!("{e}")
        };
        assert_eq!(d.changed[0].file, "1_m.up.sql");
        assert!(e.to_string().contains("1_m.up.sql") && e.to_string().contains("0000"));
        assert!(matches!(
            plan_downgrade(&s, &st, &Target::Base, &OPTS),
            Err(PlanError::Drift(_))
        ));

        let mut rows = applied_rows(&s, &["1"]);
        rows.push(row(2, "2", Kind::Up, None, false));
        let st = DbState::from_rows(&rows);
        let e = plan_upgrade(&s, &st, &Target::Head, &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::Unfinished(_)));
        assert!(e.hint().contains("resolve 2"));
    }

    #[test]
    fn normalized_mode_accepts_whitespace_only_changes() {
        let s = load_files(
            "t",
            vec![("1_a.up.sql".to_string(), "select 1;  \r\n".to_string())],
        )
        .unwrap();
        let mut rows = applied_rows(&s, &["1"]);
        rows[0].checksum = Some(crate::engine::script::Checksums::of("select 1;\n").strict);
        rows[0].checksum_normalized =
            Some(crate::engine::script::Checksums::of("select 1;\n").normalized);
        let st = DbState::from_rows(&rows);
        assert!(!drift(&s, &st, ChecksumMode::Strict).is_empty());
        assert!(drift(&s, &st, ChecksumMode::Normalized).is_empty());
    }

    #[test]
    fn missing_files_are_drift_unless_ignored() {
        let s = set(&[("2", true)]);
        let st = state(&s, &["1", "2"]);
        let e = plan_upgrade(&s, &st, &Target::Head, &OPTS).unwrap_err();
        assert!(matches!(&e, PlanError::Drift(d) if d.missing.len() == 1));
        let opts = PlanOptions {
            ignore_missing: true,
            ..OPTS
        };
        assert!(plan_upgrade(&s, &st, &Target::Head, &opts).is_ok());
    }

    #[test]
    fn downgrade_by_steps_to_a_version_and_to_base() {
        let s = set(&[("1", true), ("2", true), ("3", true)]);
        let st = state(&s, &["1", "2", "3"]);
        let p = plan_downgrade(&s, &st, &t("-1"), &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["3"]);
        assert_eq!(p.to.unwrap().to_string(), "2");
        let p = plan_downgrade(&s, &st, &t("1"), &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["3", "2"]);
        let p = plan_downgrade(&s, &st, &t("base"), &OPTS).unwrap();
        assert_eq!(versions(&p), vec!["3", "2", "1"]);
        assert!(p.to.is_none());
        let e = plan_downgrade(&s, &st, &t("-4"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::NotEnoughApplied { .. }));
        let e = plan_downgrade(&s, &state(&s, &["1"]), &t("3"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::TargetAboveCurrent { .. }));
        let e = plan_downgrade(&s, &st, &t("head"), &OPTS).unwrap_err();
        assert!(matches!(e, PlanError::WrongDirection { .. }));
    }

    #[test]
    fn downgrade_never_skips_a_step_without_a_down_script() {
        let s = set(&[("1", true), ("2", false), ("3", true)]);
        let st = state(&s, &["1", "2", "3"]);
        let e = plan_downgrade(&s, &st, &t("1"), &OPTS).unwrap_err();
        let PlanError::MissingDown(m) = &e else {
            panic!("{e}")
        };
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, "2");
        assert!(e.to_string().contains("2_m.up.sql"));
        assert!(plan_downgrade(&s, &st, &t("-1"), &OPTS).is_ok());
    }
}
