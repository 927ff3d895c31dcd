//! Every phase transition of the decision.

use super::*;
use crate::api::conditions::status_of;
use crate::api::{SchemaMigrationSpec, SourceSpec};
use k8s_openapi::jiff::Timestamp;

fn now() -> Time {
    Time(Timestamp::from_second(1_795_591_960).unwrap())
}

fn later() -> Time {
    Time(Timestamp::from_second(1_795_592_960).unwrap())
}

fn sm(mode: MigrationMode) -> SchemaMigration {
    let mut sm = SchemaMigration::new(
        "orders",
        SchemaMigrationSpec {
            mode,
            ..SchemaMigrationSpec::new(
                "orders-db",
                "url",
                SourceSpec::config_map("orders-migrations"),
            )
        },
    );
    sm.metadata.namespace = Some("shop".into());
    sm.metadata.generation = Some(3);
    sm
}

fn source(versions: &[&str]) -> SourceState {
    SourceState::Loaded {
        versions: versions.iter().map(|v| v.to_string()).collect(),
        hash: "abc".into(),
    }
}

fn db(current: Option<&str>) -> DbView {
    DbView::Read(Box::new(DbRead {
        current: current.map(str::to_string),
        ..Default::default()
    }))
}

fn namer(_target: Option<&str>, command: RunCommand) -> (String, String) {
    match command {
        RunCommand::Upgrade => ("orders-1a2b3c4d".into(), "1a2b3c4d".into()),
        RunCommand::Downgrade => ("orders-down".into(), "down".into()),
        RunCommand::Contract => ("orders-contract".into(), "contract".into()),
    }
}

fn other_namer(_target: Option<&str>, _command: RunCommand) -> (String, String) {
    ("orders-new".into(), "new".into())
}

fn inputs(sm: &SchemaMigration) -> Inputs<'_> {
    Inputs {
        sm,
        now: now(),
        secret: SecretState::Found {
            resource_version: "7".into(),
        },
        source: source(&["1", "2", "3"]),
        database: db(Some("2")),
        jobs: vec![],
        namer: Some(&namer),
        image_allowed: true,
        service_account_allowed: true,
        schema_drift: None,
        pods: vec![],
    }
}

fn job(name: &str, state: JobState, summary: Option<RunSummary>) -> JobView {
    JobView {
        kind: RunKind::Job,
        name: name.into(),
        state,
        started: Some("2026-11-25T07:00:00Z".into()),
        finished: (state != JobState::Active).then(|| "2026-11-25T07:01:00Z".into()),
        summary,
        failure: None,
        contract: false,
    }
}

fn success(to: &str) -> RunSummary {
    RunSummary {
        result: RunResult::Success,
        from: Some("2".into()),
        to: Some(to.into()),
        applied: vec![to.into()],
        exit_code: Some(0),
        ..Default::default()
    }
}

fn phase(d: &Decision) -> Phase {
    d.status.phase.unwrap()
}

fn cond<'a>(d: &'a Decision, t: &str) -> &'a Condition {
    d.status.conditions.iter().find(|c| c.type_ == t).unwrap()
}

/// kstatus: Ready excludes Reconciling and Stalled; they never hold together.
fn assert_kstatus(d: &Decision) {
    let s = &d.status.conditions;
    let (r, rec, st) = (
        status_of(s, cond::READY) == Some("True"),
        status_of(s, cond::RECONCILING) == Some("True"),
        status_of(s, cond::STALLED) == Some("True"),
    );
    assert!(!(r && (rec || st)), "{s:?}");
    assert!(!(rec && st), "{s:?}");
    assert_eq!(d.status.observed_generation, Some(3));
}

#[test]
fn job_mode_creates_the_planned_job_when_behind() {
    let sm = sm(MigrationMode::Job);
    let d = decide(&inputs(&sm));
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Migrating);
    let Action::CreateJob(plan) = &d.action else {
        panic!("{d:?}")
    };
    assert_eq!(plan.name, "orders-1a2b3c4d");
    assert_eq!(plan.target.as_deref(), Some("3"));
    assert_eq!(plan.command, RunCommand::Upgrade);
    assert_eq!(d.status.target_version.as_deref(), Some("3"));
    assert_eq!(d.status.current_version.as_deref(), Some("2"));
    assert_eq!(cond(&d, cond::RECONCILING).reason, reason::JOB_CREATED);
    assert!(d.events.iter().any(|e| e.reason == reason::JOB_CREATED));
}

#[test]
fn a_running_job_is_waited_for_even_when_the_target_changes() {
    let mut sm = sm(MigrationMode::Job);
    sm.spec.target_version = Some("2".into());
    let mut i = inputs(&sm);
    i.database = db(Some("1"));
    i.jobs = vec![job("orders-old", JobState::Active, None)];
    i.namer = Some(&other_namer);
    let d = decide(&i);
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Migrating);
    assert_eq!(d.action, Action::Nothing, "never two Jobs at once");
    assert_eq!(cond(&d, cond::RECONCILING).reason, reason::JOB_RUNNING);
    assert_eq!(d.status.last_run.as_ref().unwrap().result, "Running");
}

#[test]
fn job_success_makes_it_ready_with_the_versions() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.database = db(Some("3"));
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Succeeded,
        Some(success("3")),
    )];
    let d = decide(&i);
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Ready);
    assert_eq!(d.action, Action::Nothing);
    assert_eq!(cond(&d, cond::READY).status, "True");
    assert_eq!(cond(&d, cond::READY).reason, reason::UP_TO_DATE);
    let run = d.status.last_run.as_ref().unwrap();
    assert_eq!(
        (run.kind.as_str(), run.result.as_str()),
        ("Job", "Succeeded")
    );
    assert_eq!(run.message.as_deref(), Some("applied 3 (2 -> 3)"));
}

#[test]
fn job_success_is_trusted_when_the_database_cannot_be_read() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.database = DbView::Failed(DbFailure::new(
        DbFailureKind::Unreachable,
        "connection refused",
    ));
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Succeeded,
        Some(success("3")),
    )];
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Ready);
    assert_eq!(d.status.current_version.as_deref(), Some("3"));
    let db = cond(&d, cond::DATABASE_REACHABLE);
    assert_eq!(
        (db.status.as_str(), db.reason.as_str()),
        ("False", reason::DATABASE_UNREACHABLE)
    );
}

#[test]
fn job_failure_is_failed_and_stalled_with_the_runner_message() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    let failed = RunSummary {
        result: RunResult::Failed,
        error: Some(SummaryError {
            kind: "migration_failed".into(),
            message: "migration 3 (3_x.up.sql) failed at statement 2 of 2 (line 4): syntax error"
                .into(),
        }),
        ..Default::default()
    };
    i.jobs = vec![job("orders-1a2b3c4d", JobState::Failed, Some(failed))];
    let d = decide(&i);
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Failed);
    assert_eq!(
        d.action,
        Action::Nothing,
        "a failed Job is not retried by the controller"
    );
    let stalled = cond(&d, cond::STALLED);
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", reason::MIGRATION_FAILED)
    );
    assert!(
        stalled.message.contains("3_x.up.sql"),
        "{}",
        stalled.message
    );
    assert!(
        d.events
            .iter()
            .any(|e| e.warning && e.reason == reason::MIGRATION_FAILED)
    );
}

#[test]
fn a_job_failing_without_a_summary_reports_why() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    let mut j = job("orders-1a2b3c4d", JobState::Failed, None);
    j.failure = Some("DeadlineExceeded: Job was active longer than specified deadline".into());
    i.jobs = vec![j];
    let d = decide(&i);
    assert!(cond(&d, cond::STALLED).message.contains("DeadlineExceeded"));
}

#[test]
fn downgrade_denied_blocks_and_runs_nothing() {
    let mut sm = sm(MigrationMode::Job);
    sm.spec.target_version = Some("1".into());
    let mut i = inputs(&sm);
    i.database = db(Some("3"));
    let d = decide(&i);
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Blocked);
    assert_eq!(d.action, Action::Nothing);
    assert_eq!(cond(&d, cond::STALLED).reason, reason::DOWNGRADE_DENIED);
    // The same in init-container mode.
    let mut sm2 = sm.clone();
    sm2.spec.mode = MigrationMode::InitContainer;
    let mut i = inputs(&sm2);
    i.database = db(Some("3"));
    assert_eq!(phase(&decide(&i)), Phase::Blocked);
}

#[test]
fn downgrade_allowed_runs_a_downgrade_job() {
    let mut sm = sm(MigrationMode::Job);
    sm.spec.target_version = Some("1".into());
    sm.spec.downgrade = DowngradePolicy::Allow;
    let mut i = inputs(&sm);
    i.database = db(Some("3"));
    let d = decide(&i);
    let Action::CreateJob(plan) = &d.action else {
        panic!("{d:?}")
    };
    assert_eq!(plan.command, RunCommand::Downgrade);
    assert_eq!(plan.target.as_deref(), Some("1"));
}

#[test]
fn paused_runs_nothing_and_says_so() {
    let mut sm = sm(MigrationMode::Job);
    sm.spec.paused = true;
    let d = decide(&inputs(&sm));
    assert_kstatus(&d);
    assert_eq!(d.action, Action::Nothing);
    assert_eq!(phase(&d), Phase::Pending);
    let rec = cond(&d, cond::RECONCILING);
    assert_eq!(
        (rec.status.as_str(), rec.reason.as_str()),
        ("False", reason::PAUSED)
    );
    // Paused at the target is still Ready.
    let mut i = inputs(&sm);
    i.database = db(Some("3"));
    assert_eq!(phase(&decide(&i)), Phase::Ready);
}

#[test]
fn missing_inputs_are_named_and_nothing_runs() {
    let sm = sm(MigrationMode::Job);
    for (secret, src, want) in [
        (
            SecretState::Missing,
            source(&["1"]),
            reason::SECRET_NOT_FOUND,
        ),
        (
            SecretState::KeyMissing,
            source(&["1"]),
            reason::SECRET_KEY_MISSING,
        ),
        (
            SecretState::Found {
                resource_version: "1".into(),
            },
            SourceState::Missing,
            reason::CONFIG_MAP_NOT_FOUND,
        ),
    ] {
        let mut i = inputs(&sm);
        i.secret = secret;
        i.source = src;
        let d = decide(&i);
        assert_kstatus(&d);
        assert_eq!(d.action, Action::Nothing);
        let stalled = cond(&d, cond::STALLED);
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", want)
        );
        assert!(
            stalled.message.contains("orders-db") || stalled.message.contains("orders-migrations"),
            "{}",
            stalled.message
        );
    }
}

#[test]
fn invalid_source_unknown_target_and_disallowed_images_block() {
    let mut sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.source = SourceState::Invalid("version 1 is defined twice".into());
    assert_eq!(
        cond(&decide(&i), cond::STALLED).reason,
        reason::INVALID_SOURCE
    );

    sm.spec.target_version = Some("9".into());
    let i = inputs(&sm);
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Blocked);
    assert_eq!(cond(&d, cond::STALLED).reason, reason::UNKNOWN_TARGET);

    sm.spec.target_version = None;
    let mut i = inputs(&sm);
    i.image_allowed = false;
    let d = decide(&i);
    assert_eq!(cond(&d, cond::STALLED).reason, reason::IMAGE_NOT_ALLOWED);
    assert_eq!(d.action, Action::Nothing);

    let mut i = inputs(&sm);
    i.service_account_allowed = false;
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Blocked);
    assert_eq!(
        cond(&d, cond::STALLED).reason,
        reason::SERVICE_ACCOUNT_NOT_ALLOWED
    );
    assert_eq!(d.action, Action::Nothing);
}

#[test]
fn dirty_and_drifted_databases_fail() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.database = DbView::Read(Box::new(DbRead {
        current: Some("2".into()),
        unfinished: Some(DirtyStep {
            version: "3".into(),
            failed: false,
            message: "step 3 (up) did not finish".into(),
        }),
        ..Default::default()
    }));
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Failed);
    assert_eq!(cond(&d, cond::STALLED).reason, reason::DIRTY);
    assert_eq!(d.action, Action::Nothing);

    i.database = DbView::Read(Box::new(DbRead {
        current: Some("2".into()),
        drift: Some(Drifted {
            changed: vec!["1".into()],
            message: "applied migration 1 changed".into(),
            ..Default::default()
        }),
        ..Default::default()
    }));
    assert_eq!(cond(&decide(&i), cond::STALLED).reason, reason::DRIFT);

    i.database = DbView::Read(Box::new(DbRead {
        current: Some("3".into()),
        tool_problem: Some("golang-migrate: version 3 is dirty; `migrate force 3`".into()),
        ..Default::default()
    }));
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Failed);
    let stalled = cond(&d, cond::STALLED);
    assert_eq!(stalled.reason, reason::TOOL_NEEDS_REPAIR);
    assert!(stalled.message.contains("migrate force 3"));
    assert_eq!(d.action, Action::Nothing);
}

#[test]
fn init_container_mode_waits_for_pods_and_reports_their_runs() {
    let sm = sm(MigrationMode::InitContainer);
    let d = decide(&inputs(&sm));
    assert_kstatus(&d);
    assert_eq!(phase(&d), Phase::Migrating);
    assert_eq!(d.action, Action::Nothing, "no Jobs in init-container mode");
    assert_eq!(cond(&d, cond::RECONCILING).reason, reason::WAITING_FOR_POD);

    let mut i = inputs(&sm);
    i.database = db(Some("3"));
    assert_eq!(phase(&decide(&i)), Phase::Ready);

    let mut i = inputs(&sm);
    i.database = DbView::Failed(DbFailure::new(DbFailureKind::Unreachable, "timed out"));
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Pending);
    assert_eq!(
        cond(&d, cond::RECONCILING).reason,
        reason::DATABASE_UNREACHABLE
    );

    let mut i = inputs(&sm);
    let mut pod = job("web-7f9c", JobState::Failed, None);
    pod.kind = RunKind::Pod;
    pod.failure = Some("relation \"x\" does not exist".into());
    i.jobs = vec![pod];
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Failed);
    assert_eq!(d.status.last_run.as_ref().unwrap().kind, "Pod");
}

#[test]
fn an_unchanged_world_gives_an_identical_status() {
    let sm0 = sm(MigrationMode::Job);
    let mut i = inputs(&sm0);
    i.database = db(Some("3"));
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Succeeded,
        Some(success("3")),
    )];
    let first = decide(&i);
    let mut sm1 = sm0.clone();
    sm1.status = Some(first.status.clone());
    let mut i = inputs(&sm1);
    i.now = later();
    i.database = db(Some("3"));
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Succeeded,
        Some(success("3")),
    )];
    let second = decide(&i);
    assert_eq!(
        first.status, second.status,
        "no status churn: lastTransitionTime only moves on flips"
    );
    assert!(second.events.is_empty(), "no Event without a transition");

    // A flip moves lastTransitionTime.
    let mut i = inputs(&sm1);
    i.now = later();
    i.database = db(Some("2"));
    let third = decide(&i);
    assert_eq!(cond(&third, cond::READY).last_transition_time, later());
}

#[test]
fn a_database_that_refuses_the_controller_for_good_stalls_in_both_modes() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let sm = sm(mode);
        for (kind, why) in [
            (DbFailureKind::Auth, reason::DATABASE_AUTH_FAILED),
            (DbFailureKind::NoDatabase, reason::DATABASE_NOT_FOUND),
            (DbFailureKind::Config, reason::INVALID_DATABASE_URL),
        ] {
            let mut i = inputs(&sm);
            i.database = DbView::Failed(DbFailure::new(kind, "the server said no"));
            let d = decide(&i);
            assert_kstatus(&d);
            let stalled = cond(&d, cond::STALLED);
            assert_eq!(
                (stalled.status.as_str(), stalled.reason.as_str()),
                ("True", why)
            );
            assert!(stalled.message.contains("orders-db"), "{}", stalled.message);
            assert_eq!(
                d.action,
                Action::Nothing,
                "no Job that would fail the same way"
            );
        }
        // An unreachable server may come back: not stalled.
        let mut i = inputs(&sm);
        i.database = DbView::Failed(DbFailure::new(DbFailureKind::Unreachable, "refused"));
        assert_eq!(cond(&decide(&i), cond::STALLED).status, "False");
    }
}

#[test]
fn a_dirty_step_names_the_resolve_command_for_its_version() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.database = DbView::Read(Box::new(DbRead {
        current: Some("2".into()),
        unfinished: Some(DirtyStep {
            version: "3".into(),
            failed: true,
            message: "step 3 failed at statement 2 of 3".into(),
        }),
        ..Default::default()
    }));
    let d = decide(&i);
    assert!(
        cond(&d, cond::STALLED)
            .message
            .contains("schemagate migrate resolve 3 --applied"),
        "{:?}",
        cond(&d, cond::STALLED)
    );
}

#[test]
fn a_run_that_found_its_tables_locked_says_lock_busy() {
    for mode in [MigrationMode::Job, MigrationMode::InitContainer] {
        let sm = sm(mode);
        let mut i = inputs(&sm);
        let busy = RunSummary {
            result: RunResult::Failed,
            error: Some(SummaryError {
                kind: "lock_busy".into(),
                message: "migration 3 ... retried for 300s (12 attempts), but other sessions \
                          kept holding the lock: pid 42 (report-job, idle in transaction)"
                    .into(),
            }),
            ..Default::default()
        };
        let mut run = job("orders-1a2b3c4d", JobState::Failed, Some(busy));
        if mode == MigrationMode::InitContainer {
            run.kind = RunKind::Pod;
        }
        i.jobs = vec![run];
        let d = decide(&i);
        let stalled = cond(&d, cond::STALLED);
        assert_eq!(stalled.reason, reason::LOCK_BUSY, "{mode:?}");
        assert!(
            stalled.message.contains("report-job"),
            "{}",
            stalled.message
        );
    }
}

#[test]
fn lint_findings_of_the_pending_migrations_reach_the_status_bounded() {
    let sm = sm(MigrationMode::Job);
    let mut i = inputs(&sm);
    i.database = DbView::Read(Box::new(DbRead {
        current: Some("2".into()),
        pending: vec!["3".into()],
        lint: (0..30)
            .map(|n| format!("3_x.up.sql:{n} require-concurrent-index-creation: ..."))
            .collect(),
        ..Default::default()
    }));
    let d = decide(&i);
    assert_eq!(d.status.lint_findings.len(), crate::api::STATUS_LIST_MAX);
    assert!(d.status.lint_findings[0].starts_with("3_x.up.sql:0 require-concurrent"));
}

const HASH: &str = "5b0d9449d32bb146c117b19ef1d6b7817e5ed4ac66ade02e6423a48e933e57fe";

fn refused_for_approval() -> RunSummary {
    RunSummary {
        result: RunResult::Failed,
        exit_code: Some(21),
        plan_hash: Some(HASH.into()),
        error: Some(SummaryError {
            kind: "approval_required".into(),
            message: format!(
                "refused: this plan needs an approval (Destructive (...)): approve plan hash {HASH}"
            ),
        }),
        ..Default::default()
    }
}

#[test]
fn a_plan_that_needs_an_approval_blocks_with_its_hash_until_approved() {
    let mut s = sm(MigrationMode::Job);
    s.spec.approval.required = vec![crate::api::ApprovalKind::Destructive];
    let mut i = inputs(&s);
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Failed,
        Some(refused_for_approval()),
    )];
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Blocked);
    let stalled = cond(&d, cond::STALLED);
    assert_eq!(stalled.status, "True");
    assert_eq!(stalled.reason, reason::APPROVAL_REQUIRED);
    assert!(stalled.message.contains(HASH), "{}", stalled.message);
    assert!(stalled.message.contains("spec.approvedPlans"));
    assert_eq!(d.action, Action::Nothing, "no new Job for the same plan");
    assert_kstatus(&d);

    // Approved: the approval changes the Job's name (a new run), which is created.
    s.spec.approved_plans = vec![crate::api::ApprovedPlan {
        plan_hash: format!("sha256:{}", HASH.to_uppercase()),
        approved_by: "dba@example.com".into(),
        reason: Some("orders are archived".into()),
    }];
    let mut i = inputs(&s);
    i.namer = Some(&other_namer);
    i.jobs = vec![job(
        "orders-1a2b3c4d",
        JobState::Failed,
        Some(refused_for_approval()),
    )];
    let d = decide(&i);
    assert!(matches!(d.action, Action::CreateJob(ref j) if j.name == "orders-new"));
    assert_eq!(phase(&d), Phase::Migrating);
}

#[test]
fn an_init_container_refused_for_approval_blocks_and_an_approval_unblocks_new_pods() {
    let mut s = sm(MigrationMode::InitContainer);
    let mut run = job(
        "orders-web-1",
        JobState::Failed,
        Some(refused_for_approval()),
    );
    run.kind = RunKind::Pod;
    let mut i = inputs(&s);
    i.jobs = vec![run.clone()];
    let d = decide(&i);
    assert_eq!(
        phase(&d),
        Phase::Blocked,
        "the webhook refuses new pods meanwhile"
    );
    assert_eq!(cond(&d, cond::STALLED).reason, reason::APPROVAL_REQUIRED);
    s.spec.approved_plans = vec![crate::api::ApprovedPlan {
        plan_hash: HASH.into(),
        approved_by: "dba".into(),
        reason: None,
    }];
    let mut i = inputs(&s);
    i.jobs = vec![run];
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Migrating, "{:?}", d.status.conditions);
    assert!(cond(&d, cond::RECONCILING).message.contains("restart them"));
    assert_kstatus(&d);
}

fn drift_status(result: &str, count: usize) -> crate::api::SchemaDriftStatus {
    crate::api::SchemaDriftStatus {
        checked_at: Some("2026-12-06T08:00:00Z".into()),
        version: Some("2".into()),
        result: result.into(),
        count,
        differences: (0..count)
            .map(|n| format!("index extra_{n} on orders exists but no migration created it"))
            .collect(),
        message: format!("{result}: {count} object(s)"),
    }
}

#[test]
fn drift_is_a_condition_an_event_and_blocks_only_when_asked() {
    let mut s = sm(MigrationMode::Job);
    s.spec.target_version = Some("2".into());
    // Off: no condition at all.
    let d = decide(&inputs(&s));
    assert!(
        d.status
            .conditions
            .iter()
            .all(|c| c.type_ != cond::SCHEMA_DRIFTED)
    );

    s.spec.drift = Some(crate::api::DriftSpec {
        interval: "1h".into(),
        on_drift: crate::api::DriftAction::Report,
    });
    let mut i = inputs(&s);
    i.schema_drift = Some(drift_status(DRIFTED, 2));
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Ready, "drift does not block by default");
    let c = cond(&d, cond::SCHEMA_DRIFTED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reason::SCHEMA_DRIFTED)
    );
    assert!(
        d.events
            .iter()
            .any(|e| e.warning && e.reason == reason::SCHEMA_DRIFTED)
    );
    assert_eq!(d.status.schema_drift.as_ref().unwrap().count, 2);
    assert_kstatus(&d);

    // The same drift found again: no new Event; the status keeps it between checks.
    s.status = Some(d.status.clone());
    let mut i = inputs(&s);
    i.schema_drift = Some(drift_status(DRIFTED, 2));
    assert!(
        decide(&i)
            .events
            .iter()
            .all(|e| e.reason != reason::SCHEMA_DRIFTED)
    );
    let d = decide(&inputs(&s));
    assert_eq!(cond(&d, cond::SCHEMA_DRIFTED).status, "True");

    // Gone: a Normal Event, the condition False.
    let mut i = inputs(&s);
    i.schema_drift = Some(drift_status(CLEAN, 0));
    let d = decide(&i);
    assert_eq!(cond(&d, cond::SCHEMA_DRIFTED).status, "False");
    assert!(
        d.events
            .iter()
            .any(|e| !e.warning && e.reason == reason::NO_DRIFT)
    );

    // Block: the resource is Blocked (so the webhook refuses pods).
    s.spec.drift.as_mut().unwrap().on_drift = crate::api::DriftAction::Block;
    let mut i = inputs(&s);
    i.schema_drift = Some(drift_status(DRIFTED, 1));
    let d = decide(&i);
    assert_eq!(phase(&d), Phase::Blocked);
    assert_eq!(cond(&d, cond::STALLED).reason, reason::SCHEMA_DRIFTED);
    assert!(cond(&d, cond::STALLED).message.contains("drift --accept"));
    assert_kstatus(&d);
}

/// Files 1, 2 (expand), 3 (contract): the database after the new app's runner applied 2.
fn expanded(i: &mut Inputs<'_>) {
    i.source = source(&["1", "2", "3"]);
    i.database = DbView::Read(Box::new(DbRead {
        current: Some("2".into()),
        pending: vec!["3".into()],
        held_contract: vec!["3".into()],
        ..Default::default()
    }));
}

fn pod(name: &str, version: Option<&str>) -> PodVersion {
    PodVersion {
        name: name.into(),
        version: version.map(String::from),
    }
}

#[test]
fn a_contract_migration_waits_for_older_pods_then_runs_once_in_a_job() {
    for mode in [MigrationMode::InitContainer, MigrationMode::Job] {
        let s = sm(mode);
        // Old pods (version 1) and new ones (3) run side by side: held, and Ready (the new
        // app's migrations are applied: the rollout goes on).
        let mut i = inputs(&s);
        expanded(&mut i);
        i.pods = vec![pod("web-old-1", Some("1")), pod("web-new-1", Some("3"))];
        let d = decide(&i);
        assert_eq!(
            phase(&d),
            Phase::Ready,
            "{mode:?}: {:?}",
            d.status.conditions
        );
        assert_eq!(d.action, Action::Nothing);
        assert_eq!(d.status.contract.held.len(), 1);
        assert!(
            d.status.contract.held[0].reason.contains("web-old-1"),
            "{:?}",
            d.status.contract
        );
        assert!(d.events.iter().any(|e| e.reason == reason::CONTRACT_HELD));
        assert_kstatus(&d);

        // A pod whose version is not known holds it too.
        let mut i = inputs(&s);
        expanded(&mut i);
        i.pods = vec![pod("web-x", None), pod("web-new-1", Some("3"))];
        assert_eq!(decide(&i).action, Action::Nothing);

        // The old pods are gone: one contract Job.
        let mut i = inputs(&s);
        expanded(&mut i);
        i.pods = vec![pod("web-new-1", Some("3")), pod("web-new-2", Some("3"))];
        let d = decide(&i);
        assert_eq!(phase(&d), Phase::Ready);
        match &d.action {
            Action::CreateJob(j) => {
                assert_eq!(
                    (j.command, j.target.as_deref()),
                    (RunCommand::Contract, Some("3"))
                );
                assert_eq!(j.name, "orders-contract");
            }
            other => panic!("{mode:?}: expected the contract Job, got {other:?}"),
        }
        assert!(
            d.events
                .iter()
                .any(|e| e.reason == reason::CONTRACT_STARTED)
        );

        // Running, seen again (a repeated watch event): no second Job; Ready stays.
        let mut i = inputs(&s);
        expanded(&mut i);
        i.pods = vec![pod("web-new-1", Some("3"))];
        let mut running = job("orders-contract", JobState::Active, None);
        running.contract = true;
        i.jobs = vec![running];
        let d = decide(&i);
        assert_eq!(d.action, Action::Nothing, "{mode:?}");
        assert_eq!(
            phase(&d),
            Phase::Ready,
            "{mode:?}: {:?}",
            d.status.conditions
        );

        // Applied: the status says when and by whom, and the oldest compatible version.
        let mut i = inputs(&s);
        i.source = source(&["1", "2", "3"]);
        i.database = DbView::Read(Box::new(DbRead {
            current: Some("3".into()),
            contracts: vec![crate::api::AppliedContract {
                version: "3".into(),
                applied_at: Some("2026-12-06T09:00:00Z".into()),
                applied_by: Some("orders-contract-x".into()),
            }],
            ..Default::default()
        }));
        let mut before = s.clone();
        before.status = Some(SchemaMigrationStatus {
            contract: crate::api::ContractStatus {
                held: vec![crate::api::HeldContract {
                    version: "3".into(),
                    reason: "x".into(),
                }],
                ..Default::default()
            },
            ..Default::default()
        });
        i.sm = &before;
        let d = decide(&i);
        assert_eq!(
            d.status.contract.oldest_compatible_version.as_deref(),
            Some("3")
        );
        assert!(d.status.contract.held.is_empty());
        assert!(
            d.events
                .iter()
                .any(|e| e.reason == reason::CONTRACT_APPLIED)
        );
    }
}

#[test]
fn an_expand_migration_pending_keeps_the_resource_behind_and_nothing_contracts_over_it() {
    let s = sm(MigrationMode::Job);
    let mut i = inputs(&s);
    i.source = source(&["1", "2", "3", "4"]);
    // 3 is contract, 2 and 4 expand: 2 pending below it.
    i.database = DbView::Read(Box::new(DbRead {
        current: Some("1".into()),
        pending: vec!["2".into(), "3".into(), "4".into()],
        held_contract: vec!["3".into()],
        ..Default::default()
    }));
    let d = decide(&i);
    match &d.action {
        Action::CreateJob(j) => assert_eq!(j.command, RunCommand::Upgrade),
        other => panic!("expected the upgrade Job, got {other:?}"),
    }
    assert!(
        d.status.contract.held.is_empty(),
        "not held yet: 2 comes first"
    );
}
