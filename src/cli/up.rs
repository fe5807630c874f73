//! `ironhorn up`: the whole system on one machine, without Kubernetes.
//!
//! Starts the manager (embedded store under the data directory, REST API on
//! 127.0.0.1:9500, agent service on 127.0.0.1:9501) and three agents as nodes `node-1..3`,
//! each with its own disk directory, so that hard anti-affinity holds for 3-replica
//! volumes. Prints the URL, the token and a quick start. Children that die are restarted.
//! Ctrl-C stops everything in order: engines first (their last flush reaches the replicas),
//! then replicas and agents, then the manager. Run again with the same data directory, it
//! brings back the same volumes and data (the manager re-creates the engines of attached
//! volumes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Arguments of `ironhorn up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory that holds the store, the nodes' disks, logs and state of this cluster.
    #[arg(long, env = "IRONHORN_DATA_DIR", default_value = "ironhorn-data")]
    data_dir: PathBuf,

    /// Address of the manager's REST API (and web UI).
    #[arg(long, alias = "listen", default_value = "127.0.0.1:9500")]
    api_listen: SocketAddr,

    /// Address of the manager's agent service (gRPC). Default: the API's host, next port.
    #[arg(long)]
    agent_listen: Option<SocketAddr>,

    /// Number of nodes (agents), named node-1, node-2, ...
    #[arg(long, default_value_t = 3)]
    nodes: u16,

    /// First port of the engines and replicas; node i takes the next `--ports-per-node`.
    #[arg(long, default_value_t = 10000)]
    port_base: u16,

    /// Ports each node's engines and replicas may use (two per process).
    #[arg(long, default_value_t = 60)]
    ports_per_node: u16,
}

/// A child `up` runs and restarts.
struct Supervised {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    restarts: u32,
    next_start: Option<Instant>,
}

impl Supervised {
    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .map(|p| Pid::from_raw(p as i32))
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

fn spawn(exe: &Path, dir: &Path, s: &mut Supervised) -> anyhow::Result<()> {
    let child = Command::new(exe)
        .args(&s.args)
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(dir, &s.name)?)
        // Its own process group: a terminal's Ctrl-C reaches only `up`, which then stops
        // everything in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {} {}", exe.display(), s.args.join(" ")))?;
    tracing::info!(name = %s.name, pid = child.id(), "started");
    s.child = Some(child);
    Ok(())
}

async fn wait_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `sig` (if any) and waits up to `timeout` for the child to exit; kills it after.
async fn stop(s: &mut Supervised, sig: Option<Signal>, timeout: Duration) {
    let Some(mut child) = s.child.take() else {
        return;
    };
    if let (Some(pid), Some(sig)) = (child.id(), sig) {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(_) => tracing::info!(name = %s.name, "stopped"),
        Err(_) => {
            tracing::warn!(name = %s.name, "did not stop in {timeout:?}; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Whether an agent's records (`STATE/instances.json`) still list an engine.
fn agent_has_engines(state_dir: &Path) -> bool {
    let Ok(b) = std::fs::read(state_dir.join("instances.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
        return false;
    };
    v.as_object()
        .is_some_and(|m| m.values().any(|r| r["kind"] == "engine"))
}

impl UpArgs {
    /// Runs the local cluster until Ctrl-C.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.nodes == 0 || self.nodes > 16 {
            bail!("--nodes must be between 1 and 16");
        }
        if self.ports_per_node < 4 {
            bail!("--ports-per-node must be at least 4");
        }
        let last_port =
            u32::from(self.port_base) + u32::from(self.nodes) * u32::from(self.ports_per_node);
        if self.port_base == 0 || last_port > 65535 {
            bail!(
                "--port-base and --ports-per-node leave no room for {} nodes",
                self.nodes
            );
        }
        let agent_listen = match self.agent_listen {
            Some(a) => a,
            None => SocketAddr::new(
                self.api_listen.ip(),
                self.api_listen
                    .port()
                    .checked_add(1)
                    .context("--api-listen has no next port; give --agent-listen")?,
            ),
        };
        let exe = std::env::current_exe().context("cannot find the ironhorn executable")?;
        std::fs::create_dir_all(self.data_dir.join("logs"))
            .with_context(|| format!("create {}", self.data_dir.display()))?;
        let dir = std::path::absolute(&self.data_dir)?;
        let manager_dir = dir.join("manager");
        std::fs::create_dir_all(&manager_dir)?;
        let shutdown = CancellationToken::new();
        super::replica::spawn_signal_handler(shutdown.clone())?;

        let manager_args = vec![
            "manager".to_owned(),
            "--data-dir".into(),
            manager_dir.display().to_string(),
            "--listen".into(),
            self.api_listen.to_string(),
            "--agent-listen".into(),
            agent_listen.to_string(),
        ];
        let mut manager = Supervised {
            name: "manager".into(),
            args: manager_args,
            env: vec![],
            child: None,
            restarts: 0,
            next_start: None,
        };
        spawn(&exe, &dir, &mut manager)?;
        if let Err(e) = wait_port(self.api_listen, Duration::from_secs(30)).await {
            stop(&mut manager, Some(Signal::SIGTERM), Duration::from_secs(10)).await;
            return Err(e.context("the manager did not come up; see logs/manager.log"));
        }
        let token = std::fs::read_to_string(manager_dir.join("token"))
            .map(|t| t.trim().to_owned())
            .with_context(|| format!("read the API token in {}", manager_dir.display()))?;

        let mut agents = Vec::new();
        for i in 1..=self.nodes {
            let node = format!("node-{i}");
            let ndir = dir.join(&node);
            let first = self.port_base + (i - 1) * self.ports_per_node;
            let last = first + self.ports_per_node - 1;
            agents.push(Supervised {
                name: node.clone(),
                args: vec![
                    "agent".into(),
                    "--node".into(),
                    node.clone(),
                    "--disk".into(),
                    ndir.join("disk").display().to_string(),
                    "--manager".into(),
                    format!("http://{agent_listen}"),
                    "--ports".into(),
                    format!("{first}-{last}"),
                    "--state-dir".into(),
                    ndir.join("agent").display().to_string(),
                    "--stop-instances-on-exit".into(),
                ],
                env: vec![("IRONHORN_TOKEN".into(), token.clone())],
                child: None,
                restarts: 0,
                next_start: None,
            });
        }
        for a in &mut agents {
            spawn(&exe, &dir, a)?;
        }
        let url = format!("http://{}", self.api_listen);
        let me = exe.display();
        println!(
            "\nironhorn is up: the manager and {n} nodes (node-1..node-{n}) under {d}\n\n\
             API and web UI: {url}\n\
             token:          {token}\n\
             logs:           {d}/logs (engines and replicas: {d}/node-N/agent/logs)\n\n\
             Quick start, in another shell (export IRONHORN_MANAGER={url} IRONHORN_TOKEN={token}):\n  \
               {me} volume create vol1 --size 1GiB --replicas 3\n  \
               {me} volume attach vol1 --node node-1\n  \
               nbdinfo $({me} volume get vol1 --json | grep -o 'nbd://[^\"]*')\n\
             (a file system: nbdfuse DIR/vol1 THAT-URL &, then losetup, mkfs, mount.)\n\
             Ctrl-C stops everything; `ironhorn up` again brings back the same volumes and data.",
            n = self.nodes,
            d = dir.display(),
        );

        // Supervise: restart children that die, with back-off.
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            for s in std::iter::once(&mut manager).chain(agents.iter_mut()) {
                if let Some(c) = s.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    s.restarts += 1;
                    let delay = Duration::from_millis(500 * u64::from(s.restarts.min(20)));
                    tracing::warn!(name = %s.name, %status, restart_in = ?delay, "exited; restarting it (see logs/{}.log)", s.name);
                    s.child = None;
                    s.next_start = Some(Instant::now() + delay);
                }
                if s.child.is_none() && s.next_start.is_some_and(|t| Instant::now() >= t) {
                    s.next_start = None;
                    if let Err(e) = spawn(&exe, &dir, s) {
                        tracing::error!(name = %s.name, error = %e, "cannot restart");
                        s.next_start = Some(Instant::now() + Duration::from_secs(5));
                    }
                }
            }
        }

        // Engines first (drain), then replicas and agents, then the manager.
        for a in &agents {
            if let Some(p) = a.pid() {
                let _ = kill(p, Signal::SIGUSR1);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 1..=self.nodes {
            let state = dir.join(format!("node-{i}")).join("agent");
            while agent_has_engines(&state) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Together: each stops its replicas (their engines are gone already).
        for a in &agents {
            if let Some(p) = a.pid() {
                let _ = kill(p, Signal::SIGTERM);
            }
        }
        for a in &mut agents {
            stop(a, None, Duration::from_secs(30)).await;
        }
        stop(&mut manager, Some(Signal::SIGTERM), Duration::from_secs(10)).await;
        println!("ironhorn stopped; data kept in {}", dir.display());
        Ok(())
    }
}
