//! The shell of the kinds that hand their work to a node (DiskMerge, DiskRestore, DiskExport,
//! DiskMigration): each object gets one cluster-scoped node work object, labelled with the
//! object's namespace and name, and a finalizer (kube-runtime's `finalizer()`) so that deleting
//! the object stops or awaits its node work first. What differs between the kinds (what they
//! look up, decide and report) stays with each kind, behind [`NodeWorkKind`].

pub mod work;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::core::{ClusterResourceScope, NamespaceResourceScope};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::decide::{Decision, Refusal};
use crate::error::Error;
use crate::leader::Leadership;
use crate::metrics::OperatorMetrics;

/// What the reconcilers of node-work kinds read and write through.
pub struct NodeWorkContext {
    pub client: Client,
    pub recorder: Recorder,
    /// Checked before each reconcile: a replica that does not hold the Lease does nothing.
    pub leadership: Leadership,
    pub metrics: Arc<OperatorMetrics>,
    /// The driver's export CA (only DiskExport issues credentials).
    pub export_ca: Arc<crate::export::ca::CaStore>,
}

impl NodeWorkContext {
    /// Writes a decision to the object's status (and announces a changed Ready reason).
    pub async fn write_status<K>(&self, object: &K, decision: &Decision) -> Result<(), Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + ApiObject,
    {
        crate::finalized::write_status(&self.client, &self.recorder, object, None, decision).await
    }

    /// Writes the status of an object whose references refuse it (nothing was done) and says
    /// when to look again: soon for a refusal that may go away by itself, rarely for one that
    /// needs a person.
    pub async fn refuse<K>(&self, object: &K, refusal: &impl Refusal) -> Result<Action, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + ApiObject,
    {
        let decision = crate::decide::refused(refusal);
        self.write_status(object, &decision).await?;
        Ok(Action::requeue(Duration::from_secs(
            decision.requeue_seconds,
        )))
    }
}

/// What the API client and the controller need of an object they read, write and hand between
/// tasks.
pub trait ApiObject: Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static {}

impl<T> ApiObject for T where T: Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static
{}

/// A kind that hands its work to a node: the decisions of its own, for the shared shell.
pub trait NodeWorkKind: Send + Sync + 'static {
    /// The public kind users create.
    type Object: Resource<DynamicType = (), Scope = NamespaceResourceScope> + ApiObject;
    /// Its node work: a namespaced object cannot own a cluster-scoped one, so the work names
    /// its object by labels (and by the object's UID in its own name).
    type Work: Resource<DynamicType = (), Scope = ClusterResourceScope> + ApiObject;

    /// The operator's finalizer on the object: its node work is stopped (or awaited) first.
    const FINALIZER: &'static str;
    /// The node work's name is this prefix and the object's UID.
    const WORK_PREFIX: &'static str;
    /// The node work's labels naming its object.
    const LABEL_NAMESPACE: &'static str;
    const LABEL_NAME: &'static str;

    /// Before the finalizer is on: whether the object stops here (`Some`): its node work ended
    /// and is gone, or its references refuse it (the status says why). `None`: go on under the
    /// finalizer.
    fn refused_early(
        object: &Self::Object,
        ctx: &NodeWorkContext,
    ) -> impl Future<Output = Result<Option<Action>, Error>> + Send;

    /// Under the finalizer: creates or follows the node work, and reports it on the status.
    fn apply(
        object: &Self::Object,
        ctx: &NodeWorkContext,
    ) -> impl Future<Output = Result<Action, Error>> + Send;

    /// Once the object is deleted: its node work is removed, and awaited.
    fn cleanup(
        object: &Self::Object,
        ctx: &NodeWorkContext,
    ) -> impl Future<Output = Result<Action, Error>> + Send;
}

/// The kind's name, as metrics, logs and messages say it.
pub(crate) fn kind_name<K: NodeWorkKind>() -> String {
    K::Object::kind(&()).into_owned()
}

/// Runs the controller of one node-work kind until shutdown. A change of the node work wakes its
/// object.
pub async fn run<K: NodeWorkKind>(context: Arc<NodeWorkContext>) {
    let objects: Api<K::Object> = Api::all(context.client.clone());
    let works: Api<K::Work> = Api::all(context.client.clone());
    Controller::new(objects, watcher::Config::default().any_semantic())
        .with_config(
            controller::Config::default().concurrency(crate::controller::CONCURRENT_RECONCILES),
        )
        .watches(works, watcher::Config::default().any_semantic(), |w| {
            let labels = w.labels();
            Some(ObjectRef::new(labels.get(K::LABEL_NAME)?).within(labels.get(K::LABEL_NAMESPACE)?))
        })
        .shutdown_on_signal()
        .run(reconcile::<K>, error_policy::<K>, context)
        .for_each(|_| async {})
        .await;
}

async fn reconcile<K: NodeWorkKind>(
    object: Arc<K::Object>,
    context: Arc<NodeWorkContext>,
) -> Result<Action, Error> {
    if !context.leadership.is_leader() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let ctx = context.as_ref();
    // The finalizer goes on only once there is node work to stop: an object refused for its
    // references never holds up its own deletion (or its namespace's) on the operator.
    let guarded = object.finalizers().iter().any(|f| f == K::FINALIZER);
    let early = match guarded || object.meta().deletion_timestamp.is_some() {
        true => Ok(None),
        false => K::refused_early(&object, ctx).await,
    };
    let result = match early {
        Ok(Some(action)) => Ok(action),
        Err(error) => Err(error),
        Ok(None) => with_finalizer::<K>(object.clone(), ctx).await,
    };
    context
        .metrics
        .reconciled(&kind_name::<K>(), &result, started.elapsed());
    if let Err(error) = &result {
        crate::failure::publish_warning(&ctx.recorder, object.as_ref(), error).await;
    }
    result
}

/// The reconcile under the finalizer: `apply`, or `cleanup` once the object is deleted.
async fn with_finalizer<K: NodeWorkKind>(
    object: Arc<K::Object>,
    ctx: &NodeWorkContext,
) -> Result<Action, Error> {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<K::Object> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, K::FINALIZER, object, |event| async move {
        match event {
            finalizer::Event::Apply(o) => K::apply(&o, ctx).await,
            finalizer::Event::Cleanup(o) => K::cleanup(&o, ctx).await,
        }
    })
    .await;
    crate::finalized::settle(result, &kind_name::<K>(), &namespace, &name)
}

fn error_policy<K: NodeWorkKind>(
    _: Arc<K::Object>,
    error: &Error,
    _: Arc<NodeWorkContext>,
) -> Action {
    tracing::warn!(
        error = %livedisk_common::error_chain(error),
        "{} reconcile failed",
        kind_name::<K>()
    );
    Action::requeue(error.code().retry_after())
}
