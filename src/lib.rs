//! schemagate: versioned, locked, audited database schema migrations, as a command-line
//! tool (`engine`, `cli`) and a Kubernetes operator (`api`, `controller`, `webhook`).

pub mod api;
pub mod cli;
pub mod controller;
pub mod engine;
pub mod telemetry;
pub mod webhook;
