//! The README's demo command runs end to end: IdP stream created and verified, four signals (three
//! pushed SETs, one Kafka message) each decided and each revocation verified at the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn the_demo_tells_the_whole_story() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("created push stream"), "{stdout}");
    assert!(stdout.contains("consumer group reads"), "{stdout}");
    assert_eq!(stdout.matches("  decide  revoke").count(), 4, "{stdout}");
    assert_eq!(
        stdout
            .matches("gateway verified a signed CAEP session-revoked SET")
            .count(),
        4,
        "{stdout}"
    );
    for rule in ["risk-high", "device-not-compliant", "account-disabled"] {
        assert!(stdout.contains(rule), "{rule}: {stdout}");
    }
    assert!(stdout.contains("feed:fraud-engine"), "{stdout}");
}
