//! The `llmq` binary: parses the command line, loads the configuration and hands over to
//! the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use llmq::{
    config::Config,
    runtime::logs,
    runtime::shutdown,
    tools::client::{self, PublishArgs},
    tools::mock::{MockOptions, MockServer},
    worker,
};

/// jemalloc: under a thousand concurrent requests glibc's malloc spent a fifth of the worker's
/// CPU in allocation and fragmented more. The `system-alloc` feature (profiling with
/// heaptrack) leaves it out.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: the configuration or the command line is wrong.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "llmq", version, about = "RabbitMQ workers for LLM requests")]
struct Cli {
    /// Configuration file (default: ./config.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Serve a deterministic OpenAI-compatible mock upstream.
    MockLlm {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        #[command(flatten)]
        options: MockOptions,
    },
    /// Publish one request to the request exchange.
    Publish(PublishArgs),
    /// Inspect, replay or purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Queue depths and consumers of the topology.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Declare the topology (as a worker does) and print it, without consuming.
    Topology,
    /// Measure throughput, latency and memory against the broker (see README, Benchmarks).
    Bench(llmq::tools::bench::BenchArgs),
    /// Exit 0 when an HTTP GET of URL answers 2xx (container health checks).
    Probe {
        /// The URL to fetch.
        url: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show dead letters without removing or reordering them.
    List {
        /// How many, from the head of the queue.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the request exchange (confirmed before removal).
    Replay {
        /// Every dead letter.
        #[arg(
            long,
            conflicts_with = "request_id",
            required_unless_present = "request_id"
        )]
        all: bool,
        /// Only these request ids (repeatable).
        #[arg(long)]
        request_id: Vec<String>,
        /// Start the attempt count afresh (else a request out of attempts fails again at once).
        #[arg(long)]
        reset_attempts: bool,
    },
    /// Delete every dead letter.
    Purge,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmq: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Probe { url } = &command {
        return runtime.block_on(probe(url));
    }
    if let Command::MockLlm { addr, options } = command {
        logs::init(&Config::default().log);
        return runtime.block_on(mock(addr, options));
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("llmq: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    logs::init(&config.log);
    runtime.block_on(async move {
        match command {
            Command::Publish(args) => match client::publish(&config, &args).await {
                Ok((request_id, None)) => {
                    println!("{request_id}");
                    ExitCode::SUCCESS
                }
                Ok((_, Some(result))) => {
                    println!("{result}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("llmq publish: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Bench(args) => match llmq::tools::bench::run(&config, &args).await {
                Ok(report) => {
                    println!("{}", llmq::tools::bench::table(&report));
                    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                    println!("{json}");
                    if let Some(path) = &args.json
                        && let Err(e) = std::fs::write(path, &json)
                    {
                        eprintln!("llmq bench: cannot write {}: {e}", path.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("llmq bench: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Dlq { command } => dlq(&config, command).await,
            Command::Status { json } => match llmq::ops::dlq::status(&config).await {
                Ok(queues) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&queues).unwrap_or_default()
                        );
                    } else {
                        println!("{:<48} {:>10} {:>10}", "queue", "messages", "consumers");
                        for q in queues {
                            println!("{:<48} {:>10} {:>10}", q.queue, q.messages, q.consumers);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail("status", e),
            },
            Command::Topology => match llmq::ops::dlq::declare(&config).await {
                Ok(()) => {
                    let t = &config.topology;
                    println!("exchange {} (direct)", t.request_exchange);
                    println!(
                        "  -> queue {} (key {}, x-max-priority {})",
                        t.processing_queue, t.processing_key, t.max_priority
                    );
                    println!(
                        "  -> queue {} (key {}, x-max-priority {})",
                        t.embeddings_queue, t.embeddings_key, t.max_priority
                    );
                    println!("exchange {} (direct)", t.results_exchange);
                    if t.keep_results {
                        println!("  -> queue {} (key {})", t.results_queue, t.results_key);
                    }
                    println!("exchange {} (direct)", t.dead_letter_exchange);
                    println!(
                        "  -> queue {} (key {})",
                        t.dead_letter_queue, t.dead_letter_key
                    );
                    println!("exchange {} (headers)", t.retry_exchange);
                    for tier in llmq::broker::retry::TIERS {
                        println!(
                            "  -> queue {} (dead-letters to {})",
                            llmq::broker::topology::retry_queue(t, tier.name),
                            t.request_exchange
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail("topology", e),
            },
            _ => run_worker(config).await,
        }
    })
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("llmq {what}: {e}");
    ExitCode::FAILURE
}

async fn dlq(config: &Config, command: DlqCommand) -> ExitCode {
    use llmq::ops::dlq::{self, Selection};
    match command {
        DlqCommand::List { limit, json } => match dlq::list(config, limit).await {
            Ok(items) => {
                if json {
                    for item in items {
                        println!("{}", serde_json::to_string(&item).unwrap_or_default());
                    }
                } else {
                    println!(
                        "{:<38} {:<20} {:>8} {:>8}  reason",
                        "request_id", "error_kind", "attempts", "age_s"
                    );
                    for d in items {
                        println!(
                            "{:<38} {:<20} {:>8} {:>8}  {}",
                            d.request_id,
                            d.error_kind,
                            d.attempts,
                            d.age_secs,
                            llmq::truncate(&d.reason, 120)
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail("dlq list", e),
        },
        DlqCommand::Replay {
            all,
            request_id,
            reset_attempts,
        } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(request_id.into_iter().collect())
            };
            match dlq::replay(config, &selection, reset_attempts).await {
                Ok(done) => {
                    for d in &done {
                        println!("replayed {} ({})", d.request_id, d.error_kind);
                    }
                    println!("{} replayed", done.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail("dlq replay", e),
            }
        }
        DlqCommand::Purge => match dlq::purge(config).await {
            Ok(n) => {
                println!("{n} dead letters purged");
                ExitCode::SUCCESS
            }
            Err(e) => fail("dlq purge", e),
        },
    }
}

/// The worker and its admin server (which outlives the drain, so probes keep answering).
async fn run_worker(config: Config) -> ExitCode {
    let token = shutdown::install();
    let admin_addr = config.admin.socket_addr();
    let worker = match worker::Worker::new(config, token) {
        Ok(worker) => worker,
        Err(e) => {
            tracing::error!(error = %e, "worker failed to start");
            return ExitCode::FAILURE;
        }
    };
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = admin_addr {
        let admin = llmq::ops::admin::Admin {
            metrics: worker.metrics(),
            flow: worker.flow(),
            health: worker.health(),
        };
        match llmq::ops::admin::serve(addr, admin, admin_stop.clone()).await {
            Ok(bound) => tracing::info!(addr = %bound, "admin HTTP: /metrics /healthz /readyz"),
            Err(e) => {
                tracing::error!(error = %e, %addr, "cannot listen for the admin HTTP server");
                return ExitCode::FAILURE;
            }
        }
    }
    worker.run().await;
    admin_stop.cancel();
    ExitCode::SUCCESS
}

async fn mock(addr: SocketAddr, options: MockOptions) -> ExitCode {
    let server = match MockServer::start(addr, options.clone()).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("llmq mock-llm: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %server.addr, ?options, "mock LLM serving /v1/chat/completions, /v1/embeddings, /v1/models");
    shutdown::install().cancelled().await;
    ExitCode::SUCCESS
}

async fn probe(url: &str) -> ExitCode {
    llmq::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    let ok = match client {
        Ok(c) => c
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
