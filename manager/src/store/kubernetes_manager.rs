//! `ironhorn manager --store kubernetes`: the manager on the Kubernetes backend.
//!
//! - The store is [`KubernetesStore`] on the cluster the process runs in (service account)
//!   or the kubeconfig's.
//! - The API token is the `token` key of the Secret [`TOKEN_SECRET`] in the namespace: the
//!   first manager creates it with a random token; the agents and the CSI controller read
//!   it through `secretKeyRef` (deploy/). A token given on the command line wins.
//! - The REST API and UI are served by every manager; the agent service and the
//!   controllers run only in the one that holds the Lease ([`super::kubernetes_lease`]).
//!   Only the leader listens on the agent port, so a readiness probe on that port makes the
//!   Service send agents (and API clients) to the leader.
//! - A leader that loses the Lease stops its controllers and exits with an error (the pod
//!   restarts as a candidate), as client-go's leader election advises: a process that kept
//!   going after losing leadership could act beside the new leader.

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use tokio_util::sync::CancellationToken;

use super::Store;
use super::kubernetes::KubernetesStore;
use super::kubernetes_lease::{LeaderElector, LeaseConfig, LeaseError};
use crate::controllers::{Registry, run_control_plane};
use crate::server::{Manager, ServerError};

/// Name of the Secret holding the API token.
pub const TOKEN_SECRET: &str = "ironhorn-api-token";
/// Key of the token in [`TOKEN_SECRET`].
pub const TOKEN_KEY: &str = "token";

/// Why the Kubernetes manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesManagerError {
    /// The store could not be reached or its CRDs are missing.
    #[error(transparent)]
    Store(#[from] super::StoreError),
    /// Reading or creating the token Secret failed.
    #[error("API token secret {namespace}/{TOKEN_SECRET}: {reason}")]
    Token {
        /// Namespace of the Secret.
        namespace: String,
        /// What went wrong.
        reason: String,
    },
    /// Leader election could not start.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The API server could not start or failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Binding the agent service failed.
    #[error("bind the agent service on {addr}: {source}")]
    AgentListen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// This manager led and lost the Lease.
    #[error("lost the leader lease; exiting so that only the new leader acts")]
    LostLeadership,
}

/// Settings of the Kubernetes manager.
#[derive(Debug, Clone)]
pub struct KubernetesManagerConfig {
    /// Namespace of the objects, the Lease and the Secret; none = `POD_NAMESPACE`, else the
    /// client configuration's.
    pub namespace: Option<String>,
    /// Address of the REST API and UI.
    pub listen: SocketAddr,
    /// Address of the agent service (leader only).
    pub agent_listen: SocketAddr,
    /// API token; none = the Secret's (created when missing).
    pub token: Option<String>,
    /// This candidate's identity in the Lease (the pod name).
    pub identity: String,
}

/// The API token: the Secret's, or a new random one stored in a new Secret. Two managers
/// racing to create it agree: the second create fails and it reads the first's.
pub async fn api_token(
    client: kube::Client,
    namespace: &str,
) -> Result<String, KubernetesManagerError> {
    let err = |reason: String| KubernetesManagerError::Token {
        namespace: namespace.to_string(),
        reason,
    };
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for _ in 0..3 {
        match api.get_opt(TOKEN_SECRET).await {
            Ok(Some(secret)) => {
                let token = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(TOKEN_KEY))
                    .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
                    .unwrap_or_default();
                if token.len() < 16 {
                    return Err(err(format!(
                        "key {TOKEN_KEY:?} is missing or shorter than 16 characters"
                    )));
                }
                return Ok(token);
            }
            Ok(None) => {}
            Err(e) => return Err(err(format!("get: {e}"))),
        }
        let token = random_token().map_err(|e| err(format!("/dev/urandom: {e}")))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(TOKEN_SECRET.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            data: Some(
                [(
                    TOKEN_KEY.to_string(),
                    ByteString(token.clone().into_bytes()),
                )]
                .into(),
            ),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = TOKEN_SECRET, "created the API token secret");
                return Ok(token);
            }
            // Another manager was first: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(err(format!("create: {e}"))),
        }
    }
    Err(err("created and deleted under us repeatedly".into()))
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs the manager on the Kubernetes backend until `shutdown`: the API always, the agent
/// service and controllers while leader. Returns [`KubernetesManagerError::LostLeadership`]
/// when the Lease is lost.
pub async fn run(
    config: KubernetesManagerConfig,
    shutdown: CancellationToken,
) -> Result<(), KubernetesManagerError> {
    let backend = KubernetesStore::connect(config.namespace.clone()).await?;
    let client = backend.client().clone();
    let namespace = backend.namespace().to_string();
    tracing::info!(%namespace, identity = %config.identity, "manager on the Kubernetes store");
    let token = match config.token {
        Some(t) => t,
        None => api_token(client.clone(), &namespace).await?,
    };
    let store = Store::new(Arc::new(backend));
    let manager = Manager::with_store(store.clone(), token.clone(), config.listen).await?;
    let api_shutdown = shutdown.child_token();
    let api = tokio::spawn(manager.serve(crate::api::ui::router(), api_shutdown.clone()));

    let election_stop = CancellationToken::new();
    let elector = LeaderElector::new(client, LeaseConfig::new(&namespace, &config.identity))?;
    let (mut leading, election) = elector.spawn(election_stop.clone());
    let result = async {
        // Wait for the Lease.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = leading.wait_for(|l| *l) => {
                if changed.is_err() {
                    return Err(KubernetesManagerError::LostLeadership);
                }
            }
        }
        tracing::info!("leading: starting the agent service and the controllers");
        let agents = tokio::net::TcpListener::bind(config.agent_listen)
            .await
            .map_err(|source| KubernetesManagerError::AgentListen {
                addr: config.agent_listen,
                source,
            })?;
        let control_stop = shutdown.child_token();
        let mut control = tokio::spawn(run_control_plane(
            store,
            Some(token),
            agents,
            Registry::builtin(),
            control_stop.clone(),
        ));
        let mut control_done = false;
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            _ = leading.wait_for(|l| !*l) => Err(KubernetesManagerError::LostLeadership),
            ended = &mut control => {
                control_done = true;
                match ended {
                    Ok(Err(e)) => tracing::warn!(error = %e, "agent service stopped"),
                    Err(e) => tracing::warn!(error = %e, "control plane task failed"),
                    Ok(Ok(())) => {}
                }
                Ok(())
            }
        };
        control_stop.cancel();
        if !control_done {
            let _ = control.await;
        }
        outcome
    }
    .await;
    // Release the Lease (if held) only after the controllers stopped.
    election_stop.cancel();
    let _ = election.await;
    api_shutdown.cancel();
    match api.await {
        Ok(Err(e)) if result.is_ok() => return Err(e.into()),
        Ok(Err(e)) => tracing::warn!(error = %e, "API server"),
        Err(e) => tracing::warn!(error = %e, "API server task failed"),
        Ok(Ok(())) => {}
    }
    result
}
