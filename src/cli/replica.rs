//! `ironhorn replica …`: run a replica server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ironhorn_replica::server::{DEFAULT_MAX_DATA_CONNECTIONS, ServeConfig, serve};
use tokio_util::sync::CancellationToken;

use crate::size::ByteSize;

/// `ironhorn replica` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Serve one replica: the data protocol and the gRPC control service.
    Serve(ServeArgs),
}

impl ReplicaCommand {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            ReplicaCommand::Serve(args) => args.run().await,
        }
    }
}

/// Arguments of `ironhorn replica serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of the replica (created with --size if it holds none yet).
    #[arg(long, env = "IRONHORN_REPLICA_DIR")]
    dir: PathBuf,

    /// Volume size when creating a new replica, e.g. 10GiB, 512MiB, 4096, 2GB.
    /// Ignored when the directory already holds a replica.
    #[arg(long, env = "IRONHORN_REPLICA_SIZE")]
    size: Option<ByteSize>,

    /// Address (HOST:PORT) of the gRPC control service. Port 0 picks a free port.
    #[arg(long, env = "IRONHORN_REPLICA_LISTEN")]
    listen: String,

    /// Address (HOST:PORT) of the data protocol. Default: the --listen host, port + 1
    /// (or a free port when --listen uses port 0).
    #[arg(long, env = "IRONHORN_REPLICA_DATA_LISTEN")]
    data_listen: Option<String>,

    /// Most data-protocol connections served at once; more are refused.
    #[arg(long, env = "IRONHORN_REPLICA_MAX_DATA_CONNECTIONS", default_value_t = DEFAULT_MAX_DATA_CONNECTIONS)]
    max_data_connections: usize,
}

impl ServeArgs {
    /// Serves until SIGINT or SIGTERM.
    async fn run(self) -> anyhow::Result<()> {
        let control = resolve(&self.listen)
            .await
            .context("bad --listen address")?;
        let data = match &self.data_listen {
            Some(addr) => resolve(addr).await.context("bad --data-listen address")?,
            None => next_port(control)?,
        };
        if self.max_data_connections == 0 {
            bail!("--max-data-connections must be at least 1");
        }
        let config = ServeConfig {
            dir: self.dir,
            size: self.size.map(ByteSize::bytes),
            control_listen: control,
            data_listen: data,
            max_data_connections: self.max_data_connections,
        };
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        serve(config, shutdown).await?;
        Ok(())
    }
}

/// Resolves `HOST:PORT` to its first socket address.
pub(crate) async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(parsed) = addr.parse() {
        return Ok(parsed);
    }
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}

/// The data address by default: the control host, port + 1 (port 0 stays 0).
fn next_port(control: SocketAddr) -> anyhow::Result<SocketAddr> {
    let port = match control.port() {
        0 => 0,
        p => p.checked_add(1).with_context(|| {
            format!("--listen port {p} has no next port for the data protocol; set --data-listen")
        })?,
    };
    Ok(SocketAddr::new(control.ip(), port))
}

/// Cancels `shutdown` on the first SIGINT/SIGTERM; exits at once on the second.
pub(crate) fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(signal = name, "second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_port_follows_control_port() {
        let a: SocketAddr = "127.0.0.1:9500".parse().unwrap();
        assert_eq!(next_port(a).unwrap(), "127.0.0.1:9501".parse().unwrap());
        let z: SocketAddr = "[::1]:0".parse().unwrap();
        assert_eq!(next_port(z).unwrap(), z);
        let top: SocketAddr = "0.0.0.0:65535".parse().unwrap();
        assert!(next_port(top).is_err());
    }

    #[tokio::test]
    async fn resolves_names_and_literals() {
        assert_eq!(
            resolve("127.0.0.1:7").await.unwrap(),
            "127.0.0.1:7".parse().unwrap()
        );
        assert_eq!(resolve("localhost:7").await.unwrap().port(), 7);
        assert!(resolve("no-port").await.is_err());
    }
}
