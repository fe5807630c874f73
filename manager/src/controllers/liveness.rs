//! When each node's agent last reported, kept in memory by the agent service and read by
//! the controllers. After a manager restart every node counts from the restart, so a
//! restart never makes nodes look down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ironhorn_proto::agent::NodeReport;

/// The last report of every node and when it came.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    last: HashMap<String, (Instant, NodeReport)>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            inner: Arc::new(Mutex::new(Inner {
                started: Instant::now(),
                last: HashMap::new(),
            })),
        }
    }
}

impl Liveness {
    /// Records a report.
    pub fn reported(&self, report: &NodeReport) {
        if let Ok(mut g) = self.inner.lock() {
            g.last
                .insert(report.node.clone(), (Instant::now(), report.clone()));
        }
    }

    /// Time since the node last reported (since the manager started if it has not yet).
    pub fn silent_for(&self, node: &str) -> Duration {
        match self.inner.lock() {
            Ok(g) => match g.last.get(node) {
                Some((t, _)) => t.elapsed(),
                None => g.started.elapsed(),
            },
            Err(_) => Duration::ZERO,
        }
    }

    /// The node's last report since the manager started.
    pub fn last_report(&self, node: &str) -> Option<NodeReport> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.last.get(node).map(|(_, r)| r.clone()))
    }

    /// Whether a report came from the node since the manager started.
    pub fn has_reported(&self, node: &str) -> bool {
        self.inner.lock().is_ok_and(|g| g.last.contains_key(node))
    }
}
