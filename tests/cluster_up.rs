//! `ironhorn up` on free ports: the manager and three agents come up, a volume created and
//! attached through the REST API takes writes over NBD; Ctrl-C (SIGINT) stops every
//! process; `up` again brings back the same volume, attached, with the same data.

mod cluster_common;
mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use cluster_common::{Api, condition, free_port, free_range, items, wait_for_value};
use common::{Process, bin, run_with_timeout, wait_for};
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;

struct Up {
    process: Process,
    api: Api,
}

impl Up {
    /// Ctrl-C, and wait until `up` stopped everything.
    fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        self.process.signal(Signal::SIGINT);
        self.process.wait_timeout(Duration::from_secs(60))
    }
}

impl Drop for Up {
    /// `up` owns the manager, agents and instances: stop it in order, or they would outlive
    /// the test.
    fn drop(&mut self) {
        if self.process.is_running() {
            let _ = self.interrupt();
        }
    }
}

fn start_up(dir: &std::path::Path, api: SocketAddr, agent: SocketAddr, ports: u16) -> Up {
    let mut cmd = Command::new(bin());
    cmd.arg("up")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(api.to_string())
        .arg("--agent-listen")
        .arg(agent.to_string())
        .arg("--port-base")
        .arg(ports.to_string())
        .arg("--ports-per-node")
        .arg("40");
    let (process, ()) = Process::spawn("up", &mut cmd, |l| {
        (l.contains("started") && l.contains("node-3")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", e.message));
    wait_for(Duration::from_secs(30), "the API", || {
        TcpStream::connect(api).map(|_| ())
    });
    let token = std::fs::read_to_string(dir.join("manager").join("token")).expect("token");
    let up = Up {
        process,
        api: Api {
            addr: api,
            token: token.trim().to_owned(),
        },
    };
    wait_for_value(Duration::from_secs(30), "three ready nodes", || {
        let nodes = items(&up.api.get("/v1/nodes").body);
        let ready = nodes
            .iter()
            .filter(|n| condition(n, "Ready").as_deref() == Some("True"))
            .count();
        (ready == 3).then_some(())
    });
    up
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run_with_timeout(&mut c, 60);
    assert!(
        out.success() && !out.all_output().contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
}

fn wait_attached(api: &Api, name: &str) -> String {
    wait_for_value(Duration::from_secs(90), "volume attached", || {
        let v = api.get(&format!("/v1/volumes/{name}")).body;
        (v["status"]["state"] == "attached" && v["status"]["robustness"] == "healthy")
            .then(|| v["status"]["endpoint"].as_str().map(str::to_owned))
            .flatten()
    })
}

#[test]
fn up_stops_on_ctrl_c_and_brings_back_the_same_volume() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let agent: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let ports = free_range(120);
    let mut up = start_up(&dir, api, agent, ports);
    // The nodes' disks share the machine's file system, which other work fills.
    up.api
        .put(
            "/v1/settings/storage-minimal-available-percentage",
            serde_json::json!({"value": "0"}),
        )
        .ok();
    up.api
        .post(
            "/v1/volumes",
            serde_json::json!({"name": "vol1", "size": 16 * MIB, "numberOfReplicas": 3}),
        )
        .ok();
    up.api
        .post(
            "/v1/volumes/vol1/attach",
            serde_json::json!({"node": "node-2"}),
        )
        .ok();
    let uri = wait_attached(&up.api, "vol1");
    qemu_io(&uri, &["write -P 0x5a 0 2M", "flush"]);

    let status = up.interrupt().expect("up stops after SIGINT");
    assert!(status.success(), "up exited with {status}");
    // Nothing listens any more: the API and every instance port are free.
    assert!(TcpStream::connect(api).is_err(), "the manager still runs");
    for p in ports..ports + 120 {
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "port {p} still serves after up stopped"
        );
    }
    // Again: same volume, attached again, same data.
    let mut up2 = start_up(&dir, api, agent, ports);
    // Until the agents report, the stored status is the one from before the stop: wait for
    // the engine to serve again.
    wait_for_value(Duration::from_secs(90), "the volume served again", || {
        let uri = wait_attached(&up2.api, "vol1");
        let mut c = Command::new("nbdinfo");
        c.arg(&uri);
        run_with_timeout(&mut c, 10).success().then_some(())
    });
    let uri2 = wait_attached(&up2.api, "vol1");
    assert_eq!(uri2, uri, "the endpoint moved");
    qemu_io(&uri2, &["read -P 0x5a 0 2M"]);
    let status = up2.interrupt().expect("up stops after SIGINT");
    assert!(status.success(), "up exited with {status}");
}
