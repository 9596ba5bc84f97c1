//! The `vigil` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil::{telemetry, Config, Vigil};

mod policy_cmd;
mod streams_cmd;

/// Exit code for an invalid configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Continuous access evaluation: an OpenID SSF receiver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file; without it the built-in defaults are used.
    #[arg(long, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides the config's `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(ConfigArgs),
    /// Validate the configuration and print the effective settings (secrets redacted).
    CheckConfig(ConfigArgs),
    /// Policy-as-code tooling.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Vigil's inbound SSF streams at its transmitters (through the running Vigil).
    Streams {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(subcommand)]
        command: streams_cmd::StreamsCommand,
    },
}

/// How a command reaches the running Vigil as an operator.
#[derive(clap::Args)]
struct OperatorArgs {
    /// The running Vigil's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// An operator client's bearer token. Default: the generated `admin.token` in the data
    /// directory of `--data-dir`.
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Where to find `admin.token` when no `--token` is given.
    #[arg(long, default_value = "vigil-data", global = true)]
    data_dir: std::path::PathBuf,
}

impl OperatorArgs {
    /// The token, and where it came from.
    fn token(&self) -> Result<(String, String), String> {
        let file = self.data_dir.join(vigil::auth::ADMIN_TOKEN_FILE);
        match &self.token {
            Some(t) => Ok((t.clone(), "--token (or VIGIL_TOKEN)".to_owned())),
            None => match std::fs::read_to_string(&file) {
                Ok(t) => Ok((t.trim().to_owned(), file.display().to_string())),
                Err(e) => Err(format!(
                    "no --token (or VIGIL_TOKEN) and no {}: {e}",
                    file.display()
                )),
            },
        }
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the policy tests (`*.test.yaml`) beside the rules.
    Test {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
        /// Where `example:` events are read from when a test file names no `examples:`
        /// (`policy.examples_dir`).
        #[arg(long)]
        examples: Option<PathBuf>,
    },
    /// What a candidate policy directory would change on the running Vigil (lint and the
    /// candidate's own tests first; nothing is changed).
    Impact {
        /// The candidate policy directory.
        dir: PathBuf,
        /// Where `example:` events are read from when a test file names no `examples:`.
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Grants listed per bucket (changed, loosening, errors).
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// What a candidate policy directory would have decided over the signals the running Vigil
    /// recorded in a window, against what the live set decides (lint and tests first).
    Replay {
        /// The candidate policy directory.
        dir: PathBuf,
        /// The window's start: `90m`, `24h`, `7d`, an RFC 3339 time or seconds since the epoch.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Where `example:` events are read from when a test file names no `examples:`.
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Differences listed per bucket (added, removed, changed).
        #[arg(long, default_value_t = 5)]
        samples: usize,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// A shadow set on the running Vigil: a candidate evaluated beside the live set, never
    /// enforced, its divergences recorded.
    Shadow {
        #[command(subcommand)]
        action: ShadowAction,
        /// Print the answer as JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Compile and lint the rules (unknown fields, CEL errors, rules that fail closed, unreachable rules).
    Check {
        /// Policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ShadowAction {
    /// Load a candidate directory's rule files as the shadow set (lint and its tests first).
    Load {
        dir: PathBuf,
        /// Where `example:` events are read from when a test file names no `examples:`.
        #[arg(long)]
        examples: Option<PathBuf>,
    },
    /// The shadow set and its divergence counts.
    Show,
    /// The divergences held, newest first.
    Divergences {
        #[arg(long)]
        rule: Option<String>,
        /// `stricter` or `looser`.
        #[arg(long)]
        direction: Option<String>,
        #[arg(long)]
        grant: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Make the shadow set live (its files replace the policy directory's, then the reload
    /// path: tests, `require_preview` unless forced).
    Promote {
        #[arg(long)]
        force: bool,
    },
    /// Drop the shadow set.
    Discard,
}

fn load(
    args: &ConfigArgs,
) -> Result<(Config, vigil::config::EnvReport), vigil::config::ConfigError> {
    let (mut config, report) = Config::load_reporting(args.config.as_deref(), std::env::vars())?;
    if !report.ignored.is_empty() {
        // Names only, never values: the environment may hold secrets.
        tracing::warn!(variables = ?report.ignored,
            "environment variables with the VIGIL_ prefix name no configuration key; ignored");
    }
    if !report.applied.is_empty() {
        tracing::info!(variables = ?report.applied, "configuration from the environment");
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    Ok((config, report))
}

fn main() -> ExitCode {
    telemetry::init_logging();
    let cli = Cli::parse();
    let args = match &cli.command {
        Command::Serve(a) | Command::CheckConfig(a) => a,
        Command::Policy(cmd) => return policy_command(cmd),
        Command::Streams { operator, command } => {
            let (token, source) = match operator.token() {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            return match streams_cmd::run(&operator.url, &token, &source, command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vigil: {}", error_line(&e));
                    ExitCode::FAILURE
                }
            };
        }
    };
    let (config, report) = match load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Command::CheckConfig(_) => check_config(config, &report),
        Command::Serve(_) => serve(config),
        Command::Policy(_) | Command::Streams { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn policy_command(cmd: &PolicyCommand) -> ExitCode {
    use vigil::evaluate::testing;
    use vigil::policy::{lint, PolicySet};
    match cmd {
        PolicyCommand::Test { dir, examples } => match testing::run_dir(dir, examples.as_deref()) {
            Ok(report) => {
                print!("{}", report.render());
                if report.failed() == 0 && report.passed() > 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => fail(e),
        },
        PolicyCommand::Check { dir } => match PolicySet::load_dir(dir) {
            Ok(set) => {
                let findings = lint::lint(&set);
                for f in &findings {
                    let level = if f.error { "error" } else { "warning" };
                    println!("{level}: rule `{}`: {}", f.rule, f.message);
                }
                let errors = findings.iter().filter(|f| f.error).count();
                println!(
                    "policy check: {} rules in {} file(s), version {}: {errors} error(s), {} warning(s)",
                    set.rules.len(),
                    set.files.len(),
                    set.version,
                    findings.len() - errors
                );
                if errors == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => fail(e),
        },
        PolicyCommand::Impact {
            dir,
            examples,
            samples,
            json,
            operator,
        } => as_operator(operator, |target| {
            policy_cmd::impact(target, dir, examples.as_deref(), *samples, *json)
        }),
        PolicyCommand::Replay {
            dir,
            since,
            examples,
            samples,
            json,
            operator,
        } => as_operator(operator, |target| {
            policy_cmd::replay(target, dir, examples.as_deref(), since, *samples, *json)
        }),
        PolicyCommand::Shadow {
            action,
            json,
            operator,
        } => {
            let action = match action {
                ShadowAction::Load { dir, examples } => policy_cmd::Shadow::Load {
                    dir,
                    examples: examples.as_deref(),
                },
                ShadowAction::Show => policy_cmd::Shadow::Show,
                ShadowAction::Divergences {
                    rule,
                    direction,
                    grant,
                    limit,
                } => policy_cmd::Shadow::Divergences {
                    rule: rule.as_deref(),
                    direction: direction.as_deref(),
                    grant: grant.as_deref(),
                    limit: *limit,
                },
                ShadowAction::Promote { force } => policy_cmd::Shadow::Promote { force: *force },
                ShadowAction::Discard => policy_cmd::Shadow::Discard,
            };
            as_operator(operator, |target| policy_cmd::shadow(target, action, *json))
        }
    }
}

/// Runs a command against the running Vigil as the operator `args` name: success, a refusal
/// the command printed (`Ok(false)`), or an error.
fn as_operator(
    args: &OperatorArgs,
    run: impl FnOnce(&policy_cmd::Operator<'_>) -> anyhow::Result<bool>,
) -> ExitCode {
    let (token, token_source) = match args.token() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let target = policy_cmd::Operator {
        base: &args.url,
        token: &token,
        token_source: &token_source,
    };
    match run(&target) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => fail(error_line(&e)),
    }
}

/// An error and its causes on one line. Vigil's errors already name their source in their own
/// message (`cannot listen on …: Address already in use`), so a cause whose text the line already
/// ends with is not repeated (`anyhow`'s `{:#}` would print it twice).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("vigil: {e}");
    ExitCode::FAILURE
}

fn check_config(mut config: Config, report: &vigil::config::EnvReport) -> anyhow::Result<()> {
    // What `serve` would refuse at start-up, and the policy set's own tests.
    let checked =
        vigil::reload::load_checked(&config.policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let policy = checked.set;
    eprintln!(
        "vigil: policy set {} ({} rules, {} tests pass) from {}",
        policy.version,
        policy.rules.len(),
        checked.tests_passed,
        if config.policy.dir.is_dir() {
            config.policy.dir.display().to_string()
        } else {
            "the built-in set (no policies directory)".to_owned()
        }
    );
    check_data_dir(&config.data_dir)?;
    for t in &mut config.transmitters {
        t.authorization = "<redacted>".into();
        if let Some(m) = &mut t.manage {
            m.credential = "<redacted>".into();
            if let Some(secret) = m.oauth.as_mut().and_then(|o| o.client_secret.as_mut()) {
                *secret = "<redacted>".into();
            }
        }
    }
    for ep in &mut config.enforcement_points {
        ep.token = "<redacted>".into();
    }
    for c in &mut config.clients {
        c.token = "<redacted>".into();
    }
    // librdkafka secrets: sasl.password, ssl.key.password, ssl.key.pem, …client.secret, …
    for (name, value) in config.kafka.properties.iter_mut() {
        let name = name.to_ascii_lowercase();
        if ["password", "secret", "key", "token", "jaas"]
            .iter()
            .any(|s| name.contains(s))
        {
            *value = "<redacted>".into();
        }
    }
    println!(
        "{}",
        toml::to_string_pretty(&config).context("rendering config")?
    );
    let names = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    eprintln!(
        "vigil: environment variables applied: {}",
        names(&report.applied)
    );
    eprintln!(
        "vigil: environment variables ignored (no such key): {}",
        names(&report.ignored)
    );
    eprintln!("vigil: configuration is valid");
    Ok(())
}

/// The data directory can be created and written (a probe file, removed again); a directory that
/// does not exist yet is left as it was.
fn check_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let existed = dir.is_dir();
    std::fs::create_dir_all(dir).with_context(|| format!("data directory {}", dir.display()))?;
    let probe = dir.join(".vigil-check-config");
    let written = std::fs::write(&probe, b"probe");
    let _ = std::fs::remove_file(&probe);
    if !existed {
        let _ = std::fs::remove_dir(dir);
    }
    written.with_context(|| format!("data directory {} is not writable", dir.display()))?;
    Ok(())
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let vigil = Vigil::start(config).await.context("starting Vigil")?;
        println!("vigil: listening on http://{}", vigil.local_addr());
        let vigil = std::sync::Arc::new(vigil);
        let reload = tokio::spawn(reload_on_sighup(vigil.clone()));
        shutdown_signal().await;
        reload.abort();
        let _ = reload.await;
        let vigil = std::sync::Arc::try_unwrap(vigil)
            .map_err(|_| anyhow::anyhow!("Vigil is still in use at shutdown"))?;
        tracing::info!("shutting down");
        vigil.shutdown().await;
        Ok(())
    })
}

/// SIGHUP reloads the policy directory (the same path as a file change or the reload endpoint).
async fn reload_on_sighup(vigil: std::sync::Arc<Vigil>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let outcome = vigil.reload_policies().await;
            tracing::info!(?outcome, "SIGHUP: policy reload");
        }
    }
    #[cfg(not(unix))]
    let _ = vigil;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
