//! Criterion benchmarks of the receiver's CPU path per SET, without HTTP or storage:
//! - `jws_verify/<alg>`: compact-JWS parse + header checks + signature verification;
//! - `set_validate/<alg>`: the above plus claim validation and typed event/subject parsing
//!   (everything `Receiver::receive` does before it writes).
//!
//! Run: `cargo bench --bench verify`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::Value;
use vigil::jose::{self, Alg};
use vigil::jwks::KeySet;
use vigil::set::{self, SetRules};
use vigil::sim::{jwks_document, SigningKey};

fn example() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/spec-examples/caep-session-revoked-2-complex-session-user-tenant.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn bench(c: &mut Criterion) {
    let set_json = example();
    let issuer = set_json["iss"].as_str().unwrap_or_default().to_owned();
    let audiences = vec![set_json["aud"].as_str().unwrap_or_default().to_owned()];
    let rules = SetRules {
        issuer: &issuer,
        audiences: &audiences,
        legacy_subjects: true,
        tolerate: vigil::config::Tolerate::default(),
    };
    for alg in [Alg::RS256, Alg::ES256, Alg::PS256, Alg::EdDSA] {
        let Ok(key) = SigningKey::generate(alg, "bench") else {
            continue;
        };
        let (Ok(public), Ok(token)) = (key.public_jwk(), key.sign_set(&set_json)) else {
            continue;
        };
        let doc = jwks_document(&[public]);
        let Ok(keys) = KeySet::from_jwks_json(doc.to_string().as_bytes(), &[alg]) else {
            continue;
        };
        let mut group = c.benchmark_group("receiver");
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("jws_verify/{alg}"), |b| {
            b.iter(|| {
                let jws = jose::parse_compact(&token, &[alg]).map_err(|e| e.to_string());
                jws.and_then(|j| keys.verify(&j).map_err(|e| e.to_string()))
            })
        });
        group.bench_function(format!("set_validate/{alg}"), |b| {
            b.iter(|| {
                let jws = jose::parse_compact(&token, &[alg]).map_err(|e| e.to_string())?;
                keys.verify(&jws).map_err(|e| e.to_string())?;
                set::validate_claims(&jws.payload, rules).map_err(|e| e.to_string())
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
