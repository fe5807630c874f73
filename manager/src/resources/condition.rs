//! Kubernetes-style conditions shared by every resource's status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet).
    #[default]
    Unknown,
}

/// One observation about a resource, in the Kubernetes style.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What is observed, in CamelCase (`Scheduled`, `Ready`, `Restored`...).
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// Why, as one CamelCase word (`ReplicaSchedulingFailure`).
    #[serde(default)]
    pub reason: String,
    /// Why, for people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// Sets (adds or replaces) the condition of `type_` in `conditions`; the transition time
/// changes only when the status does. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> bool {
    let now = Some(Time(jiff::Timestamp::now()));
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status == status && c.reason == reason && c.message == message {
                return false;
            }
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message.to_owned();
            true
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of `type_`, if present.
pub fn get_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Up",
            "up"
        ));
        let t = c[0].last_transition_time.clone();
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Up",
            "still up"
        ));
        assert_eq!(c[0].last_transition_time, t);
        assert!(!set_condition(
            &mut c,
            "Ready",
            ConditionStatus::True,
            "Up",
            "still up"
        ));
        assert!(set_condition(
            &mut c,
            "Ready",
            ConditionStatus::False,
            "Down",
            "down"
        ));
        assert_eq!(c.len(), 1);
        assert_eq!(
            get_condition(&c, "Ready").map(|c| c.status),
            Some(ConditionStatus::False)
        );
    }
}
