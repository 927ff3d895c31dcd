//! Approval of risky plans by hash.
//!
//! A plan's hash covers what it would do: the direction, the version it ends at, and each
//! step's version, the checksum of the script it runs and that script's directives. The
//! policy names the kinds of plan a person must approve (`Destructive`, `Downgrade`,
//! `LintFindings`); a plan of such a kind runs only when its hash is among the approved
//! ones. Another file, another target or another starting point is another plan, with
//! another hash: an approval never carries over to something nobody looked at.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::plan::{Direction, Plan};
use super::runner::{Prepared, StepFindings};
use super::script::Directives;

/// A kind of plan the policy may require an approval for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ApprovalKind {
    /// Any data-losing statement (DROP, TRUNCATE, narrowing type changes, DELETE or UPDATE
    /// without WHERE), even one whose file carries `allow-destructive <reason>`.
    Destructive,
    /// Any plan that reverts migrations.
    Downgrade,
    /// Any lint finding not silenced by `lint-ignore` in the steps about to run.
    LintFindings,
}

impl ApprovalKind {
    pub const ALL: [ApprovalKind; 3] = [
        ApprovalKind::Destructive,
        ApprovalKind::Downgrade,
        ApprovalKind::LintFindings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalKind::Destructive => "Destructive",
            ApprovalKind::Downgrade => "Downgrade",
            ApprovalKind::LintFindings => "LintFindings",
        }
    }
}

impl fmt::Display for ApprovalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApprovalKind {
    type Err = String;

    /// Case and `-`/`_` insensitive: `Destructive`, `downgrade`, `lint-findings`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        ApprovalKind::ALL
            .into_iter()
            .find(|k| k.as_str().to_ascii_lowercase() == key)
            .ok_or_else(|| {
                format!("unknown approval kind {s:?}: use Destructive, Downgrade or LintFindings")
            })
    }
}

/// What needs approval and what is approved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApprovalPolicy {
    /// The kinds of plan that need an approval (empty: none does).
    pub required: Vec<ApprovalKind>,
    /// Approved plan hashes.
    pub approved: Vec<String>,
}

impl ApprovalPolicy {
    /// True when `hash` is approved (`sha256:` prefix and case ignored).
    pub fn approves(&self, hash: &str) -> bool {
        self.approved.iter().any(|a| same_hash(a, hash))
    }
}

/// Two spellings of one plan hash (`sha256:` prefix, case and surrounding space
/// ignored); an empty hash matches nothing.
pub fn same_hash(a: &str, b: &str) -> bool {
    let (a, b) = (bare(a), bare(b));
    !a.is_empty() && a == b
}

fn bare(hash: &str) -> String {
    let h = hash.trim();
    h.strip_prefix("sha256:").unwrap_or(h).to_ascii_lowercase()
}

/// Why a plan needs an approval: the kind, and what of the plan made it so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mark {
    pub kind: ApprovalKind,
    pub detail: String,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.detail)
    }
}

/// A plan's approval facts: its hash and the kinds it has (whether or not the policy
/// requires approving them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanApproval {
    pub plan_hash: String,
    /// Every kind the plan has.
    pub marks: Vec<Mark>,
    /// The kinds the policy requires approving that the plan has.
    pub required: Vec<ApprovalKind>,
    /// True when nothing is required or the hash is approved.
    pub approved: bool,
}

/// The directives of a script, in a fixed text form for hashing.
fn directives_text(d: &Directives) -> String {
    let ms = |t: Option<std::time::Duration>| t.map(|t| t.as_millis().to_string());
    let parts = [
        ("no-transaction", d.no_transaction.then(String::new)),
        ("lock-timeout", ms(d.lock_timeout)),
        ("statement-timeout", ms(d.statement_timeout)),
        ("lock-retry-budget", ms(d.lock_retry_budget)),
        ("allow-destructive", d.allow_destructive.clone()),
        ("empty", d.empty.clone()),
    ];
    parts
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(";")
}

/// The plan's hash: SHA-256 (hex) over the direction, the version the plan ends at
/// (`base` when none), and each step's version, checksum and directives, in order.
pub fn plan_hash(plan: &Plan<'_>, prepared: &[Prepared<'_>]) -> String {
    let mut text = String::from("schemagate-plan-v1\n");
    text.push_str(match plan.direction {
        Direction::Up => "up\n",
        Direction::Down => "down\n",
    });
    text.push_str(&format!(
        "target {}\n",
        plan.to
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "base".into())
    ));
    for p in prepared {
        text.push_str(&format!(
            "step {} {} {} {}\n",
            match p.step.direction {
                Direction::Up => "up",
                Direction::Down => "down",
            },
            p.step.migration.version,
            p.script.checksum(),
            directives_text(&p.script.directives)
        ));
    }
    crate::model::digest::sha256_hex(text.as_bytes())
}

/// What of a plan needs approval: its destructive statements (allowed by directive or
/// not), its direction, its unsilenced lint findings.
pub fn marks(
    plan: &Plan<'_>,
    destructive: &[StepFindings],
    lint_findings: &[super::lint::Finding],
) -> Vec<Mark> {
    let mut out = Vec::new();
    let statements: usize = destructive.iter().map(|s| s.findings.len()).sum();
    if statements > 0 {
        let files: Vec<String> = destructive
            .iter()
            .map(|s| {
                let what: Vec<String> = s
                    .findings
                    .iter()
                    .map(|f| format!("line {} {}", f.line, f.loss.describe()))
                    .collect();
                format!("{}: {}", s.file, what.join(", "))
            })
            .collect();
        out.push(Mark {
            kind: ApprovalKind::Destructive,
            detail: format!(
                "{statements} data-losing statement(s): {}",
                files.join("; ")
            ),
        });
    }
    if plan.direction == Direction::Down && !plan.steps.is_empty() {
        out.push(Mark {
            kind: ApprovalKind::Downgrade,
            detail: format!(
                "reverts {} migration(s) to {}",
                plan.steps.len(),
                plan.to
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "base".into())
            ),
        });
    }
    let lint: Vec<_> = lint_findings
        .iter()
        .filter(|f| f.ignored.is_none())
        .collect();
    if !lint.is_empty() {
        out.push(Mark {
            kind: ApprovalKind::LintFindings,
            detail: format!(
                "{} lint finding(s): {}",
                lint.len(),
                lint.iter()
                    .map(|f| format!("{}:{} {}", f.file, f.line, f.rule))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    out
}

/// The approval facts of a plan under `policy`.
pub fn judge(policy: &ApprovalPolicy, plan_hash: String, marks: Vec<Mark>) -> PlanApproval {
    let mut required: Vec<ApprovalKind> = marks
        .iter()
        .map(|m| m.kind)
        .filter(|k| policy.required.contains(k))
        .collect();
    required.dedup();
    let approved = required.is_empty() || policy.approves(&plan_hash);
    PlanApproval {
        plan_hash,
        marks,
        required,
        approved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_loosely_and_print_as_in_the_spec() {
        assert_eq!(
            "lint-findings".parse::<ApprovalKind>(),
            Ok(ApprovalKind::LintFindings)
        );
        assert_eq!(
            "DESTRUCTIVE".parse::<ApprovalKind>(),
            Ok(ApprovalKind::Destructive)
        );
        assert!("drop".parse::<ApprovalKind>().is_err());
        assert_eq!(ApprovalKind::Downgrade.to_string(), "Downgrade");
    }

    #[test]
    fn approvals_match_with_or_without_the_prefix() {
        let p = ApprovalPolicy {
            required: vec![ApprovalKind::Downgrade],
            approved: vec!["sha256:ABCDEF".into()],
        };
        assert!(p.approves("abcdef"));
        assert!(p.approves("sha256:abcdef"));
        assert!(!p.approves("abcde"));
    }

    #[test]
    fn only_required_kinds_need_an_approval() {
        let policy = ApprovalPolicy {
            required: vec![ApprovalKind::Destructive],
            approved: vec![],
        };
        let downgrade = Mark {
            kind: ApprovalKind::Downgrade,
            detail: "x".into(),
        };
        let j = judge(&policy, "h".into(), vec![downgrade.clone()]);
        assert!(j.approved && j.required.is_empty());
        let destructive = Mark {
            kind: ApprovalKind::Destructive,
            detail: "y".into(),
        };
        let j = judge(&policy, "h".into(), vec![downgrade, destructive]);
        assert!(!j.approved);
        assert_eq!(j.required, vec![ApprovalKind::Destructive]);
        let approved = ApprovalPolicy {
            approved: vec!["h".into()],
            ..policy
        };
        assert!(judge(&approved, "h".into(), j.marks).approved);
    }
}
