//! `fledge` — automated, metrics-driven canary releases for Envoy and Istio.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use fledge_controller::runner::Registry;
use fledge_controller::state::StateStore;
use fledge_controller::supervisor::Supervisor;
use fledge_controller::{api, cli, config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc, configured in `.cargo/config.toml` to purge freed pages in a background thread
/// after 1 s: every Canary with one interval is judged on the same tick, so each tick's burst
/// (gateway pages, Prometheus answers, reconciles in flight) is freed together, and an
/// allocator that keeps it leaves the process' RSS wherever the last bursts left it. Measured
/// side by side with `fledge-bench-scale`, 1,000 Canaries at the end of the window: mimalloc
/// 89–105 MiB, this 69–71 MiB, with less CPU (docs/operating.md, "Memory per Canary"; glibc's
/// malloc, earlier, kept 283 MiB). Build with `--features system-allocator` to profile with
/// heaptrack or valgrind, which see only malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "fledge",
    version,
    about = "Automated, metrics-driven canary releases for Envoy and Istio"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run one or more canaries standalone against Envoy (metrics from Envoy admin, weights
    /// through file-based RDS).
    Run {
        /// Canary spec files (YAML; several documents per file allowed).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Address of the status API.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Where each canary's state is saved, so a restart continues where it stopped.
        #[arg(long, default_value = ".fledge/state")]
        state_dir: PathBuf,
        /// Exit once every canary is Promoted or RolledBack (exit code 0 if all promoted, 3 if any
        /// rolled back).
        #[arg(long)]
        exit_when_done: bool,
        /// Refuse every operator command (promote, abort, pause, resume, retry) with 403.
        #[arg(long)]
        read_only: bool,
        /// Accept commands although --listen is not a loopback address (there is no
        /// authentication: put the server behind one).
        #[arg(long)]
        allow_remote_commands: bool,
    },
    /// Show canaries of a running `fledge run`: phase, weight, step, checks, last reason.
    /// Exit code 1 if a shown canary is RolledBack, 3 if the server is unreachable.
    Status {
        /// One canary in detail; without it, a table of all canaries.
        name: Option<String>,
        /// Redraw every --interval until every shown canary is Promoted or RolledBack (or
        /// Ctrl-C).
        #[arg(short = 'w', long)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Continue past a `pause: {}` step (--full: skip every remaining step and promote now).
    Promote {
        name: String,
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll the canary back to stable now.
    Abort {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Hold the canary at its current step (analysis continues and can still roll back).
    Pause {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Undo `pause`.
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Decide a spec over simulated traffic with the controller's own state machine (the
    /// dashboard's /simulator, natively): when would it promote or roll back?
    Simulate {
        /// The Canary spec (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The scenario as JSON, e.g. '{"requestsPerMinute": 600, "canaryErrorRatio": 2}'
        /// (fields: requestsPerMinute, stableErrorPercent, canaryErrorRatio,
        /// canaryLatencyFactor, medianMs, latencySigma, degradeAfterMinutes, seed, maxMinutes,
        /// promoteAtPauses).
        #[arg(long, default_value = "{}")]
        scenario: String,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: cli::Output,
    },
    /// Start a rolled-back canary again from its first step.
    Retry {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run the Kubernetes controller: watch `Canary` objects and move the weights of their Istio
    /// VirtualServices (see docs/kubernetes.md).
    Controller {
        /// Watch Canaries in this namespace only (default: all namespaces).
        #[arg(long)]
        namespace: Option<String>,
        /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else fledge-system).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "fledge-controller")]
        lease_name: String,
        /// This instance's identity in the Lease (default: $POD_NAME, else $HOSTNAME).
        #[arg(long)]
        identity: Option<String>,
        /// How long the Lease stays valid after its last renewal: a standby takes over about
        /// this long after the leader died (whole seconds, at least 3s).
        #[arg(long, default_value = "15s", value_parser = lease_duration)]
        lease_duration: std::time::Duration,
        /// Address of the probes (/healthz, /readyz), the read-only dashboard and API, and
        /// /metrics. Loopback unless configured; in a pod set `--listen=0.0.0.0:8080` (the
        /// manifests do) so the kubelet and Prometheus reach it.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Own only the Canaries of the namespaces in shard N of M (e.g. `--shard 0/4`); each
        /// shard has its own Lease (`<lease-name>-shard-N-of-M`). See docs/operating.md.
        #[arg(long)]
        shard: Option<fledge_controller::k8s::shard::Shard>,
        /// Own only the Canaries with these labels (a Kubernetes label selector, e.g.
        /// `team in (a,b)`); it gets its own Lease (`<lease-name>-<hash of the selector>`).
        #[arg(long)]
        selector: Option<String>,
        /// Write analysis progress alone (evidence, last report) to .status this often (steps,
        /// failures, commands and conditions are written at once). 0s: with every change.
        #[arg(long, default_value = "5m")]
        status_checkpoint: fledge_core::duration::HumanDuration,
        /// Kubernetes API requests per second, client side (leader election aside).
        #[arg(long, default_value_t = fledge_controller::k8s::serve::DEFAULT_API_QPS)]
        kube_api_qps: f64,
        /// Requests allowed above --kube-api-qps after a quiet while.
        #[arg(long, default_value_t = fledge_controller::k8s::serve::DEFAULT_API_BURST)]
        kube_api_burst: u32,
        /// Canaries with self-metrics series of their own at /metrics; the others are summed
        /// under canary="_other" (and counted by phase in fledge_canaries).
        #[arg(long, default_value_t = fledge_controller::telemetry::DEFAULT_CANARY_SERIES_LIMIT)]
        metrics_canary_limit: usize,
    },
    /// Print the Canary CustomResourceDefinition as YAML (`fledge crd > manifests/crd.yaml`).
    Crd,
    /// Check Canary spec files: every error (exit code 2, on stderr) and every warning (exit
    /// code 0, on stdout), each with the field and the fix.
    Validate {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// `json`: one entry per file with its `errors` and `warnings`, each with the field and
        /// the fix.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: cli::Output,
    },
}

fn load(files: &[PathBuf]) -> anyhow::Result<Vec<fledge_core::spec::Canary>> {
    config::load_files(files).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!("invalid canary spec:\n{}", text.join("\n"))
    })
}

/// Where a client command finds the server, and how it prints.
#[derive(clap::Args)]
struct ClientArgs {
    /// Base URL of the `fledge run --listen` server.
    #[arg(long, env = "FLEDGE_SERVER", default_value = cli::DEFAULT_SERVER)]
    server: String,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: cli::Output,
    /// Talk to the Kubernetes API instead of --server (kubeconfig or in-cluster): status from
    /// Canary objects, commands as the annotations `fledge controller` acts on.
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: the namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, requires = "kubernetes")]
    namespace: Option<String>,
}

impl ClientArgs {
    /// Run `work` against the target these arguments name; exit code 3 when it cannot be
    /// reached.
    fn run<F, Fut>(self, work: F) -> anyhow::Result<ExitCode>
    where
        F: FnOnce(cli::Target, cli::Output) -> Fut,
        Fut: std::future::Future<Output = u8>,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let output = self.output;
        Ok(ExitCode::from(runtime.block_on(async move {
            let target = if self.kubernetes {
                match cli::kube::KubeTarget::connect(self.namespace.as_deref()).await {
                    Ok(kube) => cli::Target::Kubernetes(Box::new(kube)),
                    Err(e) => return cli::report_error(output, &e),
                }
            } else {
                cli::Target::Server(cli::Client::new(&self.server))
            };
            work(target, output).await
        })))
    }
}

fn client_command(args: ClientArgs, name: String, verb: cli::Verb) -> anyhow::Result<ExitCode> {
    args.run(|target, output| async move { cli::command(&target, &name, verb, output).await })
}

/// `fledge simulate`: the same function the browser simulator runs, natively.
fn simulate(
    file: &std::path::Path,
    scenario: &str,
    output: cli::Output,
) -> anyhow::Result<ExitCode> {
    let spec =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let answer: serde_json::Value =
        serde_json::from_str(&fledge_rollout_sim_web::simulate(&spec, scenario))?;
    if output == cli::Output::Json {
        println!("{answer}");
    } else if let Some(error) = answer["error"].as_str() {
        eprintln!("fledge: {error}");
        for problem in answer["problems"].as_array().into_iter().flatten() {
            eprintln!(
                "  - {}: {}; {}",
                problem["field"], problem["problem"], problem["fix"]
            );
        }
    } else {
        println!(
            "{}: {} after {} intervals ({:.1} min, {} canary requests): {}",
            answer["canary"].as_str().unwrap_or_default(),
            answer["outcome"].as_str().unwrap_or_default(),
            answer["intervals"],
            answer["minutes"].as_f64().unwrap_or_default(),
            answer["canaryRequests"],
            answer["reason"].as_str().unwrap_or_default()
        );
        for warning in answer["warnings"].as_array().into_iter().flatten() {
            println!("  warning: {}", warning.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::from(match answer["outcome"].as_str() {
        _ if answer.get("error").is_some() => cli::EXIT_USAGE,
        Some("RolledBack") => cli::EXIT_ROLLED_BACK,
        _ => cli::EXIT_OK,
    }))
}

async fn run(
    files: Vec<PathBuf>,
    listen: SocketAddr,
    state_dir: PathBuf,
    exit_when_done: bool,
    commands: api::CommandPolicy,
) -> anyhow::Result<ExitCode> {
    let canaries = load(&files)?;
    let registry = Registry::default();
    let store = StateStore::new(state_dir);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    // One scrape (or query) per metrics endpoint per tick, shared by every canary reading it.
    let reads = std::sync::Arc::new(fledge_controller::metrics::ReadHub::on_own_threads());
    let mut supervisor = Supervisor::new(files, store, registry.clone(), reads, exit_when_done);
    supervisor.start(canaries)?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--listen)"))?;
    let local = listener.local_addr()?;
    println!("fledge: status API on http://{local}/api/v1/canaries");
    println!("fledge: dashboard on http://{local}/  (metrics: http://{local}/metrics)");
    if let api::CommandPolicy::Disabled(reason) = &commands {
        println!("fledge: {reason}");
    }
    let mut api_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, api::router_with(registry, commands))
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.changed().await;
            })
            .await
    });

    let outcome = supervisor.run(shutdown_signal()).await;
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    let rolled_back = outcome?;
    Ok(if rolled_back {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn controller(
    options: fledge_controller::k8s::serve::ServeOptions,
) -> anyhow::Result<ExitCode> {
    fledge_controller::k8s::serve::run_until(options, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Colour in log lines only for a person at a terminal: never in a file or a pipe, never with
/// `NO_COLOR` set.
fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(log_colours())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Controller {
            namespace,
            lease_namespace,
            lease_name,
            identity,
            lease_duration,
            listen,
            shard,
            selector,
            status_checkpoint,
            kube_api_qps,
            kube_api_burst,
            metrics_canary_limit,
        } => {
            let options = fledge_controller::k8s::serve::ServeOptions::from_args(
                namespace,
                lease_namespace,
                lease_name,
                identity,
                listen,
            )
            .with_lease_duration(lease_duration)
            .scaled(fledge_controller::k8s::serve::ScaleArgs {
                shard,
                selector,
                status_checkpoint: Some(status_checkpoint.0),
                api_qps: Some(kube_api_qps),
                api_burst: Some(kube_api_burst),
                canary_series_limit: Some(metrics_canary_limit),
            });
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(controller(options)),
                Err(e) => Err(e.into()),
            }
        }
        Commands::Crd => fledge_controller::k8s::crd::crd_yaml()
            .map(|yaml| {
                print!("{yaml}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Commands::Validate {
            files,
            output: cli::Output::Json,
        } => {
            let (document, code) = cli::validation_json(&files);
            println!("{document}");
            Ok(ExitCode::from(code))
        }
        Commands::Validate { files, .. } => {
            let (out, err, code) = cli::validation_text(&files);
            print!("{out}");
            eprint!("{err}");
            Ok(ExitCode::from(code))
        }
        Commands::Run {
            files,
            listen,
            state_dir,
            exit_when_done,
            read_only,
            allow_remote_commands,
        } => {
            let commands = api::CommandPolicy::for_listen(listen, read_only, allow_remote_commands);
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(run(files, listen, state_dir, exit_when_done, commands)),
                Err(e) => Err(e.into()),
            }
        }
        Commands::Status {
            name,
            watch,
            interval,
            client,
        } => {
            let every = std::time::Duration::from_secs_f64(interval.clamp(0.2, 3600.0));
            client.run(|target, output| async move {
                cli::status(&target, name.as_deref(), watch, every, output).await
            })
        }
        Commands::Promote { name, full, client } => {
            client_command(client, name, cli::Verb::Promote { full })
        }
        Commands::Abort { name, client } => client_command(client, name, cli::Verb::Abort),
        Commands::Pause { name, client } => client_command(client, name, cli::Verb::Pause),
        Commands::Resume { name, client } => client_command(client, name, cli::Verb::Resume),
        Commands::Retry { name, client } => client_command(client, name, cli::Verb::Retry),
        Commands::Simulate {
            file,
            scenario,
            output,
        } => simulate(&file, &scenario, output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fledge: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--lease-duration`: a duration of whole seconds, at least 3 s.
fn lease_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration: fledge_core::duration::HumanDuration = text
        .parse()
        .map_err(|e: fledge_core::duration::DurationError| e.to_string())?;
    let millis = duration.as_millis();
    if millis < 3000 || !millis.is_multiple_of(1000) {
        return Err(format!(
            "{text:?} is not whole seconds of at least 3s; write e.g. `--lease-duration 15s`"
        ));
    }
    Ok(duration.0)
}
