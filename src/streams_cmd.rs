//! `vigil streams …`: Vigil's inbound SSF streams, through the running Vigil's `/v1/ssf/streams`
//! (the running process owns the stream records, so the CLI never touches the store).

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum StreamsCommand {
    /// Every managed stream with its liveness.
    List,
    /// Create (or adopt) the stream at transmitter NAME now.
    Create { name: String },
    /// The transmitter's configuration and status of NAME's stream, with liveness.
    Status { name: String },
    /// Ask NAME's transmitter for a verification event.
    Verify { name: String },
    /// Ask NAME's transmitter to set the stream's status: enabled, paused or disabled.
    SetStatus {
        name: String,
        status: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Add a subject (RFC 9493 JSON, e.g. '{"format":"email","email":"a@b.c"}') to NAME's stream.
    AddSubject { name: String, subject: String },
    /// Remove a subject from NAME's stream.
    RemoveSubject { name: String, subject: String },
    /// Delete NAME's stream at the transmitter (a restart creates a new one).
    Delete { name: String },
}

/// Sends `request` to the Vigil at `base` as the operator client holding `token` (from
/// `token_source`): the answer's JSON, or an error saying why Vigil refused (a 401 names where the
/// token came from). What every CLI command that asks a running Vigil uses.
pub async fn operator_call(
    request: reqwest::RequestBuilder,
    base: &str,
    token: &str,
    token_source: &str,
) -> anyhow::Result<Value> {
    let resp = request
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach Vigil at {base}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        let why = body["description"].as_str().unwrap_or(text.as_str());
        if status.as_u16() == 401 {
            bail!(
                "HTTP 401: {why} (the token from {token_source} is not one the Vigil at {base} \
                 knows: give --data-dir of that instance, or --token)"
            );
        }
        bail!("HTTP {}: {why}", status.as_u16());
    }
    Ok(body)
}

/// Runs one command against Vigil at `base` (e.g. `http://127.0.0.1:8080`) as the operator
/// client holding `token`, which came from `token_source` (named when Vigil refuses it).
pub fn run(
    base: &str,
    token: &str,
    token_source: &str,
    cmd: &StreamsCommand,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(call(base.trim_end_matches('/'), token, token_source, cmd))
}

async fn call(
    base: &str,
    token: &str,
    token_source: &str,
    cmd: &StreamsCommand,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let url = |name: &str, tail: &str| format!("{base}/v1/ssf/streams/{name}{tail}");
    let subject = |raw: &str| -> anyhow::Result<Value> {
        let v: Value = serde_json::from_str(raw).context("the subject is not JSON")?;
        if !v.is_object() {
            bail!("the subject must be a JSON object (an RFC 9493 subject identifier)");
        }
        Ok(serde_json::json!({ "subject": v }))
    };
    let request = match cmd {
        StreamsCommand::List => client.get(format!("{base}/v1/ssf/streams")),
        StreamsCommand::Create { name } => client.post(url(name, "")),
        StreamsCommand::Status { name } => client.get(url(name, "")),
        StreamsCommand::Verify { name } => client.post(url(name, "/verify")),
        StreamsCommand::SetStatus {
            name,
            status,
            reason,
        } => client
            .post(url(name, "/status"))
            .json(&serde_json::json!({"status": status, "reason": reason})),
        StreamsCommand::AddSubject { name, subject: s } => {
            client.post(url(name, "/subjects:add")).json(&subject(s)?)
        }
        StreamsCommand::RemoveSubject { name, subject: s } => client
            .post(url(name, "/subjects:remove"))
            .json(&subject(s)?),
        StreamsCommand::Delete { name } => client.delete(url(name, "")),
    };
    let body = operator_call(request, base, token, token_source).await?;
    match cmd {
        StreamsCommand::List => print_list(&body),
        StreamsCommand::Status { .. } => print_status(&body),
        StreamsCommand::Create { name } => println!(
            "{name}: stream {} ready ({})",
            body["config"]["stream_id"].as_str().unwrap_or("?"),
            body["config"]["delivery"]["method"].as_str().unwrap_or("?")
        ),
        StreamsCommand::Verify { name } => println!(
            "{name}: verification requested; `vigil streams status {name}` shows when it arrives"
        ),
        StreamsCommand::SetStatus { name, .. } => {
            println!("{name}: status {}", body["status"].as_str().unwrap_or("?"))
        }
        StreamsCommand::AddSubject { name, .. } => println!("{name}: subject added"),
        StreamsCommand::RemoveSubject { name, .. } => println!("{name}: subject removed"),
        StreamsCommand::Delete { name } => println!("{name}: stream deleted"),
    }
    Ok(())
}

fn ago(ms: &Value) -> String {
    match ms.as_i64() {
        Some(t) => {
            let secs = (vigil::signal::now_ms() - t).max(0) / 1000;
            format!("{secs}s ago")
        }
        None => "never".into(),
    }
}

/// `healthy`, or `unhealthy` while a verification request is unanswered past the SLA.
fn health(live: &Value) -> String {
    match live["verification_overdue_ms"].as_i64() {
        Some(overdue) if live["healthy"] == false => {
            format!("unhealthy (verification {}s past its SLA)", overdue / 1000)
        }
        _ => "healthy".into(),
    }
}

fn print_list(body: &Value) {
    let streams = body["streams"].as_array().cloned().unwrap_or_default();
    if streams.is_empty() {
        println!("no managed streams (add a `manage` section to a transmitter)");
        return;
    }
    println!(
        "{:<16} {:<8} {:<34} {:<9} {:<10} {:<12} {:<14} ERROR",
        "TRANSMITTER", "DELIVERY", "STREAM ID", "STATUS", "HEALTH", "LAST EVENT", "LAST VERIFIED"
    );
    for s in streams {
        let l = &s["liveness"];
        println!(
            "{:<16} {:<8} {:<34} {:<9} {:<10} {:<12} {:<14} {}",
            s["transmitter"].as_str().unwrap_or("?"),
            l["delivery"].as_str().unwrap_or("?"),
            l["stream_id"].as_str().unwrap_or("-"),
            l["status"].as_str().unwrap_or("unknown"),
            health(l),
            ago(&l["last_event_ms"]),
            ago(&l["last_verified_ms"]),
            l["error"].as_str().unwrap_or("")
        );
    }
}

fn print_status(body: &Value) {
    let c = &body["config"];
    let l = &body["liveness"];
    println!(
        "transmitter:      {}",
        body["transmitter"].as_str().unwrap_or("?")
    );
    println!(
        "stream id:        {}",
        c["stream_id"].as_str().unwrap_or("?")
    );
    println!("issuer:           {}", c["iss"].as_str().unwrap_or("?"));
    println!(
        "delivery:         {} {}",
        c["delivery"]["method"].as_str().unwrap_or("?"),
        c["delivery"]["endpoint_url"].as_str().unwrap_or("")
    );
    println!(
        "status:           {}{}",
        l["status"].as_str().unwrap_or("unknown"),
        l["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "events delivered: {}",
        c["events_delivered"].as_array().map_or(0, Vec::len)
    );
    println!("last event:       {}", ago(&l["last_event_ms"]));
    println!("last verified:    {}", ago(&l["last_verified_ms"]));
    println!("health:           {}", health(l));
    if let Some(e) = l["error"].as_str() {
        println!("last error:       {e}");
    }
}
