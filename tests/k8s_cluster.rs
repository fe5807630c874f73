//! The manager on the Kubernetes store, end to end without a cluster: the API server
//! emulator (ironhorn_manager::store::kubernetes_emulator) stands in for kube-apiserver;
//! the real binary runs `ironhorn manager --store kubernetes` against it through a
//! kubeconfig, three real agents run real replicas. A Volume object written to the API
//! server (as `kubectl apply` would) gets its replicas scheduled and running and a healthy
//! status; deleting it removes its replicas, engine and data.

mod cluster_common;
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cluster_common::{Api, condition, free_port, free_range, items};
use common::{Process, bin, wait_for};
use ironhorn_manager::resources::{Volume, VolumeSpec};
use ironhorn_manager::store::Store;
use ironhorn_manager::store::kubernetes::KubernetesStore;
use ironhorn_manager::store::kubernetes_emulator::{ApiServerEmulator, ResourceKind};
use serde_json::{Value, json};

const NS: &str = "ironhorn-system";
const PORTS_PER_NODE: u16 = 40;
const MIB: u64 = 1 << 20;

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            n |= val(*b) << (18 - 6 * i);
        }
        let take = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    out
}

fn objects(emu: &ApiServerEmulator, rt: &tokio::runtime::Runtime, plural: &str) -> Vec<Value> {
    let store = KubernetesStore::new(emu.kube_client(NS).expect("client"), NS);
    let kind = plural.parse().expect("kind");
    rt.block_on(ironhorn_manager::store::StoreBackend::list(&store, kind))
        .expect("list")
}

#[test]
fn volume_object_gets_healthy_replicas_and_is_cleaned_up() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // kube clients are made inside the runtime.
    let _in_runtime = rt.enter();
    let emu = rt
        .block_on(ApiServerEmulator::start(ResourceKind::manager_kinds()))
        .expect("emulator");
    let dir = tempfile::Builder::new()
        .prefix("ih-k8s")
        .tempdir()
        .expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig(NS)).expect("kubeconfig");

    let api_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let agent_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = Command::new(bin());
    cmd.args([
        "manager",
        "--store",
        "kubernetes",
        "--identity",
        "manager-0",
    ])
    .arg("--listen")
    .arg(api_addr.to_string())
    .arg("--agent-listen")
    .arg(agent_addr.to_string())
    .env("KUBECONFIG", &kubeconfig)
    .env("POD_NAMESPACE", NS)
    .env_remove("IRONHORN_TOKEN");
    let (_manager, ()) = Process::spawn("manager", &mut cmd, |l| {
        l.contains("agent service listening").then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", e.message));

    // The manager took the Lease and made the token Secret.
    let lease = emu.object("leases", NS, "ironhorn-manager").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "manager-0");
    let secret = emu
        .object("secrets", NS, "ironhorn-api-token")
        .expect("token secret");
    let token = String::from_utf8(base64_decode(
        secret["data"]["token"].as_str().expect("token"),
    ))
    .expect("UTF-8");
    let api = Api {
        addr: api_addr,
        token: token.clone(),
    };
    api.put(
        "/v1/settings/storage-minimal-available-percentage",
        json!({"value": "0"}),
    )
    .ok();

    let base = free_range(PORTS_PER_NODE * 3);
    let mut agents = Vec::new();
    for i in 0..3u16 {
        let name = format!("node-{}", i + 1);
        let disk = dir.path().join(&name).join("disk");
        let mut cmd = Command::new(bin());
        cmd.arg("agent")
            .arg("--node")
            .arg(&name)
            .arg("--disk")
            .arg(&disk)
            .arg("--manager")
            .arg(format!("http://{agent_addr}"))
            .arg("--ports")
            .arg(format!(
                "{}-{}",
                base + PORTS_PER_NODE * i,
                base + PORTS_PER_NODE * (i + 1) - 1
            ))
            .arg("--state-dir")
            .arg(dir.path().join(&name).join("agent"))
            .arg("--stop-instances-on-exit")
            .env("IRONHORN_TOKEN", &token);
        let (p, ()) = Process::spawn(&name, &mut cmd, |l| {
            l.contains("agent running").then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        agents.push(p);
    }
    wait_for(Duration::from_secs(30), "three Ready nodes", || {
        let nodes = objects(&emu, &rt, "nodes");
        let ready = nodes
            .iter()
            .filter(|n| condition(n, "Ready").as_deref() == Some("True"))
            .count();
        if ready == 3 { Ok(()) } else { Err(nodes) }
    });

    // A Volume object, written to the API server as kubectl would.
    let store = Store::new(Arc::new(KubernetesStore::new(
        emu.kube_client(NS).expect("client"),
        NS,
    )));
    let volume = Volume::new("pvc-1", VolumeSpec::with_size(64 * MIB));
    rt.block_on(store.create(&volume))
        .expect("create the Volume");
    let v = wait_for(Duration::from_secs(60), "a healthy volume", || {
        let v = emu.object("volumes", NS, "pvc-1").unwrap_or(Value::Null);
        if v["status"]["robustness"] == "healthy" {
            Ok(v)
        } else {
            Err(v)
        }
    });
    assert_eq!(condition(&v, "Scheduled").as_deref(), Some("True"), "{v}");
    let replicas = objects(&emu, &rt, "replicas");
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let mut nodes: Vec<String> = replicas
        .iter()
        .map(|r| r["spec"]["nodeId"].as_str().unwrap_or("").to_owned())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one replica per node: {replicas:?}");
    let data_dirs: Vec<std::path::PathBuf> = replicas
        .iter()
        .map(|r| r["spec"]["dataDir"].as_str().unwrap_or("").into())
        .collect();
    for d in &data_dirs {
        assert!(d.is_dir(), "replica data at {}", d.display());
    }
    // The REST API reads the same objects.
    let listed = api.get("/v1/volumes").ok();
    assert_eq!(items(&listed).len(), 1, "{listed}");

    // Delete the object: replicas, engine and their data go.
    rt.block_on(store.delete::<Volume>("pvc-1"))
        .expect("delete the Volume");
    wait_for(
        Duration::from_secs(60),
        "replicas and engines cleaned up",
        || {
            let left: Vec<Value> = ["volumes", "replicas", "engines"]
                .iter()
                .flat_map(|k| objects(&emu, &rt, k))
                .collect();
            if left.is_empty() { Ok(()) } else { Err(left) }
        },
    );
    wait_for(Duration::from_secs(30), "replica data removed", || {
        let left: Vec<&std::path::PathBuf> = data_dirs.iter().filter(|d| d.exists()).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    drop(agents);
}

/// Two managers on one API server: only the Lease holder serves agents (both serve the
/// API); when the leader stops (SIGTERM releases the Lease) the standby takes over at once,
/// and a leader killed without releasing is replaced after the Lease expires.
#[test]
fn only_the_lease_holder_serves_agents_and_a_standby_takes_over() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _in_runtime = rt.enter();
    let emu = rt
        .block_on(ApiServerEmulator::start(ResourceKind::manager_kinds()))
        .expect("emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig(NS)).expect("kubeconfig");
    let start = |identity: &str| {
        let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let agents: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(bin());
        cmd.args(["manager", "--store", "kubernetes", "--identity", identity])
            .arg("--listen")
            .arg(api.to_string())
            .arg("--agent-listen")
            .arg(agents.to_string())
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", NS)
            .env_remove("IRONHORN_TOKEN");
        let (p, ()) = Process::spawn(identity, &mut cmd, |l| {
            l.contains("manager API listening").then_some(())
        })
        .unwrap_or_else(|e| panic!("{}", e.message));
        (p, api, agents)
    };
    let listens = |a: SocketAddr| std::net::TcpStream::connect(a).is_ok();
    let holder = || {
        emu.object("leases", NS, "ironhorn-manager")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };

    let (mut a, a_api, a_agents) = start("manager-a");
    wait_for(Duration::from_secs(20), "manager-a leads", || {
        if holder().as_deref() == Some("manager-a") && listens(a_agents) {
            Ok(())
        } else {
            Err(holder())
        }
    });
    let (mut b, b_api, b_agents) = start("manager-b");
    std::thread::sleep(Duration::from_secs(2));
    assert!(listens(b_api), "a standby serves the API");
    assert!(!listens(b_agents), "a standby must not serve agents");
    assert_eq!(holder().as_deref(), Some("manager-a"));

    // SIGTERM: a releases the Lease; b takes over well before the 15 s lease duration.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    let status = a
        .wait_timeout(Duration::from_secs(20))
        .expect("manager-a stops");
    assert!(status.success(), "a clean stop: {status:?}");
    assert!(!listens(a_api));
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(10), "manager-b leads", || {
        if holder().as_deref() == Some("manager-b") && listens(b_agents) {
            Ok(())
        } else {
            Err(holder())
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );

    // SIGKILL of the leader: a new candidate waits out the Lease, then leads.
    b.kill9();
    let (_c, _c_api, c_agents) = start("manager-c");
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(40), "manager-c leads", || {
        if holder().as_deref() == Some("manager-c") && listens(c_agents) {
            Ok(())
        } else {
            Err(holder())
        }
    });
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "took over a live-looking lease after {:?}",
        started.elapsed()
    );
}
