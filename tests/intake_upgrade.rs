//! Upgrade: intake's tables move out of the state store into intake's own file, and what was
//! pending there is replayed. (Its own binary: the replay counter is process-wide.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use vigil::intake::{Intake, RecordOutcome};

/// An earlier release kept intake's tables in the state store (`vigil.redb`). SETs it acknowledged
/// but had not processed are moved to `intake.redb` at start-up and replayed; the old tables are
/// gone afterwards, and the sequence counter goes on past the moved records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_pending_in_an_earlier_releases_state_store_are_moved_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = vigil::store::open(dir.path()).unwrap();
        let (batch, writer) = vigil::store::BatchWriter::start(db.clone(), "state", 16).unwrap();
        let intake = Intake::open(db, batch).unwrap();
        for jti in ["old-1", "old-2"] {
            assert!(matches!(
                intake.record(&recorded_signal(jti), "raw").await.unwrap(),
                RecordOutcome::Recorded(_)
            ));
        }
        intake.mark_processed(vec![1]).await.unwrap();
        intake
            .expect_verification_state("replay", "st-1")
            .await
            .unwrap();
        drop(intake);
        writer.join();
    }
    let vigil = start(test_config(dir.path(), vec![])).await;
    eventually("the moved signal to be replayed", || async {
        vigil.intake().pending().unwrap().is_empty().then_some(())
    })
    .await;
    let intake = vigil.intake();
    assert_eq!(intake.stored_count().unwrap(), 2);
    assert_eq!(
        intake
            .lookup_jti("https://idp.example.com/", "old-2")
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        intake.expected_verification_states("replay").unwrap(),
        ["st-1"]
    );
    assert_eq!(
        intake
            .record(&recorded_signal("old-1"), "raw")
            .await
            .unwrap(),
        RecordOutcome::Duplicate(1),
        "a redelivery of a moved SET is still a duplicate"
    );
    assert_eq!(
        intake
            .record(&recorded_signal("new-1"), "raw")
            .await
            .unwrap(),
        RecordOutcome::Recorded(3)
    );
    let left: Vec<String> = {
        use redb::TableHandle;
        let txn = vigil.store().begin_read().unwrap();
        txn.list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .filter(|n| n.starts_with("intake_"))
            .collect()
    };
    assert!(left.is_empty(), "old intake tables left: {left:?}");
    vigil.shutdown().await;
}
