//! `ironhorn up`: the whole data path on one machine, without Kubernetes.
//!
//! Starts replica processes under a data directory and an engine that exports one volume
//! over NBD on 127.0.0.1 (TCP and a unix socket), prints how to reach it, heals replicas the
//! engine reports as dropped, and stops everything cleanly on Ctrl-C (engine first, so its
//! last flush reaches the replicas). Run again with the same data directory, it resumes the
//! same volume. Until the manager lands, this is the system's main job.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::size::ByteSize;

/// Arguments of `ironhorn up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory that holds the replicas, logs and state of this local cluster.
    #[arg(long, env = "IRONHORN_DATA_DIR", default_value = "ironhorn-data")]
    data_dir: PathBuf,

    /// Name of the volume (the NBD export name).
    #[arg(long, default_value = "vol1")]
    volume: String,

    /// Size of the volume when it is created (ignored when resuming).
    #[arg(long, default_value = "1GiB")]
    size: ByteSize,

    /// Number of replicas when the volume is created (ignored when resuming).
    #[arg(long, default_value_t = 3)]
    replicas: usize,

    /// TCP port of the NBD export on 127.0.0.1.
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,

    /// Port of the engine's control service; replica i listens on base + 10 + 10·i and the
    /// next port (data).
    #[arg(long, default_value_t = 9500)]
    port_base: u16,
}

/// What `up` remembers in `DATA_DIR/up.json`, so that a second run resumes the same volume.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct UpState {
    volume: String,
    size: u64,
    replicas: usize,
}

const STATE_FILE: &str = "up.json";

async fn wait_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let path = dir.join("logs").join(format!("{name}.log"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open log {}", path.display()))?;
    Ok(Stdio::from(f))
}

fn spawn(exe: &Path, args: &[String], log: Stdio) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a terminal's Ctrl-C reaches only `up`, which then stops the
        // engine before the replicas, so that the engine's last flush lands.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} {}", exe.display(), args.join(" ")))
}

async fn stop(child: &mut Child, what: &str) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(_) => tracing::info!("{what} stopped"),
        Err(_) => {
            tracing::warn!("{what} did not stop in 10 s; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Cancels `shutdown` on SIGINT/SIGTERM. Later signals are only logged: `up` must still
/// stop its children, which the orderly shutdown does (killing any that hang).
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if shutdown.is_cancelled() {
                tracing::warn!("already stopping: engine first, then replicas");
            } else {
                tracing::info!("stopping");
                shutdown.cancel();
            }
        }
    });
    Ok(())
}

impl UpArgs {
    /// Runs the local cluster until Ctrl-C.
    pub async fn run(self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the ironhorn executable")?;
        let dir = &self.data_dir;
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("create {}", dir.display()))?;
        let state_path = dir.join(STATE_FILE);
        let state = match std::fs::read(&state_path) {
            Ok(b) => {
                let s: UpState = serde_json::from_slice(&b)
                    .with_context(|| format!("bad state file {}", state_path.display()))?;
                println!(
                    "resuming volume {} ({} bytes, {} replicas)",
                    s.volume, s.size, s.replicas
                );
                s
            }
            Err(_) => {
                if self.replicas == 0 || self.replicas > 16 {
                    bail!("--replicas must be between 1 and 16");
                }
                let s = UpState {
                    volume: self.volume.clone(),
                    size: self.size.bytes(),
                    replicas: self.replicas,
                };
                std::fs::write(&state_path, serde_json::to_vec_pretty(&s)?)
                    .with_context(|| format!("write {}", state_path.display()))?;
                s
            }
        };
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone())?;

        let mut replicas = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..state.replicas {
            let port = self.port_base + 10 + 10 * i as u16;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let rdir = dir.join(format!("replica-{i}"));
            let args = vec![
                "replica".into(),
                "serve".into(),
                "--dir".into(),
                rdir.display().to_string(),
                "--size".into(),
                state.size.to_string(),
                "--listen".into(),
                addr.to_string(),
            ];
            replicas.push(spawn(&exe, &args, log_file(dir, &format!("replica-{i}"))?)?);
            addrs.push(addr);
        }
        for a in &addrs {
            wait_port(*a, Duration::from_secs(20))
                .await
                .context("a replica did not come up; see the logs directory")?;
        }
        let control: SocketAddr = ([127, 0, 0, 1], self.port_base).into();
        let sock = std::path::absolute(dir.join(format!("{}.sock", state.volume)))?;
        let _ = std::fs::remove_file(&sock);
        let mut args = vec![
            "engine".into(),
            "serve".into(),
            "--volume".into(),
            state.volume.clone(),
            "--size".into(),
            state.size.to_string(),
            "--nbd".into(),
            format!("tcp://127.0.0.1:{}", self.nbd_port),
            "--nbd".into(),
            format!("unix://{}", sock.display()),
            "--listen".into(),
            control.to_string(),
        ];
        for a in &addrs {
            args.push("--replica".into());
            args.push(a.to_string());
        }
        let mut engine = spawn(&exe, &args, log_file(dir, "engine")?)?;
        if let Err(e) = wait_port(control, Duration::from_secs(30)).await {
            for r in &mut replicas {
                stop(r, "replica").await;
            }
            return Err(e.context("the engine did not come up; see logs/engine.log"));
        }
        let uri = format!("nbd://127.0.0.1:{}/{}", self.nbd_port, state.volume);
        let ctl = format!("{} engine ctl --engine {control}", exe.display());
        println!(
            "\nironhorn is up: volume {vol} ({size} bytes), {n} replicas under {dir}\n\n\
             NBD export:   {uri}\n\
             unix socket:  nbd+unix:///{vol}?socket={sock}\n\
             engine:       {control} (logs in {dir}/logs)\n\n\
             Try:\n  \
               nbdinfo {uri}\n  \
               qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'\n  \
               {ctl} info\n  \
               {ctl} snapshot create first\n\
             A file system (this machine has no kernel nbd; nbdfuse + a loop device):\n  \
               mkdir -p /tmp/ih && nbdfuse /tmp/ih/{vol} {uri} &\n  \
               dev=$(losetup -f --show /tmp/ih/{vol}) && mkfs.ext4 -q $dev && mkdir -p /mnt/ih && mount $dev /mnt/ih\n\
             Ctrl-C stops everything; `ironhorn up` again resumes the same volume.",
            vol = state.volume,
            size = state.size,
            n = state.replicas,
            dir = dir.display(),
            sock = sock.display(),
        );
        let summary = json!({"volume": state.volume, "nbd": uri, "engine": control.to_string()});
        tracing::info!(%summary, "up");

        // Heal: replicas the engine dropped, and which answer, are added back (rebuilt).
        let heal = {
            let shutdown = shutdown.clone();
            let exe = exe.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    let out = Command::new(&exe)
                        .args([
                            "engine",
                            "ctl",
                            "--engine",
                            &control.to_string(),
                            "--json",
                            "info",
                        ])
                        .stderr(Stdio::null())
                        .output()
                        .await;
                    let Ok(out) = out else { continue };
                    let Ok(info) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                        continue;
                    };
                    let replicas = info["replicas"].as_array().cloned().unwrap_or_default();
                    for r in replicas {
                        let (Some(addr), Some(mode)) = (r["address"].as_str(), r["mode"].as_str())
                        else {
                            continue;
                        };
                        let Ok(sa) = addr.parse::<SocketAddr>() else {
                            continue;
                        };
                        if mode == "ERR" && tokio::net::TcpStream::connect(sa).await.is_ok() {
                            tracing::info!(replica = addr, "re-adding a dropped replica");
                            let _ = Command::new(&exe)
                                .args([
                                    "engine",
                                    "ctl",
                                    "--engine",
                                    &control.to_string(),
                                    "replica",
                                    "add",
                                    addr,
                                ])
                                .stdout(Stdio::null())
                                .status()
                                .await;
                        }
                    }
                }
            })
        };

        tokio::select! {
            () = shutdown.cancelled() => {}
            status = engine.wait() => {
                tracing::error!(?status, "the engine exited; see logs/engine.log");
            }
        }
        heal.abort();
        stop(&mut engine, "engine").await;
        for (i, r) in replicas.iter_mut().enumerate() {
            stop(r, &format!("replica-{i}")).await;
        }
        println!("ironhorn stopped; data kept in {}", dir.display());
        Ok(())
    }
}
