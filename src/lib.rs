//! schemagate: versioned, locked, audited database schema migrations, as a command-line
//! tool and (in later modules) a Kubernetes operator.

pub mod api;
pub mod cli;
pub mod controller;
pub mod engine;
pub mod telemetry;
