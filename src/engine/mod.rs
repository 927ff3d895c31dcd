//! The migration engine: sources, planning, history, locking and execution per dialect.
//!
//! No Kubernetes types here: the CLI, the controller's Jobs and the injected init
//! containers all reach the engine through the same `schemagate migrate` commands.

pub mod clock;
pub mod dialect;
pub mod guard;
pub mod history;
pub mod lock;
pub mod plan;
pub mod redact;
pub mod runner;
pub mod script;
pub mod sent;
pub mod source;
pub mod status;
pub mod tools;
pub mod version;

pub use dialect::{Backend, ConnectConfig, Db, DbError, DbErrorKind, HistoryTable};
pub use history::DbState;
pub use plan::{ChecksumMode, Direction, PlanOptions, Target};
pub use runner::{Mode, RunError, RunReport, RunSettings, StopRequest};
pub use source::MigrationSet;
pub use version::Version;
