//! `schemagate migrate lint` with the real binary: findings with file, line, risk and the
//! safe way, the new-table exemption against a real PostgreSQL's pending set, SARIF valid
//! against the official SARIF 2.1.0 schema, GitHub annotations, `lint-ignore` silencing
//! (recorded in the history), and `upgrade --lint deny` refusing before anything runs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::*;

fn lint(url: Option<&str>, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = match url {
        Some(u) => migrate(u, dir),
        None => {
            let mut c = Command::new(bin());
            c.arg("migrate")
                .env_remove("DATABASE_URL")
                .env("SCHEMAGATE_DIR", dir);
            c
        }
    };
    c.arg("lint").args(args);
    run(c)
}

fn risky(dir: &MigDir) {
    dir.pair(
        "1",
        "orders",
        "CREATE TABLE orders (id bigint PRIMARY KEY, total integer);\n\
         CREATE INDEX orders_total ON orders (total);\n",
        None,
    );
    dir.pair(
        "2",
        "widen_total",
        "-- widening rewrites the table\nALTER TABLE orders ALTER COLUMN total TYPE bigint;\n",
        None,
    );
    dir.pair(
        "3",
        "index_total",
        "CREATE INDEX orders_total2 ON orders (total);\n",
        None,
    );
}

#[test]
fn lint_names_file_line_risk_and_safe_way_and_exits_20() {
    let dir = MigDir::new();
    risky(&dir);
    let o = lint(None, dir.path(), &["--format", "json"]);
    assert_code(&o, 20);
    let v = stdout_json(&o);
    let found: Vec<(String, String, u64)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_string(),
                f["file"].as_str().unwrap().to_string(),
                f["line"].as_u64().unwrap(),
            )
        })
        .collect();
    // Without a database each file is judged as if the earlier ones were applied: the
    // index in 1 is on a table 1 creates (new: fine); 2 and 3 touch an existing table.
    assert_eq!(
        found,
        [
            (
                "changing-column-type".to_string(),
                "2_widen_total.up.sql".to_string(),
                2
            ),
            (
                "require-concurrent-index-creation".to_string(),
                "3_index_total.up.sql".to_string(),
                1
            )
        ],
        "{v:#}"
    );
    assert!(
        v["findings"][0]["help"]
            .as_str()
            .unwrap()
            .contains("backfill")
    );
    let o = lint(None, dir.path(), &[]);
    let t = text(&o);
    assert!(
        t.contains("2_widen_total.up.sql:2: warning[changing-column-type]") && t.contains("help:"),
        "{t}"
    );
}

#[test]
fn with_a_database_only_pending_migrations_are_linted_and_old_tables_are_not_new() {
    let url = postgres::server().fresh_db();
    let dir = MigDir::new();
    risky(&dir);
    // 1 and 2 applied (2 with a lint-ignore, so the upgrade under deny goes through).
    dir.file(
        "2_widen_total.up.sql",
        "-- schemagate:lint-ignore changing-column-type the table is empty in every environment\n\
         ALTER TABLE orders ALTER COLUMN total TYPE bigint;\n",
    );
    let mut c = migrate(&url, dir.path());
    c.args(["upgrade", "2", "--lint", "deny"]);
    assert_code(&run(c), 0);
    assert_eq!(
        query(
            &url,
            "SELECT note FROM schemagate_history WHERE version = '2' AND kind = 'up'"
        ),
        ["lint-ignore changing-column-type: the table is empty in every environment"],
        "the reason is recorded"
    );
    // 3 indexes orders, which is no longer new: flagged.
    let o = lint(Some(&url), dir.path(), &["--format", "json"]);
    assert_code(&o, 20);
    let v = stdout_json(&o);
    assert_eq!(v["linted"], 1);
    assert_eq!(
        v["findings"][0]["rule"],
        "require-concurrent-index-creation"
    );
    assert_eq!(v["findings"][0]["file"], "3_index_total.up.sql");
    // Under --lint deny the upgrade is refused before anything runs (exit 20) ...
    let mut c = migrate(&url, dir.path());
    c.args(["upgrade", "--lint", "deny"]);
    let o = run(c);
    assert_code(&o, 20);
    assert!(
        text(&o).contains("require-concurrent-index-creation"),
        "{}",
        text(&o)
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM schemagate_history WHERE version = '3'"
        ),
        0
    );
    // ... and under the default (warn) it runs, with the finding in the log.
    let mut c = migrate(&url, dir.path());
    c.arg("upgrade");
    let o = run(c);
    assert_code(&o, 0);
    assert!(text(&o).contains("lint:"), "{}", text(&o));
}

#[test]
fn mysql_findings_without_a_database() {
    let dir = MigDir::new();
    dir.pair(
        "1",
        "orders",
        "ALTER TABLE orders MODIFY total BIGINT;\nRENAME TABLE orders TO purchases;\n",
        None,
    );
    let o = lint(
        None,
        dir.path(),
        &["--dialect", "mysql", "--format", "json"],
    );
    assert_code(&o, 20);
    let v = stdout_json(&o);
    let rules: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["mysql-column-type-change", "mysql-rename"]);
}

#[test]
fn github_annotations_one_per_finding() {
    let dir = MigDir::new();
    risky(&dir);
    let o = lint(None, dir.path(), &["--format", "github"]);
    assert_code(&o, 20);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("::warning file=")
            && lines[0].contains(
                "2_widen_total.up.sql,line=2,title=schemagate lint%3A changing-column-type::"
            ),
        "{out}"
    );
}

/// The official SARIF 2.1.0 JSON schema (from Microsoft's npm package), cached in target/.
fn sarif_schema() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sarif");
    let schema = target.join("package/lib/schemas/sarif-2.1.0-rtm.5.json");
    if schema.exists() {
        return schema;
    }
    std::fs::create_dir_all(&target).unwrap();
    let out = Command::new("npm")
        .args([
            "pack",
            "@microsoft/jest-sarif@1.0.0-beta.0",
            "--pack-destination",
        ])
        .arg(&target)
        .current_dir(&target)
        .output()
        .expect("npm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tgz = target.join("microsoft-jest-sarif-1.0.0-beta.0.tgz");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("package/lib/schemas/sarif-2.1.0-rtm.5.json")
        .current_dir(&target)
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    schema
}

#[test]
fn sarif_output_validates_against_the_sarif_2_1_0_schema() {
    let dir = MigDir::new();
    risky(&dir);
    dir.pair(
        "4",
        "rename",
        "-- schemagate:lint-ignore renaming-column no reader uses it yet\n\
         ALTER TABLE orders RENAME COLUMN total TO amount;\n",
        None,
    );
    let o = lint(None, dir.path(), &["--format", "sarif"]);
    assert_code(&o, 20);
    let sarif: Value = serde_json::from_slice(&o.stdout).unwrap();
    let results = sarif["runs"][0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{sarif:#}");
    assert_eq!(
        results[2]["suppressions"][0]["justification"],
        "no reader uses it yet"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &o.stdout).unwrap();
    let python = support::python::venv(
        "pyenv",
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/k8s/requirements.txt"),
    )
    .join("python");
    let check = "import json, sys, jsonschema\n\
                 schema = json.load(open(sys.argv[1]))\n\
                 doc = json.load(open(sys.argv[2]))\n\
                 cls = jsonschema.validators.validator_for(schema)\n\
                 errors = list(cls(schema).iter_errors(doc))\n\
                 [print(e.message, list(e.path)) for e in errors]\n\
                 sys.exit(1 if errors else 0)\n";
    let out = Command::new(python)
        .args(["-c", check])
        .arg(sarif_schema())
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SARIF invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
