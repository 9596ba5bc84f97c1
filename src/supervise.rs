//! Shared background tasks that must outlive any one party's input. A task that serves everyone
//! (push delivery, a transmitter's stream manager or key refresher, the policy watcher) is started
//! through [`spawn`]: if it ends before shutdown — a panic a party's answer provoked — it is
//! counted (`vigil_task_restarts_total{task}`), logged and started again after a pause, instead
//! of silently leaving every party without the service.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a task that ended unexpectedly waits before it is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs `make()`'s future until `shutdown`, starting a new one whenever one ends early.
pub fn spawn<F, Fut>(task: &'static str, shutdown: watch::Receiver<bool>, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut shutdown = shutdown;
        loop {
            let outcome = tokio::spawn(make()).await;
            if *shutdown.borrow() {
                return;
            }
            match outcome {
                Err(e) if e.is_panic() => {
                    tracing::error!(task, "shared task panicked; starting it again")
                }
                _ => tracing::error!(task, "shared task ended before shutdown; starting it again"),
            }
            metrics::counter!(crate::telemetry::TASK_RESTARTS, "task" => task).increment(1);
            tokio::select! {
                _ = tokio::time::sleep(RESTART_PAUSE) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_started_again_until_shutdown() {
        let (stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let handle = spawn("test", shutdown.clone(), move || {
            let runs = counted.clone();
            let mut shutdown = shutdown.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("provoked by a party's input");
                }
                let _ = shutdown.changed().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then it stays up"
        );
        stop.send(true).unwrap();
        handle.await.unwrap();
    }
}
