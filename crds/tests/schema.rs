//! Properties of the generated CRDs that `kubectl explain` users and GitOps tools rely on.

use serde_json::Value;

fn schemas() -> Vec<(String, Value)> {
    livedisk_api::public_crds()
        .into_iter()
        .chain(livedisk_api::internal_crds())
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let version = &crd.spec.versions[0];
            let schema = serde_json::to_value(
                version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .expect("every CRD has a schema"),
            )
            .expect("schema serialises");
            (name, schema)
        })
        .collect()
}

/// Collects the paths of properties without a description (apiVersion, kind and metadata are
/// described by Kubernetes itself).
fn undocumented(path: &str, schema: &Value, missing: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let child = format!("{path}.{name}");
            if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if property.get("description").is_none() {
                missing.push(child.clone());
            }
            undocumented(&child, property, missing);
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(&format!("{path}[]"), items, missing);
    }
}

#[test]
fn every_field_has_a_description() {
    for (crd, schema) in schemas() {
        let mut missing = Vec::new();
        undocumented("", &schema, &mut missing);
        assert!(
            missing.is_empty(),
            "{crd}: fields without a description: {missing:?}"
        );
    }
}

#[test]
fn every_kind_reports_kstatus_fields_and_belongs_to_the_category() {
    for crd in livedisk_api::public_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.group, livedisk_api::GROUP);
        // A DiskEvacuation names a node and moves the volumes of every namespace.
        let scope = match crd.spec.names.kind.as_str() {
            "DiskEvacuation" => "Cluster",
            _ => "Namespaced",
        };
        assert_eq!(crd.spec.scope, scope, "{name}");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&[livedisk_api::CATEGORY.to_string()][..]),
            "{name}"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}"
        );
        let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
        let status = &schema["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(
            status.get("observedGeneration").is_some(),
            "{name} lacks observedGeneration"
        );
        let conditions = &status["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"][0], "type",
            "{name}"
        );
        let columns = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{name} has no Age column"
        );
    }
}
