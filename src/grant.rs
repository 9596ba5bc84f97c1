//! Active grants: the sessions, tokens and agent delegations enforcement points hold, and the status
//! Vigil decides for each.
//!
//! Invariant: `Revoked` is terminal. A revoked grant stays as a tombstone until it would have expired;
//! no signal, policy change or re-registration with the same id makes it valid again.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::principal::{identifier_key, member_key, principal_keys, Members};
use crate::subject::SubjectId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    Session,
    AccessToken,
    RefreshToken,
    /// An AI agent or workload acting for a user (`on_behalf_of`).
    AgentDelegation,
}

/// What kind of principal holds the grant; policies can treat them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalType {
    #[default]
    Human,
    Workload,
    ServiceAccount,
    Agent,
}

/// A grant's current standing. Ordered: a higher status is a stronger restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    Active,
    Restricted,
    StepUp,
    Revoked,
}

/// Why a grant request is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("invalid grant: {0}")]
    Invalid(String),
}

/// Grant times at or beyond this many seconds since the epoch are refused as ambiguous
/// (milliseconds passed as seconds).
pub const MAX_GRANT_TIME: f64 = 1e11;

/// The body of `POST /v1/grants`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub id: String,
    pub kind: GrantKind,
    /// Who holds the grant (for a delegation: the acting agent). Any RFC 9493 / SSF identifier; an
    /// `aliases` identifier registers all its identifiers as one principal.
    pub subject: Value,
    #[serde(default)]
    pub principal_type: PrincipalType,
    /// For `agent_delegation`: the user the agent acts for.
    #[serde(default)]
    pub on_behalf_of: Option<Value>,
    /// Session, device, tenant, application, group, org_unit: identifier objects or plain strings.
    #[serde(default)]
    pub session: Option<Value>,
    #[serde(default)]
    pub device: Option<Value>,
    #[serde(default)]
    pub tenant: Option<Value>,
    #[serde(default)]
    pub application: Option<Value>,
    #[serde(default)]
    pub group: Option<Value>,
    #[serde(default)]
    pub org_unit: Option<Value>,
    /// For tokens: the JWT `iss` and `jti`, so a CAEP event about this token (`jwt_id`) reaches it.
    #[serde(default)]
    pub token: Option<TokenId>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Seconds since the epoch.
    pub issued_at: f64,
    /// Seconds since the epoch.
    pub expires_at: f64,
    /// acr, amr, ip, claims, required_assurance, …: visible to policy as `grant.attributes`.
    #[serde(default)]
    pub attributes: Map<String, Value>,
    /// Enforcement points holding the grant (who must hear of a revocation).
    #[serde(default)]
    pub enforcement_points: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenId {
    pub iss: String,
    pub jti: String,
}

/// How a grant came to be revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub at: f64,
    pub decision_id: String,
    pub reason: String,
    pub rules: Vec<String>,
}

/// A registered grant.
/// A JSON value held as its compact text. A grant carries its subject and member identifiers
/// only to echo them in the SETs Vigil emits about it; as `Value`s each object was a B-tree
/// whose first leaf allocates 11 slots (640 B for two or three entries), three of them per grant —
/// most of a grant's memory (`cargo bench --bench engine_scale`). Stored and answered as the JSON
/// value itself, so the stored format is unchanged.
#[derive(Debug, Clone)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    pub fn new(value: &Value) -> JsonText {
        // Written straight to text: nothing is parsed.
        JsonText(
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        )
    }

    /// The value (text this type holds is always valid JSON).
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for JsonText {}

impl Default for JsonText {
    fn default() -> JsonText {
        JsonText(RawValue::NULL.to_owned())
    }
}

/// Written as the JSON text it holds, without parsing it again (a grant is serialized for every
/// store write and every API answer).
impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Read from JSON text as the text itself (a stored grant's); from any other source through a
/// value.
impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<JsonText, D::Error> {
        Value::deserialize(d).map(|v| JsonText::new(&v))
    }
}

/// A grant's free-form attributes (`grant.attributes` in policy): most grants have none, so an
/// empty set costs one pointer instead of an inline map. Serialized as the JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes(Option<Box<Map<String, Value>>>);

impl Attributes {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.as_ref().and_then(|m| m.get(name))
    }
}

impl From<Map<String, Value>> for Attributes {
    fn from(map: Map<String, Value>) -> Attributes {
        Attributes((!map.is_empty()).then(|| Box::new(map)))
    }
}

impl Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(map) => map.serialize(s),
            None => Map::new().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Attributes, D::Error> {
        Map::deserialize(d).map(Attributes::from)
    }
}

/// Who made a grant: the API client that registered it (`client:<name>`), or the transmitter or
/// risk-feed topic whose `session-established` event announced it (`transmitter:<name>`,
/// `risk_feed:<topic>`) — the party a grant counts against, so that one party registering without
/// end fills its own quota, not the bound every party shares.
///
/// Two bytes, an index into a process-wide table of names: a grant stays in its size class (a
/// pointer would not). The names come from the configuration (clients, transmitters, topics), so the
/// table stays small; past `u16::MAX` names every new one shares the last index. Held grants are
/// written with the name, never the index, which is only this process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Registrant(u16);

/// The names of [`Registrant`]s: index − 1 → name, and name → index.
#[derive(Default)]
struct RegistrantNames {
    names: Vec<std::sync::Arc<str>>,
    index: std::collections::HashMap<std::sync::Arc<str>, u16>,
}

static REGISTRANTS: std::sync::LazyLock<std::sync::RwLock<RegistrantNames>> =
    std::sync::LazyLock::new(Default::default);

/// A thread's parties of one kind by their configured name ([`Registrant::cached`]).
type PartyCache = std::collections::HashMap<Box<str>, Registrant>;
/// Most names a thread's cache of one kind holds.
const CACHED_PARTIES: usize = 1024;

thread_local! {
    static TRANSMITTERS: std::cell::RefCell<PartyCache> = Default::default();
    static TOPICS: std::cell::RefCell<PartyCache> = Default::default();
}

impl Registrant {
    /// Grants held before registrants were recorded: counted against no quota.
    pub const NONE: Registrant = Registrant(0);

    /// The registrant called `name`.
    pub fn named(name: &str) -> Registrant {
        let known = REGISTRANTS
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .index
            .get(name)
            .copied();
        if let Some(i) = known {
            return Registrant(i);
        }
        let mut table = REGISTRANTS
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = table.index.get(name) {
            return Registrant(*i);
        }
        // Index 0 is `NONE`: the first name is 1.
        let Ok(i) = u16::try_from(table.names.len() + 1) else {
            return Registrant(u16::MAX);
        };
        let name: std::sync::Arc<str> = name.into();
        table.names.push(name.clone());
        table.index.insert(name, i);
        Registrant(i)
    }

    /// An API client's registrant.
    pub fn client(name: &str) -> Registrant {
        Registrant::named(&format!("client:{name}"))
    }

    /// A transmitter's registrant (its session-established events' grants).
    pub fn transmitter(name: &str) -> Registrant {
        Registrant::cached(&TRANSMITTERS, "transmitter:", name)
    }

    /// A risk-feed topic as a party: its messages' facts are its ([`crate::context::Stamped`]);
    /// they carry risk levels only ([`crate::risk_feed`]), so it makes no grants.
    pub fn risk_feed(topic: &str) -> Registrant {
        Registrant::cached(&TOPICS, "risk_feed:", topic)
    }

    /// `prefix` + `name`, looked up in this thread's `cache` first: every applied signal asks for
    /// its party, and the table's lock and the name's formatting were a cost per signal. The
    /// names come from the configuration; a cache past [`CACHED_PARTIES`] starts again.
    fn cached(
        cache: &'static std::thread::LocalKey<std::cell::RefCell<PartyCache>>,
        prefix: &str,
        name: &str,
    ) -> Registrant {
        cache.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(r) = cache.get(name) {
                return *r;
            }
            if cache.len() >= CACHED_PARTIES {
                cache.clear();
            }
            let r = Registrant::named(&format!("{prefix}{name}"));
            cache.insert(name.into(), r);
            r
        })
    }

    pub fn is_none(&self) -> bool {
        *self == Registrant::NONE
    }

    /// The registrant as a metric label: its name, or `unrecorded` for `NONE`.
    pub fn label(&self) -> String {
        if self.is_none() {
            "unrecorded".to_owned()
        } else {
            self.name().to_string()
        }
    }

    /// The registrant's name (empty for `NONE`).
    pub fn name(&self) -> std::sync::Arc<str> {
        let table = REGISTRANTS
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        usize::from(self.0)
            .checked_sub(1)
            .and_then(|i| table.names.get(i).cloned())
            .unwrap_or_else(|| "".into())
    }
}

impl Serialize for Registrant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Registrant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Registrant, D::Error> {
        let name = std::borrow::Cow::<str>::deserialize(d)?;
        Ok(if name.is_empty() {
            Registrant::NONE
        } else {
            Registrant::named(&name)
        })
    }
}

/// A grant's id, shared by the grant, the grant map, the expiry order and the index sets instead
/// of copied into each.
pub type GrantId = std::sync::Arc<str>;

/// A grant as Vigil holds it, a million at a time: strings and lists are boxed (no spare capacity,
/// 16 bytes instead of 24) and rare parts (attributes, revocation) sit behind a pointer, so the
/// shared `Arc<Grant>` fits jemalloc's 256-byte size class (it was 448 — a quarter of a grant's
/// memory; a test holds the size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: GrantId,
    pub kind: GrantKind,
    /// The canonical principal key (see `principal.rs`).
    pub principal: Box<str>,
    pub principal_type: PrincipalType,
    /// Every identifier key registered for the principal by this grant.
    pub identifiers: Box<[String]>,
    /// The subject identifier as registered (RFC 9493 JSON), for the SETs Vigil emits about it.
    #[serde(default)]
    pub subject_id: JsonText,
    /// The members as registered, a JSON object: member name → identifier JSON, or a plain string
    /// for an opaque id.
    #[serde(default)]
    pub member_ids: JsonText,
    /// Member keys by name (`session`, `device`, …).
    pub members: Members,
    /// `jwt_id:<iss>|<jti>` key of the token, if any.
    pub token: Option<Box<str>>,
    /// Principal key of the delegating user, for agent delegations.
    pub on_behalf_of: Option<Box<str>>,
    /// A thin pointer (a boxed box): set on few grants, and the room it saves holds
    /// `status_rules` within the 256-byte size class.
    pub audience: Option<Box<Box<str>>>,
    pub scopes: Box<[String]>,
    pub issued_at: f64,
    pub expires_at: f64,
    pub attributes: Attributes,
    pub enforcement_points: Box<[String]>,
    pub status: GrantStatus,
    /// Why the grant has its current status (the deciding rules' reasons), if not active.
    #[serde(default)]
    pub status_reason: Option<Box<str>>,
    /// The rules that decided the current status, if not active (`GET /v1/grants?rule=`).
    /// A thin pointer, as `audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_rules: Option<Box<Box<[String]>>>,
    pub registered_at: f64,
    /// Who made the grant, the party its quota counts against (`engine.max_grants_per_registrant`).
    #[serde(default, skip_serializing_if = "Registrant::is_none")]
    pub registered_by: Registrant,
    /// Boxed: set on few grants, and inline it was a sixth of every grant's size.
    pub revoked: Option<Box<Revocation>>,
}

impl GrantRequest {
    /// Validates the request and returns the grant's identifier keys (principal first). The principal
    /// key itself is chosen by the engine's alias index.
    pub fn identifier_keys(&self) -> Result<Vec<String>, GrantError> {
        let subject = SubjectId::from_json(&self.subject, true)
            .map_err(|e| GrantError::Invalid(format!("`subject`: {e}")))?;
        let keys = principal_keys(&subject);
        if keys.is_empty() {
            return Err(GrantError::Invalid(
                "`subject` must name a principal (a simple identifier, aliases, or a complex subject with `user`)"
                    .into(),
            ));
        }
        Ok(keys)
    }

    /// Builds the grant for principal key `principal`. `now` is the registration time.
    ///
    /// Times must be seconds in `[0, MAX_GRANT_TIME)`.
    pub fn into_grant(self, principal: String, now: f64) -> Result<Grant, GrantError> {
        if self.id.is_empty() || self.id.len() > 512 || crate::subject::has_control(&self.id) {
            return Err(GrantError::Invalid(
                "`id` must be 1 to 512 characters, none a control character".into(),
            ));
        }
        // Seconds since the epoch. A value of 1e11 or more (the year 5138) is almost surely
        // milliseconds: accepted, it would put the grant beyond every time-based rule
        // (`context.x_at > grant.issued_at` never true), so it is refused as ambiguous.
        for (name, t) in [
            ("issued_at", self.issued_at),
            ("expires_at", self.expires_at),
        ] {
            if !(t.is_finite() && (0.0..MAX_GRANT_TIME).contains(&t)) {
                return Err(GrantError::Invalid(format!(
                    "`{name}` must be seconds since the epoch (0 to 1e11): milliseconds are ambiguous"
                )));
            }
        }
        if self.expires_at <= self.issued_at {
            return Err(GrantError::Invalid(
                "`expires_at` must be a time after `issued_at` (seconds since the epoch)".into(),
            ));
        }
        let identifiers = self.identifier_keys()?;
        let on_behalf_of =
            match (&self.kind, &self.on_behalf_of) {
                (GrantKind::AgentDelegation, Some(v)) => {
                    let id = SubjectId::from_json(v, true)
                        .map_err(|e| GrantError::Invalid(format!("`on_behalf_of`: {e}")))?;
                    Some(principal_keys(&id).into_iter().next().ok_or_else(|| {
                        GrantError::Invalid("`on_behalf_of` must name a user".into())
                    })?)
                }
                (GrantKind::AgentDelegation, None) => {
                    return Err(GrantError::Invalid(
                        "an `agent_delegation` needs `on_behalf_of` (the delegating user)".into(),
                    ))
                }
                (_, Some(_)) => {
                    return Err(GrantError::Invalid(
                        "`on_behalf_of` is only for `agent_delegation` grants".into(),
                    ))
                }
                (_, None) => None,
            };
        let mut members = Members::default();
        let mut member_ids = Map::new();
        for (name, value) in [
            ("session", &self.session),
            ("device", &self.device),
            ("tenant", &self.tenant),
            ("application", &self.application),
            ("group", &self.group),
            ("org_unit", &self.org_unit),
        ] {
            if let Some(v) = value {
                let key = member_key(v).ok_or_else(|| {
                    GrantError::Invalid(format!(
                        "`{name}` must be a non-empty string or a subject identifier"
                    ))
                })?;
                members.insert(name, &key);
                member_ids.insert(name.to_owned(), v.clone());
            }
        }
        let token = self.token.as_ref().and_then(|t| {
            identifier_key(&SubjectId::JwtId {
                iss: t.iss.clone(),
                jti: t.jti.clone(),
            })
        });
        Ok(Grant {
            id: self.id.into(),
            kind: self.kind,
            principal: principal.into(),
            principal_type: self.principal_type,
            identifiers: identifiers.into(),
            subject_id: JsonText::new(&self.subject),
            member_ids: JsonText::new(&Value::Object(member_ids)),
            members,
            token: token.map(String::into_boxed_str),
            on_behalf_of: on_behalf_of.map(String::into_boxed_str),
            audience: self.audience.map(|a| Box::new(a.into_boxed_str())),
            scopes: self.scopes.into(),
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            attributes: Attributes::from(self.attributes),
            enforcement_points: self.enforcement_points.into(),
            status: GrantStatus::Active,
            status_reason: None,
            status_rules: None,
            registered_at: now,
            registered_by: Registrant::NONE,
            revoked: None,
        })
    }
}

impl Grant {
    pub fn is_expired(&self, now: f64) -> bool {
        now >= self.expires_at
    }

    /// The grant as policy sees it (`grant.*` in CEL).
    pub fn policy_view(&self) -> Value {
        Value::Object(
            POLICY_FIELDS
                .iter()
                .map(|f| ((*f).to_owned(), self.policy_field(f)))
                .collect(),
        )
    }

    /// One field of [`Grant::policy_view`], without building the others (`null` for a name that is
    /// not one of them).
    pub fn policy_field(&self, name: &str) -> Value {
        let member = |name: &str| self.members.get(name).map_or(Value::Null, Value::from);
        match name {
            // `attributes.required_assurance: {namespace, level}` gains a comparable `rank`.
            "required_assurance" => self
                .attributes
                .get("required_assurance")
                .and_then(|r| {
                    let ns = r.get("namespace")?.as_str()?;
                    let level = r.get("level")?.as_str()?;
                    Some(json!({"namespace": ns, "level": level,
                                "rank": crate::events::assurance_rank(level)}))
                })
                .unwrap_or(Value::Null),
            "id" => json!(self.id),
            "kind" => json!(self.kind),
            "principal" => json!(self.principal),
            "principal_type" => json!(self.principal_type),
            m if crate::principal::GRANT_MEMBERS.contains(&m) => member(m),
            "token" => json!(self.token),
            "on_behalf_of" => json!(self.on_behalf_of),
            "audience" => json!(self.audience),
            "scopes" => json!(self.scopes),
            "issued_at" => json!(self.issued_at),
            "expires_at" => json!(self.expires_at),
            "attributes" => json!(self.attributes),
            "enforcement_points" => json!(self.enforcement_points),
            "status" => json!(self.status),
            _ => Value::Null,
        }
    }
}

/// The fields of the `grant` policy variable.
pub const POLICY_FIELDS: [&str; 20] = [
    "required_assurance",
    "id",
    "kind",
    "principal",
    "principal_type",
    "session",
    "device",
    "tenant",
    "application",
    "group",
    "org_unit",
    "token",
    "on_behalf_of",
    "audience",
    "scopes",
    "issued_at",
    "expires_at",
    "attributes",
    "enforcement_points",
    "status",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> GrantRequest {
        serde_json::from_value(v).unwrap()
    }

    /// A grant is written with its registrant's name (never the process's index), read back as
    /// the same registrant, and a row from before registrants were recorded reads as none.
    #[test]
    fn a_grant_keeps_its_registrant_by_name() {
        let mut g = request(json!({"id": "r", "kind": "session",
            "subject": {"format": "email", "email": "r@example.com"},
            "issued_at": 1, "expires_at": 2}))
        .into_grant("email:r@example.com".into(), 1.0)
        .unwrap();
        assert!(g.registered_by.is_none());
        let row = serde_json::to_value(&g).unwrap();
        assert!(row.get("registered_by").is_none(), "{row}");
        assert_eq!(serde_json::from_value::<Grant>(row).unwrap(), g);
        g.registered_by = Registrant::client("gw-1");
        let row = serde_json::to_value(&g).unwrap();
        assert_eq!(row["registered_by"], "client:gw-1");
        let back: Grant = serde_json::from_value(row).unwrap();
        assert_eq!(back.registered_by, Registrant::client("gw-1"));
        assert_ne!(back.registered_by, Registrant::client("gw-2"));
    }

    /// The shared `Arc<Grant>` (two counters + the grant) must stay within jemalloc's 256-byte size
    /// class: one more field inline moves every grant to the 320-byte class (64 MB at 1 M grants).
    #[test]
    fn a_shared_grant_fits_the_256_byte_size_class() {
        assert!(
            std::mem::size_of::<Grant>() + 16 <= 256,
            "Grant is {} bytes",
            std::mem::size_of::<Grant>()
        );
    }

    #[test]
    fn attributes_round_trip_as_a_json_object_and_empty_is_unallocated() {
        let g = request(
            json!({"id":"g","kind":"session","subject":{"format":"opaque","id":"u"},
            "issued_at":1,"expires_at":2}),
        )
        .into_grant("opaque:u".into(), 1.0)
        .unwrap();
        assert_eq!(g.attributes, Attributes::default());
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["attributes"], json!({}));
        let with = Attributes::from(json!({"acr":"mfa"}).as_object().unwrap().clone());
        assert_eq!(with.get("acr"), Some(&json!("mfa")));
        let back: Attributes = serde_json::from_value(json!({"acr":"mfa"})).unwrap();
        assert_eq!(back, with);
    }

    /// Identifiers held as text are stored and answered as the JSON values they were, and read
    /// back to an equal grant.
    #[test]
    fn identifiers_held_as_text_keep_their_json_form() {
        let subject = json!({"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "u1"});
        let session = json!({"format": "opaque", "id": "s-1"});
        let grant = request(json!({"id": "g", "kind": "session", "subject": subject,
            "session": session, "issued_at": 1, "expires_at": 2}))
        .into_grant("iss_sub:x".into(), 1.0)
        .unwrap();
        let stored = serde_json::to_value(&grant).unwrap();
        assert_eq!(stored["subject_id"], subject);
        assert_eq!(stored["member_ids"], json!({"session": session}));
        let back: Grant = serde_json::from_slice(&serde_json::to_vec(&grant).unwrap()).unwrap();
        assert_eq!(back, grant);
        assert_eq!(back.subject_id.value(), subject);
    }

    #[test]
    fn builds_a_session_grant_with_member_keys() {
        let r = request(json!({
            "id": "g1", "kind": "session",
            "subject": {"format": "email", "email": "Jane@example.com"},
            "session": "s-1", "device": {"format": "opaque", "id": "d-1"},
            "issued_at": 100, "expires_at": 200, "enforcement_points": ["gw"]
        }));
        assert_eq!(r.identifier_keys().unwrap(), vec!["email:jane@example.com"]);
        let g = r
            .into_grant("email:jane@example.com".into(), 100.0)
            .unwrap();
        assert_eq!(g.members.get("session").unwrap(), "opaque:s-1");
        assert_eq!(g.members.get("device").unwrap(), "opaque:d-1");
        assert_eq!(g.status, GrantStatus::Active);
        assert_eq!(g.policy_view()["session"], "opaque:s-1");
    }

    #[test]
    fn delegations_need_the_delegating_user() {
        let base = json!({
            "id": "d1", "kind": "agent_delegation", "principal_type": "agent",
            "subject": {"format": "opaque", "id": "agent-7"},
            "issued_at": 1, "expires_at": 2
        });
        assert!(request(base.clone())
            .into_grant("opaque:agent-7".into(), 1.0)
            .is_err());
        let mut with = base;
        with["on_behalf_of"] = json!({"format": "email", "email": "u@example.com"});
        let g = request(with)
            .into_grant("opaque:agent-7".into(), 1.0)
            .unwrap();
        assert_eq!(g.on_behalf_of.as_deref(), Some("email:u@example.com"));
    }

    #[test]
    fn invalid_requests() {
        let bad = [
            json!({"id": "", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": 1, "expires_at": 2}),
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": 2, "expires_at": 1}),
            json!({"id": "x", "kind": "session", "subject": {"format":"email"}, "issued_at": 1, "expires_at": 2}),
            json!({"id": "x", "kind": "session", "subject": {"format":"complex","device":{"format":"opaque","id":"d"}}, "issued_at": 1, "expires_at": 2}),
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "session": 5, "issued_at": 1, "expires_at": 2}),
            // Milliseconds: ambiguous, refused.
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": 1_700_000_000_000u64, "expires_at": 1_800_000_000_000u64}),
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": 1_700_000_000, "expires_at": 1_800_000_000_000u64}),
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": -5, "expires_at": 2}),
            // A control character in the id, or in a member's (a session named as a plain string).
            json!({"id": "x\u{0}y", "kind": "session", "subject": {"format":"opaque","id":"u"}, "issued_at": 1, "expires_at": 2}),
            json!({"id": "x", "kind": "session", "subject": {"format":"opaque","id":"u"}, "session": "s\u{0}", "issued_at": 1, "expires_at": 2}),
        ];
        for v in bad {
            let r = request(v.clone());
            assert!(r.into_grant("k".into(), 1.0).is_err(), "{v}");
        }
        assert!(serde_json::from_value::<GrantRequest>(
            json!({"id":"x","kind":"cookie","subject":{},"issued_at":1,"expires_at":2})
        )
        .is_err());
    }
}
