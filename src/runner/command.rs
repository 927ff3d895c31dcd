//! What a runner runs: the one place that turns a resource (and, for Jobs, the controller's
//! decision) into `schemagate migrate ...` arguments. The controller's Jobs, the init
//! container the webhook injects, and `wait` all take their arguments from here, so the two
//! never decide differently.
//!
//! The gate's rule: with no `spec.targetVersion`, a runner goes to `head`, the newest
//! migration of the files its own pod mounts or copies (the ConfigMap as the kubelet mounts
//! it, the inline snapshot the pod was admitted with, the files of the image it copies).
//! Never to a version a status recorded earlier: in a GitOps sync that changes the
//! migrations and the app in one apply, a pod admitted before the controller's next
//! reconcile still migrates (or waits) to the version of its own files.

use std::time::Duration;

use crate::api::{DowngradePolicy, MigrationMode, SchemaMigration};

/// What a migration Job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunCommand {
    /// Pending expand migrations (contract ones are held for the controller).
    Upgrade,
    Downgrade,
    /// The held contract migrations, once no older app version runs.
    Contract,
}

impl RunCommand {
    /// Names the run (in Job names and Events).
    pub fn as_str(self) -> &'static str {
        match self {
            RunCommand::Upgrade => "upgrade",
            RunCommand::Downgrade => "downgrade",
            RunCommand::Contract => "contract",
        }
    }
}

/// Every runner in the cluster runs with a phase: the gate and upgrade Jobs apply expand
/// migrations (contract ones wait until no older app version runs), the controller's
/// contract Jobs the held contract migrations.
const PHASE: &str = "--phase";

/// `head`: the newest migration of the runner's own files.
pub const HEAD: &str = "head";

/// A migration Job's runner: `migrate <command> <target> --output json`, the target being
/// the controller's decision (`None`: `head`).
pub fn job_args(command: RunCommand, target: Option<&str>) -> Vec<String> {
    let target = target.unwrap_or(HEAD).to_string();
    let mut args = vec!["migrate".to_string()];
    match command {
        RunCommand::Upgrade => {
            args.extend(["upgrade".into(), target, PHASE.into(), "expand".into()])
        }
        RunCommand::Contract => {
            args.extend(["upgrade".into(), target, PHASE.into(), "contract".into()])
        }
        RunCommand::Downgrade => args.extend(["downgrade".into(), target]),
    }
    args.extend(["--output".into(), "json".into()]);
    args
}

/// `migrate wait`: block until the database is at `version` (`None`: the newest migration
/// of the mounted files) or later, failing after `timeout`.
pub fn wait_args(version: Option<&str>, timeout: Duration) -> Vec<String> {
    let mut args = vec![
        "migrate".to_string(),
        "wait".into(),
        PHASE.into(),
        "expand".into(),
    ];
    if let Some(v) = version {
        args.extend(["--version".into(), v.into()]);
    }
    args.extend([
        "--timeout".into(),
        format!("{}s", timeout.as_secs()),
        "--output".into(),
        "json".into(),
    ]);
    args
}

/// The init container injected into a gated pod:
/// - `InitContainer` mode: `migrate upgrade <spec.targetVersion | head>`; with a target and
///   `downgrade: Allow`, `--allow-downgrade` lets the runner revert a database above the
///   target (decided by the runner from the database's history, under the lock);
/// - `Job` mode: `migrate wait [--version <spec.targetVersion>]`: with no target, wait for
///   the newest migration of the files mounted into the pod (the controller's Job migrates).
///
/// Only the resource's spec is read, never its status.
pub fn gate_args(sm: &SchemaMigration, wait_timeout: Duration) -> Vec<String> {
    let target = sm.spec.target_version.as_deref();
    match sm.spec.mode {
        MigrationMode::InitContainer => {
            let mut args = vec![
                "migrate".to_string(),
                "upgrade".into(),
                target.unwrap_or(HEAD).into(),
                PHASE.into(),
                "expand".into(),
            ];
            if target.is_some() && sm.spec.downgrade == DowngradePolicy::Allow {
                args.push("--allow-downgrade".into());
            }
            args.extend(["--output".into(), "json".into()]);
            args
        }
        MigrationMode::Job => wait_args(target, wait_timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SchemaMigrationSpec, SchemaMigrationStatus, SourceSpec};

    fn sm(mode: MigrationMode, target: Option<&str>) -> SchemaMigration {
        let mut sm = SchemaMigration::new(
            "orders",
            SchemaMigrationSpec {
                mode,
                target_version: target.map(String::from),
                ..SchemaMigrationSpec::new("db", "url", SourceSpec::config_map("m"))
            },
        );
        // A status from an earlier reconcile must not matter.
        sm.status = Some(SchemaMigrationStatus {
            target_version: Some("3".into()),
            current_version: Some("3".into()),
            ..Default::default()
        });
        sm
    }

    #[test]
    fn without_a_target_the_gate_goes_to_the_head_of_its_own_files() {
        let t = Duration::from_secs(60);
        assert_eq!(
            gate_args(&sm(MigrationMode::InitContainer, None), t),
            [
                "migrate", "upgrade", "head", "--phase", "expand", "--output", "json"
            ]
        );
        assert_eq!(
            gate_args(&sm(MigrationMode::Job, None), t),
            [
                "migrate",
                "wait",
                "--phase",
                "expand",
                "--timeout",
                "60s",
                "--output",
                "json"
            ]
        );
    }

    #[test]
    fn a_target_is_followed_and_downgrades_only_where_allowed() {
        let t = Duration::from_secs(60);
        let mut s = sm(MigrationMode::InitContainer, Some("2"));
        assert_eq!(
            gate_args(&s, t),
            [
                "migrate", "upgrade", "2", "--phase", "expand", "--output", "json"
            ]
        );
        s.spec.downgrade = DowngradePolicy::Allow;
        assert_eq!(
            gate_args(&s, t),
            [
                "migrate",
                "upgrade",
                "2",
                "--phase",
                "expand",
                "--allow-downgrade",
                "--output",
                "json"
            ]
        );
        assert_eq!(
            gate_args(&sm(MigrationMode::Job, Some("2")), t),
            [
                "migrate",
                "wait",
                "--phase",
                "expand",
                "--version",
                "2",
                "--timeout",
                "60s",
                "--output",
                "json"
            ]
        );
        assert_eq!(
            job_args(RunCommand::Downgrade, Some("1")),
            ["migrate", "downgrade", "1", "--output", "json"]
        );
        assert_eq!(
            job_args(RunCommand::Contract, None),
            [
                "migrate", "upgrade", "head", "--phase", "contract", "--output", "json"
            ]
        );
    }
}
