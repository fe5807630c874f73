//! The CSI Identity service: plugin name and version, capabilities, probe.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::pb;
use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::service::Type as ServiceType;
use crate::pb::plugin_capability::volume_expansion::Type as ExpansionType;

/// Name the driver registers under (CSIDriver object, StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "driver.ironhorn.io";

/// What the Identity service reports.
#[derive(Debug, Clone)]
pub struct IdentityService {
    /// Whether this process serves the Controller service.
    pub controller: bool,
    /// Whether volumes grow while attached (else: offline expansion).
    pub online_expansion: bool,
}

fn service(t: ServiceType) -> pb::PluginCapability {
    pb::PluginCapability {
        r#type: Some(pb::plugin_capability::Type::Service(
            pb::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = Vec::new();
        if self.controller {
            capabilities.push(service(ServiceType::ControllerService));
        }
        capabilities.push(service(ServiceType::VolumeAccessibilityConstraints));
        let expansion = if self.online_expansion {
            ExpansionType::Online
        } else {
            ExpansionType::Offline
        };
        capabilities.push(pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::VolumeExpansion(
                pb::plugin_capability::VolumeExpansion {
                    r#type: expansion as i32,
                },
            )),
        });
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}
