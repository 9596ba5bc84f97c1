//! Restart replays what intake recorded but the next stage had not processed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use vigil::events::{Event, SessionRevoked};
use vigil::intake::{Intake, RecordOutcome};
use vigil::signal::{Signal, SignalSource};
use vigil::subject::SubjectId;

fn signal(jti: &str) -> Signal {
    Signal {
        seq: 0,
        source: SignalSource::SsfPush {
            transmitter: "t".into(),
            stream: "replay".into(),
        },
        iss: "https://idp.example.com/".into(),
        jti: jti.into(),
        txn: Some("txn-1".into()),
        event_uri: "https://schemas.openid.net/secevent/caep/event-type/session-revoked".into(),
        event: Event::SessionRevoked(SessionRevoked::default()),
        subject: SubjectId::Email {
            email: "a@example.com".into(),
        },
        event_time: 1_700_000_000.0,
        iat: 1_700_000_001.0,
        received_at_ms: 1_700_000_001_000,
        attributes: Default::default(),
        ttl_secs: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_signals_are_replayed_on_start_and_then_marked_processed() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Simulate a crash between the durable record (202 sent) and processing.
        let (intake, writer) = Intake::open_dir(dir.path(), 16).unwrap();
        for jti in ["p1", "p2", "p3"] {
            assert!(matches!(
                intake.record(&signal(jti), "raw").await.unwrap(),
                RecordOutcome::Recorded(_)
            ));
        }
        assert_eq!(intake.pending().unwrap().len(), 3);
        drop(intake);
        writer.join();
    }
    let vigil = start(test_config(dir.path(), vec![])).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vigil.intake().pending().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "pending signals were not replayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
