//! The `llmq` binary: parses the command line, loads the configuration and hands over to
//! the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use llmq::{
    app::App,
    config::Config,
    config::QueueType,
    ops::{
        convert,
        dlq::{self, Selection},
        status, topology, usage,
    },
    runtime::{logs, shutdown},
    tools::{
        self, bench,
        client::{self, PublishArgs},
        mock::{MockOptions, MockServer},
    },
};

/// jemalloc: under a thousand concurrent requests glibc's malloc spent a fifth of the worker's
/// CPU in allocation and fragmented more. The `system-alloc` feature (profiling with
/// heaptrack) leaves it out.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: the configuration or the command line is wrong.
const EX_USAGE: u8 = 64;

/// What `--version` prints: the crate's version and the commit it was built from
/// (`build.rs`: `LLMQ_COMMIT` when set, as the Dockerfile does, else `git`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LLMQ_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "llmq",
    version = VERSION,
    about = "RabbitMQ workers for LLM requests",
    arg_required_else_help = true
)]
struct Cli {
    /// Configuration file (default: ./config.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
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
    /// Cancel a request: every worker hears it; one in flight is aborted, one still queued
    /// is answered `cancelled` when it is reached.
    Cancel {
        /// The request's id.
        request_id: String,
    },
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
    /// Print the topology this configuration declares (nothing is declared without
    /// `--declare`).
    Topology {
        /// Declare it first, as a worker does at start-up, without consuming.
        #[arg(long)]
        declare: bool,
        #[command(subcommand)]
        command: Option<TopologyCommand>,
    },
    /// Check the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script (e.g. `llmq completions bash > /etc/bash_completion.d/llmq`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// What each tenant spent, used and asked for today and this month (UTC), from Redis
    /// (`limits.redis_url`).
    Usage {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput, latency and memory against the broker (see README, Benchmarks).
    Bench(bench::BenchArgs),
    /// Exit 0 when an HTTP GET of URL answers 2xx (container health checks).
    Probe {
        /// The URL to fetch.
        url: String,
    },
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Move every queue of the topology to the other queue type, keeping each message once
    /// (stop every worker first; then start them with topology.queue_type set to it).
    Convert {
        /// The queue type to move to.
        #[arg(long, value_enum)]
        to: QueueType,
        /// Only list what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file, then `LLMQ_*` variables) and print it in effect,
    /// secrets hidden; exit 64 listing every problem.
    Check,
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
            conflicts_with_all = ["request_id", "kind"],
            required_unless_present_any = ["request_id", "kind"]
        )]
        all: bool,
        /// Only these request ids (repeatable).
        #[arg(long, conflicts_with = "kind")]
        request_id: Vec<String>,
        /// Only dead letters of this kind (`x-error-kind`), e.g. `budget_exceeded` once the
        /// budgets reset.
        #[arg(long)]
        kind: Option<llmq::contract::ErrorKind>,
        /// Start the attempt count afresh (else a request out of attempts fails again at once).
        #[arg(long)]
        reset_attempts: bool,
    },
    /// Delete every dead letter, after asking (on a terminal) unless `--yes`.
    Purge {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command;
    if let Command::Completions { shell } = command {
        clap_complete::generate(shell, &mut Cli::command(), "llmq", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmq: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Probe { url } = &command {
        return exit(runtime.block_on(tools::probe::probe(url)));
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
    if let Command::Config {
        command: ConfigCommand::Check,
    } = command
    {
        return match config.to_redacted_toml() {
            Ok(toml) => {
                eprintln!("llmq config check: the configuration is valid; in effect:");
                print(toml)
            }
            Err(e) => fail("config check", e),
        };
    }
    logs::init(&config.log);
    runtime.block_on(async move {
        match command {
            Command::Publish(args) => match client::publish(&config, &args).await {
                Ok((request_id, result)) => print(result.unwrap_or(request_id)),
                Err(e) => fail("publish", e),
            },
            Command::Cancel { request_id } => match client::cancel(&config, &request_id).await {
                Ok(()) => print(format!("cancel sent for {request_id}")),
                Err(e) => fail("cancel", e),
            },
            Command::Bench(args) => match bench::run(&config, &args).await {
                Ok(report) => {
                    println!("{}", bench::table(&report));
                    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                    println!("{json}");
                    match &args.json {
                        Some(path) => match std::fs::write(path, &json) {
                            Ok(()) => ExitCode::SUCCESS,
                            Err(e) => {
                                fail("bench", format!("cannot write {}: {e}", path.display()))
                            }
                        },
                        None => ExitCode::SUCCESS,
                    }
                }
                Err(e) => fail("bench", e),
            },
            Command::Dlq { command } => dlq(&config, command).await,
            Command::Usage { tenant, json } => {
                match usage::usage(&config, tenant.as_deref()).await {
                    Ok((period, rows)) if json => print(usage::json(&period, &rows)),
                    Ok((period, rows)) => print(usage::table(&period, &rows)),
                    Err(e) => fail("usage", e),
                }
            }
            Command::Status { json } => match status::status(&config).await {
                Ok(queues) if json => {
                    print(serde_json::to_string_pretty(&queues).unwrap_or_default())
                }
                Ok(queues) => print(status::table(&queues)),
                Err(e) => fail("status", e),
            },
            Command::Topology {
                declare: true,
                command: None,
            } => match topology::declare(&config).await {
                Ok(version) => print(topology::describe(&config.topology, version)),
                Err(e) => fail("topology", e),
            },
            Command::Topology {
                declare: false,
                command: None,
            } => {
                let version = topology::version(&config).await;
                println!(
                    "{}",
                    topology::describe(&config.topology, version).trim_end()
                );
                print("(not declared: `llmq topology --declare` declares it)")
            }
            Command::Topology {
                command: Some(TopologyCommand::Convert { to, dry_run }),
                ..
            } => convert_topology(&config, to, dry_run).await,
            Command::Run => run(config).await,
            // Handled before the configuration is loaded.
            Command::Probe { .. }
            | Command::MockLlm { .. }
            | Command::Completions { .. }
            | Command::Config { .. } => ExitCode::FAILURE,
        }
    })
}

fn print(text: impl std::fmt::Display) -> ExitCode {
    println!("{}", text.to_string().trim_end());
    ExitCode::SUCCESS
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("llmq {what}: {e}");
    ExitCode::FAILURE
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn dlq(config: &Config, command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List { limit, json } => match dlq::list(config, limit).await {
            Ok(items) if json => print(dlq::json_lines(&items)),
            Ok(items) => print(dlq::table(&items)),
            Err(e) => fail("dlq list", e),
        },
        DlqCommand::Replay {
            all,
            request_id,
            kind,
            reset_attempts,
        } => {
            let selection = match kind {
                _ if all => Selection::All,
                Some(kind) => Selection::Kind(kind),
                None => Selection::Ids(request_id.into_iter().collect()),
            };
            match dlq::replay(config, &selection, reset_attempts).await {
                Ok(done) => {
                    for d in &done {
                        println!("replayed {} ({})", d.request_id, d.error_kind);
                    }
                    print(format!("{} replayed", done.len()))
                }
                Err(e) => fail("dlq replay", e),
            }
        }
        DlqCommand::Purge { yes } => {
            if !yes {
                match confirm_purge(config).await {
                    Ok(true) => {}
                    Ok(false) => return fail("dlq purge", "not confirmed; nothing purged"),
                    Err(e) => return fail("dlq purge", e),
                }
            }
            match dlq::purge(config).await {
                Ok(n) => print(format!("{n} dead letters purged")),
                Err(e) => fail("dlq purge", e),
            }
        }
    }
}

/// Asks on the terminal whether to purge the DLQ, saying how many dead letters it holds.
/// Without a terminal there is no one to ask: an error that names `--yes`.
async fn confirm_purge(config: &Config) -> Result<bool, String> {
    use std::io::{BufRead, IsTerminal, Write};
    let queue = &config.topology.dead_letter_queue;
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "refusing to purge {queue} without confirmation: stdin is not a terminal; pass \
             --yes to purge without asking"
        ));
    }
    let n = dlq::count(config).await.map_err(|e| e.to_string())?;
    eprint!("Delete the {n} dead letters in {queue}? They cannot be replayed after. [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// `llmq topology convert`: what it would do, then (unless `dry_run`) what it did.
async fn convert_topology(config: &Config, to: QueueType, dry_run: bool) -> ExitCode {
    let plan = match convert::plan(config, to).await {
        Ok(plan) => plan,
        Err(e) => return fail("topology convert", e),
    };
    println!("{}", plan.to_string().trim_end());
    if dry_run && plan.refusals().is_empty() {
        return print("--dry-run: nothing changed");
    }
    if dry_run {
        return fail("topology convert", "--dry-run: it would be refused");
    }
    match convert::convert(config, to).await {
        Ok(done) => print(convert::report(&done, to)),
        Err(e) => fail("topology convert", e),
    }
}

/// The worker and its admin server until SIGTERM or SIGINT, then the drain.
async fn run(config: Config) -> ExitCode {
    let ran = match App::start(config, shutdown::install()).await {
        Ok(app) => app.run().await,
        Err(e) => Err(e),
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "llmq failed to start");
            ExitCode::FAILURE
        }
    }
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
