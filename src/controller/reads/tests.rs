use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use super::*;
use crate::controller::decide::{DbFailure, DbFailureKind, DbRead};

const LONG: Duration = Duration::from_secs(3600);

fn key(url: &str) -> ReadKey {
    ReadKey::new(url, "schemagate_history", Some("abc"))
}

fn at(version: &str) -> DbView {
    DbView::Read(Box::new(DbRead {
        current: Some(version.into()),
        ..Default::default()
    }))
}

fn failed(kind: DbFailureKind) -> DbView {
    DbView::Failed(DbFailure::new(kind, "no"))
}

/// A read that counts itself and answers `view`.
async fn counted(reads: &AtomicUsize, view: DbView) -> DbView {
    reads.fetch_add(1, Ordering::SeqCst);
    view
}

/// Lets every spawned task run until it waits (the test runtime has one thread).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn callers_that_arrive_during_a_read_share_it() {
    let shared = Arc::new(SharedReads::default());
    let reads = Arc::new(AtomicUsize::new(0));
    let (release, gate) = oneshot::channel::<()>();
    let first = {
        let (shared, reads) = (shared.clone(), reads.clone());
        tokio::spawn(async move {
            shared
                .read(key("pg://a"), LONG, false, async {
                    reads.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.await;
                    at("2")
                })
                .await
        })
    };
    settle().await;
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let (shared, reads) = (shared.clone(), reads.clone());
            tokio::spawn(async move {
                shared
                    .read(key("pg://a"), LONG, false, counted(&reads, at("1")))
                    .await
            })
        })
        .collect();
    settle().await;
    assert_eq!(reads.load(Ordering::SeqCst), 1, "one read in flight");
    release.send(()).unwrap();
    assert_eq!(first.await.unwrap(), at("2"));
    for w in waiters {
        assert_eq!(w.await.unwrap(), at("2"), "the waiters got the shared read");
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_read_is_reused_until_it_expires_and_never_for_a_fresh_caller() {
    let shared = SharedReads::default();
    let reads = AtomicUsize::new(0);
    let k = key("pg://a");
    assert_eq!(
        shared
            .read(k.clone(), LONG, false, counted(&reads, at("1")))
            .await,
        at("1")
    );
    assert_eq!(
        shared
            .read(k.clone(), LONG, false, counted(&reads, at("2")))
            .await,
        at("1"),
        "reused within the time to live"
    );
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    assert_eq!(
        shared
            .read(k.clone(), LONG, true, counted(&reads, at("2")))
            .await,
        at("2"),
        "a caller that saw a run finish reads again"
    );
    assert_eq!(
        shared
            .read(k.clone(), LONG, false, counted(&reads, at("3")))
            .await,
        at("2"),
        "and the others get its newer result"
    );
    assert_eq!(
        shared
            .read(k.clone(), Duration::ZERO, false, counted(&reads, at("3")))
            .await,
        at("3"),
        "expired"
    );
    assert_eq!(reads.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_fresh_caller_takes_a_read_that_began_after_it_asked() {
    let shared = Arc::new(SharedReads::default());
    let reads = Arc::new(AtomicUsize::new(0));
    let (release, gate) = oneshot::channel::<()>();
    let spawn_read = |view: DbView, gate: Option<oneshot::Receiver<()>>| {
        let (shared, reads) = (shared.clone(), reads.clone());
        tokio::spawn(async move {
            shared
                .read(key("pg://a"), LONG, true, async {
                    reads.fetch_add(1, Ordering::SeqCst);
                    if let Some(gate) = gate {
                        let _ = gate.await;
                    }
                    view
                })
                .await
        })
    };
    // One read in flight; then two fresh callers: the first must read again (the read in
    // flight began before it asked), the second takes that new read.
    let old = spawn_read(at("1"), Some(gate));
    settle().await;
    let b = spawn_read(at("2"), None);
    settle().await;
    let c = spawn_read(at("3"), None);
    settle().await;
    release.send(()).unwrap();
    assert_eq!(old.await.unwrap(), at("1"));
    assert_eq!(b.await.unwrap(), at("2"));
    assert_eq!(c.await.unwrap(), at("2"));
    assert_eq!(reads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn transient_failures_are_not_reused_permanent_ones_are() {
    let shared = SharedReads::default();
    let reads = AtomicUsize::new(0);
    let (a, b) = (key("pg://down"), key("pg://wrong-password"));
    let down = failed(DbFailureKind::Unreachable);
    let refused = failed(DbFailureKind::Auth);
    shared
        .read(a.clone(), LONG, false, counted(&reads, down.clone()))
        .await;
    assert_eq!(
        shared.read(a, LONG, false, counted(&reads, at("1"))).await,
        at("1"),
        "read again after a transient failure"
    );
    shared
        .read(b.clone(), LONG, false, counted(&reads, refused.clone()))
        .await;
    assert_eq!(
        shared.read(b, LONG, false, counted(&reads, at("1"))).await,
        refused
    );
    assert_eq!(reads.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn keys_separate_databases_tables_and_sources_and_expired_ones_go() {
    assert_ne!(
        ReadKey::new("pg://a", "h", Some("s")),
        ReadKey::new("pg://b", "h", Some("s"))
    );
    assert_ne!(
        ReadKey::new("pg://a", "h", Some("s")),
        ReadKey::new("pg://a", "other", Some("s"))
    );
    assert_ne!(
        ReadKey::new("pg://a", "h", Some("s")),
        ReadKey::new("pg://a", "h", Some("t"))
    );
    assert!(
        !format!("{:?}", ReadKey::new("pg://u:hunter22@a/db", "h", None)).contains("hunter22"),
        "the key holds no password"
    );
    let shared = SharedReads::default();
    let reads = AtomicUsize::new(0);
    for url in ["pg://a", "pg://b", "pg://c"] {
        shared
            .read(key(url), Duration::ZERO, false, counted(&reads, at("1")))
            .await;
    }
    assert_eq!(
        shared.len(),
        1,
        "expired results are dropped as new keys come"
    );
    shared
        .read(key("pg://d"), LONG, false, counted(&reads, at("1")))
        .await;
    shared
        .read(key("pg://e"), LONG, false, counted(&reads, at("1")))
        .await;
    assert_eq!(shared.len(), 3, "live ones stay");
}
