//! The fleet decision, case by case.

use super::*;
use crate::api::{DatabasesSpec, MigrationMode, SchemaMigrationSpec, SourceSpec};
use crate::controller::decide::{
    DbFailure, DbFailureKind, DbRead, RunKind, RunSummary, SummaryError,
};
use k8s_openapi::jiff::Timestamp;

fn fleet_sm(on_failure: FleetFailurePolicy) -> SchemaMigration {
    let mut spec = SchemaMigrationSpec::new("x", "url", SourceSpec::config_map("m"));
    spec.database = None;
    spec.mode = MigrationMode::Job;
    spec.databases = Some(DatabasesSpec {
        secret_selector: Default::default(),
        key: "url".into(),
        canary: 1,
        max_parallel: 4,
        on_failure,
    });
    let mut sm = SchemaMigration::new("tenants", spec);
    sm.metadata.namespace = Some("saas".into());
    sm.metadata.generation = Some(1);
    sm
}

fn at(version: Option<&str>) -> Option<DbView> {
    Some(DbView::Read(Box::new(DbRead {
        current: version.map(String::from),
        ..Default::default()
    })))
}

fn member(name: &str, version: Option<&str>) -> Member {
    Member {
        secret: name.into(),
        database: at(version),
    }
}

fn namer(batch: &[String]) -> (String, String) {
    (format!("tenants-{}", batch.join("-")), "base".into())
}

fn inputs<'a>(
    sm: &'a SchemaMigration,
    members: Vec<Member>,
    jobs: Vec<FleetJob>,
) -> FleetInputs<'a> {
    FleetInputs {
        sm,
        now: Time(Timestamp::from_second(1_800_000_000).unwrap()),
        source: SourceState::Loaded {
            versions: vec!["1".into(), "2".into()],
            hash: "h".into(),
        },
        members,
        jobs,
        namer: &namer,
        image_allowed: true,
        service_account_allowed: true,
    }
}

fn job(members: &[&str], state: JobState, summary: Option<RunSummary>) -> FleetJob {
    FleetJob {
        view: JobView {
            kind: RunKind::Job,
            name: format!("tenants-{}", members.join("-")),
            state,
            started: None,
            finished: None,
            summary,
            failure: None,
            contract: false,
        },
        members: members.iter().map(|m| m.to_string()).collect(),
        current: true,
    }
}

fn batch(d: &Decision) -> Vec<String> {
    match &d.action {
        Action::CreateJob(p) => p.members.clone(),
        other => panic!("expected a batch Job, got {other:?}"),
    }
}

fn fleet(d: &Decision) -> FleetStatus {
    d.status.databases.clone().unwrap()
}

#[test]
fn the_canary_goes_first_then_the_rest_in_batches() {
    let sm = fleet_sm(FleetFailurePolicy::Halt);
    let names = ["a", "b", "c", "d", "e"];
    let d = decide(&inputs(
        &sm,
        names.iter().map(|n| member(n, None)).collect(),
        vec![],
    ));
    assert_eq!(batch(&d), ["a"], "the canary alone");
    assert_eq!(d.status.phase, Some(Phase::Migrating));
    // The canary's Job runs: nothing else starts.
    let d = decide(&inputs(
        &sm,
        names.iter().map(|n| member(n, None)).collect(),
        vec![job(&["a"], JobState::Active, None)],
    ));
    assert_eq!(d.action, Action::Nothing);
    // The canary is at the target (read back): the rest, in one batch.
    let mut members: Vec<Member> = names.iter().map(|n| member(n, None)).collect();
    members[0] = member("a", Some("2"));
    let d = decide(&inputs(
        &sm,
        members,
        vec![job(&["a"], JobState::Succeeded, None)],
    ));
    assert_eq!(batch(&d), ["b", "c", "d", "e"]);
    // All at the target: Ready, and the counts say so.
    let d = decide(&inputs(
        &sm,
        names.iter().map(|n| member(n, Some("2"))).collect(),
        vec![],
    ));
    assert_eq!(d.status.phase, Some(Phase::Ready));
    let f = fleet(&d);
    assert_eq!((f.total, f.at_target, f.pending, f.failed), (5, 5, 0, 0));
    // Paused: nothing starts.
    let mut paused = sm.clone();
    paused.spec.paused = true;
    let d = decide(&inputs(
        &paused,
        names.iter().map(|n| member(n, None)).collect(),
        vec![],
    ));
    assert_eq!(d.action, Action::Nothing);
    assert_eq!(d.status.phase, Some(Phase::Pending));
    // A Secret that joins later is migrated.
    let mut members: Vec<Member> = names.iter().map(|n| member(n, Some("2"))).collect();
    members.push(member("f", None));
    assert_eq!(batch(&decide(&inputs(&sm, members, vec![]))), ["f"]);
}

#[test]
fn a_failure_halts_the_fleet_or_is_left_out_with_continue() {
    let summary = RunSummary {
        error: Some(SummaryError {
            kind: "fleet_incomplete".into(),
            message: "c: migration 2 (2_x.up.sql) failed: column \"plan\" already exists".into(),
        }),
        ..Default::default()
    };
    let members = || {
        vec![
            member("a", Some("2")),
            member("b", Some("2")),
            member("c", Some("1")),
            member("d", None),
            member("e", None),
        ]
    };
    let failed_job = || {
        job(
            &["b", "c", "d", "e"],
            JobState::Failed,
            Some(summary.clone()),
        )
    };
    let sm = fleet_sm(FleetFailurePolicy::Halt);
    let mut ms = members();
    ms[3] = member("d", Some("2"));
    ms[4] = member("e", Some("2"));
    let d = decide(&inputs(&sm, ms, vec![failed_job()]));
    assert_eq!(d.action, Action::Nothing, "halted");
    assert_eq!(d.status.phase, Some(Phase::Failed));
    let f = fleet(&d);
    assert_eq!(f.failed, 1);
    assert_eq!(f.failed_databases[0].secret, "c");
    assert!(
        f.failed_databases[0].reason.contains("already exists"),
        "{f:?}"
    );
    let stalled = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == cond::STALLED)
        .unwrap();
    assert_eq!(stalled.status, "True");
    assert!(
        stalled.message.contains("c: migration 2"),
        "{}",
        stalled.message
    );

    // Halt: a failure stops new batches (d and e not started).
    let d = decide(&inputs(&sm, members(), vec![failed_job()]));
    assert_eq!(d.action, Action::Nothing);
    // Continue: the others go on, the failed one is left out.
    let sm = fleet_sm(FleetFailurePolicy::Continue);
    let d = decide(&inputs(&sm, members(), vec![failed_job()]));
    assert_eq!(batch(&d), ["d", "e"]);
    // A failed canary halts even with Continue.
    let mut ms = members();
    ms[0] = Member {
        secret: "a".into(),
        database: Some(DbView::Failed(DbFailure::new(
            DbFailureKind::Auth,
            "password authentication failed",
        ))),
    };
    let d = decide(&inputs(&sm, ms, vec![]));
    assert_eq!(d.action, Action::Nothing);
    assert!(
        fleet(&d).failed_databases[0]
            .reason
            .contains("password authentication")
    );
    // A Secret without the URL key is named.
    let ms = vec![
        member("a", Some("2")),
        Member {
            secret: "b".into(),
            database: None,
        },
    ];
    let d = decide(&inputs(&sm, ms, vec![]));
    assert!(
        fleet(&d).failed_databases[0]
            .reason
            .contains("no database URL")
    );
}

#[test]
fn the_status_stays_small_with_ten_thousand_databases() {
    let sm = fleet_sm(FleetFailurePolicy::Continue);
    let members: Vec<Member> = (0..10_000)
        .map(|i| {
            let name = format!("tenant-{i:05}");
            match i % 3 {
                0 => member(&name, Some("2")),
                1 => member(&name, None),
                _ => Member {
                    secret: name,
                    database: Some(DbView::Failed(DbFailure::new(
                        DbFailureKind::NoDatabase,
                        "database \"tenant\" does not exist",
                    ))),
                },
            }
        })
        .collect();
    let d = decide(&inputs(&sm, members, vec![]));
    let f = fleet(&d);
    assert_eq!(f.total, 10_000);
    assert_eq!(f.failed_databases.len(), STATUS_LIST_MAX);
    assert_eq!(batch(&d).len(), BATCH_MAX);
    let size = serde_json::to_vec(&d.status).unwrap().len();
    assert!(size < 16 * 1024, "status of {size} bytes");
}

/// The controller's side of the fleet benchmark (`bench/fanout.py` (d)): the status size
/// and the decision's time for simulated fleets. Prints figures; asserts nothing timed.
#[test]
#[ignore = "a benchmark: cargo test --release --lib fleet_status_size -- --ignored --nocapture"]
fn fleet_status_size() {
    let sm = fleet_sm(FleetFailurePolicy::Continue);
    for n in [1_000, 10_000] {
        let members: Vec<Member> = (0..n)
            .map(|i| member(&format!("tenant-{i:05}"), (i % 2 == 0).then_some("2")))
            .collect();
        let started = std::time::Instant::now();
        let runs = 20;
        let mut size = 0;
        for _ in 0..runs {
            let d = decide(&inputs(&sm, members.clone(), vec![]));
            size = serde_json::to_vec(&d.status).unwrap().len();
        }
        let per = started.elapsed() / runs;
        println!("{n:>6} databases: status {size} bytes, decision {per:?}");
    }
}
