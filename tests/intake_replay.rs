//! Restart replays what intake recorded but the next stage had not processed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use vigil::intake::{Intake, RecordOutcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_signals_are_replayed_on_start_and_then_marked_processed() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Simulate a crash between the durable record (202 sent) and processing.
        let (intake, writer) = Intake::open_dir(dir.path(), 16).unwrap();
        for jti in ["p1", "p2", "p3"] {
            assert!(matches!(
                intake.record(&recorded_signal(jti), "raw").await.unwrap(),
                RecordOutcome::Recorded(_)
            ));
        }
        assert_eq!(intake.pending().unwrap().len(), 3);
        drop(intake);
        writer.join();
    }
    let vigil = start(test_config(dir.path(), vec![])).await;
    eventually("pending signals to be replayed", || async {
        vigil.intake().pending().unwrap().is_empty().then_some(())
    })
    .await;
    assert_eq!(
        vigil.intake().stored_count().unwrap(),
        3,
        "replay does not duplicate records"
    );
    let (_, metrics) = get(&vigil, "/metrics").await;
    assert!(
        metrics.contains("vigil_signals_replayed_total 3"),
        "{metrics}"
    );
    vigil.shutdown().await;

    // Nothing is pending after a clean restart.
    let vigil = start(test_config(dir.path(), vec![])).await;
    assert!(vigil.intake().pending().unwrap().is_empty());
    vigil.shutdown().await;
}
