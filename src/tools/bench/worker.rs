//! The worker under test: its configuration, starting and stopping it as a child process
//! (`llmq run`), and what `/proc` tells about it (peak RSS, CPU time, the open-files limit).

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use lapin::Connection;
use tokio::process::{Child, Command};

use super::BenchError;
use crate::{
    broker::topology,
    config::{Config, SecretUrl, child_command, clean_command},
    tools::mock::MockServer,
};

/// What every run's worker starts from.
pub(super) struct Base<'a> {
    /// The configuration each run adjusts.
    pub(super) config: &'a Config,
    /// A command (and its arguments) the worker runs under, for profiling; empty for none.
    pub(super) wrap: Vec<String>,
}

/// A worker's configuration and how to start it.
pub(super) struct RunConfig {
    config: Config,
    /// As [`Base::wrap`].
    wrap: Vec<String>,
    /// What the worker logs (`LLMQ_LOG__LEVEL`), on the bench's stderr.
    log_level: &'static str,
}

impl RunConfig {
    /// The worker logs at `level` (`warn` unless told): for a run where warnings are
    /// expected by the thousand.
    pub(super) fn log_level(self, level: &'static str) -> Self {
        Self {
            log_level: level,
            ..self
        }
    }
}

impl std::ops::Deref for RunConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

/// A configuration with names of its own, pointed at the mock.
pub(super) fn bench_config(
    base: &Base,
    mock: &MockServer,
    adjust: impl FnOnce(&mut Config),
) -> RunConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let p = format!("llmq-bench-{}", &id[..8]);
    let mut c = base.config.clone();
    c.llm.base_url = SecretUrl::new(mock.base_url());
    c.worker.id = format!("{p}-worker");
    c.idempotency.key_prefix = p.clone();
    c.admin.addr = "127.0.0.1:0".into();
    c.topology = c.topology.with_prefix(&p);
    adjust(&mut c);
    RunConfig {
        config: c,
        wrap: base.wrap.clone(),
        log_level: "warn",
    }
}

pub(super) async fn start_worker(conn: &Connection, cfg: &RunConfig) -> Result<Child, BenchError> {
    let setup = conn.create_channel().await?;
    topology::declare(&setup, &cfg.topology).await?;
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    let (cmd, config_file) =
        child_command(&exe, cfg).map_err(|e| BenchError::Setup(e.to_string()))?;
    let cmd = match cfg.wrap.split_first() {
        None => cmd,
        // The same command under the wrapper: the wrapper's environment cleaned the same way.
        Some((wrapper, args)) => {
            let mut wrapped = clean_command(Path::new(wrapper));
            wrapped
                .args(args)
                .arg(&exe)
                .arg("--config")
                .arg(config_file.path());
            wrapped
        }
    };
    let child = Command::from(cmd)
        .arg("run")
        .env("LLMQ_LOG__LEVEL", cfg.log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start the worker: {e}")))?;
    // A worker under valgrind takes far longer to start.
    let patience = if cfg.wrap.is_empty() { 30 } else { 300 };
    let deadline = Instant::now() + Duration::from_secs(patience);
    loop {
        let q = topology::queue_depth(&setup, &cfg.topology.processing_queue).await?;
        if q.consumers >= u32::from(cfg.worker.consumers) {
            break;
        }
        if Instant::now() > deadline {
            // The child is killed when dropped; the run's topology goes with it.
            topology::delete(&setup, &cfg.topology).await;
            return Err(BenchError::Setup(format!(
                "the worker did not subscribe within {patience} s (its log is above)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A subscribed worker has read its configuration.
    drop(config_file);
    let _ = setup.close(200, "ready".into()).await;
    Ok(child)
}

/// Stops the worker (SIGTERM, then kill) and deletes the run's topology.
pub(super) async fn finish(conn: &Connection, cfg: &RunConfig, mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    if let Ok(ch) = conn.create_channel().await {
        topology::delete(&ch, &cfg.topology).await;
        let _ = ch.close(200, "cleaned".into()).await;
    }
}

/// A `kB` figure of the process's `/proc/<pid>/status` (`VmHWM:` is the peak resident
/// set), KiB; 0 when it cannot be read.
pub(super) fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The process's user + system CPU time so far, in clock ticks (fields 14 and 15 of
/// `/proc/<pid>/stat`, all threads together).
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; reading `sysconf` directly would need unsafe
/// code), 100 when it cannot be asked, as on every common Linux build.
pub(super) fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// This process's soft limit on open files (`Max open files` in `/proc/self/limits`; the
/// worker inherits it); `None` when unknown or unlimited.
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
