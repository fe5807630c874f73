//! `ironhorn nbd …`: the kernel NBD client without Kubernetes: attach an export to a
//! /dev/nbdN (and keep it connected across engine restarts), list attachments, detach.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::engine::parse_duration;
use ironhorn_csi::device::kernel_nbd::{self, AttachOptions, NbdTarget, SuperviseEnd};

/// `ironhorn nbd` subcommands.
#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// Attach an export (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH) to a free
    /// /dev/nbdN, or find the existing attachment; prints the device path.
    Attach(AttachArgs),
    /// Detach a device (/dev/nbdN, or the URI it is attached to).
    Detach(DetachArgs),
    /// Grow the device attached to URI to the export's current size (after `volume
    /// expand`), online; prints the new size in bytes.
    Grow {
        /// The export's NBD URI, as given to attach.
        uri: String,
    },
    /// List connected nbd devices and what they are attached to.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `ironhorn nbd attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The export's NBD URI.
    uri: String,
    /// Stay running and reconnect whenever the connection dies (engine restart); stops on
    /// SIGINT/SIGTERM leaving the device attached, or when the device is detached.
    #[arg(long)]
    supervise: bool,
    /// Time after which an unanswered request is retried on a reconnected socket.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// How long I/O waits for a reconnection before failing.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    dead_conn_timeout: Duration,
    /// Connections to the export (used if the server allows multi-conn).
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Use /dev/nbdN with this N instead of any free device.
    #[arg(long)]
    index: Option<u32>,
}

/// Arguments of `ironhorn nbd detach`.
#[derive(Debug, Args)]
pub struct DetachArgs {
    /// /dev/nbdN, or the URI it is attached to.
    device: String,
    /// How long to wait for the kernel to let the device go.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

impl NbdCommand {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            NbdCommand::Attach(a) => a.run().await,
            NbdCommand::Detach(d) => tokio::task::spawn_blocking(move || d.run())
                .await
                .context("detach task")?,
            NbdCommand::Grow { uri } => tokio::task::spawn_blocking(move || {
                let target = NbdTarget::parse(&uri)?;
                let backend = kernel_nbd::backend_id(&target);
                let Some(index) = kernel_nbd::find(&backend)? else {
                    bail!("{uri} is not attached");
                };
                let size = kernel_nbd::grow(index, &backend, &target)
                    .with_context(|| format!("grow /dev/nbd{index}"))?;
                println!("/dev/nbd{index}\t{size}");
                Ok(())
            })
            .await
            .context("grow task")?,
            NbdCommand::Ls { json } => {
                let devs = kernel_nbd::list()?;
                if json {
                    let v: Vec<_> = devs
                        .iter()
                        .map(|d| {
                            json!({"device": kernel_nbd::device_path(d.index), "backend": d.backend, "size": d.size})
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    for d in devs {
                        println!("/dev/nbd{}\t{}\t{}", d.index, d.size, d.backend);
                    }
                }
                Ok(())
            }
        }
    }
}

impl AttachArgs {
    async fn run(self) -> anyhow::Result<()> {
        let target = NbdTarget::parse(&self.uri)?;
        let opts = AttachOptions {
            io_timeout: self.io_timeout,
            dead_conn_timeout: self.dead_conn_timeout,
            connections: self.connections,
            index: self.index,
            ..AttachOptions::default()
        };
        let supervise = self.supervise;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let task = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let backend = kernel_nbd::backend_id(&target);
            let mut att = kernel_nbd::attach(&target, &backend, &opts)?;
            if att.existing {
                tracing::info!(device = %att.device().display(), "already attached");
            }
            println!("{}", att.device().display());
            if !supervise {
                return Ok(());
            }
            match kernel_nbd::supervise(&mut att, &target, &opts, &stop2)? {
                SuperviseEnd::Stopped => {
                    tracing::info!("supervision stopped; device stays attached")
                }
                SuperviseEnd::Detached => tracing::info!("device detached"),
            }
            Ok(())
        });
        if supervise {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot watch SIGTERM");
                            return;
                        }
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
        task.await.context("attach task")?
    }
}

impl DetachArgs {
    fn run(self) -> anyhow::Result<()> {
        let (index, backend) = if let Some(n) = self.device.strip_prefix("/dev/nbd") {
            let index: u32 = n
                .parse()
                .with_context(|| format!("bad device {:?}", self.device))?;
            (index, None)
        } else {
            let target = NbdTarget::parse(&self.device)?;
            let backend = kernel_nbd::backend_id(&target);
            match kernel_nbd::find(&backend)? {
                Some(i) => (i, Some(backend)),
                None => {
                    println!("{} is not attached", self.device);
                    return Ok(());
                }
            }
        };
        if !Path::new("/sys/module/nbd").exists() {
            bail!("the kernel nbd module is not loaded");
        }
        kernel_nbd::detach(index, backend.as_deref(), self.timeout)?;
        println!("detached /dev/nbd{index}");
        Ok(())
    }
}
