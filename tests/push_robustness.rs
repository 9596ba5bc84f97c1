//! No input panics the receiver: random bodies, mutated tokens and validly signed SETs with random
//! claims all get a 202, 400 or 413 — never a 5xx, never a dropped connection — and the server keeps
//! accepting good SETs afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::{json, Value};
use vigil::jose::Alg;

const ISS: &str = "https://idp.example.com/123456789/";
const AUD: &str = "https://sp.example.com/caep";

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[a-zA-Z0-9_:/.@+-]{0,16}".prop_map(Value::from),
        Just(json!(ISS)),
        Just(json!(AUD)),
        Just(json!("complex")),
        Just(json!("email")),
        Just(json!(
            "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
        )),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            btree_map(
                prop_oneof![
                    "[a-z_-]{1,10}",
                    Just("format".to_owned()),
                    Just("user".to_owned()),
                    Just("email".to_owned()),
                    Just("identifiers".to_owned()),
                    Just("state".to_owned()),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Spec-example claims with one member (at the top, in the event payload or in `sub_id`) replaced.
fn arb_claims() -> impl Strategy<Value = Value> {
    let examples = [
        "caep-session-revoked-2-complex-session-user-tenant.json",
        "caep-credential-change.json",
        "caep-risk-level-change.json",
        "caep-assurance-level-change.json",
        "risc-account-disabled.json",
        "ssf-stream-updated.json",
        "ssf-verification.json",
    ];
    let targets = [
        "iss",
        "aud",
        "jti",
        "iat",
        "txn",
        "toe",
        "sub",
        "exp",
        "events",
        "sub_id",
        "@event",
        "@event.x",
        "@sub_id.format",
        "@sub_id.user",
    ];
    (0..examples.len(), 0..targets.len(), arb_json()).prop_map(move |(e, t, value)| {
        let mut set = spec_example(examples[e]);
        set["iss"] = json!(ISS);
        set["aud"] = json!(AUD);
        let uri = set["events"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        match targets[t] {
            "@event" => set["events"][&uri] = value,
            "@event.x" => {
                if let Some(obj) = set["events"][&uri].as_object_mut() {
                    let field = obj.keys().next().cloned().unwrap_or_else(|| "x".into());
                    obj.insert(field, value);
                }
            }
            "@sub_id.format" => set["sub_id"]["format"] = value,
            "@sub_id.user" => set["sub_id"]["user"] = value,
            top => set[top] = value,
        }
        set
    })
}

#[derive(Debug, Clone)]
enum Input {
    Bytes(Vec<u8>),
    Mutated {
        flips: Vec<(usize, u8)>,
        cut: Option<usize>,
    },
    Claims(Value),
    Header(Value),
}

fn arb_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        vec(any::<u8>(), 0..512).prop_map(Input::Bytes),
        (
            vec((any::<usize>(), any::<u8>()), 1..4),
            proptest::option::of(any::<usize>())
        )
            .prop_map(|(flips, cut)| Input::Mutated { flips, cut }),
        arb_claims().prop_map(Input::Claims),
        arb_json().prop_map(|v| Input::Header(
            json!({"typ": "secevent+jwt", "alg": "RS256", "kid": "key-RS256", "x": v})
        )),
        arb_json()
            .prop_map(|v| Input::Header(json!({"typ": v, "alg": "RS256", "kid": "key-RS256"}))),
        arb_json().prop_map(|v| Input::Header(
            json!({"typ": "secevent+jwt", "alg": v, "kid": "key-RS256"})
        )),
        arb_json()
            .prop_map(|v| Input::Header(json!({"typ": "secevent+jwt", "alg": "RS256", "kid": v}))),
    ]
}

#[test]
fn no_input_panics_or_breaks_the_receiver() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, vigil) = rt.block_on(async {
        let tx = Transmitter::start(&[Alg::RS256]).await;
        let vigil = start(test_config(dir.path(), vec![tx.config("fz", ISS, &[AUD])])).await;
        (tx, vigil)
    });
    let key = tx.key(Alg::RS256);
    let mut good = spec_example("caep-session-revoked.json");
    good["jti"] = json!("fuzz-baseline");
    let valid = key.sign_set(&good).unwrap();

    let mut runner = TestRunner::new(PropConfig {
        cases: 1500,
        failure_persistence: None,
        ..PropConfig::default()
    });
    runner
        .run(&arb_input(), |input| {
            let body: Vec<u8> = match &input {
                Input::Bytes(b) => b.clone(),
                Input::Mutated { flips, cut } => {
                    let mut b = valid.clone().into_bytes();
                    for (pos, byte) in flips {
                        let i = pos % b.len();
                        b[i] = *byte;
                    }
                    if let Some(c) = cut {
                        b.truncate(c % (b.len() + 1));
                    }
                    b
                }
                Input::Claims(claims) => key.sign_set(claims).unwrap().into_bytes(),
                Input::Header(header) => key
                    .sign_raw(header, &serde_json::to_vec(&good).unwrap())
                    .unwrap()
                    .into_bytes(),
            };
            let answer = rt.block_on(push_raw(
                &vigil,
                "fz",
                Some(&format!("{AUTH}-fz")),
                "application/secevent+jwt",
                body,
            ));
            prop_assert!(
                matches!(answer.status, 202 | 400 | 413),
                "{input:?} -> {answer:?}"
            );
            if answer.status != 202 {
                prop_assert!(answer.err().is_some(), "{input:?} -> {answer:?}");
            }
            Ok(())
        })
        .unwrap();

    rt.block_on(async {
        assert_eq!(get(&vigil, "/healthz").await.0, 200);
        assert_eq!(
            push(&vigil, "fz", &valid).await.status,
            202,
            "still accepting after the fuzzing"
        );
        vigil.shutdown().await;
    });
}
