//! The `vigil` binary itself: `serve` with a config file, SIGHUP policy reload, clean SIGTERM stop,
//! config errors naming the key, and the policy tooling's exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::free_port;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_reloads_policies_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("base.yaml"), "rules: []\n").unwrap();
    let port = free_port();
    let config = dir.path().join("vigil.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[policy]\ndir = \"{}\"\nwatch_interval_secs = 0\n",
            dir.path().join("data").display(),
            policies.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(VIGIL)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    wait_for("the server", || {
        client.get(format!("{base}/healthz")).send().ok()
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let grant = json!({"id": "hup", "kind": "session", "subject": {"format": "email", "email": "hup@example.com"},
                       "scopes": ["admin"], "issued_at": now - 10.0, "expires_at": now + 3600.0});
    // No [[clients]] in the config: the binary generated an all-roles token beside its store.
    let token = std::fs::read_to_string(dir.path().join("data").join("admin.token")).unwrap();
    let token = token.trim();
    let resp = client
        .post(format!("{base}/v1/grants"))
        .bearer_auth(token)
        .json(&grant)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let no_admin =
        "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: revoke}]\n";
    let test_expecting = |effect: &str| {
        format!(
            "tests:\n  - name: admin grant\n    grant: {{id: g, kind: session, subject: {{format: email, email: a@example.com}}, scopes: [admin], issued_at: 1, expires_at: 2000000000}}\n    expect: {{effect: {effect}}}\n"
        )
    };

    // `vigil policy impact`: the candidate's tests run here, then the running Vigil says what it
    // would change — and changes nothing.
    let candidate = dir.path().join("candidate");
    std::fs::create_dir(&candidate).unwrap();
    std::fs::write(candidate.join("admin.yaml"), no_admin).unwrap();
    std::fs::write(candidate.join("admin.test.yaml"), test_expecting("revoke")).unwrap();
    let impact = |dir: &std::path::Path| {
        Command::new(VIGIL)
            .args(["policy", "impact"])
            .arg(dir)
            .args(["--url", &base, "--data-dir"])
            .arg(dir.parent().unwrap().join("data"))
            .output()
            .unwrap()
    };
    let out = impact(&candidate);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 grants evaluated"), "{stdout}");
    assert!(stdout.contains("changed    1"), "{stdout}");
    assert!(stdout.contains("active -> revoked: 1"), "{stdout}");
    assert!(stdout.contains("by rule no-admin: 1"), "{stdout}");
    assert!(
        stdout.contains("hup (email:hup@example.com): active -> revoked"),
        "{stdout}"
    );
    // A candidate failing its own tests is not even sent.
    std::fs::write(candidate.join("admin.test.yaml"), test_expecting("none")).unwrap();
    let out = impact(&candidate);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FAIL") && stderr.contains("would refuse it"),
        "{stderr}"
    );
    // `vigil policy replay`: what the candidate would have decided since the window's start —
    // here the registration of `hup`, which it revokes.
    std::fs::write(candidate.join("admin.test.yaml"), test_expecting("revoke")).unwrap();
    let out = Command::new(VIGIL)
        .args(["policy", "replay"])
        .arg(&candidate)
        .args(["--since", "1h", "--url", &base, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 signals replayed"), "{stdout}");
    assert!(stdout.contains("added      1"), "{stdout}");
    assert!(stdout.contains("rule no-admin: +1 -0 ~0"), "{stdout}");
    assert!(
        stdout.contains("hup (email:hup@example.com) on registration: live nothing / candidate revoked [no-admin]"),
        "{stdout}"
    );
    // `vigil policy shadow`: the candidate (its tests passing again) runs beside the live set,
    // shown, then dropped.
    std::fs::write(candidate.join("admin.test.yaml"), test_expecting("revoke")).unwrap();
    let shadow = |args: &[&str]| {
        let out = Command::new(VIGIL)
            .args(["policy", "shadow"])
            .args(args)
            .args(["--url", &base, "--data-dir"])
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let loaded = shadow(&["load", candidate.to_str().unwrap()]);
    assert!(
        loaded.contains("(1 rules from admin.yaml): 0 divergences"),
        "{loaded}"
    );
    let shown: Value = serde_json::from_str(&shadow(&["show", "--json"])).unwrap();
    assert_eq!(shown["rules"][0]["id"], "no-admin", "{shown}");
    let listed = shadow(&["divergences", "--direction", "stricter"]);
    assert!(listed.contains("0 divergences"), "{listed}");
    assert!(shadow(&["discard"]).contains("discarded"));

    let grant_status = || -> Option<String> {
        let g: Value = client
            .get(format!("{base}/v1/grants/hup"))
            .bearer_auth(token)
            .send()
            .ok()?
            .json()
            .ok()?;
        Some(g["status"].as_str()?.to_owned())
    };
    let refused_reloads = || -> Option<String> {
        let text = client
            .get(format!("{base}/metrics"))
            .bearer_auth(token)
            .send()
            .ok()?
            .text()
            .ok()?;
        text.lines()
            .find(|l| l.starts_with("vigil_policy_reloads_total{outcome=\"refused\"}"))
            .map(str::to_owned)
    };
    assert_eq!(grant_status().as_deref(), Some("active"));

    // SIGHUP with a set that fails its own test: refused, the grant untouched.
    std::fs::write(policies.join("admin.yaml"), no_admin).unwrap();
    std::fs::write(policies.join("admin.test.yaml"), test_expecting("none")).unwrap();
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup();
    wait_for("the SIGHUP reload to be refused", refused_reloads);
    assert_eq!(grant_status().as_deref(), Some("active"));

    // Fixed: the next SIGHUP swaps it in.
    std::fs::write(policies.join("admin.test.yaml"), test_expecting("revoke")).unwrap();
    hup();
    wait_for("the SIGHUP reload to revoke the grant", || {
        (grant_status()? == "revoked").then_some(())
    });

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for("a clean exit", || child.try_wait().unwrap());
    assert!(exit.success(), "{exit:?}");
}

/// Runs `vigil <command> --config <file>` to completion.
fn vigil_with_config(command: &str, file: &std::path::Path) -> std::process::Output {
    Command::new(VIGIL)
        .args([command, "--config"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn invalid_config_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[engine]\nshardz = 2\n").unwrap();
    let out = vigil_with_config("serve", &config);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("engine.shardz"), "{stderr}");
}

#[test]
fn check_config_redacts_secrets_and_names_bad_kafka_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kafka.toml");
    std::fs::write(
        &config,
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[kafka.properties]\nsecurity_protocol = \"SASL_SSL\"\n\
         sasl_username = \"vigil\"\nsasl_password = \"hunter2-kafka\"\n\
         [[enforcement_points]]\nname = \"gw\"\ntoken = \"gw-secret-token-0123456789\"\n\
         [[transmitters]]\nname = \"idp\"\nstream = \"idp\"\nissuer = \"https://idp.example.com/\"\n\
         audiences = [\"https://vigil.example\"]\ndiscovery = true\n\
         [transmitters.manage]\ndelivery = \"poll\"\n\
         [transmitters.manage.oauth]\nclient_id = \"vigil\"\nclient_secret = \"hunter2-oauth\"\n",
    )
    .unwrap();
    let out = vigil_with_config("check-config", &config);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hunter2-oauth"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SASL_SSL") && stdout.contains("vigil"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2-kafka"), "{stdout}");
    assert!(!stdout.contains("gw-secret-token"), "{stdout}");

    // Vigil owns offset handling: a pass-through that would change it is refused, by name.
    std::fs::write(
        &config,
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[kafka.properties]\nenable_auto_commit = \"true\"\n",
    )
    .unwrap();
    let out = vigil_with_config("check-config", &config);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kafka.properties.enable.auto.commit"),
        "{stderr}"
    );
}

#[test]
fn policy_tooling_exit_codes() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let ok = Command::new(VIGIL)
        .args(["policy", "test", &format!("{repo}/policies")])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let ok = Command::new(VIGIL)
        .args(["policy", "check", &format!("{repo}/policies")])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "rules: [{id: a, on: ['*'], when: \"context.risk.nope == 1\", effect: revoke}]",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("r.test.yaml"),
        "tests: [{name: expects nothing, grant: {id: g, kind: session, subject: {format: email, email: a@b.c}, issued_at: 1, expires_at: 2}, expect: {effect: none}}]",
    )
    .unwrap();
    let check = Command::new(VIGIL)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stdout).contains("fail closed"));
    let test = Command::new(VIGIL)
        .args(["policy", "test"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!test.status.success());
    assert!(String::from_utf8_lossy(&test.stdout).contains("FAIL"));
}

/// Kubernetes injects `VIGIL_SERVICE_HOST`, `VIGIL_SERVICE_PORT` and `VIGIL_PORT=tcp://…` into every
/// pod of a namespace with a Service named `vigil`; they, and any other `VIGIL_…` variable that
/// names no configuration key, must not stop Vigil from starting. They are named (never their
/// values) in one warning; `check-config` says which variables were applied and which ignored.
#[test]
fn unrelated_vigil_variables_are_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let unrelated = [
        ("VIGIL_SERVICE_HOST", "10.96.7.7"),
        ("VIGIL_SERVICE_PORT", "8080"),
        ("VIGIL_PORT", "tcp://10.96.7.7:8080"),
        ("VIGIL_PORT_8080_TCP", "tcp://10.96.7.7:8080"),
        ("VIGIL_SOMETHING", "secret-value-never-logged"),
    ];
    let log = dir.path().join("vigil.log");
    let mut child = Command::new(VIGIL)
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("data"))
        .envs(unrelated)
        .env("VIGIL_LISTEN", format!("127.0.0.1:{port}"))
        .env("VIGIL_LOG_FORMAT", "text")
        // Logs go to stdout.
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    wait_for("the server, listening where VIGIL_LISTEN says", || {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!(
                "vigil exited with {exit:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    wait_for("a clean exit", || child.try_wait().unwrap());
    let text = std::fs::read_to_string(&log).unwrap();
    let warning = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("name no configuration key"))
        .unwrap_or_else(|| panic!("no warning naming the variables:\n{text}"));
    for (name, _) in unrelated {
        assert!(warning.contains(name), "{name} not named: {warning}");
    }
    assert!(!text.contains("secret-value-never-logged"), "{text}");
    assert!(!text.contains("10.96.7.7"), "{text}");

    let out = Command::new(VIGIL)
        .arg("check-config")
        .envs(unrelated)
        .env("VIGIL_LISTEN", "127.0.0.1:9997")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variables applied: VIGIL_LISTEN"),
        "{stderr}"
    );
    assert!(
        stderr.contains("environment variables ignored (no such key): VIGIL_PORT, VIGIL_PORT_8080_TCP, VIGIL_SERVICE_HOST, VIGIL_SERVICE_PORT, VIGIL_SOMETHING"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:9997"));
}

/// `check-config` checks what `serve` would refuse and more: the policy directory exists, its set
/// compiles and lints, its own tests pass.
#[test]
fn check_config_checks_the_policy_set_and_its_tests() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vigil.toml");
    let write_config = |policy_dir: &std::path::Path| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[policy]\ndir = \"{}\"\n",
                dir.path().join("data").display(),
                policy_dir.display()
            ),
        )
        .unwrap()
    };
    write_config(&dir.path().join("no-such-dir"));
    let out = vigil_with_config("check-config", &config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");

    // A set whose own test fails.
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("base.yaml"),
        "rules: [{id: no-admin, on: ['*'], when: \"'admin' in grant.scopes\", effect: revoke}]\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("base.test.yaml"),
        "tests:\n  - name: admin is fine\n    grant: {id: g, kind: session, subject: {format: email, email: a@example.com}, scopes: [admin], issued_at: 1, expires_at: 2000000000}\n    expect: {effect: none}\n",
    )
    .unwrap();
    write_config(&policies);
    let out = vigil_with_config("check-config", &config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 of 1 policy tests failed"), "{stderr}");
    // `serve` refuses to start on it, naming the test.
    let out = vigil_with_config("serve", &config);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 1 policy tests failed") && stderr.contains("admin is fine"),
        "{stderr}"
    );

    // Fixed: valid, and it says which set.
    std::fs::write(
        policies.join("base.test.yaml"),
        "tests:\n  - name: admin is revoked\n    grant: {id: g, kind: session, subject: {format: email, email: a@example.com}, scopes: [admin], issued_at: 1, expires_at: 2000000000}\n    expect: {effect: revoke, rules: [no-admin]}\n",
    )
    .unwrap();
    let out = vigil_with_config("check-config", &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("policy set") && stderr.contains("1 rules"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "check-config created nothing"
    );
}

/// A start-up error is printed once, with its cause once (not `X: X`).
#[test]
fn a_start_error_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(VIGIL)
        .args(["serve", "--listen"])
        .arg(taken.local_addr().unwrap().to_string())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("vigil: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("cannot listen on"), "{line}");
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");
    // Refused before anything was created: no data directory, token or keys left behind.
    assert!(
        !dir.path().join("data").exists(),
        "a start that could not listen created {:?}",
        std::fs::read_dir(dir.path().join("data")).map(|d| d.count())
    );
}

/// Where the data and the rules are is said at start-up, as absolute paths (relative ones are
/// taken from the working directory, which the operator may not think of).
#[test]
fn start_up_names_the_directories_it_uses() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(VIGIL)
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "rel-data"])
        .env("VIGIL_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let expected = dir.path().join("rel-data");
    wait_for("the data directory", || {
        expected.join("admin.token").exists().then_some(())
    });
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = log
        .lines()
        .find(|l| l.contains("data_dir"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&expected.display().to_string()),
        "the absolute data directory: {line}"
    );
}

/// `vigil streams` with a token another instance wrote: the refusal names the file it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_names_the_token_file_vigil_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vigil = common::start(common::test_config(&dir.path().join("data"), Vec::new())).await;
    let other = dir.path().join("other-instance");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(
        other.join("admin.token"),
        "a-token-of-another-instance-0123",
    )
    .unwrap();
    let url = format!("http://{}", vigil.local_addr());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(VIGIL)
            .args(["streams", "--url", &url, "--data-dir"])
            .arg(&other)
            .arg("list")
            .env_remove("VIGIL_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("other-instance/admin.token"),
        "{stderr}"
    );
    vigil.shutdown().await;
}
