//! One upgrade over many tenant databases (`migrate upgrade --databases`) on a real
//! PostgreSQL with tens of databases: the canary goes first and alone; the parallelism is
//! what was asked (measured from the server's own history rows: each step's transaction
//! start and duration); a failing tenant halts the fleet and the summary names it; after
//! the fix the same command resumes; a tenant added later is migrated; every version is
//! applied exactly once per database; no password is printed.

mod support;

use std::path::Path;

use support::postgres::{PASSWORD, server};
use support::*;

/// `n` fresh databases, listed in `dir` as one file per tenant.
fn fleet(dir: &Path, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("tenant-{i:03}");
        let url = server().fresh_db();
        std::fs::write(dir.join(&name), format!("{url}\n")).unwrap();
        out.push((name, url));
    }
    out
}

fn migrations() -> MigDir {
    let m = MigDir::new();
    m.pair(
        "1",
        "accounts",
        "CREATE TABLE accounts (id SERIAL PRIMARY KEY, name TEXT NOT NULL);\n",
        None,
    );
    // Slow enough for steps of different tenants to overlap when they run in parallel.
    m.pair(
        "2",
        "plan",
        "SELECT pg_sleep(0.15);\nALTER TABLE accounts ADD COLUMN plan TEXT;\n",
        None,
    );
    m
}

fn upgrade(dbs: &Path, mig: &MigDir, extra: &[&str]) -> std::process::Output {
    let mut c = migrate("", mig.path());
    c.env_remove("DATABASE_URL")
        .args(["--output", "json", "upgrade", "--databases"])
        .arg(dbs)
        .args(extra);
    run(c)
}

/// A step of `url`'s version `v`: (start, end) in milliseconds since the epoch.
fn step_window(url: &str, v: &str) -> (f64, f64) {
    let rows = query(
        url,
        &format!(
            "SELECT (extract(epoch FROM applied_at) * 1000)::bigint || ' ' || duration_ms \
             FROM schemagate_history WHERE version = '{v}' AND success"
        ),
    );
    assert_eq!(
        rows.len(),
        1,
        "{url}: version {v} applied exactly once: {rows:?}"
    );
    let mut parts = rows[0].split(' ').map(|x| x.parse::<f64>().unwrap());
    let (start, ms) = (parts.next().unwrap(), parts.next().unwrap());
    (start, start + ms)
}

/// The most steps whose windows overlap at one moment.
fn max_overlap(windows: &[(f64, f64)]) -> usize {
    windows
        .iter()
        .map(|(s, _)| windows.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn canary_first_bounded_parallelism_halt_resume_and_newcomers() {
    let dbs = tempfile::tempdir().unwrap();
    let tenants = fleet(dbs.path(), 24);
    let mig = migrations();

    let o = upgrade(dbs.path(), &mig, &["--canary", "2", "--max-parallel", "4"]);
    assert_code(&o, 0);
    for secret in [PASSWORD.to_string(), support::postgres::urlencode(PASSWORD)] {
        assert!(
            !text(&o).contains(&secret),
            "a password was printed: {}",
            text(&o)
        );
    }
    let json = stdout_json(&o);
    assert_eq!(json["databases"]["total"], 24);
    assert_eq!(json["databases"]["atTarget"], 24);
    let results = json["results"].as_array().unwrap();
    assert_eq!(results[0]["name"], "tenant-000");
    assert_eq!(results[0]["canary"], true);
    assert_eq!(results[2]["canary"], false);

    // From the server's history: the canaries finished before any other tenant started,
    // and at most 4 (and more than 1) ran at once.
    let windows: Vec<(f64, f64)> = tenants.iter().map(|(_, u)| step_window(u, "2")).collect();
    let canary_end = windows[..2].iter().map(|w| w.1).fold(0.0, f64::max);
    let rest_start = windows[2..].iter().map(|w| w.0).fold(f64::MAX, f64::min);
    assert!(
        canary_end <= rest_start + 1.0,
        "a tenant started before the canaries were done: {canary_end} > {rest_start}"
    );
    let overlap = max_overlap(&windows[2..]);
    assert!((2..=4).contains(&overlap), "max parallel steps: {overlap}");

    // A tenant whose migration fails (someone created the column by hand): with halt, no
    // new tenant starts; the summary names it and why.
    let broken = &tenants[5].1;
    exec(broken, "ALTER TABLE accounts ADD COLUMN region TEXT");
    mig.pair(
        "3",
        "region",
        "ALTER TABLE accounts ADD COLUMN region TEXT;\n",
        None,
    );
    let o = upgrade(dbs.path(), &mig, &["--canary", "1", "--max-parallel", "1"]);
    assert_code(&o, 22);
    let json = stdout_json(&o);
    let failed: Vec<&serde_json::Value> = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{json:#}");
    assert_eq!(failed[0]["name"], "tenant-005");
    assert!(
        failed[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("region"),
        "{json:#}"
    );
    assert_eq!(json["databases"]["skipped"], 18, "{json:#}");
    assert_eq!(
        count(
            &tenants[10].1,
            "SELECT count(*) FROM schemagate_history WHERE version = '3'"
        ),
        0,
        "nothing started after the failure"
    );

    // Fixed, and a new tenant joins: the same command resumes; exactly once everywhere.
    exec(broken, "ALTER TABLE accounts DROP COLUMN region");
    let newcomer = server().fresh_db();
    std::fs::write(dbs.path().join("tenant-100"), &newcomer).unwrap();
    let o = upgrade(dbs.path(), &mig, &["--max-parallel", "8"]);
    assert_code(&o, 0);
    let json = stdout_json(&o);
    assert_eq!(json["databases"]["total"], 25);
    assert_eq!(json["databases"]["noop"], 5, "{json:#}");
    for (_, url) in tenants
        .iter()
        .chain([(String::new(), newcomer.clone())].iter())
    {
        for v in ["1", "2", "3"] {
            step_window(url, v);
        }
    }
}

#[test]
fn a_failing_canary_stops_the_fleet_and_continue_goes_past_other_failures() {
    let dbs = tempfile::tempdir().unwrap();
    let tenants = fleet(dbs.path(), 6);
    let mig = migrations();
    exec(&tenants[0].1, "CREATE TABLE accounts (id INTEGER)");
    exec(&tenants[3].1, "CREATE TABLE accounts (id INTEGER)");
    // The canary fails: nothing else starts, even with --on-failure continue.
    let o = upgrade(dbs.path(), &mig, &["--on-failure", "continue"]);
    assert_code(&o, 22);
    let json = stdout_json(&o);
    assert_eq!(json["canaryFailed"], true);
    assert_eq!(json["databases"]["skipped"], 5);
    // Canary repaired: with continue, tenant-003's failure does not stop the others.
    exec(&tenants[0].1, "DROP TABLE accounts");
    let o = upgrade(
        dbs.path(),
        &mig,
        &["--on-failure", "continue", "--max-parallel", "2"],
    );
    assert_code(&o, 22);
    let json = stdout_json(&o);
    assert_eq!(json["databases"]["failed"], 1);
    assert_eq!(json["databases"]["atTarget"], 5);
    assert_eq!(json["databases"]["skipped"], 0);
    let human = {
        let mut c = migrate("", mig.path());
        c.env_remove("DATABASE_URL")
            .args(["upgrade", "--databases"])
            .arg(dbs.path());
        run(c)
    };
    assert!(
        text(&human).contains("tenant-003 FAILED"),
        "{}",
        text(&human)
    );
}

#[test]
fn a_file_of_urls_names_tenants_and_bad_lists_are_refused() {
    let a = server().fresh_db();
    let b = server().fresh_db();
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), format!("# tenants\nacme {a}\n\n{b}\n")).unwrap();
    let mig = migrations();
    let o = upgrade(list.path(), &mig, &[]);
    assert_code(&o, 0);
    let json = stdout_json(&o);
    assert_eq!(json["results"][0]["name"], "acme");
    let second = json["results"][1]["name"].as_str().unwrap();
    assert!(
        second.contains("127.0.0.1") && !second.contains(PASSWORD),
        "{second}"
    );
    std::fs::write(list.path(), format!("acme {a}\nacme {b}\n")).unwrap();
    let o = upgrade(list.path(), &mig, &[]);
    assert_code(&o, 2);
    assert!(text(&o).contains("acme is listed twice"), "{}", text(&o));
    std::fs::write(list.path(), "# nothing\n").unwrap();
    assert_code(&upgrade(list.path(), &mig, &[]), 2);
}
