//! A Redis connection made on first use and shared by every caller.
//!
//! Callers that arrive while it is being made wait on that one attempt together, each for at
//! most the connect timeout: a Redis that blackholes the connect costs every waiting
//! delivery one timeout at the same time, not one timeout each in turn, as a lock held
//! around the connect would. A failed attempt is forgotten, so the next caller tries again.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Why no connection could be made. Never quotes the URL, which may carry a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The connect (TCP, TLS, handshake) took longer than the timeout.
    #[error("redis connect timed out after {0:?}")]
    TimedOut(Duration),
    /// Redis refused or failed; its error kind and the server's words.
    #[error("{0}")]
    Redis(String),
}

type Connecting = Shared<BoxFuture<'static, Result<ConnectionManager, ConnectError>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(ConnectionManager),
}

/// A lazily made connection manager (it reconnects by itself once made).
pub struct LazyConnection {
    client: redis::Client,
    timeout: Duration,
    state: Mutex<State>,
}

impl LazyConnection {
    /// Connects to `client` on first use; both the connect and every command time out after
    /// `timeout`, and commands are not retried (a caller waiting on Redis holds a delivery).
    pub fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            state: Mutex::new(State::Idle),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a plain value; a panic while it was locked leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection, made now (or joined while another caller makes it) if need be.
    pub async fn get(&self) -> Result<ConnectionManager, ConnectError> {
        let attempt = {
            let mut state = self.state();
            match &*state {
                State::Ready(conn) => return Ok(conn.clone()),
                State::Connecting(attempt) => attempt.clone(),
                State::Idle => {
                    let attempt = self.connect().boxed().shared();
                    *state = State::Connecting(attempt.clone());
                    attempt
                }
            }
        };
        let result = attempt.clone().await;
        let mut state = self.state();
        // Only the attempt still current is recorded: a caller may have started a new one.
        if let State::Connecting(current) = &*state
            && current.ptr_eq(&attempt)
        {
            *state = match &result {
                Ok(conn) => State::Ready(conn.clone()),
                Err(_) => State::Idle,
            };
        }
        result
    }

    fn connect(&self) -> impl Future<Output = Result<ConnectionManager, ConnectError>> + 'static {
        let client = self.client.clone();
        let timeout = self.timeout;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        async move {
            // The outer timeout also bounds what the connection timeout may not cover.
            match tokio::time::timeout(timeout, client.get_connection_manager_with_config(config))
                .await
            {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) if e.is_timeout() => Err(ConnectError::TimedOut(timeout)),
                Ok(Err(e)) => Err(ConnectError::Redis(format!(
                    "{:?}: {}",
                    e.kind(),
                    e.detail().unwrap_or("no detail")
                ))),
                Err(_) => Err(ConnectError::TimedOut(timeout)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use super::*;

    /// A TCP listener that accepts connections and never answers.
    async fn blackhole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn callers_of_a_blackholed_redis_fail_together_within_one_timeout() {
        let (addr, task) = blackhole().await;
        let client = redis::Client::open(format!("redis://{addr}")).expect("URL");
        let conn = Arc::new(LazyConnection::new(client, Duration::from_millis(300)));
        let started = Instant::now();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let conn = conn.clone();
                tokio::spawn(async move { conn.get().await.map(|_| ()) })
            })
            .collect();
        for caller in callers {
            let result = caller.await.expect("no panic");
            assert!(
                matches!(result, Err(ConnectError::TimedOut(_))),
                "{result:?}"
            );
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "20 callers waited one timeout together, not one each: {took:?}"
        );
        // Forgotten: the next caller tries again, and fails the same way.
        assert!(matches!(conn.get().await, Err(ConnectError::TimedOut(_))));
        task.abort();
    }

    #[tokio::test]
    async fn a_reachable_redis_is_connected_once_and_shared() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).expect("URL");
        let conn = LazyConnection::new(client, Duration::from_secs(2));
        let mut a = conn.get().await.expect("the Redis at REDIS_URL answers");
        let pong: String = redis::cmd("PING").query_async(&mut a).await.expect("PING");
        assert_eq!(pong, "PONG");
        assert!(matches!(&*conn.state(), State::Ready(_)));
    }
}
