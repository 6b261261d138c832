//! Namespace users get the public livedisk kinds through the cluster's own `view` and `edit`
//! roles: the chart's ClusterRoles carry the aggregation labels (applied by `hack/accounts.sh`
//! with the rest of the chart's RBAC), and the API server's authorizer answers for real. The
//! cluster-scoped DiskEvacuation is in the same roles, and so reaches only users bound to them
//! cluster-wide.

use anyhow::Result;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use livedisk_e2e::{TestNamespace, client, eventually};

/// The namespaced public kinds.
const KINDS: [&str; 5] = [
    "disksnapshots",
    "diskmerges",
    "diskmigrations",
    "diskexports",
    "diskrestores",
];

/// The cluster-scoped public kind: reached only through a ClusterRoleBinding.
const CLUSTER_KIND: &str = "diskevacuations";

async fn allowed(
    client: &kube::Client,
    user: &str,
    namespace: &str,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
) -> Result<bool> {
    allowed_in(client, user, Some(namespace), verb, resource, subresource).await
}

/// `namespace: None` asks about the cluster scope (a cluster-scoped kind, or every namespace).
async fn allowed_in(
    client: &kube::Client,
    user: &str,
    namespace: Option<&str>,
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
                namespace: namespace.map(String::from),
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
        role_ref: role_ref(role),
        subjects: Some(vec![self::user(user)]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

fn role_ref(role: &str) -> RoleRef {
    RoleRef {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "ClusterRole".into(),
        name: role.into(),
    }
}

fn user(name: &str) -> Subject {
    Subject {
        api_group: Some("rbac.authorization.k8s.io".into()),
        kind: "User".into(),
        name: name.into(),
        ..Default::default()
    }
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
        // A namespace's RoleBinding does not reach the cluster-scoped DiskEvacuation.
        for (who, verb) in [("viewer", "get"), ("editor", "get"), ("editor", "create")] {
            assert!(
                !allowed_in(&client, who, None, verb, CLUSTER_KIND, None).await?,
                "{who} {verb} {CLUSTER_KIND} through a RoleBinding"
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

#[tokio::test]
async fn cluster_wide_view_and_edit_users_get_disk_evacuations_and_never_their_status() -> Result<()>
{
    let client = client().await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let viewer = format!("cluster-viewer-{}", &suffix[..8]);
    let editor = format!("cluster-editor-{}", &suffix[..8]);
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let mut names = Vec::new();
    for (who, role) in [(&viewer, "view"), (&editor, "edit")] {
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("livedisk-e2e-{who}")),
                ..Default::default()
            },
            role_ref: role_ref(role),
            subjects: Some(vec![user(who)]),
        };
        bindings.create(&PostParams::default(), &binding).await?;
        names.push(format!("livedisk-e2e-{who}"));
    }
    let result = async {
        eventually(60, "the edit role to include DiskEvacuations", || async {
            Ok(
                allowed_in(&client, &editor, None, "create", CLUSTER_KIND, None)
                    .await?
                    .then_some(()),
            )
        })
        .await?;
        for verb in ["get", "list", "watch"] {
            for who in [&viewer, &editor] {
                assert!(
                    allowed_in(&client, who, None, verb, CLUSTER_KIND, None).await?,
                    "{who} {verb} {CLUSTER_KIND}"
                );
            }
        }
        for verb in ["create", "update", "patch", "delete"] {
            assert!(
                !allowed_in(&client, &viewer, None, verb, CLUSTER_KIND, None).await?,
                "viewer {verb} {CLUSTER_KIND}"
            );
            assert!(
                allowed_in(&client, &editor, None, verb, CLUSTER_KIND, None).await?,
                "editor {verb} {CLUSTER_KIND}"
            );
        }
        assert!(allowed_in(&client, &viewer, None, "get", CLUSTER_KIND, Some("status")).await?);
        assert!(
            !allowed_in(
                &client,
                &editor,
                None,
                "patch",
                CLUSTER_KIND,
                Some("status")
            )
            .await?,
            "editor patch {CLUSTER_KIND}/status"
        );
        Ok(())
    }
    .await;
    for name in names {
        bindings.delete(&name, &DeleteParams::default()).await?;
    }
    result
}
