//! Telemetry: logging (`tracing` to standard error, as text or JSON, every line scrubbed of
//! secrets) and the Prometheus metrics of the operator (`metrics`).

pub mod metrics;

use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Short human-readable lines.
    Text,
    /// One JSON object per line, with timestamps (for log collectors).
    Json,
}

/// Standard error, through [`crate::model::redact::redact`]. The formatter hands over one
/// whole event per write, so a secret is never split across two writes.
#[derive(Clone, Copy)]
struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(crate::model::redact::redact(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the global subscriber. `filter` uses tracing's syntax; an invalid filter falls
/// back to `info` with a warning rather than stopping a migration.
pub fn init(filter: &str, format: LogFormat) {
    let (env_filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(RedactingStderr)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Text => builder.without_time().with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok()
        && let Some(e) = bad
    {
        tracing::warn!(filter, error = %e, "invalid log filter; using info");
    }
}
