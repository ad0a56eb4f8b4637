//! A non-Rust client: `tests/interop/tutorial_client.py` (aio-pika) declares the work queue
//! the way tutorials do while the worker runs, publishes the seed form with a priority and
//! waits for its result on its own reply queue.

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
