//! The migration engine: sources, planning, history, locking and execution per dialect.
//!
//! No Kubernetes types here: the CLI, the controller's Jobs and the injected init
//! containers all reach the engine through the same `schemagate migrate` commands.

// Pure values the engine shares with every other layer (see `crate::model`).
pub use crate::model::{clock, redact, version};

pub mod alembic;
pub mod approval;
pub mod dialect;
pub mod guard;
pub mod history;
pub mod lint;
pub mod lock;
pub mod lockwait;
pub mod plan;
pub mod runner;
pub mod schema;
pub mod script;
pub mod sent;
pub mod source;
pub mod status;
pub mod tools;

pub use crate::model::Version;
pub use dialect::{Backend, ConnectConfig, Db, DbError, DbErrorKind, HistoryTable};
pub use history::DbState;
pub use plan::{ChecksumMode, Direction, PlanOptions, Target};
pub use runner::{Mode, RunError, RunReport, RunSettings, StopRequest};
pub use source::MigrationSet;
