//! The `llmq` binary: parses the command line, loads the configuration and hands over to
//! the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use llmq::{
    client::{self, PublishArgs},
    config::Config,
    consume,
    mock::{MockOptions, MockServer},
    shutdown, telemetry,
};

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
    /// Measure throughput, latency and memory against the broker (see README, Benchmarks).
    Bench(llmq::bench::BenchArgs),
    /// Exit 0 when an HTTP GET of URL answers 2xx (container health checks).
    Probe {
        /// The URL to fetch.
        url: String,
    },
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
        telemetry::init(&Config::default().log);
        return runtime.block_on(mock(addr, options));
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("llmq: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    telemetry::init(&config.log);
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
            Command::Bench(args) => match llmq::bench::run(&config, &args).await {
                Ok(report) => {
                    println!("{}", llmq::bench::table(&report));
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
            _ => {
                let token = shutdown::install();
                match consume::run(config, token).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "worker failed");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
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
