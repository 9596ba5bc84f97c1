//! Kafka risk messages: the native format and a configured foreign-format mapping, on arbitrary
//! payloads. Normalization never panics (a bad message is an error that goes to the dead letters).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::risk_feed::{from_mapped, from_native, Origin};
use vigil::sim::risk::fraud_engine_mapping;

fuzz_target!(|data: &[u8]| {
    let origin = Origin {
        topic: "vigil.risk",
        partition: 0,
        offset: 42,
        now: 1_700_000_000.0,
        received_at_ms: 1_700_000_000_000,
    };
    let _ = from_native(origin, data);
    let mapping = fraud_engine_mapping("fraud.scores");
    let _ = from_mapped(&mapping, origin, data);
});
