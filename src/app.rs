//! Assembles the running service from a [`Config`]: store → intake → receiver → HTTP server, plus the
//! hand-off consumer and the JWKS refreshers, and takes it apart again on shutdown. Tests and the
//! binary start Vigil the same way, through [`Vigil::start`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::audit::AuditLog;
use crate::auth::ApiAuth;
use crate::clock::Clock;
use crate::config::Config;
use crate::config::Role;
use crate::engine::{Engine, EngineError, EngineSettings};
use crate::handoff::{self, EngineSink};
use crate::intake::{Intake, IntakeError};
use crate::jwks::{KeySource, KeyStore, KeyStoreSettings};
use crate::limits::RateLimiter;
use crate::policy::{PolicyError, PolicySet};
use crate::push::{self, PushState};
use crate::receiver::{Receiver, Transmitter};
use crate::reload::{PolicyReloader, ReloadOutcome};
use crate::store::{BatchWriter, BatchWriterThread};
use crate::transmitter::mgmt::{self, EnforcementPoint, MgmtState};
use crate::transmitter::streams::StreamStore;
use crate::transmitter::{self, Identity, MetadataState};
use crate::{ops, store, telemetry};

/// Why Vigil could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the store writer: {0}")]
    Writer(String),
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("policy set: {0}")]
    PolicySet(String),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("signing identity: {0}")]
    Identity(String),
    #[error("delivery state: {0}")]
    Delivery(String),
    #[error("cannot open the audit log: {0}")]
    Audit(std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// A running Vigil.
pub struct Vigil {
    addr: SocketAddr,
    db: Arc<redb::Database>,
    intake: Intake,
    engine: Arc<Engine>,
    reloader: Arc<PolicyReloader>,
    identity: Arc<Identity>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Ends when the engine (the decisions' producer) is gone, so it is awaited after it.
    decision_task: JoinHandle<()>,
    writer: BatchWriterThread,
    /// Intake's threads (the log's appender, `intake.redb`'s writer).
    intake_writer: crate::intake::IntakeThreads,
    /// The generated all-roles API token, when no `[[clients]]` are configured.
    admin_token: Option<String>,
}

impl Vigil {
    /// Opens the store, replays pending signals, fetches keys in the background and starts serving.
    pub async fn start(config: Config) -> Result<Vigil, StartError> {
        Vigil::start_with_clock(config, Clock::system()).await
    }

    /// [`Vigil::start`] with "now" read from `clock` everywhere (a test's manual one moves only
    /// when the test says).
    pub async fn start_with_clock(config: Config, clock: Clock) -> Result<Vigil, StartError> {
        // 1. Rules, then the port and the TLS files: a start refused here leaves no data
        //    directory, token or keys behind.
        let policy = load_policy(&config)?;
        let (listener, addr) = bind(&config).await?;
        let tls = crate::tls::acceptor(&config.tls)?;
        // Cluster mode: the brokers answer and Vigil's topics exist (their partition count,
        // which ownership follows, read back).
        let cluster_topics = if config.cluster.enabled() {
            let topics = crate::cluster::Topics::of(&config.cluster.name);
            let partitions = ensure_topics(&config.cluster, &topics).await?;
            Some((topics, partitions))
        } else {
            None
        };
        tracing::info!(data_dir = %absolute(&config.data_dir).display(),
            policy_dir = %absolute(&config.policy.dir).display(), "directories (relative paths are taken from the working directory)");
        let metrics = telemetry::metrics_handle();
        // 2. The data directory: the store first (its lock stops a second instance on the same
        //    directory), the API token, the writers, intake, the audit log.
        let db = store::open(&config.data_dir)?;
        let cluster_instance = match &cluster_topics {
            Some(_) => Some(crate::cluster::instance_id(
                &config.cluster,
                &config.data_dir,
            )?),
            None => None,
        };
        let (api_auth, admin_token) = ApiAuth::new(&config.clients, &config.data_dir)?;
        let limits = &config.limits;
        let api_auth = Arc::new(api_auth.with_rate_limit(RateLimiter::new(
            limits.client_requests_per_sec,
            limits.burst,
        )));
        let (batch_writer, writer) =
            BatchWriter::start(db.clone(), "state", config.intake.max_batch)
                .map_err(|e| StartError::Writer(e.to_string()))?;
        let (intake, intake_writer) =
            Intake::open_with(&config.data_dir, &config.intake, clock.clone())?;
        intake.adopt_legacy_tables(&db)?;
        let pending = intake.pending()?;

        let audit = Arc::new(
            AuditLog::open(
                &config.data_dir.join("audit"),
                config.audit.max_file_bytes,
                config.audit.keep_files,
            )
            .and_then(|log| {
                log.with_max_age(std::time::Duration::from_secs(config.audit.max_age_secs))
            })
            .map_err(StartError::Audit)?,
        );
        // 3. The engine, and what it decided before a restart that delivery has not taken over.
        let (decision_tx, decision_rx) = crate::engine::lanes(4096);
        let mut engine_settings = engine_settings(&config, clock.clone());
        // Cluster mode: every batch's rows also go to the state topic, for the next owner.
        if let Some((topics, partitions)) = &cluster_topics {
            engine_settings.changelog = Some(Arc::new(crate::cluster::StateLog::new(
                &config.cluster,
                topics,
                *partitions,
                audit.origin(),
            )?));
        }
        // Delivery deletes a decision's hand-off row from the state topic once it took it over.
        let changelog = engine_settings.changelog.clone();
        // The engine takes `batch_writer`; delivery and the Kafka source write through this handle.
        let store_writer = batch_writer.clone();
        let engine = Arc::new(Engine::start(
            &db,
            batch_writer,
            intake.clone(),
            audit.clone(),
            policy,
            decision_tx,
            engine_settings,
        )?);
        // Cluster mode: this instance owns nothing until the group assigns it partitions (and it
        // has read their state back); what its data directory held from an earlier run may be
        // stale since, so it is dropped.
        if cluster_topics.is_some() {
            let engine = engine.clone();
            let dropped = tokio::task::spawn_blocking(move || {
                engine.release_blocking(Arc::new(|_: &str| true))?;
                engine.forget_stored_blocking(Arc::new(|_: &str| true))
            })
            .await
            .map_err(|e| {
                StartError::Cluster(crate::cluster::ClusterError::Brokers(e.to_string()))
            })??;
            if dropped > 0 {
                tracing::info!(rows = dropped, "state from an earlier run dropped: it is restored from the state topic with the partitions assigned");
            }
        }
        // Read before anything can make new decisions, so none is both replayed and re-sent.
        let pending_handoff =
            crate::engine::pending_handoff(&db).map_err(|e| StartError::Delivery(e.to_string()))?;
        let reloader = Arc::new(PolicyReloader::new(config.policy.clone(), engine.clone()));
        // 4. Vigil's signing identity, outbound clients, the transmitters and their keys.
        //    In cluster mode the keys are the cluster's (its key topic), so every instance signs
        //    alike; the topics' producer is shared by the keys, the streams and the outbox.
        let (shutdown, shutdown_rx) = watch::channel(false);
        let cluster_parts = match (&cluster_topics, &cluster_instance) {
            (Some((topics, partitions)), Some(instance)) => Some((
                topics,
                *partitions,
                instance.as_str(),
                Arc::new(crate::cluster::TopicWriter::new(&config.cluster)?),
                Arc::new(crate::kafka::KafkaHealth::for_cluster()),
            )),
            _ => None,
        };
        let identity = match &cluster_parts {
            Some((topics, _, instance, writer, _)) => {
                crate::cluster::shared_identity(
                    &config.cluster,
                    &topics.keys,
                    instance,
                    writer.clone(),
                    crate::cluster::KeySettings {
                        algs: config.identity.algorithms(),
                        choices: signing_choices(&config),
                        retention_secs: config.identity.key_retention_secs,
                        seed_dir: &config.data_dir.join("keys"),
                        clock: clock.clone(),
                    },
                    shutdown_rx.clone(),
                )
                .await?
            }
            None => Arc::new(
                Identity::load_or_create(
                    &config.data_dir.join("keys"),
                    &config.identity.algorithms(),
                    config.identity.key_retention_secs,
                    clock.clone(),
                )
                .map_err(|e| StartError::Identity(e.to_string()))?
                .with_choices(signing_choices(&config)),
            ),
        };
        // Intake's writer hands each group commit's new signals on; bounded in signals.
        let (next_tx, next_rx) = crate::intake::hand_on_channel(config.intake.channel_capacity);

        let client = transmitter_client(&config)?;
        let destinations = crate::outbound::Destinations {
            allow_loopback: config.outbound.allow_loopback,
        };
        let push_client = push_client(&config, destinations)?;
        let mut tasks = Vec::new();
        // Managed streams: their records, and the push credential Vigil generates for each (kept
        // in the store so the transmitter's copy stays valid across restarts).
        let stream_records =
            crate::ssf_client::StreamRecords::open(db.clone(), store_writer.clone())
                .map_err(|e| StartError::Delivery(e.to_string()))?;
        let streams = Arc::new(
            StreamStore::open(db.clone(), store_writer.clone(), clock.clone())
                .map_err(|e| StartError::Delivery(e.to_string()))?,
        );
        // Enforcement points' streams. In cluster mode they are the cluster's (read from its
        // streams topic), with the records of the streams kept at transmitters, and their outboxes
        // those of the partitions owned — shared before the push credentials are read, and before
        // delivery or the emitter start.
        let outboxes = match &cluster_parts {
            Some((topics, partitions, instance, writer, health)) => {
                stream_records
                    .forget_all()
                    .await
                    .map_err(|e| StartError::Delivery(e.to_string()))?;
                let shared = crate::cluster::share_streams(
                    crate::cluster::Sharing {
                        config: &config.cluster,
                        topics,
                        partitions: *partitions,
                        instance,
                        writer: writer.clone(),
                        health: health.clone(),
                        on_managed: managed_records(stream_records.clone(), intake.clone()),
                    },
                    streams.clone(),
                    shutdown_rx.clone(),
                )
                .await?;
                stream_records
                    .share(Arc::new(ManagedOnTopic(shared.clone())))
                    .map_err(|e| StartError::Delivery(e.to_string()))?;
                Some(crate::cluster::Outboxes::start(
                    &config.cluster,
                    shared,
                    streams.clone(),
                    instance,
                    shutdown_rx.clone(),
                )?)
            }
            None => None,
        };
        let transmitter_configs = transmitter_configs(&config, &stream_records).await?;
        let transmitters = key_stores(
            &config,
            &transmitter_configs,
            &client,
            &shutdown_rx,
            &mut tasks,
        );

        // 5. The pipeline's tasks: intake hand-off, push delivery, the decision emitter; then
        //    every grant re-evaluated under the loaded set.
        tasks.push(tokio::spawn(handoff::run(
            EngineSink(engine.clone()),
            intake.clone(),
            pending,
            next_rx,
            clock.clone(),
        )));
        let push_settings = push_settings(&config, destinations, clock.clone());
        let (st, sd) = (streams.clone(), shutdown_rx.clone());
        tasks.push(crate::supervise::spawn(
            "push_delivery",
            shutdown_rx.clone(),
            move || {
                transmitter::push::run(
                    st.clone(),
                    push_client.clone(),
                    push_settings.clone(),
                    sd.clone(),
                )
            },
        ));
        let (st, id, sd, bounds) = (
            streams.clone(),
            identity.clone(),
            shutdown_rx.clone(),
            transmitter::outbox_bounds::Bounds::from(&config.delivery),
        );
        tasks.push(crate::supervise::spawn(
            "outbox_bounds",
            shutdown_rx.clone(),
            move || {
                transmitter::outbox_bounds::run(st.clone(), id.clone(), bounds.clone(), sd.clone())
            },
        ));
        let decision_task = tokio::spawn(transmitter::emit::run(
            decision_rx,
            identity.clone(),
            streams.clone(),
            pending_handoff,
            changelog,
        ));
        // Start-up ends in the state a reload of the same set would reach: every grant is
        // re-evaluated under it (the set may have changed while Vigil was stopped). After the
        // emitter runs, so the decisions it makes are delivered like any other.
        engine.reevaluate_all()?.wait().await;
        // 6. The sources that call in or out: the policy watcher, managed streams, Kafka, the
        //    receiver; then the routes and the server.
        if config.policy.watch_interval_secs > 0 {
            tasks.push(tokio::spawn(reloader.clone().watch(
                Duration::from_secs(config.policy.watch_interval_secs),
                shutdown_rx.clone(),
            )));
        }
        let liveness = Arc::new(crate::liveness::Liveness::with_clock(clock.clone()));
        // Where transmitters reach Vigil when a stream's `receiver_url` does not say: this
        // listener; in cluster mode the name every instance is reached by (`identity.issuer`), so
        // the stream's push endpoint does not change when another instance takes it over.
        let receiver_base = match (&cluster_topics, &config.identity.issuer) {
            (Some(_), Some(issuer)) => issuer.trim_end_matches('/').to_owned(),
            _ => format!("http://{addr}"),
        };
        let mut managers = Vec::new();
        for t in &transmitter_configs {
            let Some(manage) = t.manage.clone() else {
                continue;
            };
            let manager = crate::ssf_client::StreamManager::new(
                t.clone(),
                manage,
                &receiver_base,
                client.clone(),
                stream_records.clone(),
                intake.clone(),
                liveness.clone(),
            )
            .map_err(|e| StartError::Delivery(format!("transmitter `{}`: {e}", t.name)))?;
            managers.push(Arc::new(manager));
        }
        let ssf_clients = Arc::new(crate::ssf_client::StreamClients {
            managers,
            liveness: liveness.clone(),
        });
        // Kafka: a single node's risk feeds, or in cluster mode the signals topic's partitions
        // this instance owns (and the producer every push is recorded with).
        let (source_config, kafka_health, cluster_intake) = match &cluster_topics {
            Some((topics, partitions)) => {
                let log = crate::cluster::SignalLog::new(
                    &config.cluster,
                    topics.signals.clone(),
                    *partitions,
                )?;
                (
                    Some((
                        crate::cluster::source_config(&config.cluster, topics),
                        Some(topics.signals.clone()),
                    )),
                    cluster_parts.as_ref().map(|(.., health)| health.clone()),
                    Some(Arc::new(crate::cluster::ClusterIntake::new(
                        log,
                        engine.clone(),
                    ))),
                )
            }
            None if config.kafka.enabled() => (
                Some((config.kafka.clone(), None)),
                Some(Arc::new(crate::kafka::KafkaHealth::default())),
                None,
            ),
            None => (None, None, None),
        };
        if kafka_health.is_some() {
            crate::kafka::note_stored_dead_letters(&db);
        }
        if let (Some((source_config, signals_topic)), Some(health)) = (source_config, &kafka_health)
        {
            let source = crate::kafka::KafkaSource::start(
                &source_config,
                crate::kafka::SourceFormat {
                    max_future_skew_secs: config.events.max_future_skew_secs,
                    signals_topic,
                    hooks: match (&cluster_topics, &cluster_instance, &outboxes) {
                        (Some((topics, partitions)), Some(instance), Some(outboxes)) => {
                            let standby = if config.cluster.standby {
                                Some(crate::cluster::Standby::follow(
                                    &config.cluster,
                                    &topics.state,
                                    *partitions,
                                    instance,
                                    shutdown_rx.clone(),
                                )?)
                            } else {
                                None
                            };
                            Some(Arc::new(crate::cluster::Handover::new(
                                engine.clone(),
                                config.cluster.clone(),
                                topics.state.clone(),
                                *partitions,
                                health.clone(),
                                standby,
                                outboxes.clone(),
                            ))
                                as Arc<dyn crate::kafka::PartitionHooks>)
                        }
                        _ => None,
                    },
                    forward: None,
                },
                health.clone(),
                intake.clone(),
                engine.clone(),
                store_writer.clone(),
                shutdown_rx.clone(),
            )?;
            tasks.push(source.into_task());
        }
        // Cluster mode: the members directory (who owns which partitions, and where), through
        // which grant calls reach their owner.
        let peers = match (&cluster_topics, &kafka_health, &cluster_instance) {
            (Some((topics, partitions)), Some(health), Some(instance)) => {
                crate::cluster::follow_aliases(
                    &config.cluster,
                    &topics.aliases,
                    instance,
                    engine.clone(),
                    shutdown_rx.clone(),
                )
                .await?;
                let (directory, announcer) = crate::cluster::Directory::start(
                    &config.cluster,
                    topics.members.clone(),
                    crate::cluster::Member::new(
                        instance.clone(),
                        crate::cluster::advertised_url(&config.cluster, addr, tls.is_some()),
                    ),
                    health.clone(),
                    engine.grant_counts(),
                    clock.clone(),
                    shutdown_rx.clone(),
                )?;
                tasks.push(announcer);
                Some(Arc::new(crate::cluster::Peers::new(
                    directory,
                    *partitions,
                    peer_client(&config, destinations)?,
                    destinations,
                )))
            }
            _ => None,
        };
        // Cluster mode's risk feeds: consumed by the feeds' own group (`kafka.group_id`: it splits
        // the feed topics between the instances) and appended to the signals topic on each
        // principal's partition, where its owner applies them; started once the alias table is
        // read, so they are routed by it.
        let feeds = match &cluster_intake {
            Some(cluster) if config.kafka.enabled() => {
                let health = Arc::new(crate::kafka::KafkaHealth::for_split_group());
                // Incremental rebalancing, as the signals topic's group: an instance joining or
                // leaving stops only the feed partitions that move, not every one.
                let mut feeds_config = config.kafka.clone();
                feeds_config
                    .properties
                    .entry("partition_assignment_strategy".into())
                    .or_insert_with(|| "cooperative-sticky".into());
                let source = crate::kafka::KafkaSource::start(
                    &feeds_config,
                    crate::kafka::SourceFormat {
                        max_future_skew_secs: config.events.max_future_skew_secs,
                        signals_topic: None,
                        hooks: None,
                        forward: Some(cluster.clone() as Arc<dyn crate::kafka::SignalForward>),
                    },
                    health.clone(),
                    intake.clone(),
                    engine.clone(),
                    store_writer.clone(),
                    shutdown_rx.clone(),
                )?;
                tasks.push(source.into_task());
                Some(health)
            }
            _ => None,
        };
        let mut receiver = Receiver::new(transmitters, intake.clone(), next_tx, liveness)
            .with_max_future_skew(config.events.max_future_skew_secs);
        if let Some(cluster) = &cluster_intake {
            receiver = receiver.with_cluster(cluster.clone());
        }
        let receiver = Arc::new(receiver);
        // Cluster mode: the principals this instance owns; the engine refuses registrations for
        // others (a partition moving between the API's check and the shard).
        let ownership = match (&cluster_topics, &kafka_health) {
            (Some((_, partitions)), Some(health)) => {
                let ownership =
                    Arc::new(crate::cluster::Ownership::new(*partitions, health.clone()));
                let fence = ownership.clone();
                engine.fence(Arc::new(move |key: &str| fence.check(key).is_ok()));
                Some(ownership)
            }
            _ => None,
        };
        // Cluster mode: every grant's status, for checks of grants held elsewhere.
        let status_view = match (&cluster_topics, &cluster_instance) {
            (Some((topics, partitions)), Some(instance)) => {
                Some(crate::cluster::StatusView::follow(
                    &config.cluster,
                    &topics.state,
                    *partitions,
                    instance,
                    shutdown_rx.clone(),
                )?)
            }
            _ => None,
        };
        // Cluster mode: the other instances' decisions, copied into this one's audit log.
        let decision_copies = match (&cluster_topics, &cluster_instance) {
            (Some((topics, _)), Some(instance)) => Some(crate::cluster::DecisionCopies::follow(
                &config.cluster,
                &topics.decisions,
                audit.clone(),
                instance,
                shutdown_rx.clone(),
            )?),
            _ => None,
        };
        // Cluster mode: the signals topic read back, for replay and the live feed.
        let signal_history = match (&cluster_topics, &kafka_health) {
            (Some((topics, partitions)), Some(health)) => {
                Some(Arc::new(crate::cluster::SignalHistory::new(
                    config.cluster.clone(),
                    topics.signals.clone(),
                    *partitions,
                    health.clone(),
                )))
            }
            _ => None,
        };
        let access_audit = Arc::new(
            crate::audit::AccessLogs::open(
                &config.data_dir.join("audit").join("access"),
                config.audit.access_max_file_bytes,
                config.audit.access_keep_files,
                std::time::Duration::from_secs(config.audit.max_age_secs),
            )
            .map_err(StartError::Audit)?,
        );
        let api_state = Arc::new(ApiState {
            identity: identity.clone(),
            streams: streams.clone(),
            engine: engine.clone(),
            audit,
            reloader: reloader.clone(),
            enforcement_points: config
                .enforcement_points
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            ownership: ownership.clone(),
            peers: peers.clone(),
            view: status_view.clone(),
            decision_copies,
            signal_history,
            access_log: crate::engine::AccessLog::start(access_audit.clone()),
            access_audit,
            access_sample_rate: config.authzen.audit_sample_rate,
            max_outbox_per_stream: config.delivery.max_outbox_per_stream,
        });
        // Logs nobody appends to keep `audit.max_age_secs` too.
        let (d, a, sd) = (
            api_state.audit.clone(),
            api_state.access_audit.clone(),
            shutdown_rx.clone(),
        );
        tasks.push(crate::supervise::spawn(
            "audit_age",
            shutdown_rx.clone(),
            move || {
                crate::audit::expire_aged_every(
                    d.clone(),
                    a.clone(),
                    crate::audit::AGE_SWEEP,
                    sd.clone(),
                )
            },
        ));
        // Streams kept at transmitters. In cluster mode each runs on exactly one instance — the
        // owner of its transmitter's partition — and moves with it; every instance accepts the
        // cluster's push credential, which it follows as the records change.
        let lease = match (&ownership, &kafka_health) {
            (Some(o), Some(h)) => Some((o.clone(), h.clone())),
            _ => None,
        };
        for m in &ssf_clients.managers {
            let (m, r, sd, lease) = (
                m.clone(),
                receiver.clone(),
                shutdown_rx.clone(),
                lease.clone(),
            );
            tasks.push(crate::supervise::spawn(
                "ssf_stream_manager",
                shutdown_rx.clone(),
                move || {
                    let (m, r, sd, lease) = (m.clone(), r.clone(), sd.clone(), lease.clone());
                    async move {
                        match lease {
                            Some((ownership, health)) => {
                                let key = format!("transmitter:{}", m.name());
                                crate::cluster::while_owned(key, ownership, health, sd, |stop| {
                                    m.clone().run(r.clone(), stop)
                                })
                                .await;
                            }
                            None => m.run(r, sd).await,
                        }
                    }
                },
            ));
        }
        if cluster_topics.is_some() {
            tasks.push(tokio::spawn(follow_push_credentials(
                ssf_clients.managers.clone(),
                stream_records.clone(),
                receiver.clone(),
                shutdown_rx.clone(),
            )));
        }

        let (app, health) = router(
            &config,
            Parts {
                api_auth,
                receiver,
                transmitter_configs: &transmitter_configs,
                api_state,
                ssf_clients: ssf_clients.clone(),
                metrics: metrics.clone(),
                kafka: kafka_health,
                feeds,
                view: status_view,
                identity: identity.clone(),
                streams,
                stream_forwarder: peers.as_ref().map(|p| {
                    Arc::new(crate::cluster::StreamCalls::new(p.clone()))
                        as Arc<dyn transmitter::mgmt::StreamForwarder>
                }),
                addr,
                destinations,
                shutdown: shutdown_rx.clone(),
            },
        );
        let server_limits = crate::server::ServerLimits {
            max_connections: config.server.max_connections,
            max_connections_per_peer: config.server.max_connections_per_peer,
            health_reserve: config.server.health_reserve_connections,
            request_head_timeout: Duration::from_millis(config.server.request_head_timeout_ms),
            tls_handshake_timeout: Duration::from_millis(config.server.tls_handshake_timeout_ms),
        };
        tasks.push(tokio::spawn(crate::server::serve(
            listener,
            tls,
            app,
            health,
            server_limits,
            shutdown_rx.clone(),
        )));
        if let Some(handle) = metrics {
            let mut upkeep_shutdown = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                        _ = upkeep_shutdown.changed() => return,
                    }
                }
            }));
        }
        tracing::info!(%addr, transmitters = config.transmitters.len(), "Vigil listening");
        Ok(Vigil {
            addr,
            db,
            intake,
            engine,
            reloader,
            identity,
            shutdown,
            tasks,
            decision_task,
            writer,
            intake_writer,
            admin_token,
        })
    }

    /// The all-roles API token Vigil generated (stored in `<data_dir>/admin.token`) because no
    /// `[[clients]]` are configured; `None` when clients are configured.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// The address the HTTP server is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The embedded store (for inspection by tests and tools).
    pub fn store(&self) -> &Arc<redb::Database> {
        &self.db
    }

    /// Durable intake, for inspection and for the stream-management client.
    pub fn intake(&self) -> &Intake {
        &self.intake
    }

    /// Vigil's signing identity toward enforcement points.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The evaluation engine (grants, contexts, policy).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Reloads the policy directory now (what SIGHUP does).
    pub async fn reload_policies(&self) -> ReloadOutcome {
        // Testing the set and re-evaluating every grant is blocking work.
        let reloader = self.reloader.clone();
        match tokio::task::spawn_blocking(move || reloader.reload(false)).await {
            Ok(outcome) => outcome,
            Err(e) => ReloadOutcome::Refused {
                version: self.engine.policy_version(),
                error: format!("the reload did not complete: {e}"),
                failed_tests: Vec::new(),
                impact: None,
            },
        }
    }

    /// Stops accepting requests, lets in-flight ones finish, drains the hand-off and the engine, and
    /// closes the store.
    pub async fn shutdown(self) {
        let Vigil {
            shutdown,
            tasks,
            writer,
            intake_writer,
            intake,
            engine,
            reloader,
            decision_task,
            db,
            ..
        } = self;
        let _ = shutdown.send(true);
        for task in tasks {
            let _ = task.await;
        }
        engine.shutdown().await;
        drop(reloader);
        drop(engine);
        let _ = decision_task.await;
        drop(intake);
        drop(db);
        // The writers exit once the last handles (held by the tasks above) are gone.
        let _ = tokio::task::spawn_blocking(move || {
            writer.join();
            intake_writer.join();
        })
        .await;
    }
}

/// Stage 1: the policy set, through the one path every reload takes ([`crate::reload::load_checked`]).
/// A set that does not load, or lints with errors, is a start-up error: Vigil never runs without
/// its rules, and a refused start leaves nothing open or created.
fn load_policy(config: &Config) -> Result<PolicySet, StartError> {
    let checked = crate::reload::load_checked(&config.policy)
        .map_err(|refusal| StartError::PolicySet(refusal.error))?;
    let policy = checked.set;
    tracing::info!(version = %policy.version, rules = policy.rules.len(), files = ?policy.files,
        tests_passed = checked.tests_passed, dir = %config.policy.dir.display(), "policy set loaded");
    Ok(policy)
}

/// Stage 2: the listening socket.
async fn bind(config: &Config) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listen = |source| StartError::Listen {
        addr: config.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    Ok((listener, addr))
}

/// `path` as the process sees it (relative paths are taken from the working directory), for the
/// start-up log line that says where data and rules are.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn engine_settings(config: &Config, clock: Clock) -> EngineSettings {
    EngineSettings {
        shards: if config.engine.shards == 0 {
            EngineSettings::default().shards
        } else {
            config.engine.shards
        },
        decay: config.context.decay.clone(),
        session_ttl_secs: config.engine.session_ttl_secs as f64,
        sweep_interval: Duration::from_millis(config.engine.sweep_interval_ms),
        max_batch: config.engine.max_batch,
        checkpoint_interval: Duration::from_millis(config.engine.checkpoint_interval_ms),
        max_inflight: config.engine.max_inflight,
        max_grants: config.engine.max_grants,
        max_grants_per_registrant: config.engine.grants_per_registrant(),
        grant_quotas: config
            .clients
            .iter()
            .filter_map(|c| Some((crate::grant::Registrant::client(&c.name), c.max_grants?)))
            .chain(config.transmitters.iter().filter_map(|t| {
                Some((
                    crate::grant::Registrant::transmitter(&t.name),
                    t.max_grants?,
                ))
            }))
            .collect(),
        context_retention: Duration::from_secs(config.engine.context_retention_secs),
        disabled_account_retention: Duration::from_secs(
            config.engine.disabled_account_retention_secs,
        ),
        context_scan_interval: crate::engine::scan_interval(Duration::from_secs(
            config.engine.context_retention_secs,
        )),
        clock,
        changelog: None,
        shadow_divergences_max: config.policy.shadow_divergences_max,
        journal_fold_rows: config.engine.journal_fold_rows,
        journal_fold_interval: Duration::from_millis(config.engine.journal_fold_interval_ms),
        journal_fold_cache_bytes: config.engine.journal_fold_cache_bytes,
    }
}

/// The client for calls to transmitters (metadata, keys, stream management, poll): their
/// configured issuer is the operator's choice, so loopback is allowed there; what their metadata
/// names is checked where it is used. Redirects stay on the origin asked for; link-local and other
/// never-valid addresses are refused for every name resolved.
fn transmitter_client(config: &Config) -> Result<reqwest::Client, StartError> {
    crate::tls::trust_bundle(
        reqwest::Client::builder()
            .timeout(Duration::from_millis(config.jwks.fetch_timeout_ms))
            .redirect(crate::outbound::same_origin_redirects())
            .dns_resolver(
                crate::outbound::Destinations {
                    allow_loopback: true,
                }
                .resolver(),
            ),
        &config.tls,
    )?
    .build()
    .map_err(|e| StartError::Client(e.to_string()))
}

/// The client for push delivery, which goes where enforcement points say: their URLs pass the
/// destination policy (`[outbound]`), every name they use is resolved through it, and no redirect
/// is followed.
fn push_client(
    config: &Config,
    destinations: crate::outbound::Destinations,
) -> Result<reqwest::Client, StartError> {
    // Each attempt has its own timeout (`delivery.push_timeout_ms`).
    policed_client(config, destinations, reqwest::Client::builder())
}

/// The client for calls to the cluster's other instances (their URLs come from a topic): as for
/// push, with a deadline, since the caller waits.
fn peer_client(
    config: &Config,
    destinations: crate::outbound::Destinations,
) -> Result<reqwest::Client, StartError> {
    policed_client(
        config,
        destinations,
        reqwest::Client::builder().timeout(Duration::from_secs(5)),
    )
}

/// `builder` with the destination policy on every name resolved, no redirect followed, and the
/// configured CA bundle.
fn policed_client(
    config: &Config,
    destinations: crate::outbound::Destinations,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, StartError> {
    crate::tls::trust_bundle(
        builder
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(destinations.resolver()),
        &config.tls,
    )?
    .build()
    .map_err(|e| StartError::Client(e.to_string()))
}

fn push_settings(
    config: &Config,
    destinations: crate::outbound::Destinations,
    clock: Clock,
) -> transmitter::push::PushSettings {
    transmitter::push::PushSettings {
        timeout: Duration::from_millis(config.delivery.push_timeout_ms),
        initial_backoff: Duration::from_millis(config.delivery.initial_backoff_ms),
        max_backoff: Duration::from_secs(config.delivery.max_backoff_secs),
        dead_letter_after: Duration::from_secs(config.delivery.dead_letter_after_secs),
        per_endpoint_concurrency: config.limits.push_concurrency_per_enforcement_point,
        destinations,
        max_error_body: 16 * 1024,
        clock,
    }
}

/// The configured transmitters, a managed stream's push credential filled in from its record
/// (generated once and kept, so the transmitter's copy stays valid across restarts).
async fn transmitter_configs(
    config: &Config,
    stream_records: &crate::ssf_client::StreamRecords,
) -> Result<Vec<crate::config::TransmitterConfig>, StartError> {
    let mut configs = config.transmitters.clone();
    for t in &mut configs {
        if t.manage.is_some() && t.authorization.trim().is_empty() {
            t.authorization = stream_records
                .push_credential(&t.name)
                .await
                .map_err(|e| StartError::Delivery(e.to_string()))?;
        }
    }
    Ok(configs)
}

/// Cluster mode: Vigil's topics, made when missing; their partition count. Brokers that do not
/// answer are waited for (an instance started during an outage starts when they return, with no
/// operator action), each attempt logged; a topic that cannot serve (wrong partition count, not
/// creatable) stops the start.
async fn ensure_topics(
    config: &crate::config::ClusterConfig,
    topics: &crate::cluster::Topics,
) -> Result<i32, crate::cluster::ClusterError> {
    let mut wait = Duration::from_secs(1);
    loop {
        match crate::cluster::ensure(config, topics).await {
            Err(crate::cluster::ClusterError::Brokers(why)) => {
                tracing::error!(alert = true, error = %why, retry_in_s = wait.as_secs(),
                    "the cluster's brokers do not answer; waiting for them before starting");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            other => return other,
        }
    }
}

/// Cluster mode: the records of the streams kept at transmitters, on the streams topic.
struct ManagedOnTopic(Arc<crate::cluster::StreamTopics>);

impl crate::ssf_client::RecordShare for ManagedOnTopic {
    fn publish(
        &self,
        name: &str,
        record: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), String>> {
        use crate::transmitter::streams::SharedStreams;
        self.0
            .configure(vec![(crate::cluster::managed_key(name), Some(record))])
    }
}

/// Cluster mode: takes up a record of a stream kept at a transmitter as it is read from the
/// streams topic, and the verification state it expects (any instance may be pushed the event).
fn managed_records(
    records: crate::ssf_client::StreamRecords,
    intake: Intake,
) -> crate::cluster::ManagedRecords {
    Arc::new(move |name: String, record: Vec<u8>| {
        let (records, intake) = (records.clone(), intake.clone());
        Box::pin(async move {
            let expected = records
                .apply(&name, record)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(v) = expected {
                intake
                    .expect_verification_state(&v.stream, &v.state)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    })
}

/// Cluster mode: keeps each managed stream's push credential, as the cluster's records hold it,
/// the one the receiver accepts (looked at every second).
async fn follow_push_credentials(
    managers: Vec<Arc<crate::ssf_client::StreamManager>>,
    records: crate::ssf_client::StreamRecords,
    receiver: Arc<Receiver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut accepted: std::collections::HashMap<String, String> = Default::default();
    loop {
        for m in &managers {
            let Ok(Some(credential)) = records.get(m.name()).map(|r| r.authorization) else {
                continue;
            };
            if accepted.get(m.name()) == Some(&credential) {
                continue;
            }
            if let Some(t) = receiver.transmitter(m.stream()) {
                t.set_credential(&credential);
                accepted.insert(m.name().to_owned(), credential);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Each transmitter with its key store, whose refresher runs supervised in `tasks`.
fn key_stores(
    config: &Config,
    configs: &[crate::config::TransmitterConfig],
    client: &reqwest::Client,
    shutdown_rx: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Vec<Arc<Transmitter>> {
    let settings = KeyStoreSettings {
        min_refetch: Duration::from_secs(config.jwks.min_refetch_interval_secs),
        refetch_floor: Duration::from_secs(config.jwks.refetch_floor_secs),
        refresh_interval: Duration::from_secs(config.jwks.refresh_interval_secs),
        retry_interval: Duration::from_secs(config.jwks.retry_interval_secs),
    };
    let mut transmitters = Vec::new();
    for t in configs {
        let source = match &t.jwks_uri {
            Some(uri) => KeySource::JwksUri(uri.clone()),
            None => KeySource::Discovery,
        };
        let keys = Arc::new(KeyStore::new(
            &t.name,
            &t.issuer,
            source,
            t.algorithms.clone(),
            client.clone(),
            settings.clone(),
        ));
        let (k, sd) = (keys.clone(), shutdown_rx.clone());
        tasks.push(crate::supervise::spawn(
            "jwks_refresh",
            shutdown_rx.clone(),
            move || k.clone().run_refresh(sd.clone()),
        ));
        transmitters.push(Arc::new(Transmitter::new(t.clone(), keys)));
    }
    transmitters
}

/// What the routes serve.
struct Parts<'a> {
    api_auth: Arc<ApiAuth>,
    receiver: Arc<Receiver>,
    transmitter_configs: &'a [crate::config::TransmitterConfig],
    api_state: Arc<ApiState>,
    ssf_clients: Arc<crate::ssf_client::StreamClients>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    kafka: Option<Arc<crate::kafka::KafkaHealth>>,
    /// Cluster mode: the risk feeds' source.
    feeds: Option<Arc<crate::kafka::KafkaHealth>>,
    /// Cluster mode: the grant status view.
    view: Option<Arc<crate::cluster::StatusView>>,
    identity: Arc<Identity>,
    streams: Arc<StreamStore>,
    /// Cluster mode: poll and SSE for streams other instances deliver.
    stream_forwarder: Option<Arc<dyn transmitter::mgmt::StreamForwarder>>,
    addr: SocketAddr,
    destinations: crate::outbound::Destinations,
    shutdown: watch::Receiver<bool>,
}

/// The HTTP surface: every route behind the role it needs, and the health routes a connection in
/// the server's reserve is served (see `server.rs`).
fn router(config: &Config, parts: Parts<'_>) -> (Router, Router) {
    let limits = &config.limits;
    let needs = |role: Role| {
        axum::middleware::from_fn_with_state(
            (parts.api_auth.clone(), Some(role)),
            crate::auth::require,
        )
    };
    let revocation_state = Arc::new(crate::global_revocation::RevocationState {
        receiver: parts.receiver.clone(),
        engine: parts.api_state.engine.clone(),
        max_body_bytes: config.push.max_body_bytes,
        limiter: RateLimiter::new(limits.transmitter_sets_per_sec, limits.burst),
    });
    let push_state = Arc::new(PushState {
        receiver: parts.receiver.clone(),
        max_body_bytes: config.push.max_body_bytes,
        limiter: RateLimiter::new(limits.transmitter_sets_per_sec, limits.burst),
        inflight: parts
            .transmitter_configs
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    Arc::new(tokio::sync::Semaphore::new(limits.transmitter_max_inflight)),
                )
            })
            .collect(),
    });
    let ops_state = Arc::new(ops::OpsState {
        receiver: parts.receiver,
        metrics: parts.metrics,
        kafka: parts.kafka,
        feeds: parts.feeds,
        view: parts.view,
    });
    let app = Router::new()
        .route("/ssf/push/{stream}", post(push::push))
        .with_state(push_state)
        .merge(
            Router::new()
                .route(
                    "/oauth/global-token-revocation",
                    post(crate::global_revocation::revoke),
                )
                .with_state(revocation_state),
        )
        .merge(
            Router::new()
                .route("/v1/grants", post(api::register_grant))
                .route(
                    "/v1/grants/{id}",
                    get(api::get_grant).delete(api::delete_grant),
                )
                .route_layer(needs(Role::Grants))
                .merge(
                    Router::new()
                        .route("/v1/check", post(api::check_grant))
                        .route("/v1/check/auth_request", get(api::check_auth_request))
                        .route("/access/v1/evaluation", post(crate::authzen::evaluation))
                        .route("/access/v1/evaluations", post(crate::authzen::evaluations))
                        .route_layer(needs(Role::Check)),
                )
                .merge(
                    Router::new()
                        .route("/v1/decisions", get(api::decisions))
                        .route("/v1/subjects", get(api::find_subjects))
                        .route("/v1/subjects/{key}", get(api::subject))
                        .route("/v1/signals", get(api::signals))
                        .route("/v1/enforcement-points", get(api::enforcement_points))
                        .route("/v1/grants", get(api::list_grants))
                        .route("/v1/grants/{id}/explain", get(api::explain_grant))
                        .route("/v1/policies", get(crate::policy_api::policies))
                        .route("/v1/policies/reload", post(crate::policy_api::reload))
                        .route("/v1/policies/impact", post(crate::policy_api::impact))
                        .route("/v1/policies/replay", post(crate::policy_api::replay))
                        .route(
                            "/v1/policies/shadow",
                            get(crate::policy_api::shadow)
                                .put(crate::policy_api::load_shadow)
                                .delete(crate::policy_api::discard_shadow),
                        )
                        .route(
                            "/v1/policies/shadow/promote",
                            post(crate::policy_api::promote_shadow),
                        )
                        .route(
                            "/v1/policies/shadow/divergences",
                            get(crate::policy_api::divergences),
                        )
                        .route("/v1/deadletters", get(api::dead_letters))
                        .route("/v1/keys/rotate", post(api::rotate_key))
                        .route("/v1/deadletters/replay", post(api::replay_dead_letters))
                        .route_layer(needs(Role::Operator)),
                )
                .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
                .with_state(parts.api_state),
        )
        .merge(
            crate::ssf_client::http::routes(parts.ssf_clients).route_layer(needs(Role::Operator)),
        )
        .route("/console", get(crate::console::index))
        .route("/console/login.js", get(crate::console::login))
        .route("/console/console.css", get(crate::console::style))
        .merge(
            Router::new()
                .route("/console/app.js", get(crate::console::app))
                .route_layer(needs(Role::Operator)),
        )
        .merge(
            Router::new()
                .route("/v1/openapi.yaml", get(ops::openapi))
                .route_layer(axum::middleware::from_fn_with_state(
                    (parts.api_auth.clone(), None),
                    crate::auth::require,
                )),
        )
        .merge(
            Router::new()
                .route("/metrics", get(ops::metrics))
                .route_layer(needs(Role::Metrics))
                .with_state(ops_state.clone()),
        );
    // What a connection in the health reserve is served (see `server.rs`).
    let health = Router::new()
        .route("/readyz", get(ops::readyz))
        .route_layer(needs(Role::Metrics))
        .route("/healthz", get(ops::healthz))
        .with_state(ops_state);
    let app = app.merge(health.clone());

    let issuer = config
        .identity
        .issuer
        .clone()
        .unwrap_or_else(|| format!("http://{}", parts.addr));
    let well_known = crate::discovery::metadata_url(&issuer, "ssf-configuration")
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|_| "/.well-known/ssf-configuration".to_owned());
    let app = app.merge(
        Router::new()
            .route(
                "/.well-known/authzen-configuration",
                get(crate::authzen::metadata),
            )
            .with_state(Arc::new(issuer.trim_end_matches('/').to_owned())),
    );
    let app = app.merge(
        Router::new()
            .route(&well_known, get(transmitter::metadata))
            .route("/jwks.json", get(transmitter::jwks))
            .with_state(Arc::new(MetadataState {
                issuer: issuer.clone(),
                identity: parts.identity.clone(),
            })),
    );
    let mgmt_state = Arc::new(MgmtState {
        issuer,
        points: config
            .enforcement_points
            .iter()
            .map(|p| EnforcementPoint {
                name: p.name.clone(),
                token_digest: crate::auth::digest(&p.token),
                audience: p.audience.clone().unwrap_or_else(|| p.name.clone()),
            })
            .collect(),
        streams: parts.streams,
        identity: parts.identity.clone(),
        poll_timeout: Duration::from_secs(config.identity.poll_timeout_secs),
        connections: Arc::new(tokio::sync::Semaphore::new(
            limits.max_streaming_connections,
        )),
        connections_per_point: config
            .enforcement_points
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Arc::new(tokio::sync::Semaphore::new(
                        limits.max_streaming_connections_per_enforcement_point,
                    )),
                )
            })
            .collect(),
        max_streams_per_point: limits.max_streams_per_enforcement_point,
        max_subjects_per_stream: limits.max_subjects_per_stream,
        destinations: parts.destinations,
        limiter: RateLimiter::new(
            limits.enforcement_point_requests_per_sec,
            limits.enforcement_point_requests_per_sec * 2.0,
        ),
        shutdown: parts.shutdown,
        forwarder: parts.stream_forwarder,
    });
    let app = app.merge(
        Router::new()
            .route(
                "/ssf/streams",
                post(mgmt::create)
                    .get(mgmt::read)
                    .patch(mgmt::update)
                    .put(mgmt::replace)
                    .delete(mgmt::delete),
            )
            .route(
                "/ssf/status",
                get(mgmt::read_status).post(mgmt::update_status),
            )
            .route("/ssf/subjects:add", post(mgmt::add_subject))
            .route("/ssf/subjects:remove", post(mgmt::remove_subject))
            .route("/ssf/verify", post(mgmt::verify))
            .route("/ssf/poll/{stream_id}", post(mgmt::poll))
            .route("/ssf/sse/{stream_id}", get(mgmt::sse))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
            .with_state(mgmt_state),
    );
    let app = app.layer(axum::middleware::from_fn_with_state(
        Duration::from_millis(config.server.body_read_timeout_ms),
        crate::server::body_deadline,
    ));
    (app, health)
}

/// The signing algorithm of each enforcement point that names one.
fn signing_choices(config: &Config) -> std::collections::HashMap<String, crate::jose::Alg> {
    config
        .enforcement_points
        .iter()
        .filter_map(|ep| Some((ep.name.clone(), ep.signing_alg?)))
        .collect()
}
