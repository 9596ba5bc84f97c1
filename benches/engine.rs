//! Criterion benchmarks of the evaluation engine's pure parts:
//! - `engine/context_apply`: folding one CAEP risk-level-change into a principal's context;
//! - `engine/evaluate_grant`: building the policy inputs and running the default policy set
//!   (14 rules) for one session grant, as a signal triggers it;
//! - `engine/kafka_normalize`: turning one native-format Kafka risk message (bytes) into a signal;
//! - `engine/evaluate_all_100k`: one evaluation pass over 100 000 grants on all cores (the work of a
//!   policy swap, without the store).
//!
//! Run: `cargo bench --bench engine`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use vigil::context::{Decay, PrincipalContext};
use vigil::evaluate::testing::signal_from_claims;
use vigil::evaluate::{evaluate_grant, Contexts, Trigger, Triggered};
use vigil::grant::{Grant, GrantRequest};
use vigil::policy::PolicySet;
use vigil::principal::Target;

fn grant(i: usize) -> Option<Grant> {
    let req: GrantRequest = serde_json::from_value(json!({
        "id": format!("g{i}"), "kind": "session",
        "subject": {"format": "email", "email": format!("user{}@example.com", i % 10_000)},
        "session": format!("s{i}"), "device": format!("d{}", i % 5000),
        "scopes": ["read", "write"], "issued_at": 1_700_000_000, "expires_at": 1_800_000_000,
        "attributes": {"acr": "AAL2", "amr": ["otp"]}, "enforcement_points": ["gw"]
    }))
    .ok()?;
    let principal = req.identifier_keys().ok()?.remove(0);
    req.into_grant(principal, 1_700_000_000.0).ok()
}

fn bench(c: &mut Criterion) {
    let Ok(policy) = PolicySet::load_dir_or_builtin(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies"
    ))) else {
        return;
    };
    let Ok(signal) = signal_from_claims(
        &json!({"iss": "https://idp.example.com/", "aud": "vigil", "jti": "j1", "iat": 1_700_000_100,
                "sub_id": {"format": "email", "email": "user1@example.com"},
                "events": {"https://schemas.openid.net/secevent/caep/event-type/risk-level-change":
                    {"principal": "USER", "current_level": "MEDIUM", "event_timestamp": 1_700_000_100}}}),
        1,
    ) else {
        return;
    };
    let target = Target::of(&signal.subject);
    let Some(g) = grant(1) else { return };
    let mut ctx = PrincipalContext::new(&g.principal);
    ctx.apply(&signal, &target);

    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    group.bench_function("context_apply", |b| {
        b.iter(|| {
            let mut c = PrincipalContext::new("email:user1@example.com");
            c.apply(&signal, &target)
        })
    });
    let payload = vigil::sim::risk::message(vigil::sim::risk::Pattern::Steady, 7, 1000, 1.7e9)
        .native()
        .to_string()
        .into_bytes();
    let origin = vigil::risk_feed::Origin {
        topic: "vigil.risk",
        partition: 0,
        offset: 7,
        now: 1.7e9,
        received_at_ms: 1_700_000_000_000,
    };
    group.bench_function("kafka_normalize", |b| {
        b.iter(|| vigil::risk_feed::from_native(origin, &payload).is_ok())
    });
    let decay = Decay::default();
    // The signal's policy view is built once per signal, however many grants it re-evaluates.
    let triggered = Triggered::new(&signal, &target);
    group.bench_function("evaluate_grant", |b| {
        b.iter(|| {
            let contexts = Contexts {
                principal: &ctx,
                entities: &[],
                delegator: None,
                view: None,
            };
            evaluate_grant(
                &policy,
                &g,
                contexts,
                Trigger::Signal(&triggered),
                &decay,
                1_700_000_200.0,
            )
        })
    });

    let grants: Vec<Grant> = (0..100_000).filter_map(grant).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    group.throughput(Throughput::Elements(grants.len() as u64));
    group.sample_size(10);
    group.bench_function("evaluate_all_100k", |b| {
        b.iter(|| {
            std::thread::scope(|s| {
                for chunk in grants.chunks(grants.len().div_ceil(threads)) {
                    let (policy, ctx, decay) = (&policy, &ctx, &decay);
                    s.spawn(move || {
                        chunk
                            .iter()
                            .filter(|g| {
                                let contexts = Contexts {
                                    principal: ctx,
                                    entities: &[],
                                    delegator: None,
                                    view: None,
                                };
                                evaluate_grant(
                                    policy,
                                    g,
                                    contexts,
                                    Trigger::State,
                                    decay,
                                    1_700_000_200.0,
                                )
                                .effect
                                .is_some()
                            })
                            .count()
                    });
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
