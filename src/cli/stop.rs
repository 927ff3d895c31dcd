//! Stopping on request: SIGTERM (Kubernetes deleting a pod, a service manager) and SIGINT
//! (Ctrl-C). While an upgrade or downgrade runs its steps, the first request lets the
//! running step finish and be recorded and starts no other; a second one, or a request
//! while nothing is being applied (waiting for the lock, `wait`, reads), stops at once:
//! the connection closes, so the server rolls back what was not committed once it notices
//! and frees the session lock (a lease expires). `exec` passes requests on to its command
//! instead, and the end of a run (releasing the lock, reporting) is never cut short.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Notify;

use crate::engine::StopRequest;

/// What the signal listener shares with the command that runs.
#[derive(Default)]
pub struct Stopper {
    /// Read by the engine between steps; it records what the run applied.
    pub request: Arc<StopRequest>,
    /// Woken when the command must end at once.
    now: Notify,
    /// The first signal that asked.
    signal: OnceLock<&'static str>,
    /// Requests are left to the code that runs (`exec`, the end of a run).
    shielded: AtomicBool,
    /// The stop at once cut a run between its first and last step.
    cut: AtomicBool,
}

static STOPPER: OnceLock<Arc<Stopper>> = OnceLock::new();

/// Watches a signal (`None` if it cannot be watched).
pub fn stop_signal(kind: SignalKind) -> Option<Signal> {
    signal(kind).ok()
}

/// The next delivery of a signal (never, if it is not watched).
pub async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Starts listening for SIGTERM and SIGINT (once per process; needs the runtime).
pub fn listen() -> Arc<Stopper> {
    STOPPER
        .get_or_init(|| {
            let stopper = Arc::new(Stopper::default());
            // Registered before returning, so no request is missed (or kills the process).
            let term = stop_signal(SignalKind::terminate());
            let int = stop_signal(SignalKind::interrupt());
            tokio::spawn(serve(stopper.clone(), term, int));
            stopper
        })
        .clone()
}

/// The listener's state, if it was started.
pub fn current() -> Option<Arc<Stopper>> {
    STOPPER.get().cloned()
}

async fn serve(stopper: Arc<Stopper>, mut term: Option<Signal>, mut int: Option<Signal>) {
    loop {
        let name = tokio::select! {
            () = recv(&mut term) => "SIGTERM",
            () = recv(&mut int) => "SIGINT",
        };
        let _ = stopper.signal.set(name);
        if stopper.shielded.load(Ordering::SeqCst) {
            continue;
        }
        let graceful = stopper.request.busy() && !stopper.request.requested();
        stopper.request.request();
        if graceful {
            tracing::warn!(
                signal = name,
                "asked to stop: finishing the running step, then stopping (ask again to stop at \
                 once: the step is then rolled back, or recorded unfinished if it runs outside \
                 a transaction)"
            );
        } else {
            stopper.cut.store(stopper.request.busy(), Ordering::SeqCst);
            stopper.now.notify_one();
        }
    }
}

impl Stopper {
    /// Resolves when the command must end at once.
    pub async fn now(&self) {
        self.now.notified().await
    }

    /// True if the stop at once came while a run was applying steps.
    pub fn cut_a_run(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// The (first) signal that asked to stop.
    pub fn signal(&self) -> &'static str {
        self.signal.get().copied().unwrap_or("a signal")
    }

    /// While the guard lives, requests are left to the caller (`exec` passes them on; the
    /// end of a run finishes).
    pub fn shield(&self) -> Shield<'_> {
        self.shielded.store(true, Ordering::SeqCst);
        Shield(self)
    }
}

pub struct Shield<'a>(&'a Stopper);

impl Drop for Shield<'_> {
    fn drop(&mut self) {
        self.0.shielded.store(false, Ordering::SeqCst);
    }
}
