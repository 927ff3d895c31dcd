//! `schemagate migrate lint` and its output formats: human, JSON, SARIF 2.1.0 (for code
//! scanning in CI) and GitHub Actions annotations.

use serde_json::{Value, json};

use super::output::Outcome;
use super::{DialectArg, LintFormat, OutputFormat};
use crate::engine::lint::{Finding, Severity};
use crate::engine::script::Dialect;
use crate::runner::exit::Exit;

/// Where SARIF readers find what each rule means.
const DOCS: &str = "https://github.com/schemagate/schemagate#lint";

pub fn dialect_of(arg: DialectArg) -> Dialect {
    match arg {
        DialectArg::Postgres => Dialect::Postgres,
        DialectArg::Mysql => Dialect::MySql,
        DialectArg::Sqlite => Dialect::Sqlite,
    }
}

fn counted(findings: &[Finding]) -> usize {
    findings.iter().filter(|f| f.ignored.is_none()).count()
}

/// The human report.
pub fn human(findings: &[Finding], linted: usize) -> String {
    let mut out = String::new();
    for f in findings {
        let tag = match (&f.ignored, f.severity) {
            (Some(_), _) => "ignored",
            (None, Severity::Error) => "error",
            (None, Severity::Warning) => "warning",
        };
        out.push_str(&format!(
            "{}:{}: {tag}[{}]: {}\n    {}\n",
            f.file, f.line, f.rule, f.message, f.statement
        ));
        if let Some(h) = &f.help {
            out.push_str(&format!("    help: {h}\n"));
        }
        if let Some(r) = &f.ignored {
            out.push_str(&format!("    ignored: {r}\n"));
        }
    }
    let n = counted(findings);
    out.push_str(&match n {
        0 => format!("{linted} migration(s) linted: no findings\n"),
        n => format!(
            "{linted} migration(s) linted: {n} finding(s); fix them, or silence one with \
             `-- schemagate:lint-ignore <rule> <reason>` right above its statement\n"
        ),
    });
    out
}

/// SARIF 2.1.0: one run, the rules that fired, one result per finding (silenced ones
/// carry a suppression, as code scanning expects).
pub fn sarif(findings: &[Finding], dir: &str) -> Value {
    let mut rules: Vec<&str> = findings.iter().map(|f| f.rule.as_str()).collect();
    rules.sort_unstable();
    rules.dedup();
    let rule_objs: Vec<Value> = rules
        .iter()
        .map(|r| {
            let help = findings
                .iter()
                .find(|f| f.rule == *r)
                .and_then(|f| f.help.clone())
                .unwrap_or_default();
            json!({
                "id": r,
                "name": r,
                "shortDescription": {"text": r},
                "help": {"text": help},
                "helpUri": DOCS,
            })
        })
        .collect();
    let results: Vec<Value> = findings
        .iter()
        .map(|f| {
            let mut r = json!({
                "ruleId": f.rule,
                "ruleIndex": rules.iter().position(|x| *x == f.rule).unwrap_or(0),
                "level": match f.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "message": {"text": match &f.help {
                    Some(h) => format!("{} ({h})", f.message),
                    None => f.message.clone(),
                }},
                "locations": [{"physicalLocation": {
                    "artifactLocation": {"uri": format!("{}/{}", dir.trim_end_matches('/'), f.file)},
                    "region": {"startLine": f.line},
                }}],
            });
            if let Some(reason) = &f.ignored {
                r["suppressions"] = json!([{"kind": "inSource", "justification": reason}]);
            }
            r
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "schemagate",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": DOCS,
                "rules": rule_objs,
            }},
            "results": results,
        }],
    })
}

/// GitHub Actions workflow commands: one annotation per counted finding.
pub fn github(findings: &[Finding], dir: &str) -> String {
    // Workflow-command values escape %, CR and LF (and , : in properties).
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A")
    };
    let prop = |s: &str| esc(s).replace(':', "%3A").replace(',', "%2C");
    findings
        .iter()
        .filter(|f| f.ignored.is_none())
        .map(|f| {
            let level = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            let text = match &f.help {
                Some(h) => format!("{}. {h}", f.message),
                None => f.message.clone(),
            };
            format!(
                "::{level} file={},line={},title={}::{}\n",
                prop(&format!("{}/{}", dir.trim_end_matches('/'), f.file)),
                f.line,
                prop(&format!("schemagate lint: {}", f.rule)),
                esc(&text)
            )
        })
        .collect()
}

/// The command's outcome in the chosen format; exit 20 when a finding counts.
pub fn outcome(
    findings: Vec<Finding>,
    linted: usize,
    format: Option<LintFormat>,
    output: OutputFormat,
    dir: &str,
) -> Outcome {
    let exit = if counted(&findings) > 0 {
        Exit::LintFindings
    } else {
        Exit::Ok
    };
    let json = json!({
        "linted": linted,
        "findings": findings,
        "counted": counted(&findings),
    });
    let format = format.unwrap_or(match output {
        OutputFormat::Human => LintFormat::Human,
        OutputFormat::Json => LintFormat::Json,
    });
    let (json, human) = match format {
        LintFormat::Human => (json, human(&findings, linted)),
        LintFormat::Json => {
            let text = serde_json::to_string_pretty(&json).unwrap_or_default() + "\n";
            (json, text)
        }
        LintFormat::Sarif => {
            let s = sarif(&findings, dir);
            let text = serde_json::to_string_pretty(&s).unwrap_or_default() + "\n";
            (s, text)
        }
        LintFormat::Github => (json, github(&findings, dir)),
    };
    Outcome { exit, json, human }
}
