//! Bring your own migration tool: a real Flask-Migrate (Alembic) app run through
//! `schemagate migrate exec` by 10 concurrent runners against the real PostgreSQL, other
//! tools' history tables read as each tool creates them (the real sqlx migrator; the
//! documented DDL of Flyway, golang-migrate and dbmate), and `import` adopting a database.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::flask::{fixture, flask};
use support::postgres::server;
use support::*;

/// `schemagate migrate --tool alembic exec -- flask db <args>` with a summary file.
fn exec_flask(bin: &Path, url: &str, args: &[&str], summary: &Path) -> Command {
    let mut c = migrate(url, Path::new("/nonexistent"));
    c.args(["--tool", "alembic", "--summary-file"])
        .arg(summary)
        .args(["exec", "--"])
        .arg(bin.join("flask"))
        .arg("db")
        .args(args)
        .env("FLASK_APP", fixture().join("app.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn all_at_once(commands: Vec<Command>) -> Vec<Output> {
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut c| c.spawn().expect("spawn"))
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect()
}

fn alembic_current(url: &str) -> Value {
    let mut c = migrate(url, Path::new("/nonexistent"));
    c.args(["--tool", "alembic", "-o", "json", "current"]);
    let o = run(c);
    assert_code(&o, 0);
    stdout_json(&o)
}

#[test]
fn flask_migrate_through_exec_applies_each_revision_exactly_once() {
    let bin = support::python::venv("flaskenv", &fixture().join("requirements.txt"));

    // Evidence the lock is needed: ten plain `flask db upgrade` at once on a fresh
    // database. Alembic takes no lock; the losers fail on the winner's tables.
    let url = server().fresh_db();
    let plain = all_at_once((0..10).map(|_| flask(&bin, &url, &["upgrade"])).collect());
    let failed = plain.iter().filter(|o| !o.status.success()).count();
    assert!(
        failed >= 1,
        "without a lock concurrent Alembic runs collide; all ten succeeded this time"
    );
    let evidence =
        String::from_utf8_lossy(&plain.iter().find(|o| !o.status.success()).unwrap().stderr)
            .to_string();
    assert!(
        evidence.contains("already exists") || evidence.contains("duplicate key"),
        "{evidence}"
    );

    // Through schemagate: every runner succeeds, one migrates, the data migration runs once.
    let url = server().fresh_db();
    let logs = tempfile::tempdir().unwrap();
    let outputs = all_at_once(
        (0..10)
            .map(|i| {
                exec_flask(
                    &bin,
                    &url,
                    &["upgrade"],
                    &logs.path().join(format!("{i}.json")),
                )
            })
            .collect(),
    );
    for o in &outputs {
        assert_code(o, 0);
    }
    let summaries: Vec<Value> = (0..10)
        .map(|i| {
            let text = std::fs::read_to_string(logs.path().join(format!("{i}.json"))).unwrap();
            serde_json::from_str(text.trim()).unwrap()
        })
        .collect();
    let migrated: Vec<&Value> = summaries
        .iter()
        .filter(|s| !s["applied"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(
        migrated.len(),
        1,
        "exactly one runner migrated: {summaries:#?}"
    );
    assert_eq!(migrated[0]["to"], "0003_add_total");
    assert!(migrated[0]["from"].is_null());
    assert!(
        summaries
            .iter()
            .filter(|s| s["applied"].as_array().unwrap().is_empty())
            .all(|s| s["result"] == "noop" && s["to"] == "0003_add_total"),
        "{summaries:#?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM order_status"), 1);
    assert_eq!(alembic_current(&url)["current"], "0003_add_total");

    // A downgrade through the runner is reflected.
    let summary = logs.path().join("down.json");
    let o = run(exec_flask(&bin, &url, &["downgrade"], &summary));
    assert_code(&o, 0);
    let s: Value = serde_json::from_str(std::fs::read_to_string(&summary).unwrap().trim()).unwrap();
    assert_eq!(
        (s["from"].as_str(), s["to"].as_str()),
        (Some("0003_add_total"), Some("0002_seed_status"))
    );
    assert_eq!(alembic_current(&url)["current"], "0002_seed_status");

    // A failing command is reported with the tool's exit and the lock is released.
    let o = run(exec_flask(
        &bin,
        &url,
        &["upgrade", "no_such_revision"],
        &summary,
    ));
    assert_code(&o, 12);
    assert!(text(&o).contains("exited with status"), "{}", text(&o));
    let o = run(exec_flask(&bin, &url, &["upgrade"], &summary));
    assert_code(&o, 0);
    assert_eq!(alembic_current(&url)["current"], "0003_add_total");
}

fn tool_json(url: &str, tool: &str, cmd: &str) -> (i32, Value) {
    let mut c = migrate(url, Path::new("/nonexistent"));
    c.args(["--tool", tool, "-o", "json", cmd]);
    let o = run(c);
    (code(&o), stdout_json(&o))
}

#[test]
fn flyway_histories_with_undo_and_failed_rows() {
    let url = server().fresh_db();
    assert_eq!(tool_json(&url, "flyway", "current").1["initialized"], false);
    // Flyway's own DDL for PostgreSQL (flyway-database-postgresql, createMetaDataTable.sql).
    exec(
        &url,
        "CREATE TABLE flyway_schema_history (
            installed_rank INT NOT NULL, version VARCHAR(50), description VARCHAR(200) NOT NULL,
            type VARCHAR(20) NOT NULL, script VARCHAR(1000) NOT NULL, checksum INTEGER,
            installed_by VARCHAR(100) NOT NULL, installed_on TIMESTAMP NOT NULL DEFAULT now(),
            execution_time INTEGER NOT NULL, success BOOLEAN NOT NULL,
            CONSTRAINT flyway_schema_history_pk PRIMARY KEY (installed_rank));
         INSERT INTO flyway_schema_history VALUES
            (1, '1', 'init', 'SQL', 'V1__init.sql', 1, 'app', now(), 5, TRUE),
            (2, '1.1', 'add', 'SQL', 'V1_1__add.sql', 2, 'app', now(), 5, TRUE),
            (3, NULL, 'views', 'SQL', 'R__views.sql', 3, 'app', now(), 5, TRUE),
            (4, '1.10', 'more', 'SQL', 'V1_10__more.sql', 4, 'app', now(), 5, TRUE)",
    );
    let (code, s) = tool_json(&url, "flyway", "status");
    assert_eq!(code, 0, "{s}");
    assert_eq!(s["current"], "1.10");
    exec(
        &url,
        "INSERT INTO flyway_schema_history VALUES
            (5, '1.10', 'more', 'UNDO_SQL', 'U1_10__more.sql', 4, 'app', now(), 5, TRUE),
            (6, '2', 'broken', 'SQL', 'V2__broken.sql', 5, 'app', now(), 5, FALSE)",
    );
    let (code, s) = tool_json(&url, "flyway", "status");
    assert_eq!(code, 4, "a failed row is drift/dirty: {s}");
    assert_eq!(s["current"], "1.1");
    assert!(
        s["problem"].as_str().unwrap().contains("flyway repair"),
        "{s}"
    );
}

#[test]
fn golang_migrate_and_dbmate_share_a_table_name_but_not_its_meaning() {
    let url = server().fresh_db();
    // golang-migrate's DDL (database/postgres): one row, version and dirty.
    exec(
        &url,
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
         INSERT INTO schema_migrations VALUES (20251102, false)",
    );
    let (code, s) = tool_json(&url, "golang-migrate", "status");
    assert_eq!((code, s["current"].as_str()), (0, Some("20251102")), "{s}");
    exec(
        &url,
        "UPDATE schema_migrations SET version = 20251103, dirty = true",
    );
    let (code, s) = tool_json(&url, "golang-migrate", "status");
    assert_eq!(code, 4);
    assert!(
        s["problem"]
            .as_str()
            .unwrap()
            .contains("migrate force 20251103"),
        "{s}"
    );
    // dbmate's DDL: one row per applied version.
    let url = server().fresh_db();
    exec(
        &url,
        "CREATE TABLE schema_migrations (version character varying(128) NOT NULL PRIMARY KEY);
         INSERT INTO schema_migrations VALUES ('20251101090000'), ('20251103090000'), ('20251102090000')",
    );
    let (_, s) = tool_json(&url, "dbmate", "history");
    assert_eq!(s["current"], "20251103090000");
    assert_eq!(s["applied"].as_array().unwrap().len(), 3);
    // Reading dbmate's table as golang-migrate's is a clear error, not a wrong answer.
    let (code, s) = tool_json(&url, "golang-migrate", "current");
    assert_eq!(code, 16, "{s}");
    let message = s["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("golang-migrate") && message.contains("schema_migrations"),
        "{message}"
    );
}

/// Runs the real sqlx migrator over `dir` against `url`.
fn sqlx_migrate(url: &str, dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        let migrator = sqlx::migrate::Migrator::new(dir).await.unwrap();
        migrator.run(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    });
}

#[test]
fn a_sqlx_database_is_read_and_imported_then_only_new_files_run() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    // sqlx's own format (`<version>_<description>.sql`), read by both tools as it is.
    dir.file(
        "1_orders.sql",
        "CREATE TABLE orders (id INT PRIMARY KEY);\n",
    );
    dir.file("2_seed.sql", "INSERT INTO orders VALUES (1), (2);\n");
    sqlx_migrate(&url, dir.path());
    let (code, s) = tool_json(&url, "sqlx", "current");
    assert_eq!((code, s["current"].as_str()), (0, Some("2")), "{s}");

    // Dry run by default: nothing written.
    let mut c = migrate(&url, dir.path());
    c.args(["import", "--from", "sqlx"]);
    let o = run(c);
    assert_code(&o, 0);
    assert!(
        text(&o).contains("Would record as applied (from sqlx): 1, 2"),
        "{}",
        text(&o)
    );
    assert!(
        query(&url, "SELECT to_regclass('schemagate_history')::text")[0] == "NULL",
        "a dry run creates nothing"
    );
    let mut c = migrate(&url, dir.path());
    c.args(["import", "--from", "sqlx", "--apply"]);
    assert_code(&run(c), 0);
    // Recorded with the files' checksums: verify is clean, and the next file alone runs.
    let mut c = migrate(&url, dir.path());
    c.arg("verify");
    assert_code(&run(c), 0);
    dir.file("3_total.sql", "ALTER TABLE orders ADD COLUMN total INT;\n");
    let mut c = migrate(&url, dir.path());
    c.args(["-o", "json", "upgrade"]);
    let o = run(c);
    assert_code(&o, 0);
    let applied: Vec<String> = stdout_json(&o)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(applied, ["3"]);
    assert_eq!(
        count(&url, "SELECT count(*) FROM orders"),
        2,
        "rows preserved"
    );
    // Importing again is refused: the history is schemagate's now.
    let mut c = migrate(&url, dir.path());
    c.args(["import", "--from", "sqlx", "--apply"]);
    assert_code(&run(c), 16);
}

#[test]
fn a_golang_migrate_database_is_imported_up_to_its_version() {
    let url = server().fresh_db();
    let dir = MigDir::new();
    dir.pair(
        "1",
        "orders",
        "CREATE TABLE orders (id INT PRIMARY KEY);\n",
        Some("DROP TABLE orders;\n"),
    );
    dir.pair("2", "seed", "INSERT INTO orders VALUES (7);\n", None);
    dir.pair(
        "3",
        "total",
        "ALTER TABLE orders ADD COLUMN total INT;\n",
        None,
    );
    // What golang-migrate leaves after `migrate up 2`.
    exec(
        &url,
        "CREATE TABLE orders (id INT PRIMARY KEY); INSERT INTO orders VALUES (7);
         CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
         INSERT INTO schema_migrations VALUES (2, false)",
    );
    let mut c = migrate(&url, dir.path());
    c.args([
        "-o",
        "json",
        "import",
        "--from",
        "golang-migrate",
        "--apply",
    ]);
    let o = run(c);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["versions"], serde_json::json!(["1", "2"]));
    let mut c = migrate(&url, dir.path());
    c.args(["-o", "json", "upgrade"]);
    let o = run(c);
    assert_code(&o, 0);
    assert_eq!(stdout_json(&o)["steps"].as_array().unwrap().len(), 1);
    assert_eq!(count(&url, "SELECT count(*) FROM orders"), 1);

    // A dirty golang-migrate state is refused, naming the fix.
    let url = server().fresh_db();
    exec(
        &url,
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
         INSERT INTO schema_migrations VALUES (2, true)",
    );
    let mut c = migrate(&url, dir.path());
    c.args(["import", "--from", "golang-migrate", "--apply"]);
    let o = run(c);
    assert_code(&o, 13);
    assert!(text(&o).contains("migrate force 2"), "{}", text(&o));
}

#[test]
fn the_injected_tool_runner_installs_schemagate_and_gates_flask_migrate() {
    use schemagate::api::{
        MIGRATION_LABEL, SchemaMigration, SchemaMigrationSpec, SourceSpec, ToolEnv, ToolName,
        ToolSource,
    };
    use schemagate::webhook::{INIT_CONTAINER, InjectSettings, Outcome, inject};
    let venv = support::python::venv("flaskenv", &fixture().join("requirements.txt"));
    let url = server().fresh_db();
    let mut sm = SchemaMigration::new(
        "web",
        SchemaMigrationSpec::new(
            "web-db",
            "url",
            SourceSpec {
                tool: Some(ToolSource {
                    name: ToolName::Alembic,
                    image: "shop/web:2.4".into(),
                    command: vec!["flask".into(), "db".into(), "upgrade".into()],
                    working_dir: Some(fixture().display().to_string()),
                    env: vec![
                        ToolEnv {
                            name: "FLASK_APP".into(),
                            value: "app.py".into(),
                        },
                        ToolEnv {
                            name: "PYTHONDONTWRITEBYTECODE".into(),
                            value: "1".into(),
                        },
                    ],
                }),
                ..Default::default()
            },
        ),
    );
    sm.metadata.namespace = Some("shop".into());
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-1", "labels": {MIGRATION_LABEL: "web"}},
        "spec": {"containers": [{"name": "web", "image": "shop/web:2.4"}]}
    }))
    .unwrap();
    let settings = InjectSettings {
        image: "ghcr.io/schemagate/schemagate:test".into(),
        allowed_images: vec![],
        wait_timeout: std::time::Duration::from_secs(60),
        ..Default::default()
    };
    let Outcome::Patched(injected) = inject(&pod, "shop", "web", Some(&sm), &settings).unwrap()
    else {
        panic!("not injected")
    };
    let init = injected.spec.unwrap().init_containers.unwrap();
    let (install, runner) = (&init[0], &init[1]);
    assert_eq!(runner.name, INIT_CONTAINER);

    // The emptyDir the two containers share, and the install step as the kubelet runs it
    // (the schemagate image's entrypoint is the binary).
    let shared = tempfile::tempdir().unwrap();
    let map = |p: &str| p.replace("/schemagate", &shared.path().display().to_string());
    let mut c = Command::new(bin());
    c.args(install.args.clone().unwrap().iter().map(|a| map(a)));
    assert_code(&run(c), 0);

    // Three pods start at once; the tool's image has flask on its PATH.
    let logs = tempfile::tempdir().unwrap();
    let runners: Vec<Command> = (0..3)
        .map(|i| {
            let mut c = Command::new(map(&runner.command.clone().unwrap()[0]));
            c.env_clear()
                .args(runner.args.clone().unwrap())
                .current_dir(runner.working_dir.clone().unwrap())
                .env("PATH", format!("{}:/usr/bin:/bin", venv.display()));
            for e in runner.env.iter().flatten() {
                let from = e.value_from.as_ref();
                let value = if from.is_some_and(|f| f.secret_key_ref.is_some()) {
                    url.clone()
                } else if from.is_some_and(|f| f.field_ref.is_some()) {
                    format!("web-{i}")
                } else if e.value.as_deref() == Some("/dev/termination-log") {
                    logs.path().join(format!("{i}")).display().to_string()
                } else {
                    e.value.clone().unwrap_or_default()
                };
                c.env(&e.name, value);
            }
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        })
        .collect();
    let outputs = all_at_once(runners);
    for o in &outputs {
        assert_code(o, 0);
    }
    let applied: usize = (0..3)
        .map(|i| {
            let s: Value = serde_json::from_str(
                std::fs::read_to_string(logs.path().join(format!("{i}")))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
            s["applied"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(applied, 1, "one pod migrated");
    assert_eq!(count(&url, "SELECT count(*) FROM order_status"), 1);
    assert_eq!(alembic_current(&url)["current"], "0003_add_total");
}

/// A command that starts a process in the background and waits for it, printing the
/// background process's pid: what a shell wrapper around a migration tool looks like.
fn wrapper_command(url: &str, runner_id: &str) -> Command {
    let mut c = migrate(url, Path::new("/nonexistent"));
    c.args(["--runner-id", runner_id, "exec", "--check-every", "200ms"])
        .args([
            "--",
            "sh",
            "-c",
            "sleep 60 & printf 'bg%s %s\\n' -pid $!; wait",
        ]);
    c
}

/// The pid the wrapper printed.
fn started_pid(w: &Watched) -> u32 {
    let line = w.seen.last().unwrap();
    let pid = line
        .rsplit(' ')
        .next()
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit());
    pid.parse().unwrap_or_else(|_| panic!("no pid in {line:?}"))
}

/// True once a process has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z')),
    }
}

#[test]
fn a_command_whose_lock_is_lost_is_stopped_with_all_it_started() {
    let url = server().fresh_db();
    let mut w = Watched::spawn(wrapper_command(&url, "lock-loss-test"));
    w.wait_line("bg-pid", std::time::Duration::from_secs(30));
    let background = started_pid(&w);
    assert!(!ended(background));
    // The session that holds the advisory lock dies (a failover, an idle timeout, a DBA).
    let killed = query(
        &url,
        "SELECT count(pg_terminate_backend(pid))::text FROM pg_stat_activity \
         WHERE application_name = 'schemagate lock-loss-test'",
    );
    assert_eq!(killed, ["1"]);
    // Noticed at the next check: the command and what it started are stopped, the run fails.
    w.wait_line(
        "lost the migration lock",
        std::time::Duration::from_secs(20),
    );
    let status = w.child.wait().unwrap();
    assert_eq!(status.code(), Some(17), "{:?}", w.seen);
    assert_ends(background);
}

/// Waits for a process to end (SIGKILL is delivered asynchronously).
#[track_caller]
fn assert_ends(pid: u32) {
    wait_for(
        "the command's background process to end",
        std::time::Duration::from_secs(10),
        || ended(pid),
    );
}

#[test]
fn a_stopped_exec_stops_its_command_before_releasing_the_lock() {
    let url = server().fresh_db();
    let mut w = Watched::spawn(wrapper_command(&url, "sigterm-test"));
    w.wait_line("bg-pid", std::time::Duration::from_secs(30));
    let background = started_pid(&w);
    // A service manager (or a terminal) asks schemagate to stop: the command is asked too.
    w.signal("TERM");
    let code = w.exit_code(std::time::Duration::from_secs(30));
    assert_eq!(code, Some(18), "{:?}", w.seen);
    assert!(
        w.seen
            .iter()
            .any(|l| l.contains("after schemagate was asked to stop (SIGTERM, passed on)")),
        "{:?}",
        w.seen
    );
    // Nothing the command started runs on...
    assert_ends(background);
    // ...and the lock is free for the next runner at once.
    let mut next = migrate(&url, Path::new("/nonexistent"));
    next.args(["--lock-timeout", "5s", "exec", "--", "true"]);
    assert_code(&run(next), 0);
}

#[test]
fn a_command_that_ignores_the_request_is_killed_when_asked_again() {
    let url = server().fresh_db();
    let mut c = migrate(&url, Path::new("/nonexistent"));
    c.args(["exec", "--"]).args([
        "sh",
        "-c",
        "trap '' TERM INT; sleep 60 & printf 'bg%s %s\\n' -pid $!; wait",
    ]);
    let mut w = Watched::spawn(c);
    w.wait_line("bg-pid", std::time::Duration::from_secs(30));
    let background = started_pid(&w);
    w.signal("TERM");
    w.wait_line("ask again to kill it", std::time::Duration::from_secs(30));
    assert!(!ended(background), "the command ignores SIGTERM");
    w.signal("TERM");
    let code = w.exit_code(std::time::Duration::from_secs(30));
    assert_eq!(code, Some(18), "{:?}", w.seen);
    assert_ends(background);
}

/// A command that outlives many lock checks, on every database's session lock and on a
/// lease, runs to its end: a healthy check never stops it.
#[test]
fn a_long_command_keeps_its_lock_through_the_checks() {
    let sqlite = sqlite_db();
    let urls = [
        ("postgres", server().fresh_db()),
        (
            "postgres lease",
            format!("{}&schemagate_lock=lease", server().fresh_db()),
        ),
        ("mariadb", support::mysql::server().fresh_db()),
        ("sqlite", sqlite.url.clone()),
    ];
    for (what, url) in urls {
        let marker = tempfile::tempdir().unwrap();
        let go = marker.path().join("go");
        let mut c = migrate(&url, Path::new("/nonexistent"));
        c.env("SCHEMAGATE_LOG", "debug")
            .args(["exec", "--check-every", "20ms", "--", "sh", "-c"])
            .arg(format!(
                "echo started; while [ ! -e {} ]; do sleep 0.01; done; echo finished",
                go.display()
            ));
        let mut w = Watched::spawn(c);
        w.wait_line("started", std::time::Duration::from_secs(30));
        for _ in 0..3 {
            w.wait_line("lock is still held", std::time::Duration::from_secs(30));
        }
        std::fs::write(&go, "").unwrap();
        w.wait_line("finished", std::time::Duration::from_secs(30));
        let status = w.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{what}: {:?}", w.seen);
    }
}
