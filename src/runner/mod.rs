//! The runner contract, below both the controller and the webhook: what a runner is
//! (`schemagate migrate ...` in a Job or an injected init container), what it runs
//! (`command`), with which pod and container spec (`pod`), from which files (`source`),
//! under which policy (`policy`), how it ends (`exit` codes) and what it reports
//! (`summary`, written by the CLI and read by the controller).
//!
//! Neither the controller nor the webhook re-derives any of this on its own.

pub mod command;
pub mod exit;
pub mod pod;
pub mod policy;
pub mod source;
pub mod summary;
