//! Namespace users get the public livedisk kinds through the cluster's own `view` and `edit`
//! roles: the chart's ClusterRoles carry the aggregation labels (applied by `hack/accounts.sh`
//! with the rest of the chart's RBAC), and the API server's authorizer answers for real.

use anyhow::Result;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use livedisk_e2e::{TestNamespace, client, eventually};

const KINDS: [&str; 5] = [
    "disksnapshots",
    "diskmerges",
    "diskmigrations",
    "diskexports",
    "diskrestores",
];

async fn allowed(
    client: &kube::Client,
    user: &str,
    namespace: &str,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
) -> Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            resource_attributes: Some(ResourceAttributes {
                group: Some("livedisk.io".into()),
                resource: Some(resource.into()),
                subresource: subresource.map(String::from),
                namespace: Some(namespace.into()),
                verb: Some(verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
}

async fn bind(client: &kube::Client, namespace: &str, user: &str, role: &str) -> Result<()> {
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(format!("{user}-{role}")),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.into(),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

#[tokio::test]
async fn view_and_edit_users_get_the_public_kinds_and_never_their_status() -> Result<()> {
    let client = client().await?;
    let namespace = TestNamespace::create(&client, "user-roles").await?;
    let ns = namespace.name.clone();
    let result = async {
        bind(&client, &ns, "viewer", "view").await?;
        bind(&client, &ns, "editor", "edit").await?;
        // Aggregation is done by kube-controller-manager: wait until the last kind is in.
        eventually(
            60,
            "the edit role to include the livedisk kinds",
            || async {
                Ok(
                    allowed(&client, "editor", &ns, "create", "diskrestores", None)
                        .await?
                        .then_some(()),
                )
            },
        )
        .await?;
        for kind in KINDS {
            for verb in ["get", "list", "watch"] {
                assert!(
                    allowed(&client, "viewer", &ns, verb, kind, None).await?,
                    "viewer {verb} {kind}"
                );
                assert!(
                    allowed(&client, "editor", &ns, verb, kind, None).await?,
                    "editor {verb} {kind}"
                );
            }
            for verb in ["create", "update", "patch", "delete"] {
                assert!(
                    !allowed(&client, "viewer", &ns, verb, kind, None).await?,
                    "viewer {verb} {kind}"
                );
                assert!(
                    allowed(&client, "editor", &ns, verb, kind, None).await?,
                    "editor {verb} {kind}"
                );
            }
            // Status is the operator's to write; users may read it.
            assert!(allowed(&client, "viewer", &ns, "get", kind, Some("status")).await?);
            assert!(
                !allowed(&client, "editor", &ns, "patch", kind, Some("status")).await?,
                "editor patch {kind}/status"
            );
            // Only in the namespace of the binding.
            assert!(
                !allowed(
                    &client,
                    "editor",
                    &format!("{ns}-other"),
                    "create",
                    kind,
                    None
                )
                .await?
            );
        }
        // The internal kinds stay out of users' reach.
        for internal in ["livediskvolumes", "livedisksnapshots", "livedisknodes"] {
            assert!(
                !allowed(&client, "editor", &ns, "get", internal, None).await?,
                "editor get {internal}"
            );
        }
        Ok(())
    }
    .await;
    namespace.delete().await?;
    result
}
