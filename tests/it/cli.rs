//! The binary as users run it: configuration errors, `llmq publish`, `llmq mock-llm`,
//! `llmq probe`.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use crate::helpers::{TestEnv, bin, llmq_with};
use llmq::{config::clean_command, tools::mock::MockOptions};

/// The binary with none of this process's configuration variables, away from any
/// `./config.toml`.
fn llmq() -> Command {
    let mut cmd = clean_command(Path::new(bin()));
    cmd.current_dir(std::env::temp_dir());
    cmd
}

#[test]
fn invalid_configuration_exits_64_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[worker]\nmax_inflight = 0\nconsumers = \"four\"\n").unwrap();
    let out = llmq()
        .args(["--config", file.to_str().unwrap(), "run"])
        .env("LLMQ_LLM__BASE_URL", "ftp://nowhere")
        .env("LLMQ_AMQP__URL", "amqp://u:canary-secret@[::1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "worker.max_inflight",
        "worker.consumers",
        "llm.base_url",
        "amqp.url",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(!err.contains("canary-secret"), "{err}");
}

#[test]
fn env_overrides_the_file_and_an_unreachable_broker_is_waited_for() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[worker]\nmax_inflight = 0\n").unwrap();
    // The file alone is invalid; the environment fixes it, so the worker starts and keeps
    // trying the (unreachable) broker instead of exiting.
    let mut child = llmq()
        .args(["--config", file.to_str().unwrap(), "run"])
        .env("LLMQ_WORKER__MAX_INFLIGHT", "8")
        .env("LLMQ_AMQP__URL", "amqp://guest:canary-pw@127.0.0.1:1/%2f")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let done = lines
            .iter()
            .filter(|l: &&String| l.contains("broker unreachable"))
            .count()
            >= 2;
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = lines.join("\n");
    assert!(all.contains("broker unreachable"), "{all}");
    assert!(all.contains("amqp://guest:***@127.0.0.1:1"), "{all}");
    assert!(!all.contains("canary-pw"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_prints_the_result() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let t = &env.config.topology;
    let out = tokio::process::Command::from(llmq())
        .args([
            "publish",
            "Hello from the CLI",
            "--priority",
            "5",
            "--wait",
            "--timeout-secs",
            "30",
        ])
        .env("LLMQ_AMQP__URL", crate::helpers::amqp_url())
        .env("LLMQ_TOPOLOGY__REQUEST_EXCHANGE", &t.request_exchange)
        .env("LLMQ_TOPOLOGY__PROCESSING_KEY", &t.processing_key)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["content"], "mock reply to: Hello from the CLI");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `llmq publish --stream` prints the text as it comes, then the result on its own line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stream_prints_the_text_then_the_result() {
    let env = TestEnv::new(MockOptions {
        chunk_ms: 5,
        ..Default::default()
    })
    .await;
    let worker = env.start_worker();
    let t = &env.config.topology;
    let out = tokio::process::Command::from(llmq())
        .args([
            "publish",
            "Tell me a streamed story",
            "--stream",
            "--timeout-secs",
            "30",
        ])
        .env("LLMQ_AMQP__URL", crate::helpers::amqp_url())
        .env("LLMQ_TOPOLOGY__REQUEST_EXCHANGE", &t.request_exchange)
        .env("LLMQ_TOPOLOGY__PROCESSING_KEY", &t.processing_key)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0], "mock reply to: Tell me a streamed story");
    let result: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["content"], lines[0]);
    let streams = env.mock.stats().streams.load(Ordering::Relaxed);
    assert_eq!(streams, 1, "the upstream streamed");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_llm_serves_and_probe_checks_it() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut mock = tokio::process::Command::new(bin())
        .args(["mock-llm", "--addr", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://{addr}/v1/models");
    let mut up = false;
    for _ in 0..100 {
        let status = llmq().args(["probe", &url]).status().unwrap();
        if status.success() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "probe succeeds once the mock listens");
    llmq::install_crypto_provider();
    let body: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "mock reply to: ping"
    );
    mock.kill().await.unwrap();
    let status = llmq()
        .args(["probe", &format!("http://{addr}/nothing")])
        .status()
        .unwrap();
    assert!(!status.success(), "probe fails when nothing answers");
}

/// Bare `llmq` starts nothing: it prints its usage, with the commands, and fails as a usage
/// error.
#[test]
fn bare_llmq_prints_help_and_starts_nothing() {
    let out = llmq().stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Usage: llmq [OPTIONS] <COMMAND>"), "{err}");
    for command in ["run", "publish", "dlq", "topology", "config", "completions"] {
        assert!(
            err.contains(&format!("\n  {command} ")),
            "{command} listed: {err}"
        );
    }
}

/// `--version`: the crate's version and the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let out = llmq().arg("--version").output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let commit = std::env::var("LLMQ_COMMIT")
        .ok()
        .or(git)
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        printed,
        format!("llmq {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

/// `llmq completions SHELL` prints a completion script that knows the subcommands.
#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_llmq()"),
        ("zsh", "#compdef llmq"),
        ("fish", "complete -c llmq"),
    ] {
        let out = llmq().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("purge"), "{shell} completes dlq purge");
    }
    let out = llmq().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `llmq config check` prints the configuration in effect (file, then variables), with
/// every secret hidden; an invalid one exits 64 naming each problem.
#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[worker]\nmax_inflight = 12\n").unwrap();
    let out = llmq()
        .args(["config", "check", "--config", file.to_str().unwrap()])
        .env("LLMQ_WORKER__CONSUMERS", "3")
        .env("LLMQ_AMQP__URL", "amqp://u:canary-amqp@broker:5672/%2f")
        .env("LLMQ_LLM__API_KEY", "sk-canary-key")
        .env(
            "LLMQ_IDEMPOTENCY__REDIS_URL",
            "redis://:canary-redis@cache:6379",
        )
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the configuration is valid"), "{stderr}");
    assert!(
        !stdout.contains("canary") && !stderr.contains("canary"),
        "{stdout}"
    );
    let printed: toml::Value = toml::from_str(&stdout).expect("TOML");
    assert_eq!(
        printed["worker"]["max_inflight"].as_integer(),
        Some(12),
        "the file"
    );
    assert_eq!(
        printed["worker"]["consumers"].as_integer(),
        Some(3),
        "the variable"
    );
    assert_eq!(
        printed["amqp"]["url"].as_str(),
        Some("amqp://u:***@broker:5672/%2f")
    );
    assert_eq!(printed["llm"]["api_key"].as_str(), Some("***"));
    assert_eq!(
        printed["idempotency"]["redis_url"].as_str(),
        Some("redis://:***@cache:6379")
    );
    let out = llmq()
        .args(["config", "check", "--config", file.to_str().unwrap()])
        .env("LLMQ_WORKER__MAX_INFLIGHT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker.max_inflight"), "{err}");
}

/// `llmq dlq purge` without a terminal to ask on refuses unless `--yes`, and purges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_purge_asks_unless_yes() {
    let env = TestEnv::new(MockOptions::default()).await;
    let dlq = env.config.topology.dead_letter_queue.clone();
    let confirm = env
        .channel
        .basic_publish(
            "".into(),
            dlq.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None));
    let out = llmq_with(&env.config, &["dlq", "purge"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--yes") && err.contains("not a terminal"),
        "{err}"
    );
    assert_eq!(env.queue_len(&dlq).await, 1, "nothing purged");
    let out = llmq_with(&env.config, &["dlq", "purge", "--yes"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 dead letters purged"
    );
    assert_eq!(env.queue_len(&dlq).await, 0);
    env.cleanup().await;
}

/// `llmq topology` prints what this configuration declares and declares nothing;
/// `--declare` declares it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_prints_without_declaring_unless_asked() {
    let mut config = crate::helpers::test_config("http://127.0.0.1:1");
    config.topology.lanes = 0;
    let t = config.topology.clone();
    let out = llmq_with(&config, &["topology"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.starts_with(&format!("exchange {} (direct)\n", t.request_exchange)),
        "{printed}"
    );
    assert!(printed.contains("not declared"), "{printed}");
    let conn = lapin::Connection::connect(
        &crate::helpers::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let exists = |queue: String| {
        let conn = &conn;
        async move {
            let ch = conn.create_channel().await.unwrap();
            llmq::broker::topology::queue_depth(&ch, &queue)
                .await
                .is_ok()
        }
    };
    assert!(
        !exists(t.processing_queue.clone()).await,
        "nothing declared"
    );
    let out = llmq_with(&config, &["topology", "--declare"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(exists(t.processing_queue.clone()).await, "declared");
    assert!(exists(t.dead_letter_queue.clone()).await, "declared");
    crate::helpers::delete_topology(&conn, &t).await;
    let _ = conn.close(200, "done".into()).await;
}
