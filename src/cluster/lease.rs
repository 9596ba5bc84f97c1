//! Work that must run on exactly one instance at a time — a stream Vigil keeps at a transmitter:
//! its management calls, verification schedule and poll loop. The instance that owns a key's
//! partition runs it; when the partition moves (the instance died, left, or the group rebalanced)
//! the task is stopped here and started by the new owner. Between the two — at most the group's
//! session timeout after a crash — it runs nowhere; it never runs on two instances at once for
//! longer than a rebalance takes to reach the one giving the partition up.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Ownership;
use crate::kafka::KafkaHealth;

/// How often ownership is looked at besides the rebalances' wake-ups.
const RECHECK: Duration = Duration::from_secs(1);

/// Runs `task` while this instance owns `key`'s partition, until `shutdown`. `task` is given a
/// stop signal of its own (set when the partition moves away, or at shutdown) and is started
/// again whenever the partition comes back — or ends by itself while owned.
pub async fn while_owned<F, Fut>(
    key: String,
    ownership: Arc<Ownership>,
    health: Arc<KafkaHealth>,
    mut shutdown: watch::Receiver<bool>,
    task: F,
) where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        while ownership.check(&key).is_err() {
            tokio::select! {
                _ = health.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
        tracing::info!(%key, "owned here: started");
        let (stop, stopped) = watch::channel(false);
        let run = task(stopped);
        tokio::pin!(run);
        loop {
            tokio::select! {
                () = &mut run => break,
                _ = health.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = shutdown.changed() => {
                    let _ = stop.send(true);
                    run.await;
                    return;
                }
            }
            if ownership.check(&key).is_err() {
                tracing::info!(%key, "no longer owned here: stopped");
                let _ = stop.send(true);
                (&mut run).await;
                break;
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The task runs only while the key's partition is owned: started when it is assigned,
    /// stopped when it is revoked, started again when it comes back; and it stops at shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_task_runs_where_its_partition_is_owned() {
        let health = Arc::new(KafkaHealth::for_cluster());
        let ownership = Arc::new(Ownership::new(6, health.clone()));
        let key = "transmitter:idp".to_owned();
        let partition = super::super::partition_of(&key, 6);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (started, running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, r) = (started.clone(), running.clone());
        let lease = tokio::spawn(while_owned(
            key,
            ownership,
            health.clone(),
            shutdown,
            move |mut stop| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = stop.wait_for(|stop| *stop).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                }
            },
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(started.load(Ordering::SeqCst), 0, "not owned: not run");
        health.rebalanced(std::iter::once(partition), true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        health.rebalanced(std::iter::once(partition), false);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(running.load(Ordering::SeqCst), 0, "moved away: stopped");
        health.rebalanced(std::iter::once(partition), true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            (
                started.load(Ordering::SeqCst),
                running.load(Ordering::SeqCst)
            ),
            (2, 1),
            "back: started again"
        );
        shutdown_tx.send(true).unwrap();
        lease.await.unwrap();
        assert_eq!(running.load(Ordering::SeqCst), 0, "stopped at shutdown");
    }
}
