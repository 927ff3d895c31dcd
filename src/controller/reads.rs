//! Database reads shared between resources: many SchemaMigrations name the same database
//! with the same source (one per app replica set, per namespace...), and each reconcile
//! used to open its own connection and read the same history table. Reads are keyed by
//! what determines their result (the URL, the history table, the source), coalesced while
//! one is in flight, and reused for a short time after.
//!
//! A reuse is never staler than what the resource itself knows: a caller that saw a run
//! finish (or one running) asks for a `fresh` read, which only a read that began after it
//! asked can answer. A transient failure is shared with the callers that waited for it but
//! never reused later, so one dropped connection does not spread to every resource.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::decide::DbView;

/// What a database read's result depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReadKey {
    /// SHA-256 of the URL: the map never holds a password.
    pub url_hash: String,
    /// The history table, as written in the spec.
    pub table: String,
    /// The source's hash (pending and drift are computed against its files), empty when
    /// the source is not readable.
    pub source: String,
}

impl ReadKey {
    pub fn new(url: &str, table: &str, source: Option<&str>) -> Self {
        ReadKey {
            url_hash: crate::model::digest::sha256_hex(url.as_bytes()),
            table: table.to_string(),
            source: source.unwrap_or_default().to_string(),
        }
    }
}

struct Entry {
    started: Instant,
    view: DbView,
}

impl Entry {
    /// Whether a caller that asked at `asked` may take this result.
    fn answers(&self, asked: Instant, ttl: Duration, fresh: bool) -> bool {
        // A read that began after the caller asked saw everything the caller could know of.
        if self.started >= asked {
            return true;
        }
        let transient = matches!(&self.view, DbView::Failed(f) if !f.kind.permanent());
        !fresh && !transient && self.started.elapsed() < ttl
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

/// The shared reads of one controller (see the module documentation).
#[derive(Default)]
pub struct SharedReads {
    slots: Mutex<HashMap<ReadKey, Slot>>,
}

impl SharedReads {
    /// The result for `key`: a read in flight or one younger than `ttl` (unless `fresh`),
    /// else `read`'s, which is then shared.
    pub async fn read<F>(&self, key: ReadKey, ttl: Duration, fresh: bool, read: F) -> DbView
    where
        F: Future<Output = DbView>,
    {
        let asked = Instant::now();
        let slot = self.slot(key, ttl);
        let mut entry = slot.lock().await;
        if let Some(e) = entry.as_ref()
            && e.answers(asked, ttl, fresh)
        {
            return e.view.clone();
        }
        let started = Instant::now();
        let view = read.await;
        *entry = Some(Entry {
            started,
            view: view.clone(),
        });
        view
    }

    /// The slot for `key`; a new key also drops the slots nobody uses whose result expired
    /// (sources and Secrets change: keys must not pile up).
    fn slot(&self, key: ReadKey, ttl: Duration) -> Slot {
        // A poisoned map only means another reconcile panicked while holding it (the map
        // itself is always consistent): keep using it.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&key) {
            return slot.clone();
        }
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map(|e| e.as_ref().is_some_and(|e| e.started.elapsed() < ttl))
                    .unwrap_or(true)
        });
        slots.entry(key).or_default().clone()
    }

    /// How many keys are held (for tests).
    pub fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
