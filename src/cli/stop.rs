//! Stopping on request: SIGTERM (Kubernetes deleting a pod, a service manager) and SIGINT
//! (Ctrl-C). While an upgrade or downgrade runs its steps, the first request lets the
//! running step finish and be recorded and starts no other; a second one, or a request
//! while nothing is being applied (waiting for the lock, `wait`, reads), stops at once:
//! the connection closes, so the server rolls back what was not committed and releases
//! the session lock. `exec` passes requests on to its command instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::engine::StopRequest;

/// What the signal listener shares with the command that runs.
#[derive(Default)]
pub struct Stopper {
    /// Read by the engine between steps.
    pub request: Arc<StopRequest>,
    /// Woken when the command must end at once.
    now: Notify,
    /// The signal that asked last.
    signal: OnceLock<&'static str>,
    /// `exec` is running a command and handles signals itself.
    command: AtomicBool,
    /// The stop at once cut a run between its first and last step.
    cut: AtomicBool,
}

static STOPPER: OnceLock<Arc<Stopper>> = OnceLock::new();

/// Starts listening for SIGTERM and SIGINT (once per process; needs the runtime).
pub fn listen() -> Arc<Stopper> {
    STOPPER
        .get_or_init(|| {
            let stopper = Arc::new(Stopper::default());
            // Registered before returning, so no request is missed (or kills the process).
            if let (Ok(term), Ok(int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::spawn(serve(stopper.clone(), term, int));
            }
            stopper
        })
        .clone()
}

/// The listener's state, if it was started.
pub fn current() -> Option<Arc<Stopper>> {
    STOPPER.get().cloned()
}

async fn serve(
    stopper: Arc<Stopper>,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    loop {
        let name = tokio::select! {
            Some(()) = term.recv() => "SIGTERM",
            Some(()) = int.recv() => "SIGINT",
            else => return,
        };
        let _ = stopper.signal.set(name);
        if stopper.command.load(Ordering::SeqCst) {
            continue;
        }
        let graceful = stopper.request.busy() && !stopper.request.requested();
        stopper.request.request();
        if graceful {
            tracing::warn!(
                signal = name,
                "asked to stop: finishing the running step, then stopping (ask again to stop at \
                 once: the step is then rolled back, or recorded dirty if it runs outside a \
                 transaction)"
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

    /// The signal that asked to stop.
    pub fn signal(&self) -> &'static str {
        self.signal.get().copied().unwrap_or("a signal")
    }

    /// While the guard lives, requests are left to the caller (`exec` passes them on).
    pub fn command_section(&self) -> CommandSection<'_> {
        self.command.store(true, Ordering::SeqCst);
        CommandSection(self)
    }
}

pub struct CommandSection<'a>(&'a Stopper);

impl Drop for CommandSection<'_> {
    fn drop(&mut self) {
        self.0.command.store(false, Ordering::SeqCst);
    }
}
