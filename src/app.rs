//! The service wired together: the worker, its admin HTTP server and shutdown. The binary
//! and the tests start it the same way.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    ops::admin::{self, Admin},
    worker::{Worker, WorkerError},
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The worker could not be built.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The admin HTTP server could not listen.
    #[error("cannot listen for the admin HTTP server on {addr}: {source}")]
    Admin {
        /// `admin.addr`.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A started service: the worker built and the admin server listening.
pub struct App {
    worker: Worker,
    admin_addr: Option<SocketAddr>,
    admin_stop: CancellationToken,
}

impl App {
    /// Builds the worker and binds the admin server (when `admin.addr` is set). `shutdown`
    /// stops the worker; the admin server keeps answering probes until the drain is over.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Self, AppError> {
        let addr = config.admin.socket_addr();
        let worker = Worker::new(config, shutdown)?;
        let admin_stop = CancellationToken::new();
        let admin_addr = match addr {
            None => None,
            Some(addr) => {
                let admin = Admin {
                    metrics: worker.metrics(),
                    router: worker.router(),
                    health: worker.health(),
                };
                let bound = admin::serve(addr, admin, admin_stop.clone())
                    .await
                    .map_err(|source| AppError::Admin { addr, source })?;
                tracing::info!(addr = %bound, "admin HTTP: /metrics /healthz /readyz");
                Some(bound)
            }
        };
        Ok(Self {
            worker,
            admin_addr,
            admin_stop,
        })
    }

    /// Where the admin server listens (the bound port when `admin.addr` asked for port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Runs the worker until shutdown and its drain are over, then stops the admin server.
    /// An error when the worker stopped on its own because it must not consume the topology
    /// it found (see [`Worker::run`]).
    pub async fn run(self) -> Result<(), AppError> {
        let ran = self.worker.run().await;
        self.admin_stop.cancel();
        Ok(ran?)
    }
}
