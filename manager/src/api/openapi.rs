//! The OpenAPI 3.0 document served at `/v1/openapi.json`: paths written out here, schemas
//! generated from the Rust types (schemars, OpenAPI 3.0 dialect), so they cannot drift from
//! what the handlers parse and return.

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

use super::backups::{BackupQuery, RestoreBackup, SetBackupTarget};
use super::config::{RecurringJobBody, SetSetting, SettingView};
use super::error::ErrorBody;
use super::nodes::UpdateNode;
use super::volumes::{
    AttachVolume, CreateBackup, CreateSnapshot, CreateVolume, ExpandVolume, UpdateVolume,
};
use crate::resources::{Backup, BackupTarget, Node, RecurringJob, Replica, Snapshot, Volume};

struct Doc {
    generator: SchemaGenerator,
    paths: Map<String, Value>,
}

/// One operation to document.
struct Op<'a> {
    method: &'a str,
    path: &'a str,
    id: &'a str,
    summary: &'a str,
    body: Option<Value>,
    ok: (u16, Option<Value>),
    errors: &'a [u16],
    query: Vec<Value>,
}

impl Doc {
    fn schema<T: JsonSchema>(&mut self) -> Value {
        self.generator.subschema_for::<T>().to_value()
    }

    fn array<T: JsonSchema>(&mut self) -> Value {
        json!({"type": "array", "items": self.schema::<T>()})
    }

    fn add(&mut self, op: Op<'_>) {
        let mut params: Vec<Value> = Vec::new();
        let mut rest = op.path;
        while let Some(start) = rest.find('{') {
            let Some(end) = rest[start..].find('}') else {
                break;
            };
            let name = &rest[start + 1..start + end];
            params.push(json!({
                "name": name, "in": "path", "required": true,
                "schema": {"type": "string", "minLength": 1}
            }));
            rest = &rest[start + end + 1..];
        }
        params.extend(op.query);
        let error_ref = json!({"$ref": "#/components/responses/Error"});
        let mut responses = Map::new();
        let ok_body = match op.ok.1 {
            Some(schema) => {
                json!({"description": "success", "content": {"application/json": {"schema": schema}}})
            }
            None => json!({"description": "success"}),
        };
        responses.insert(op.ok.0.to_string(), ok_body);
        for code in [400u16, 401].iter().chain(op.errors) {
            responses.insert(code.to_string(), error_ref.clone());
        }
        let mut operation = json!({
            "operationId": op.id,
            "summary": op.summary,
            "parameters": params,
            "responses": responses,
        });
        if let Some(body) = op.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": body}}
            });
        }
        let entry = self
            .paths
            .entry(op.path.to_owned())
            .or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
}

fn op<'a>(method: &'a str, path: &'a str, id: &'a str, summary: &'a str) -> Op<'a> {
    Op {
        method,
        path,
        id,
        summary,
        body: None,
        ok: (200, None),
        errors: &[],
        query: vec![],
    }
}

/// The OpenAPI document of `/v1` (and `/metrics`).
pub fn document() -> Value {
    let mut d = Doc {
        generator: SchemaSettings::openapi3().into_generator(),
        paths: Map::new(),
    };
    let volume = d.schema::<Volume>();
    let volumes = d.array::<Volume>();
    let snapshot = d.schema::<Snapshot>();
    let backup = d.schema::<Backup>();
    let node = d.schema::<Node>();
    let setting = d.schema::<SettingView>();
    let job = d.schema::<RecurringJob>();
    let target = d.schema::<BackupTarget>();

    d.add(Op {
        ok: (200, Some(volumes)),
        ..op("get", "/v1/volumes", "listVolumes", "List volumes")
    });
    let body = d.schema::<CreateVolume>();
    d.add(Op {
        body: Some(body),
        ok: (201, Some(volume.clone())),
        errors: &[409],
        ..op("post", "/v1/volumes", "createVolume", "Create a volume")
    });
    d.add(Op {
        ok: (200, Some(volume.clone())),
        errors: &[404],
        ..op("get", "/v1/volumes/{name}", "getVolume", "Get a volume")
    });
    let body = d.schema::<UpdateVolume>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(volume.clone())),
        errors: &[404, 409],
        ..op(
            "patch",
            "/v1/volumes/{name}",
            "updateVolume",
            "Change a volume's replica count, locality, selectors or labels",
        )
    });
    d.add(Op {
        ok: (202, None),
        errors: &[404, 409],
        ..op(
            "delete",
            "/v1/volumes/{name}",
            "deleteVolume",
            "Delete a volume and its data",
        )
    });
    let body = d.schema::<AttachVolume>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(volume.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/attach",
            "attachVolume",
            "Attach a volume to a node",
        )
    });
    d.add(Op {
        ok: (200, Some(volume.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/detach",
            "detachVolume",
            "Detach a volume",
        )
    });
    let body = d.schema::<ExpandVolume>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(volume.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/expand",
            "expandVolume",
            "Grow a volume",
        )
    });
    let list = d.array::<Snapshot>();
    d.add(Op {
        ok: (200, Some(list)),
        errors: &[404],
        ..op(
            "get",
            "/v1/volumes/{name}/snapshots",
            "listSnapshots",
            "List a volume's snapshots",
        )
    });
    let body = d.schema::<CreateSnapshot>();
    d.add(Op {
        body: Some(body),
        ok: (201, Some(snapshot.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/snapshots",
            "createSnapshot",
            "Take a snapshot",
        )
    });
    d.add(Op {
        ok: (200, Some(snapshot)),
        errors: &[404],
        ..op(
            "get",
            "/v1/volumes/{name}/snapshots/{snapshot}",
            "getSnapshot",
            "Get a snapshot",
        )
    });
    d.add(Op {
        ok: (202, None),
        errors: &[404, 409],
        ..op(
            "delete",
            "/v1/volumes/{name}/snapshots/{snapshot}",
            "deleteSnapshot",
            "Remove a snapshot",
        )
    });
    d.add(Op {
        ok: (200, Some(volume.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/snapshots/{snapshot}/revert",
            "revertSnapshot",
            "Revert a detached volume to a snapshot",
        )
    });
    let body = d.schema::<CreateBackup>();
    d.add(Op {
        body: Some(body),
        ok: (201, Some(backup.clone())),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/volumes/{name}/backups",
            "createBackup",
            "Back up a volume",
        )
    });
    let list = d.array::<Replica>();
    d.add(Op {
        ok: (200, Some(list)),
        errors: &[404],
        ..op(
            "get",
            "/v1/volumes/{name}/replicas",
            "listReplicas",
            "List a volume's replicas",
        )
    });
    d.add(Op {
        ok: (202, None),
        errors: &[404, 409],
        ..op(
            "delete",
            "/v1/volumes/{name}/replicas/{replica}",
            "removeReplica",
            "Remove a replica (a new one is scheduled)",
        )
    });

    let list = d.array::<Node>();
    d.add(Op {
        ok: (200, Some(list)),
        ..op(
            "get",
            "/v1/nodes",
            "listNodes",
            "List nodes and their disks",
        )
    });
    d.add(Op {
        ok: (200, Some(node.clone())),
        errors: &[404],
        ..op("get", "/v1/nodes/{name}", "getNode", "Get a node")
    });
    let body = d.schema::<UpdateNode>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(node)),
        errors: &[404, 409],
        ..op(
            "patch",
            "/v1/nodes/{name}",
            "updateNode",
            "Change a node's or its disks' scheduling and tags",
        )
    });

    let list = d.array::<Backup>();
    let _ = d.schema::<BackupQuery>();
    d.add(Op {
        ok: (200, Some(list)),
        query: vec![json!({"name": "volume", "in": "query", "required": false, "schema": {"type": "string"}})],
        ..op("get", "/v1/backups", "listBackups", "List backups")
    });
    d.add(Op {
        ok: (200, Some(backup)),
        errors: &[404],
        ..op("get", "/v1/backups/{name}", "getBackup", "Get a backup")
    });
    d.add(Op {
        ok: (202, None),
        errors: &[404, 409],
        ..op(
            "delete",
            "/v1/backups/{name}",
            "deleteBackup",
            "Delete a backup from the target",
        )
    });
    let body = d.schema::<RestoreBackup>();
    d.add(Op {
        body: Some(body),
        ok: (201, Some(volume)),
        errors: &[404, 409],
        ..op(
            "post",
            "/v1/backups/{name}/restore",
            "restoreBackup",
            "Restore a backup into a new volume",
        )
    });
    d.add(Op {
        ok: (200, Some(target.clone())),
        ..op(
            "get",
            "/v1/backuptarget",
            "getBackupTarget",
            "Get the backup target",
        )
    });
    let body = d.schema::<SetBackupTarget>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(target)),
        errors: &[409],
        ..op(
            "put",
            "/v1/backuptarget",
            "setBackupTarget",
            "Set the backup target",
        )
    });

    let list = d.array::<SettingView>();
    d.add(Op {
        ok: (200, Some(list)),
        ..op(
            "get",
            "/v1/settings",
            "listSettings",
            "List settings with defaults and bounds",
        )
    });
    d.add(Op {
        ok: (200, Some(setting.clone())),
        errors: &[404],
        ..op("get", "/v1/settings/{name}", "getSetting", "Get a setting")
    });
    let body = d.schema::<SetSetting>();
    d.add(Op {
        body: Some(body),
        ok: (200, Some(setting)),
        errors: &[404, 409],
        ..op(
            "put",
            "/v1/settings/{name}",
            "setSetting",
            "Set a setting (validated)",
        )
    });

    let list = d.array::<RecurringJob>();
    d.add(Op {
        ok: (200, Some(list)),
        ..op(
            "get",
            "/v1/recurringjobs",
            "listRecurringJobs",
            "List recurring jobs",
        )
    });
    let body = d.schema::<RecurringJobBody>();
    d.add(Op {
        body: Some(body.clone()),
        ok: (201, Some(job.clone())),
        errors: &[409],
        ..op(
            "post",
            "/v1/recurringjobs",
            "createRecurringJob",
            "Create a recurring job",
        )
    });
    d.add(Op {
        ok: (200, Some(job.clone())),
        errors: &[404],
        ..op(
            "get",
            "/v1/recurringjobs/{name}",
            "getRecurringJob",
            "Get a recurring job",
        )
    });
    d.add(Op {
        body: Some(body),
        ok: (200, Some(job)),
        errors: &[404, 409],
        ..op(
            "put",
            "/v1/recurringjobs/{name}",
            "updateRecurringJob",
            "Change a recurring job",
        )
    });
    d.add(Op {
        ok: (204, None),
        errors: &[404],
        ..op(
            "delete",
            "/v1/recurringjobs/{name}",
            "deleteRecurringJob",
            "Delete a recurring job",
        )
    });

    d.paths.insert(
        "/v1/events".into(),
        json!({"get": {
            "operationId": "events",
            "summary": "Server-sent events of resource changes (event: Added/Modified/Deleted; data: {type, kind, object})",
            "parameters": [
                {"name": "kind", "in": "query", "required": false, "schema": {"type": "string"}},
                {"name": "replay", "in": "query", "required": false, "schema": {"type": "boolean"}}
            ],
            "responses": {
                "200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "400": {"$ref": "#/components/responses/Error"},
                "401": {"$ref": "#/components/responses/Error"}
            }
        }}),
    );
    d.paths.insert(
        "/metrics".into(),
        json!({"get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": {"$ref": "#/components/responses/Error"}
            }
        }}),
    );

    let error = d.schema::<ErrorBody>();
    let schemas = d.generator.take_definitions(true);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "ironhorn manager API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Desired state in, observed state out: handlers write specs and read statuses; controllers act. Every call needs `Authorization: Bearer TOKEN` (the token the manager printed at first start)."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": d.paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {
                "description": "error",
                "content": {"application/json": {"schema": error}}
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for part in text.split("\"$ref\":\"").skip(1) {
            let target = part.split('"').next().unwrap_or_default();
            if let Some(name) = target.strip_prefix("#/components/schemas/") {
                assert!(schemas.contains_key(name), "dangling $ref {target}");
            } else {
                assert!(
                    target.starts_with("#/components/responses/"),
                    "odd $ref {target}"
                );
            }
        }
        assert!(doc["paths"]["/v1/volumes"]["post"]["requestBody"].is_object());
        assert_eq!(doc["openapi"], "3.0.3");
    }
}
