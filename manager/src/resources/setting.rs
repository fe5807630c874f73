//! Setting: one named, validated knob of the control plane (catalog in `crate::settings`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired value of a setting.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Setting",
    namespaced,
    status = "SettingStatus",
    shortname = "ihset",
    printcolumn = r#"{"name":"Value","type":"string","jsonPath":".spec.value"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SettingSpec {
    /// The value, as text (validated against the setting's definition).
    pub value: String,
}

/// Observed state of a setting.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettingStatus {
    /// Whether the controllers have taken the value into account.
    #[serde(default)]
    pub applied: bool,
}
