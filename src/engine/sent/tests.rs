use std::time::Duration;

use super::*;
use crate::engine::dialect::Flavor;
use crate::engine::dialect::sql::SessionKey;
use crate::engine::history::DbState;
use crate::engine::plan::{PlanOptions, Target, plan_upgrade};
use crate::engine::runner::prepare;
use crate::engine::source::{MigrationSet, load_files};

fn set(files: &[(&str, &str)]) -> MigrationSet {
    load_files(
        "t",
        files.iter().map(|(n, t)| (n.to_string(), t.to_string())),
    )
    .unwrap()
}

fn session(flavor: Flavor) -> Session {
    Session {
        flavor,
        database: (flavor.dialect() == Dialect::MySql).then(|| "app".to_string()),
        busy_timeout: Duration::from_secs(5),
    }
}

/// The scripts of upgrading `set` from nothing, shown as `plan` shows them.
fn scripts(
    set: &MigrationSet,
    flavor: Flavor,
    guard: &Guard,
    defaults: &StepTimeouts,
) -> Vec<Vec<(Role, usize, String)>> {
    let plan = plan_upgrade(
        set,
        &DbState::default(),
        &Target::Head,
        &PlanOptions::default(),
    )
    .unwrap();
    let prepared = prepare(&plan, flavor.dialect()).unwrap();
    let session = session(flavor);
    let table = HistoryTable::parse("h").unwrap();
    let cx = Context {
        session: &session,
        table: &table,
        guard,
        runner_id: Slot::RunnerId.marker(),
        note: None,
    };
    steps(&prepared, defaults, &cx)
        .iter()
        .map(|s| {
            s.statements
                .iter()
                .map(|st| (st.role, st.round_trip, st.shown()))
                .collect()
        })
        .collect()
}

fn texts(script: &[(Role, usize, String)]) -> Vec<&str> {
    script.iter().map(|(_, _, t)| t.as_str()).collect()
}

fn lease() -> Guard {
    Guard::Lease {
        table: HistoryTable::parse("h_lock").unwrap(),
        token: Slot::LeaseToken.marker().to_string(),
        ttl: Duration::from_secs(15),
    }
}

#[test]
fn postgres_sends_begin_fence_timeouts_and_statements_in_one_round_trip() {
    let s = set(&[(
        "1_a.up.sql",
        "-- schemagate:lock-timeout 2s\ncreate table a(x int);\n-- c; d\ninsert into a values (1);\n",
    )]);
    let defaults = StepTimeouts {
        lock: None,
        statement: Some(Duration::from_secs(30)),
    };
    let got = &scripts(&s, Flavor::Postgres, &lease(), &defaults)[0];
    let first: Vec<&str> = got
        .iter()
        .filter(|(_, trip, _)| *trip == 1)
        .map(|(_, _, t)| t.as_str())
        .collect();
    assert_eq!(first[0], "BEGIN");
    assert!(first[1].starts_with("DO $schemagate$") && first[1].contains("token = <lease_token>"));
    assert_eq!(
        &first[2..],
        [
            "SET LOCAL lock_timeout = '2000ms'",
            "SET LOCAL statement_timeout = '30000ms'",
            "create table a(x int)",
            "insert into a values (1)",
        ]
    );
    let roles: Vec<Role> = got
        .iter()
        .filter(|(_, t, _)| *t > 1)
        .map(|(r, _, _)| *r)
        .collect();
    assert_eq!(
        roles,
        [
            Role::HistoryInsert,
            Role::LeaseRenewal,
            Role::Commit,
            Role::Reset,
            Role::Reset,
            Role::Reset
        ]
    );
    let insert = &got
        .iter()
        .find(|(r, _, _)| *r == Role::HistoryInsert)
        .unwrap()
        .2;
    assert!(insert.contains("<runner_id>, <duration_ms>"), "{insert}");
}

#[test]
fn mariadb_and_mysql_name_their_statement_timeout_and_set_it_before_the_transaction() {
    let s = set(&[(
        "1_a.up.sql",
        "-- schemagate:statement-timeout 20s\ninsert into a values (1);\n",
    )]);
    let guard = Guard::Session {
        key: SessionKey::Named("sg".into()),
    };
    for (flavor, setting) in [
        (Flavor::MariaDb, "SET SESSION max_statement_time = 20.000"),
        (Flavor::MySql, "SET SESSION max_execution_time = 20000"),
    ] {
        let got = &scripts(&s, flavor, &guard, &StepTimeouts::default())[0];
        assert_eq!(
            got[..4]
                .iter()
                .map(|(r, t, s)| (*r, *t, s.as_str()))
                .collect::<Vec<_>>(),
            [
                (Role::Setting, 1, setting),
                (Role::Begin, 2, "START TRANSACTION"),
                (
                    Role::Fence,
                    2,
                    "SELECT IS_USED_LOCK('sg') = CONNECTION_ID()"
                ),
                (Role::Migration, 3, "insert into a values (1)"),
            ],
            "{flavor:?}"
        );
        let reset = &got.iter().rfind(|(r, _, _)| *r == Role::Reset).unwrap().2;
        assert_eq!(reset, "USE `app`");
        let timeout = if flavor == Flavor::MariaDb {
            "max_statement_time = DEFAULT"
        } else {
            "max_execution_time = DEFAULT"
        };
        assert!(
            got.iter()
                .any(|(r, _, s)| *r == Role::Reset && s.ends_with(timeout)),
            "{got:?}"
        );
    }
}

#[test]
fn non_transactional_steps_send_each_statement_alone_with_its_progress() {
    let s = set(&[(
        "1_a.up.sql",
        "-- schemagate:no-transaction\ncreate index concurrently i on a(x);\nselect 1;\n",
    )]);
    let got = &scripts(&s, Flavor::Postgres, &Guard::None, &StepTimeouts::default())[0];
    assert_eq!(
        texts(got),
        [
            &*format!(
                "INSERT INTO \"h\" (version, description, kind, success, checksum, \
                 checksum_normalized, transactional, statements_total, statements_done, \
                 applied_by, duration_ms, error, note) VALUES ('1', 'a', 'up', NULL, '{}', '{}', \
                 FALSE, 2, 0, <runner_id>, NULL, NULL, NULL) RETURNING id",
                s.migrations[0].up.checksum(),
                s.migrations[0].up.checksum_normalized()
            ),
            "create index concurrently i on a(x)",
            "UPDATE \"h\" SET statements_done = 1 WHERE id = <row_id>",
            "select 1",
            "UPDATE \"h\" SET statements_done = 2 WHERE id = <row_id>",
            "UPDATE \"h\" SET success = TRUE, duration_ms = <duration_ms>, error = NULL, \
             statements_done = 2 WHERE id = <row_id>",
            "RESET ALL",
            "RESET ROLE",
            "RESET SESSION AUTHORIZATION",
        ]
    );
    // Every statement and every progress record is a round trip of its own (the reset
    // is one).
    let trips: Vec<usize> = got.iter().map(|(_, t, _)| *t).collect();
    assert_eq!(trips, [1, 2, 3, 4, 5, 6, 7, 7, 7]);
}

#[test]
fn slots_are_filled_in_when_known() {
    let table = HistoryTable::parse("h").unwrap();
    let text = sql::finish(
        Dialect::Sqlite,
        &table,
        Int::Slot(Slot::RowId),
        true,
        Int::Slot(Slot::DurationMs),
        None,
        3,
        &Guard::None,
    );
    let sent = Sent::template(Role::HistoryFinish, 1, Expect::Nothing, &text);
    assert_eq!(
        sent.shown(),
        "UPDATE \"h\" SET success = TRUE, duration_ms = <duration_ms>, error = NULL, \
         statements_done = 3 WHERE id = <row_id>"
    );
    let filled = sent.sql(&Fill {
        row_id: Some(7),
        duration_ms: Some(12),
    });
    assert_eq!(
        filled,
        "UPDATE \"h\" SET success = TRUE, duration_ms = 12, error = NULL, statements_done = 3 \
         WHERE id = 7"
    );
    assert_eq!(sent.slots().count(), 2);
    // A migration's text is never read for markers.
    let verbatim = Sent::verbatim(1, "select '\0row_id\0'");
    assert_eq!(verbatim.slots().count(), 0);
}

#[test]
fn results_are_checked_against_the_guard() {
    let table = HistoryTable::parse("h").unwrap();
    let s = session(Flavor::MySql);
    let guard = Guard::Session {
        key: SessionKey::Named("sg".into()),
    };
    let cx = Context {
        session: &s,
        table: &table,
        guard: &guard,
        runner_id: "me",
        note: None,
    };
    let row = NewRow {
        version: "1".into(),
        description: "a".into(),
        kind: crate::engine::history::Kind::Baseline,
        success: Some(true),
        checksum: None,
        checksum_normalized: None,
        transactional: true,
        statements_total: None,
        statements_done: None,
        applied_by: "me".into(),
        duration_ms: Some(0.into()),
        error: None,
        note: None,
    };
    let insert = insert(&row, &cx);
    let refused = Done::default();
    assert_eq!(
        insert.check(&refused).unwrap_err().kind,
        crate::engine::DbErrorKind::Lock
    );
    let inserted = Done {
        rows: 1,
        value: None,
        insert_id: Some(9),
    };
    assert!(insert.check(&inserted).is_ok());
    assert_eq!(row_id(&inserted), Some(9));
    let script = record(std::slice::from_ref(&row), &cx);
    let fence = script
        .statements
        .iter()
        .find(|s| s.role == Role::Fence)
        .unwrap();
    assert!(fence.check(&Done::default()).is_err());
    assert!(
        fence
            .check(&Done {
                rows: 1,
                value: Some(1),
                insert_id: None
            })
            .is_ok()
    );
}
