//! schemagate: versioned, locked, audited database schema migrations, as a command-line
//! tool (`engine`, `cli`) and a Kubernetes operator (`api`, `controller`, `webhook`, wired
//! together by `operator`), over a shared runner contract (`runner`) and pure values
//! (`model`). Imports point down only; `tests/layering.rs` checks the rules.

pub mod api;
pub mod cli;
pub mod controller;
pub mod engine;
pub mod model;
pub mod operator;
pub mod runner;
pub mod telemetry;
pub mod webhook;
