//! One identity provider's signals and an enforcement point's grants, as the evaluation tests
//! write them: the SET claims of its events, the grants' JSON, and [`Env`] steps that push,
//! register and wait for a grant's status.

use serde_json::{json, Value};
use vigil::jose::Alg;

use super::{
    encode, enforcement_point, eventually, get_json, post_json, push, start, test_config, Env,
    Transmitter,
};

pub const ISS: &str = "https://idp.example.com/123456789/";
pub const AUD: &str = "https://sp.example.com/caep";
pub const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
pub const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";

/// Now, in seconds (the wall clock: Vigil's event-time window is checked against it).
pub fn now() -> f64 {
    vigil::signal::now_ms() as f64 / 1000.0
}

pub fn email(e: &str) -> Value {
    json!({"format": "email", "email": e})
}

/// An hour-long session held by `api-gateway`.
pub fn grant(id: &str, subject: Value, issued_at: f64) -> Value {
    json!({
        "id": id, "kind": "session", "subject": subject,
        "issued_at": issued_at, "expires_at": issued_at + 3600.0,
        "enforcement_points": ["api-gateway"]
    })
}

/// A SET from [`ISS`] to [`AUD`] carrying one event.
pub fn set(jti: &str, sub_id: Value, event: &str, payload: Value) -> Value {
    json!({"iss": ISS, "aud": AUD, "jti": jti, "iat": now() as i64, "sub_id": sub_id,
           "events": {event: payload}})
}

/// A CAEP risk-level-change payload.
pub fn risk(level: &str, at: f64) -> Value {
    json!({"principal": "USER", "current_level": level, "risk_reason": "impossible travel", "event_timestamp": at})
}

/// A Vigil whose one transmitter (`idp`, stream `idp`) signs as [`ISS`] for [`AUD`], and whose one
/// enforcement point is `api-gateway`; `edit` adjusts the configuration before it starts.
pub async fn start_env(edit: impl FnOnce(&mut vigil::Config)) -> Env {
    let tx = Transmitter::start(&[Alg::RS256]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), vec![tx.config("idp", ISS, &[AUD])]);
    config.enforcement_points = vec![enforcement_point(
        "api-gateway",
        "api-gateway-token-0123456789",
    )];
    edit(&mut config);
    let vigil = start(config.clone()).await;
    Env {
        tx,
        vigil,
        config,
        _dir: dir,
    }
}

impl Env {
    /// Signs `claims` with the transmitter's RS256 key and pushes them to the `idp` stream (202).
    pub async fn push(&self, claims: &Value) {
        let token = self.tx.key(Alg::RS256).sign_set(claims).unwrap();
        let answer = push(&self.vigil, "idp", &token).await;
        assert_eq!(answer.status, 202, "{answer:?}");
    }

    /// Registers a grant (201) and returns the answer.
    pub async fn register(&self, body: &Value) -> Value {
        let (status, reply) = post_json(&self.vigil, "/v1/grants", body).await;
        assert_eq!(status, 201, "{reply}");
        reply
    }

    pub async fn status(&self, id: &str) -> String {
        let (code, g) = get_json(&self.vigil, &format!("/v1/grants/{}", encode(id))).await;
        assert_eq!(code, 200, "{g}");
        g["status"].as_str().unwrap().to_owned()
    }

    pub async fn wait_status(&self, id: &str, status: &str) {
        eventually(&format!("{id} to become {status}"), || async {
            let (_, g) = get_json(&self.vigil, &format!("/v1/grants/{}", encode(id))).await;
            (g["status"] == status).then_some(())
        })
        .await
    }
}
