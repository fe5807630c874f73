//! `ironhorn setting ls|get|set`: the manager's settings, validated by the manager.

use clap::{Args, Subcommand};
use ironhorn_manager::client::SettingView;

use super::volume::{ClientArgs, Table, text};

/// `ironhorn setting …`
#[derive(Debug, Args)]
pub struct SettingArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: SettingCommand,
}

#[derive(Debug, Subcommand)]
enum SettingCommand {
    /// List settings with their values, defaults and bounds.
    Ls,
    /// Show one setting.
    Get {
        /// Setting.
        name: String,
    },
    /// Set a setting.
    Set {
        /// Setting.
        name: String,
        /// Value.
        value: String,
    },
}

fn table(settings: &[SettingView]) -> Table {
    let mut t = Table::new(&["NAME", "VALUE", "DEFAULT", "TYPE", "BOUNDS"]);
    for s in settings {
        let bounds = match (s.min, s.max) {
            (Some(a), Some(b)) => format!("{a}..={b}"),
            _ => "-".into(),
        };
        t.row(vec![
            s.name.clone(),
            s.value.clone(),
            s.default.clone(),
            text(&s.type_),
            bounds,
        ]);
    }
    t
}

impl SettingArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let out = &self.client;
        let c = out.client()?;
        match self.command {
            SettingCommand::Ls => {
                let list = c.list_settings().await?;
                out.print(&list, || table(&list))
            }
            SettingCommand::Get { name } => {
                let s = c.get_setting(&name).await?;
                out.print(&s, || table(std::slice::from_ref(&s)))
            }
            SettingCommand::Set { name, value } => {
                let s = c.set_setting(&name, &value).await?;
                out.print(&s, || table(std::slice::from_ref(&s)))
            }
        }
    }
}
