#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests the way tests/deploy_manifests.rs needs.

usage: deploy_validate.py CRDS_YAML MANIFEST...

- every CRD in CRDS_YAML has a structural schema (what the API server demands of
  apiextensions.k8s.io/v1 CRDs: a type on every node, no $ref, nothing but validation
  inside anyOf/oneOf/allOf/not, `properties` and `additionalProperties` not together);
- every ironhorn.io object in the manifests validates (jsonschema) against the
  openAPIV3Schema of its CRD version, with unknown fields rejected wherever the API server
  would prune them (so a misspelt field fails here instead of vanishing in a cluster);
- every snapshot.storage.k8s.io VolumeSnapshotClass / VolumeSnapshot validates against the
  schema vendored in tests/deploy_schemas/ (kubernetes-validate has no schema for that
  external CRD);
- every other object is left to kubernetes-validate (the Rust test runs it).

Prints one line per object checked and exits non-zero on the first kind of failure found,
after reporting all of them.
"""

import copy
import json
import os
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
VENDORED = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): "volumesnapshotclass.json",
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): "volumesnapshot.json",
}
# Keywords that may not appear inside anyOf/oneOf/allOf/not of a structural schema.
NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable",
                   "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                   "x-kubernetes-int-or-string"}


def structural_errors(schema, path, inside_junctor=False):
    """Violations of the structural-schema rules, as strings."""
    errors = []
    if not isinstance(schema, dict):
        return [f"{path}: not a schema object"]
    if "$ref" in schema:
        errors.append(f"{path}: $ref is not allowed")
    if inside_junctor:
        for key in NOT_IN_JUNCTORS & set(schema):
            errors.append(f"{path}: '{key}' inside anyOf/oneOf/allOf/not")
    else:
        untyped_ok = schema.get("x-kubernetes-int-or-string") or schema.get(
            "x-kubernetes-preserve-unknown-fields")
        if "type" not in schema and not untyped_ok:
            errors.append(f"{path}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{path}: both properties and additionalProperties")
    for name, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, f"{path}.{name}", inside_junctor)
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], f"{path}.*", inside_junctor)
    if isinstance(schema.get("items"), dict):
        errors += structural_errors(schema["items"], f"{path}[]", inside_junctor)
    for junctor in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(junctor, [])):
            errors += structural_errors(sub, f"{path}.{junctor}[{i}]", True)
    if "not" in schema:
        errors += structural_errors(schema["not"], f"{path}.not", True)
    return errors


def strict(schema):
    """The schema as jsonschema should apply it: `nullable` as a null type, and no
    unknown fields where the API server would prune them."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if not isinstance(s, dict):
            return
        if s.get("nullable") and "type" in s:
            s["type"] = [s["type"], "null"]
        if (s.get("type") == "object" or "properties" in s) and "properties" in s \
                and not s.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in s:
            s["additionalProperties"] = False
        for sub in s.get("properties", {}).values():
            walk(sub)
        if isinstance(s.get("additionalProperties"), dict):
            walk(s["additionalProperties"])
        if isinstance(s.get("items"), dict):
            walk(s["items"])
        for junctor in ("anyOf", "oneOf", "allOf"):
            for sub in s.get(junctor, []):
                walk(sub)

    walk(schema)
    # metadata is the API server's: only check that it is an object with a name.
    props = schema.setdefault("properties", {})
    props["metadata"] = {"type": "object", "required": ["name"]}
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    return schema


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ironhorn_args(path):
    """Prints `KIND/NAME/CONTAINER<TAB>[args]` for every container running the ironhorn
    image in the rendered manifests at `path`."""
    for doc in load_all(path):
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if c.get("image", "").split(":")[0].split("/")[-1] == "ironhorn":
                where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
                print(f"{where}\t{json.dumps(c.get('args', []))}")
    return 0


def driver_objects(path):
    """Prints one JSON object: the CSIDriver name, and for each StorageClass and
    VolumeSnapshotClass its driver and parameters, from the manifests at `path`."""
    out = {"csidrivers": [], "storageclasses": [], "snapshotclasses": []}
    for doc in load_all(path):
        if doc.get("kind") == "CSIDriver":
            out["csidrivers"].append(doc["metadata"]["name"])
        elif doc.get("kind") == "StorageClass":
            out["storageclasses"].append(
                {"driver": doc.get("provisioner", ""), "parameters": doc.get("parameters", {})})
        elif doc.get("kind") == "VolumeSnapshotClass":
            out["snapshotclasses"].append(
                {"driver": doc.get("driver", ""), "parameters": doc.get("parameters", {})})
    print(json.dumps(out))
    return 0


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--ironhorn-args":
        return ironhorn_args(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--driver-objects":
        return driver_objects(sys.argv[2])
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    failures = 0
    crds = [d for d in load_all(sys.argv[1]) if d.get("kind") == "CustomResourceDefinition"]
    if not crds:
        print(f"FAIL {sys.argv[1]}: no CustomResourceDefinition in it")
        return 1
    schemas = {}
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            errors = structural_errors(schema, spec["names"]["kind"])
            if errors:
                failures += 1
                print(f"FAIL crd/{crd['metadata']['name']} {version['name']}: schema not structural:")
                for e in errors:
                    print(f"     {e}")
            else:
                print(f"ok   crd/{crd['metadata']['name']} {version['name']}: structural schema")
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = strict(schema)

    for path in sys.argv[2:]:
        for doc in load_all(path):
            key = (doc.get("apiVersion", ""), doc.get("kind", ""))
            name = doc.get("metadata", {}).get("name", "?")
            if key[0].startswith("ironhorn.io/"):
                schema = schemas.get(key)
                if schema is None:
                    failures += 1
                    print(f"FAIL {path}: {key[1]} {name}: no CRD serves {key[0]} {key[1]}")
                    continue
            elif key in VENDORED:
                with open(os.path.join(HERE, "deploy_schemas", VENDORED[key])) as f:
                    schema = json.load(f)
            else:
                continue
            validator = jsonschema.Draft7Validator(schema)
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            if errors:
                failures += 1
                print(f"FAIL {path}: {key[1]} {name}:")
                for e in errors:
                    print(f"     at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
            else:
                print(f"ok   {path}: {key[1]} {name} against its schema")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
