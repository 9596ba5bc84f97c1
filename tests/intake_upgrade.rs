//! Upgrade: intake's tables move out of the state store into intake's log and file, and what was
//! pending there is replayed. (Its own binary: the replay counter is process-wide.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use vigil::intake::RecordOutcome;

/// An earlier release kept intake's tables in the state store (`vigil.redb`). SETs it acknowledged
/// but had not processed are moved into the intake log at start-up and replayed; the old tables are
/// gone afterwards, and the sequence counter goes on past the moved records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_pending_in_an_earlier_releases_state_store_are_moved_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The earlier release's layout, written as it wrote it.
        let db = vigil::store::open(dir.path()).unwrap();
        vigil::intake::write_legacy_record(&db, 1, &recorded_signal("old-1"), "raw", true).unwrap();
        vigil::intake::write_legacy_record(&db, 2, &recorded_signal("old-2"), "raw", false)
            .unwrap();
        vigil::intake::write_legacy_verification_state(&db, "replay", "st-1").unwrap();
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
    assert_eq!(vigil.intake().get(1).unwrap().unwrap().1, "raw");
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
