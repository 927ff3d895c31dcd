//! One runner at a time: the session lock (advisory lock, `GET_LOCK`, SQLite's file lock)
//! or a lease row with heartbeats, for places where session locks break (PgBouncer in
//! transaction mode, `GET_LOCK` that is node-local on a cluster).
//!
//! Waiting always polls a non-blocking attempt: a waiter never holds or waits on anything
//! the holder's own work could need (a `CREATE INDEX CONCURRENTLY` run by the holder
//! finishes while others wait).
//!
//! A lease is safe to take over: every history write (and every step's transaction, on
//! PostgreSQL) is conditional on still holding the lease, and a takeover skips a lease row
//! that a running step has locked. A runner that lost its lease can therefore never record
//! a step, and a step a dead holder left unfinished is reported dirty, never re-run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dialect::sql::Guard;
use super::dialect::{Backend, ConnectConfig, Db, DbError, LockHolder};

/// How runners exclude each other.
#[derive(Clone, Debug)]
pub enum LockMode {
    /// The database's session lock; it dies with the runner's connection.
    Session,
    /// A lease row renewed every `heartbeat` on a second connection (made with `connect`)
    /// and taken over `ttl` after its last renewal.
    Lease {
        heartbeat: Duration,
        ttl: Duration,
        connect: Box<ConnectConfig>,
    },
}

impl LockMode {
    pub fn name(&self) -> &'static str {
        match self {
            LockMode::Session => "session",
            LockMode::Lease { .. } => "lease",
        }
    }
}

/// Why the lock could not be had.
#[derive(Debug)]
pub enum LockError {
    Db {
        during: &'static str,
        source: DbError,
    },
    Timeout {
        waited: Duration,
        holder: Option<LockHolder>,
    },
}

/// Xorshift jitter seeded from the clock and pid; good enough to spread pollers.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Jitter(seed | 1)
    }
    /// A factor in [0.8, 1.2).
    fn factor(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        0.8 + (self.0 % 4000) as f64 / 10_000.0
    }
}

/// First poll interval while waiting for the lock, and the longest one.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);
/// How often a waiting runner says who it waits for.
const WAIT_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Something that can try, without blocking, to become the lock holder.
trait Contender {
    async fn attempt(&mut self) -> Result<bool, DbError>;
    async fn holder(&mut self) -> Option<LockHolder>;
}

struct SessionContender<'a, B>(&'a mut B);

impl<B: Backend> Contender for SessionContender<'_, B> {
    async fn attempt(&mut self) -> Result<bool, DbError> {
        self.0.try_lock().await
    }
    async fn holder(&mut self) -> Option<LockHolder> {
        self.0.lock_holder().await.ok().flatten()
    }
}

struct LeaseContender<'a> {
    db: &'a mut Db,
    holder: &'a str,
    token: &'a str,
    ttl: Duration,
}

impl Contender for LeaseContender<'_> {
    async fn attempt(&mut self) -> Result<bool, DbError> {
        self.db
            .lease_acquire(self.holder, self.token, self.ttl)
            .await
    }
    async fn holder(&mut self) -> Option<LockHolder> {
        self.db.lease_holder().await.ok().flatten()
    }
}

/// Polls `c` until it holds the lock or `timeout` passes, saying who holds it meanwhile.
async fn poll(c: &mut impl Contender, timeout: Duration) -> Result<Duration, LockError> {
    let start = Instant::now();
    let mut delay = POLL_MIN;
    let mut jitter = Jitter::new();
    let mut last_report: Option<Instant> = None;
    loop {
        let got = c.attempt().await.map_err(|source| LockError::Db {
            during: "taking the migration lock",
            source,
        })?;
        if got {
            return Ok(start.elapsed());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            let holder = c.holder().await;
            return Err(LockError::Timeout { waited, holder });
        }
        if last_report.is_none_or(|t| t.elapsed() >= WAIT_REPORT_EVERY) {
            let holder = c.holder().await;
            tracing::info!(
                holder = %holder.map(|h| h.to_string()).unwrap_or_else(|| "another runner".into()),
                waited_ms = waited.as_millis() as u64,
                "waiting for the migration lock"
            );
            last_report = Some(Instant::now());
        }
        let sleep = delay.mul_f64(jitter.factor()).min(timeout - waited);
        tokio::time::sleep(sleep).await;
        delay = (delay * 3 / 2).min(POLL_MAX);
    }
}

/// The lock while it is held.
pub struct Held {
    pub waited: Duration,
    /// The condition every history write (and, on PostgreSQL under a lease, every step's
    /// transaction) carries, so that only the holder can record a step.
    pub guard: Guard,
    lease: Option<LeaseKeeper>,
}

struct LeaseKeeper {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
    /// When the last successful renewal was sent (no later than the server recorded it).
    renewed: Arc<Mutex<Instant>>,
    heartbeat: Duration,
    ttl: Duration,
}

impl Held {
    /// True once the lease was taken over (or could not be renewed for its whole TTL):
    /// the run must not start another step.
    pub fn lost(&self) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.lost.load(Ordering::SeqCst))
    }

    /// For work that cannot stop at a step boundary (another tool's command): false as
    /// soon as the lease could have been taken over within the next heartbeat, i.e. it
    /// was last renewed more than its TTL minus one heartbeat ago. Always true for a
    /// session lock (the caller checks that the session answers).
    pub fn lease_fresh(&self) -> bool {
        self.lease.as_ref().is_none_or(|l| {
            let renewed = *l.renewed.lock().unwrap_or_else(|e| e.into_inner());
            !l.lost.load(Ordering::SeqCst) && renewed.elapsed() + l.heartbeat < l.ttl
        })
    }

    /// The lease's heartbeat (`None` for a session lock).
    pub fn heartbeat(&self) -> Option<Duration> {
        self.lease.as_ref().map(|l| l.heartbeat)
    }
}

/// A unique token for a lease: who, when, and a counter, hashed.
fn lease_token(holder: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let seed = format!("{holder}/{}/{nanos}/{n}", std::process::id());
    super::script::sha256_hex(seed.as_bytes())[..32].to_string()
}

/// The guard that makes history writes on `db` conditional on holding the lock of
/// `mode`; `token` is the lease's (or, for `plan`, a placeholder).
pub fn guard(db: &impl Backend, mode: &LockMode, token: &str) -> Guard {
    match mode {
        LockMode::Session => db.session_guard(),
        LockMode::Lease { ttl, .. } => Guard::Lease {
            table: db.table().lease_table(),
            token: token.to_string(),
            ttl: *ttl,
        },
    }
}

/// Takes the lock (waiting up to `timeout`); its [`Held::guard`] guards the history writes.
pub async fn acquire(
    db: &mut impl Backend,
    mode: &LockMode,
    holder: &str,
    timeout: Duration,
) -> Result<Held, LockError> {
    match mode {
        LockMode::Session => {
            let waited = poll(&mut SessionContender(&mut *db), timeout).await?;
            Ok(Held {
                waited,
                guard: guard(db, mode, ""),
                lease: None,
            })
        }
        LockMode::Lease {
            heartbeat,
            ttl,
            connect,
        } => {
            let mut lease_db = Db::connect(connect).await.map_err(|source| LockError::Db {
                during: "connecting for the lease",
                source,
            })?;
            let token = lease_token(holder);
            let mut contender = LeaseContender {
                db: &mut lease_db,
                holder,
                token: &token,
                ttl: *ttl,
            };
            let waited = match poll(&mut contender, timeout).await {
                Ok(w) => w,
                Err(e) => {
                    lease_db.close().await;
                    return Err(e);
                }
            };
            let guard = guard(db, mode, &token);
            let lost = Arc::new(AtomicBool::new(false));
            let renewed = Arc::new(Mutex::new(Instant::now()));
            let (stop, task) = keep_lease(
                lease_db,
                (**connect).clone(),
                token,
                (*heartbeat, *ttl),
                lost.clone(),
                renewed.clone(),
            );
            Ok(Held {
                waited,
                guard,
                lease: Some(LeaseKeeper {
                    stop,
                    task,
                    lost,
                    renewed,
                    heartbeat: *heartbeat,
                    ttl: *ttl,
                }),
            })
        }
    }
}

/// Renews the lease every `heartbeat` until told to stop, then releases it.
fn keep_lease(
    mut db: Db,
    connect: ConnectConfig,
    token: String,
    (heartbeat, ttl): (Duration, Duration),
    lost: Arc<AtomicBool>,
    renewed: Arc<Mutex<Instant>>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(heartbeat) => {}
            }
            // A renewal that hangs (a dead network) must not outlive the heartbeat.
            let attempt = Instant::now();
            let renewal = tokio::time::timeout(
                heartbeat.max(Duration::from_secs(1)),
                db.lease_renew(&token, ttl),
            )
            .await;
            match renewal {
                Ok(Ok(true)) => {
                    last_renewal = Instant::now();
                    *renewed.lock().unwrap_or_else(|e| e.into_inner()) = attempt;
                }
                Ok(Ok(false)) => {
                    lost.store(true, Ordering::SeqCst);
                    tracing::error!(
                        "the migration lease was taken over by another runner; no further step will start"
                    );
                    break;
                }
                // Our own running step holds the lease row; it renews the lease when it
                // commits, and nobody can take it over meanwhile.
                Ok(Err(e)) if e.message == super::dialect::LEASE_BUSY => {}
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer".to_string(),
                    };
                    tracing::warn!(error = %why, "could not renew the migration lease; retrying");
                    if last_renewal.elapsed() >= ttl {
                        lost.store(true, Ordering::SeqCst);
                        tracing::error!(
                            "the migration lease expired before it could be renewed; no further step will start"
                        );
                    }
                    // The connection may be gone: start a new one for the next attempt.
                    if let Ok(Ok(fresh)) =
                        tokio::time::timeout(heartbeat, Db::connect(&connect)).await
                    {
                        std::mem::replace(&mut db, fresh).close().await;
                    }
                }
            }
        }
        if !lost.load(Ordering::SeqCst) {
            match tokio::time::timeout(
                heartbeat.max(Duration::from_secs(1)),
                db.lease_release(&token),
            )
            .await
            {
                Ok(Ok(())) => {}
                _ => tracing::warn!("could not release the migration lease; it expires on its own"),
            }
        }
        db.close().await;
    });
    (stop, task)
}

/// Releases the lock.
pub async fn release(db: &mut impl Backend, held: Held) {
    match held.lease {
        None => {
            if let Err(e) = db.unlock().await {
                // Closing the connection releases it anyway; say so rather than fail the run.
                tracing::warn!(error = %e, "could not release the migration lock; it is released when the connection closes");
            }
        }
        Some(keeper) => {
            let _ = keeper.stop.send(());
            let _ = keeper.task.await;
        }
    }
}

/// Who holds the lock of `mode` now, as far as the database can tell.
pub async fn holder(db: &mut impl Backend, mode: &LockMode) -> Option<LockHolder> {
    match mode {
        LockMode::Session => db.lock_holder().await.ok().flatten(),
        LockMode::Lease { .. } => db.lease_holder().await.ok().flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique() {
        let a = lease_token("pod/1");
        let b = lease_token("pod/1");
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let f = j.factor();
            assert!((0.8..1.2).contains(&f));
        }
    }
}
