//! A whole ironhorn cluster on 127.0.0.1 for the `cluster_*` tests: a manager process
//! (embedded store in a temporary directory, REST API and agent service on free ports) and
//! agent processes as nodes `node-1..N`, each with its own disk directory and port range.
//! The tests drive it through the REST API ([`Api`]), like a user would.
//!
//! - [`Cluster::start`]: starts the manager and the agents and waits until every node is
//!   registered and ready.
//! - [`Cluster::kill_manager`] / [`Cluster::start_manager`]: restart the manager (same store,
//!   same ports, same token).
//! - [`Cluster::kill_node`]: SIGKILL a node's agent and every process it started (the node
//!   is gone); [`Cluster::start_agent`] brings the agent back.
//! - [`Cluster::instance_pid`]: the pid of an engine or replica process by name, from its
//!   agent's records.
//!
//! Cleanup: dropping the cluster kills the agents, every engine and replica they started
//! (found in their records) and the manager, then removes the directory.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::common::{Process, bin, wait_for};

/// Ports each node's engines and replicas may take.
pub const PORTS_PER_NODE: u16 = 40;

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A range of `n` consecutive ports that all bind now, in the ephemeral-free zone
/// 20000..32000 (Linux hands out ephemeral ports from 32768).
pub fn free_range(n: u16) -> u16 {
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20000 + (x % 12000) as u16;
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range of {n}");
}

/// A small HTTP/1.1 client of the manager's REST API (JSON, bearer token).
#[derive(Debug, Clone)]
pub struct Api {
    /// API address.
    pub addr: SocketAddr,
    /// Bearer token.
    pub token: String,
}

/// One API answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body parsed as JSON (Null when empty or not JSON).
    pub body: Value,
    /// Body as text.
    pub text: String,
}

impl Answer {
    /// Panics unless the status is 2xx.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "API answered {}: {}",
            self.status,
            self.text
        );
        self.body
    }
}

impl Api {
    /// Sends one request.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("bad HTTP answer: {text:?}"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        Ok(Answer {
            status,
            body: serde_json::from_str(&body).unwrap_or(Value::Null),
            text: body,
        })
    }

    /// GET, panicking on transport errors.
    #[track_caller]
    pub fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).expect("API GET")
    }

    /// POST with a JSON body.
    #[track_caller]
    pub fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(&body)).expect("API POST")
    }

    /// PUT with a JSON body.
    #[track_caller]
    pub fn put(&self, path: &str, body: Value) -> Answer {
        self.call("PUT", path, Some(&body)).expect("API PUT")
    }

    /// DELETE.
    #[track_caller]
    pub fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None).expect("API DELETE")
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// One node: its agent process (when running), disk and state directories, ports.
pub struct Node {
    /// `node-N`.
    pub name: String,
    /// The agent, while it runs.
    pub agent: Option<Process>,
    /// Disk directory.
    pub disk: PathBuf,
    /// Agent state directory (records, instance logs).
    pub state: PathBuf,
    /// First port of the node's range.
    pub port_base: u16,
}

/// A running cluster.
pub struct Cluster {
    /// Temporary directory holding everything.
    pub dir: TempDir,
    /// The manager, while it runs.
    pub manager: Option<Process>,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// REST API client.
    pub api: Api,
    /// Agent service address.
    pub agent_addr: SocketAddr,
    /// Extra manager arguments.
    manager_args: Vec<String>,
}

impl Cluster {
    /// Starts a manager and `nodes` agents; `manager_args` go to the manager.
    pub fn start(nodes: usize, manager_args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ih-cluster")
            .tempdir()
            .expect("temp dir");
        let api_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let agent_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        // One range for the cluster, split between the nodes, so they never share a port.
        let base = free_range(PORTS_PER_NODE * nodes as u16);
        let mut c = Cluster {
            nodes: (1..=nodes)
                .map(|i| {
                    let name = format!("node-{i}");
                    Node {
                        disk: dir.path().join(&name).join("disk"),
                        state: dir.path().join(&name).join("agent"),
                        name,
                        agent: None,
                        port_base: base + PORTS_PER_NODE * (i as u16 - 1),
                    }
                })
                .collect(),
            dir,
            manager: None,
            api: Api {
                addr: api_addr,
                token: String::new(),
            },
            agent_addr,
            manager_args: manager_args.iter().map(|s| (*s).to_owned()).collect(),
        };
        c.start_manager();
        // The disks of all nodes share the machine's file system, which other work fills;
        // tests do not depend on how full it is.
        c.set_setting("storage-minimal-available-percentage", "0");
        for i in 0..nodes {
            c.start_agent(i);
        }
        c.wait_nodes_ready();
        c
    }

    /// Directory of the manager's store and token.
    pub fn manager_dir(&self) -> PathBuf {
        self.dir.path().join("manager")
    }

    /// Starts the manager (again) and waits until its API answers.
    pub fn start_manager(&mut self) {
        let mdir = self.manager_dir();
        let mut cmd = Command::new(bin());
        cmd.arg("manager")
            .arg("--data-dir")
            .arg(&mdir)
            .arg("--listen")
            .arg(self.api.addr.to_string())
            .arg("--agent-listen")
            .arg(self.agent_addr.to_string())
            .args(&self.manager_args);
        let api = self.api.addr;
        let (p, ()) = Process::spawn("manager", &mut cmd, |line| {
            (line.contains("agent service listening")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        self.manager = Some(p);
        wait_for(Duration::from_secs(30), "the manager's API", || {
            TcpStream::connect(api).map(|_| ())
        });
        let token = std::fs::read_to_string(mdir.join("token")).expect("manager token file");
        self.api.token = token.trim().to_owned();
    }

    /// SIGKILLs the manager.
    pub fn kill_manager(&mut self) {
        if let Some(mut m) = self.manager.take() {
            m.kill9();
        }
    }

    /// Starts the agent of node `i` (index from 0).
    pub fn start_agent(&mut self, i: usize) {
        let n = &self.nodes[i];
        let mut cmd = Command::new(bin());
        cmd.arg("agent")
            .arg("--node")
            .arg(&n.name)
            .arg("--disk")
            .arg(&n.disk)
            .arg("--manager")
            .arg(format!("http://{}", self.agent_addr))
            .arg("--ports")
            .arg(format!(
                "{}-{}",
                n.port_base,
                n.port_base + PORTS_PER_NODE - 1
            ))
            .arg("--state-dir")
            .arg(&n.state)
            .env("IRONHORN_TOKEN", &self.api.token);
        let (p, ()) = Process::spawn(&n.name.clone(), &mut cmd, |line| {
            line.contains("agent running").then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        self.nodes[i].agent = Some(p);
    }

    /// Pids of the engines and replicas node `i`'s agent started (from its records).
    pub fn instance_pids(&self, i: usize) -> Vec<(String, u32)> {
        let Ok(b) = std::fs::read(self.nodes[i].state.join("instances.json")) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, r)| Some((k.clone(), r["pid"].as_u64()? as u32)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pid of an instance (engine or replica) by name, on any node.
    pub fn instance_pid(&self, name: &str) -> Option<u32> {
        (0..self.nodes.len())
            .flat_map(|i| self.instance_pids(i))
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// SIGKILLs node `i`'s agent and every process it started: the node is gone.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill9();
        }
        for (_, pid) in self.instance_pids(i) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }

    /// Waits until every node with a running agent is registered and Ready.
    pub fn wait_nodes_ready(&self) {
        let want: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.agent.is_some())
            .map(|n| n.name.clone())
            .collect();
        wait_for(Duration::from_secs(30), "nodes ready", || {
            let nodes = self.api.get("/v1/nodes").body;
            let ready: Vec<String> = items(&nodes)
                .iter()
                .filter(|n| condition(n, "Ready") == Some("True".into()))
                .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            if want.iter().all(|w| ready.contains(w)) {
                Ok(())
            } else {
                Err(nodes.to_string())
            }
        });
    }

    /// A volume as the API shows it.
    pub fn volume(&self, name: &str) -> Value {
        self.api.get(&format!("/v1/volumes/{name}")).ok()
    }

    /// Waits until `pred` holds for the volume; returns it.
    #[track_caller]
    pub fn wait_volume(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(timeout, what, || {
            let v = self.api.get(&format!("/v1/volumes/{name}")).body;
            if pred(&v) { Ok(v) } else { Err(v.to_string()) }
        })
    }
}

/// The items of a list answer (`{"items": [...]}` or a bare array).
pub fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .or_else(|| v.as_array())
        .cloned()
        .unwrap_or_default()
}

/// Status of condition `type_` of a resource.
pub fn condition(v: &Value, type_: &str) -> Option<String> {
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// Message of condition `type_` of a resource.
pub fn condition_message(v: &Value, type_: &str) -> String {
    v["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                a.kill9();
            }
        }
        for i in 0..self.nodes.len() {
            for (_, pid) in self.instance_pids(i) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        self.kill_manager();
    }
}

/// `json!` re-exported for tests.
pub fn body(v: Value) -> Value {
    json!(v)
}

/// Whether a path exists (for data-removal checks).
pub fn exists(p: &Path) -> bool {
    p.exists()
}

// ---------------------------------------------------------------------------------------
// The API calls the tests make (one place to follow the REST API).

impl Cluster {
    /// Creates a volume.
    #[track_caller]
    pub fn create_volume(&self, name: &str, size: u64, replicas: u32) -> Value {
        self.api
            .post(
                "/v1/volumes",
                json!({"name": name, "size": size, "numberOfReplicas": replicas}),
            )
            .ok()
    }

    /// Attaches a volume to a node.
    #[track_caller]
    pub fn attach(&self, name: &str, node: &str) -> Value {
        self.api
            .post(&format!("/v1/volumes/{name}/attach"), json!({"node": node}))
            .ok()
    }

    /// Detaches a volume.
    #[track_caller]
    pub fn detach(&self, name: &str) -> Value {
        self.api
            .post(&format!("/v1/volumes/{name}/detach"), json!({}))
            .ok()
    }

    /// Takes a snapshot.
    #[track_caller]
    pub fn snapshot(&self, volume: &str, snap: &str) -> Value {
        self.api
            .post(
                &format!("/v1/volumes/{volume}/snapshots"),
                json!({"name": snap}),
            )
            .ok()
    }

    /// Reverts a (detached) volume to a snapshot.
    #[track_caller]
    pub fn revert(&self, volume: &str, snap: &str) -> Value {
        self.api
            .post(
                &format!("/v1/volumes/{volume}/snapshots/{snap}/revert"),
                json!({}),
            )
            .ok()
    }

    /// Waits until the volume is detached.
    #[track_caller]
    pub fn wait_detached(&self, name: &str) -> Value {
        self.wait_volume(name, Duration::from_secs(60), "volume detached", |v| {
            v["status"]["state"] == "detached"
        })
    }

    /// Sets a setting.
    #[track_caller]
    pub fn set_setting(&self, name: &str, value: &str) -> Value {
        self.api
            .put(&format!("/v1/settings/{name}"), json!({"value": value}))
            .ok()
    }

    /// Waits until the volume is attached and returns its NBD endpoint.
    #[track_caller]
    pub fn wait_attached(&self, name: &str) -> String {
        let v = self.wait_volume(name, Duration::from_secs(60), "volume attached", |v| {
            v["status"]["state"] == "attached" && v["status"]["endpoint"].is_string()
        });
        v["status"]["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the volume's robustness is `r`.
    #[track_caller]
    pub fn wait_robustness(&self, name: &str, r: &str, timeout: Duration) -> Value {
        self.wait_volume(name, timeout, &format!("robustness {r}"), |v| {
            v["status"]["robustness"] == r
        })
    }

    /// Replica process names of a volume on node `i`, from the agent's records.
    pub fn replicas_on(&self, i: usize, volume: &str) -> Vec<(String, u32)> {
        let prefix = format!("{volume}-r-");
        self.instance_pids(i)
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect()
    }
}

/// Runs fio with the nbd engine: random writes of 4–64 KiB over `[offset, offset+size)` at
/// queue depth 16, then verifies it all (crc32c). `extra` adds options (`--verify_only`,
/// `--rate=…`). Returns fio's output; panics when fio fails or reports a verify error.
#[track_caller]
pub fn fio(
    uri: &str,
    dir: &Path,
    name: &str,
    offset: u64,
    size: u64,
    seed: u64,
    extra: &[&str],
) -> crate::common::CmdOutput {
    let mut c = Command::new("fio");
    c.current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--rw=randwrite")
        .arg("--bsrange=4k-64k")
        .arg("--iodepth=16")
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg(format!("--randseed={seed}"))
        .arg("--verify=crc32c")
        .arg("--do_verify=1")
        .arg("--verify_fatal=1")
        .arg("--verify_state_save=0")
        .args(extra);
    let out = crate::common::run_with_timeout(&mut c, 120);
    assert!(out.success(), "fio {name} failed: {out}");
    let text = out.all_output().to_lowercase();
    assert!(
        !text.contains("verify: bad") && !text.contains("verify failed"),
        "fio {name} reported a verify error: {out}"
    );
    out
}

/// Polls `f` every 100 ms until it returns `Some`; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_for_value<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
