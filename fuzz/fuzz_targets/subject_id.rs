//! RFC 9493 / SSF subject identifiers (and the legacy dialects) from arbitrary JSON: parsing never
//! panics, and whatever parses survives its own serialization unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::subject::SubjectId;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for legacy in [false, true] {
        if let Ok(id) = SubjectId::from_json(&value, legacy) {
            let again = SubjectId::from_json(&id.to_json(), legacy);
            assert_eq!(again.ok().as_ref(), Some(&id), "round trip of {value}");
        }
    }
});
