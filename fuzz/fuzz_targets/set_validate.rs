//! The SET path before any key is involved: compact JWS parsing and header rules on arbitrary text,
//! then the SSF SET claim rules (RFC 8417 as SSF 1.0 restricts them), typed events and subjects on
//! arbitrary payload bytes. Neither may panic; whatever is accepted must be internally consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::jose::{parse_compact, Alg};
use vigil::set::{validate_claims, SetRules, Tolerate};

const ALGS: [Alg; 4] = [Alg::RS256, Alg::PS256, Alg::ES256, Alg::EdDSA];

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = parse_compact(token, &ALGS);
    }
    let audiences = ["https://vigil.example.com/".to_owned()];
    // Spec-exact, and every deviation a transmitter may be allowed (`[transmitters.tolerate]`).
    let lenient = Tolerate {
        millisecond_timestamps: true,
        revoked_change_type: true,
        legacy_risc: true,
        late_verification: true,
    };
    for (legacy_subjects, tolerate) in [(false, Tolerate::default()), (true, lenient)] {
        let rules = SetRules {
            issuer: "https://idp.example.com/",
            audiences: &audiences,
            legacy_subjects,
            tolerate,
        };
        if let Ok(set) = validate_claims(data, rules) {
            assert_eq!(set.iss, "https://idp.example.com/");
            assert!(!set.jti.is_empty());
        }
    }
});
