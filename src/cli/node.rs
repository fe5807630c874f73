//! `ironhorn node ls|get|update`: nodes and their disks, through the manager's API.

use clap::{Args, Subcommand};
use ironhorn_manager::client::UpdateNode;
use ironhorn_manager::resources::Object;
use ironhorn_manager::resources::{ConditionStatus, Node, get_condition};

use super::volume::{ClientArgs, Table};
use crate::size::ByteSize;

/// `ironhorn node …`
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List nodes and their disks.
    Ls,
    /// Show one node.
    Get {
        /// Node.
        name: String,
    },
    /// Change a node's scheduling or tags.
    Update {
        /// Node.
        name: String,
        /// Allow (true) or stop (false) new replicas on the node.
        #[arg(long)]
        allow_scheduling: Option<bool>,
        /// Node tags, comma-separated (replaces all).
        #[arg(long, value_delimiter = ',')]
        tags: Option<Vec<String>>,
    },
}

fn table(nodes: &[Node]) -> Table {
    let mut t = Table::new(&[
        "NODE",
        "READY",
        "SCHEDULABLE",
        "DISK",
        "PATH",
        "SIZE",
        "FREE",
        "SCHEDULED",
        "TAGS",
    ]);
    for n in nodes {
        let st = n.status.clone().unwrap_or_default();
        let ready = get_condition(&st.conditions, "Ready")
            .is_some_and(|c| c.status == ConditionStatus::True);
        if n.spec.disks.is_empty() {
            t.row(vec![
                n.name().to_owned(),
                ready.to_string(),
                n.spec.allow_scheduling.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                n.spec.tags.join(","),
            ]);
        }
        for (disk, spec) in &n.spec.disks {
            let ds = st.disks.get(disk).cloned().unwrap_or_default();
            t.row(vec![
                n.name().to_owned(),
                ready.to_string(),
                (n.spec.allow_scheduling && spec.allow_scheduling).to_string(),
                disk.clone(),
                spec.path.clone(),
                ByteSize(ds.storage_maximum).to_string(),
                ByteSize(ds.storage_available).to_string(),
                ByteSize(ds.storage_scheduled).to_string(),
                n.spec
                    .tags
                    .iter()
                    .chain(&spec.tags)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            ]);
        }
    }
    t
}

impl NodeArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let out = &self.client;
        let c = out.client()?;
        match self.command {
            NodeCommand::Ls => {
                let nodes = c.list_nodes().await?;
                out.print(&nodes, || table(&nodes))
            }
            NodeCommand::Get { name } => {
                let n = c.get_node(&name).await?;
                out.print(&n, || table(std::slice::from_ref(&n)))
            }
            NodeCommand::Update {
                name,
                allow_scheduling,
                tags,
            } => {
                let req = UpdateNode {
                    allow_scheduling,
                    tags,
                    ..Default::default()
                };
                let n = c.update_node(&name, &req).await?;
                out.print(&n, || table(std::slice::from_ref(&n)))
            }
        }
    }
}
