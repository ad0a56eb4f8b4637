//! Non-Rust clients (aio-pika): `tests/interop/tutorial_client.py` declares the work queue
//! the way tutorials do while the worker runs, publishes the seed form with a priority and
//! waits for its result on its own reply queue; `tests/interop/stream_client.py` streams an
//! answer and prints its tokens as they arrive.

use std::path::PathBuf;

use crate::helpers::TestEnv;
use llmq::tools::mock::MockOptions;

/// The Python with aio-pika: `INTEROP_PYTHON` (set by `make test`), else the
/// project's `.venv`.
fn python() -> PathBuf {
    let path = std::env::var_os("INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with aio-pika at {}: run `make test` (it creates .venv) or set INTEROP_PYTHON",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_tutorial_client_gets_its_result() {
    let python = python();
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let t = &env.config.topology;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/tutorial_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("AMQP_URL", crate::helpers::amqp_url())
        .env("LLMQ_REQUEST_EXCHANGE", &t.request_exchange)
        .env("LLMQ_PROCESSING_QUEUE", &t.processing_queue)
        .env("LLMQ_ROUTING_KEY", &t.processing_key)
        .env("TIMEOUT_SECS", "30")
        .env("PROMPT", "Hello from aio-pika")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "interop client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("interop ok") && stdout.contains("mock reply to: Hello from aio-pika"),
        "{stdout}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// The streaming client (`tests/interop/stream_client.py`, aio-pika) prints the tokens as
/// they arrive, drops the text of an attempt that broke off when its restart marker comes,
/// and finds the deltas it kept equal to the result's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_streaming_client_prints_tokens_and_survives_a_restart() {
    let python = python();
    // The first stream breaks off after two words, the retry gets through.
    let env = TestEnv::new(MockOptions {
        chunk_ms: 10,
        fail_mid_stream_after: Some(4),
        fail_mid_stream_rate: 0.5,
        ..Default::default()
    })
    .await;
    let worker = env.start_worker();
    let t = &env.config.topology;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/stream_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("AMQP_URL", crate::helpers::amqp_url())
        .env("LLMQ_REQUEST_EXCHANGE", &t.request_exchange)
        .env("LLMQ_ROUTING_KEY", &t.processing_key)
        .env("TIMEOUT_SECS", "30")
        .env("PROMPT", "a story streamed to Python")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stream client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("[attempt 2 starts again]"),
        "the restart marker was seen: {stdout}"
    );
    assert!(
        stdout.contains("restarts=1 content='mock reply to: a story streamed to Python'"),
        "{stdout}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}
