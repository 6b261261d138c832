//! Schema fragments shared by the CRDs: object-name references, quantities and condition lists.
//!
//! They exist so that the API server, not our controllers, rejects bad input at admission with a
//! message that names the offending field.

use schemars::{Schema, SchemaGenerator, json_schema};

/// RFC 1123 subdomain: what Kubernetes accepts as the name of a PVC, a VirtualMachine, a node or
/// one of our own objects.
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A reference by name to an object in the same namespace (or to a node).
pub fn object_name(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": OBJECT_NAME_PATTERN,
    })
}

/// An optional object-name reference; same rules as [`object_name`].
pub fn optional_object_name(generator: &mut SchemaGenerator) -> Schema {
    object_name(generator)
}

/// A non-negative bandwidth such as `200Mi` (bytes per second). Stored as a string so that CEL can
/// check it with the Kubernetes quantity library and reject malformed or negative values with a
/// readable message (the stock Quantity schema is int-or-string and accepts any string).
pub fn bandwidth(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [
            {
                "rule": "isQuantity(self)",
                "message": "must be a quantity of bytes per second such as 200Mi or 1Gi"
            },
            {
                "rule": "!isQuantity(self) || !quantity(self).isLessThan(quantity('0'))",
                "message": "must not be negative"
            }
        ]
    })
}

/// A list of conditions keyed by `type`, so server-side apply merges them one by one.
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let mut schema =
        generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}
