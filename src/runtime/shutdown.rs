//! Signals: the first SIGTERM or SIGINT starts a graceful shutdown, a second one exits at
//! once (the broker requeues whatever was not acked).

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code after a second signal (128 + SIGINT, the shell's convention).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Spawns the signal watcher; returns the token it cancels on the first signal.
pub fn install() -> CancellationToken {
    let token = CancellationToken::new();
    let first = token.clone();
    tokio::spawn(async move {
        if let Err(e) = signal().await {
            warn!(error = %e, "cannot listen for signals; stop the worker with SIGKILL");
            return;
        }
        info!("shutdown requested; finishing in-flight work (signal again to exit at once)");
        first.cancel();
        if signal().await.is_ok() {
            warn!("second signal; exiting now, unacked requests go back to the broker");
            std::process::exit(FORCED_EXIT_CODE);
        }
    });
    token
}

#[cfg(unix)]
async fn signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
