//! The DiskSnapshot reconciler for a VirtualMachine source (decision 5 of the brief): the VM's
//! livedisk volumes are taken as one VolumeGroupSnapshot per node that holds some of them, each
//! selecting its claims by a label unique to the request (removed afterwards). A running VM with
//! a guest agent is frozen through KubeVirt's subresource API around the cut and thawed as soon
//! as every group has its cut; volumes on several nodes are only taken inside such a freeze (or
//! while the VM writes nothing: stopped or paused).
//!
//! The freeze, the creation of the groups and the wait for their cut run in one pass, so that the
//! guest stays frozen no longer than the cut takes. A pass interrupted there (an operator
//! restart) leaves `guestFreeze.state` Freezing on the status: the next operator thaws the guest,
//! discards that attempt's groups and takes the snapshot again.

mod freeze;
mod groups;
mod lookup;
pub mod plan;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};
use livedisk_api::DiskSnapshot;
use livedisk_api::common::Phase;
use livedisk_api::snapshot::{
    DeletionPolicy, DiskSnapshotStatus, GuestFreeze, GuestFreezeState, SnapshotIndication,
    VirtualMachineVolumeSnapshot,
};
use serde_json::Value;

use self::plan::{FreezePlan, GroupsState, Members, VmRefusal};
use super::{FINALIZER, SnapshotContext};
use crate::decide::{Decision, EventKind, Health, conditions, refused};
use crate::error::Error;

/// How often the groups are looked at while the guest is frozen.
const CUT_POLL: Duration = Duration::from_millis(50);
/// The longest the guest is kept frozen waiting for the cut; past it the attempt fails (the
/// guest agent would thaw by itself at `UNFREEZE_TIMEOUT` anyway).
const CUT_DEADLINE: Duration = Duration::from_secs(30);
/// How often a snapshot whose groups are being taken is looked at again.
const FOLLOW_SECONDS: u64 = 2;
/// How long the claims' labels are given to reach the snapshot-controller's cache before the
/// groups that select them are made (outside the freeze). A group that took other volumes anyway
/// is found by its content's volume handles and taken again.
const LABEL_SETTLE: Duration = Duration::from_secs(1);

/// What this process did to the DiskSnapshots it reconciles, by UID. The status read at the start
/// of a pass can lag behind this process's own writes; this tells a stale status from the state
/// an interrupted (earlier) process left.
#[derive(Default)]
pub struct Attempts(Mutex<HashMap<String, Attempt>>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// This process wrote the groups' names of this attempt.
    Started(i32),
    /// This process discarded this attempt (the next one is to be started).
    Discarded(i32),
}

impl Attempts {
    fn get(&self, uid: &str) -> Option<Attempt> {
        self.0.lock().ok().and_then(|m| m.get(uid).copied())
    }
    fn set(&self, uid: &str, attempt: Attempt) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(uid.into(), attempt);
        }
    }
    fn forget(&self, uid: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(uid);
        }
    }
}

/// Pure: whether the status read lags behind what this process wrote (look again shortly).
fn stale(memory: Option<Attempt>, attempt: i32, names_written: bool) -> bool {
    match memory {
        Some(Attempt::Started(a)) => attempt < a || (attempt == a && !names_written),
        Some(Attempt::Discarded(a)) => attempt <= a,
        None => false,
    }
}

/// A DiskSnapshot of the VirtualMachine `vm`, under the finalizer.
pub async fn reconcile(
    snapshot: std::sync::Arc<DiskSnapshot>,
    ctx: &SnapshotContext,
    vm: &str,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().unwrap_or_default();
    let span = tracing::info_span!("reconcile", kind = "DiskSnapshot", %namespace, %name, %vm);
    let _entered = span.enter();
    let guarded = snapshot.finalizers().iter().any(|f| f == FINALIZER);
    if snapshot.meta().deletion_timestamp.is_some() {
        if !guarded {
            return Ok(Action::await_change());
        }
        if let Some(action) = deletion(&snapshot, ctx).await? {
            return Ok(action);
        }
    }
    let api: Api<DiskSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, snapshot, |event| async move {
        match event {
            finalizer::Event::Apply(s) => apply(&s, ctx, vm).await,
            finalizer::Event::Cleanup(s) => {
                ctx.vm_attempts.forget(&s.uid().unwrap_or_default());
                Ok(Action::await_change())
            }
        }
    })
    .await;
    crate::finalized::settle(result, "DiskSnapshot", &namespace, &name)
}

fn uid_of(snapshot: &DiskSnapshot) -> Result<String, Error> {
    snapshot.uid().ok_or_else(|| {
        Error::InvalidObject(format!(
            "DiskSnapshot {} has no uid yet",
            snapshot.name_any()
        ))
    })
}

fn decision(phase: Phase, health: Health, reason: &str, message: &str, requeue: u64) -> Decision {
    Decision {
        phase,
        conditions: conditions(health, reason, message),
        event: if health == Health::Stalled {
            EventKind::Warning
        } else {
            EventKind::Normal
        },
        requeue_seconds: requeue,
        fields: Default::default(),
    }
}

fn set(decision: &mut Decision, key: &str, value: impl serde::Serialize) {
    decision.fields.insert(
        key.into(),
        serde_json::to_value(value).unwrap_or(Value::Null),
    );
}

async fn write(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    decision: &Decision,
) -> Result<(), Error> {
    super::write_status(snapshot, ctx, decision).await
}

fn requeue(decision: &Decision) -> Action {
    Action::requeue(Duration::from_secs(decision.requeue_seconds))
}

async fn publish(
    ctx: &SnapshotContext,
    snapshot: &DiskSnapshot,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    crate::finalized::publish(
        &ctx.recorder,
        &snapshot.object_ref(&()),
        type_,
        reason,
        note,
        "Snapshot",
    )
    .await;
}

async fn apply(snapshot: &DiskSnapshot, ctx: &SnapshotContext, vm: &str) -> Result<Action, Error> {
    let uid = uid_of(snapshot)?;
    let status = snapshot.status.clone().unwrap_or_default();
    let attempt = status.attempt.unwrap_or(0);
    // A failed VM snapshot is final, as KubeVirt's are: a new DiskSnapshot takes a new one.
    if status.phase == Phase::Failed || status.phase == Phase::Ready && attempt_done(&status) {
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let memory = ctx.vm_attempts.get(&uid);
    if stale(
        memory,
        attempt,
        !status.volume_group_snapshot_names.is_empty(),
    ) {
        // This process wrote a newer state than the status shows: the cache lags.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    match memory {
        Some(_) => {}
        None => {
            let frozen = status.guest_freeze.as_ref().is_some_and(|f| {
                matches!(
                    f.state,
                    GuestFreezeState::Freezing | GuestFreezeState::Frozen
                )
            });
            if frozen {
                return interrupted(snapshot, ctx, vm, &uid, attempt).await;
            }
        }
    }
    if status.volume_group_snapshot_names.is_empty() {
        start(snapshot, ctx, vm, &uid, attempt).await
    } else {
        ctx.vm_attempts.set(&uid, Attempt::Started(attempt));
        follow(snapshot, ctx, &uid, &status).await
    }
}

/// Whether a Ready status has nothing left to do (its claims are unlabelled once it is ready).
fn attempt_done(status: &DiskSnapshotStatus) -> bool {
    status
        .volumes
        .iter()
        .all(|v| v.skipped.is_some() || v.volume_snapshot_name.is_some())
}

/// An earlier operator was stopped while the guest was frozen: thaw, discard the attempt, and
/// take the snapshot again.
async fn interrupted(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    vm: &str,
    uid: &str,
    attempt: i32,
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let thaw = match freeze::unfreeze(&ctx.client, &namespace, vm).await {
        Ok(()) => "thawed the guest".to_string(),
        Err(refused) => format!("the unfreeze answered: {refused}"),
    };
    let message = format!(
        "attempt {attempt} was interrupted while the guest was frozen (an operator restart): {thaw}"
    );
    restart_attempt(snapshot, ctx, uid, attempt, "FreezeInterrupted", &message).await
}

/// Discards attempt `attempt` (its groups and labels) and starts the next one.
async fn restart_attempt(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    uid: &str,
    attempt: i32,
    reason: &str,
    why: &str,
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let leftovers = groups::list(&ctx.client, &namespace, uid).await?;
    groups::delete(&ctx.client, &namespace, &leftovers, false).await?;
    groups::unlabel_claims(&ctx.client, &namespace, &plan::selector_label(uid)).await?;
    let message = format!(
        "{why}; discarded its {} group(s) and takes the snapshot again",
        leftovers.len()
    );
    tracing::warn!(%message, "attempt discarded");
    publish(ctx, snapshot, EventType::Warning, reason, &message).await;
    let next = attempt + 1;
    ctx.vm_attempts.set(uid, Attempt::Discarded(attempt));
    let mut d = decision(Phase::Pending, Health::InProgress, reason, &message, 1);
    set(&mut d, "attempt", next);
    set(&mut d, "guestFreeze", Value::Null);
    set(&mut d, "volumeGroupSnapshotNames", Value::Null);
    write(snapshot, ctx, &d).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Looks at the VM and its claims; refuses, or labels the claims and takes the groups (inside a
/// freeze when one is planned).
async fn start(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    vm: &str,
    uid: &str,
    attempt: i32,
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let client = &ctx.client;
    let Some(volumes) = lookup::vm_volumes(client, &namespace, vm).await? else {
        let message = format!("waiting for VirtualMachine \"{vm}\" to exist in this namespace");
        let d = decision(
            Phase::Pending,
            Health::InProgress,
            "ReferenceNotFound",
            &message,
            30,
        );
        write(snapshot, ctx, &d).await?;
        return Ok(requeue(&d));
    };
    let claims = lookup::claims(client, &namespace, &volumes).await?;
    let members = match plan::members(vm, &volumes, &claims, livedisk_common::DRIVER_NAME) {
        Ok(m) => m,
        Err(refusal) => return refuse(snapshot, ctx, &refusal).await,
    };
    let instance = lookup::instance(client, &namespace, vm).await?;
    let nodes: Vec<String> = members.groups.keys().cloned().collect();
    let freeze_plan = match plan::freeze_plan(
        snapshot.spec.freeze,
        instance.as_ref(),
        &nodes,
        members.partial,
    ) {
        Ok(p) => p,
        Err(refusal) => return refuse(snapshot, ctx, &refusal).await,
    };
    let label = plan::selector_label(uid);
    for (n, claims) in members.groups.values().enumerate() {
        for claim in claims {
            groups::label_claim(
                client,
                &namespace,
                claim,
                &label,
                Some(&plan::selector_value(attempt, n)),
            )
            .await?;
        }
    }
    tokio::time::sleep(LABEL_SETTLE).await;
    let names: Vec<String> = (0..nodes.len())
        .map(|n| plan::group_name(&snapshot.name_any(), attempt, n))
        .collect();
    if freeze_plan.freeze {
        frozen_cut(
            snapshot,
            ctx,
            vm,
            uid,
            attempt,
            &members,
            freeze_plan,
            &names,
        )
        .await
    } else {
        let mut d = decision(
            Phase::Running,
            Health::InProgress,
            "SnapshotInProgress",
            &format!(
                "taking {} group(s) without a freeze: {}",
                names.len(),
                names.join(", ")
            ),
            FOLLOW_SECONDS,
        );
        set(&mut d, "attempt", attempt);
        set(&mut d, "volumes", &members.volumes);
        set(&mut d, "indications", &freeze_plan.indications);
        set(&mut d, "volumeGroupSnapshotNames", &names);
        write(snapshot, ctx, &d).await?;
        ctx.vm_attempts.set(uid, Attempt::Started(attempt));
        if let Err(e) = create_groups(snapshot, ctx, uid, attempt, &names).await {
            return group_create_failed(snapshot, ctx, uid, e).await;
        }
        Ok(requeue(&d))
    }
}

async fn refuse(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    refusal: &VmRefusal,
) -> Result<Action, Error> {
    let d = refused(refusal);
    write(snapshot, ctx, &d).await?;
    Ok(requeue(&d))
}

async fn create_groups(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    uid: &str,
    attempt: i32,
    names: &[String],
) -> Result<(), Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let owner = snapshot
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidObject("DiskSnapshot has no uid yet".into()))?;
    let label = plan::selector_label(uid);
    for (n, name) in names.iter().enumerate() {
        let value = plan::selector_value(attempt, n);
        let desired = groups::group(
            name,
            snapshot.spec.snapshot_class_name.as_deref(),
            (&label, &value),
            uid,
            owner.clone(),
        );
        groups::create(&ctx.client, &namespace, desired).await?;
    }
    Ok(())
}

/// The groups could not be created: a cluster without group snapshots waits for them; any other
/// error is the reconcile's.
async fn group_create_failed(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    uid: &str,
    error: Error,
) -> Result<Action, Error> {
    if !groups::not_served(&error) {
        return Err(error);
    }
    let namespace = snapshot.namespace().unwrap_or_default();
    groups::unlabel_claims(&ctx.client, &namespace, &plan::selector_label(uid)).await?;
    ctx.vm_attempts.forget(uid);
    let mut d = refused(&VmRefusal::GroupSnapshotsNotServed);
    set(&mut d, "volumeGroupSnapshotNames", Value::Null);
    set(&mut d, "guestFreeze", Value::Null);
    write(snapshot, ctx, &d).await?;
    Ok(requeue(&d))
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())
}

/// Freeze, groups, wait for every cut, thaw: the guest is frozen for as long as this takes.
#[allow(clippy::too_many_arguments)]
async fn frozen_cut(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    vm: &str,
    uid: &str,
    attempt: i32,
    members: &Members,
    freeze_plan: FreezePlan,
    names: &[String],
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let client = &ctx.client;
    let mut freeze_status = GuestFreeze {
        state: GuestFreezeState::Freezing,
        requested_at: Some(now()),
        ..Default::default()
    };
    // Written before the freeze: an operator stopped from here on leaves the mark its successor
    // thaws by.
    let mut d = decision(
        Phase::Running,
        Health::InProgress,
        "Freezing",
        &format!(
            "freezing the guest of VirtualMachine {vm} for the cut of {} group(s)",
            names.len()
        ),
        FOLLOW_SECONDS,
    );
    set(&mut d, "attempt", attempt);
    set(&mut d, "volumes", &members.volumes);
    set(&mut d, "indications", &freeze_plan.indications);
    set(&mut d, "volumeGroupSnapshotNames", names);
    set(&mut d, "guestFreeze", &freeze_status);
    write(snapshot, ctx, &d).await?;
    ctx.vm_attempts.set(uid, Attempt::Started(attempt));

    let frozen_at = Instant::now();
    if let Err(answer) = freeze::freeze(client, &namespace, vm, freeze::UNFREEZE_TIMEOUT).await {
        // A freeze that failed half-way may have frozen some filesystems: thaw regardless.
        let _ = freeze::unfreeze(client, &namespace, vm).await;
        let message = format!("the guest freeze was refused: {answer}");
        publish(ctx, snapshot, EventType::Warning, "FreezeFailed", &message).await;
        freeze_status.state = GuestFreezeState::Failed;
        freeze_status.message = Some(answer.to_string());
        let required = snapshot.spec.freeze == livedisk_api::snapshot::FreezePolicy::Required;
        if required || names.len() > 1 {
            groups::unlabel_claims(client, &namespace, &plan::selector_label(uid)).await?;
            let why = if required {
                "freeze is Required".to_string()
            } else {
                format!(
                    "the volumes are held by {} nodes, whose instants agree only inside a freeze",
                    names.len()
                )
            };
            let mut d = decision(
                Phase::Failed,
                Health::Stalled,
                "FreezeFailed",
                &format!("{message}; {why}: nothing was taken"),
                300,
            );
            set(&mut d, "guestFreeze", &freeze_status);
            set(&mut d, "volumeGroupSnapshotNames", Value::Null);
            write(snapshot, ctx, &d).await?;
            return Ok(requeue(&d));
        }
        // One node: its group is one instant; the snapshot goes on, crash-consistent.
        let indications = plan::freeze_failed(&freeze_plan.indications, &answer.to_string());
        let mut d = decision(
            Phase::Running,
            Health::InProgress,
            "SnapshotInProgress",
            &format!("{message}; taking the group crash-consistent"),
            FOLLOW_SECONDS,
        );
        set(&mut d, "indications", &indications);
        set(&mut d, "guestFreeze", &freeze_status);
        write(snapshot, ctx, &d).await?;
        if let Err(e) = create_groups(snapshot, ctx, uid, attempt, names).await {
            return group_create_failed(snapshot, ctx, uid, e).await;
        }
        return Ok(requeue(&d));
    }
    tracing::info!(vm, "guest frozen");

    let created = create_groups(snapshot, ctx, uid, attempt, names).await;
    let outcome = match created {
        Ok(()) => wait_for_cut(ctx, &namespace, names).await,
        Err(e) => Err(e),
    };
    let incomplete = match &outcome {
        Ok((_, facts)) => plan::expected_handles(members)
            .iter()
            .zip(facts)
            .any(|(expected, group)| plan::incomplete(expected, group)),
        Err(_) => false,
    };
    let outcome = outcome.map(|(state, _)| state);
    let thaw = freeze::unfreeze(client, &namespace, vm).await;
    let frozen_ms = i64::try_from(frozen_at.elapsed().as_millis()).unwrap_or(i64::MAX);
    tracing::info!(vm, frozen_ms, "guest thawed");
    freeze_status.state = GuestFreezeState::Thawed;
    freeze_status.frozen_milliseconds = Some(frozen_ms);
    if let Err(answer) = &thaw {
        freeze_status.message = Some(format!("the unfreeze answered: {answer}"));
    }
    let mut indications: Vec<SnapshotIndication> = freeze_plan.indications.clone();
    let timeout_ms = i64::try_from(freeze::UNFREEZE_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
    if plan::quiesce_timed_out(frozen_ms, timeout_ms) {
        indications.push(SnapshotIndication {
            indication: "QuiesceTimeout".into(),
            message: format!("the guest stayed frozen {frozen_ms} ms, past its unfreeze timeout: it may have thawed before the cut"),
        });
    }
    if incomplete {
        let why = format!(
            "a group took other volumes than the VM's claims (the labels had not reached the snapshot-controller); the guest was thawed after {frozen_ms} ms"
        );
        return restart_attempt(snapshot, ctx, uid, attempt, "GroupIncomplete", &why).await;
    }
    let failure = match outcome {
        Ok(GroupsState::Failed(error)) => Some(format!("a group snapshot failed: {error}")),
        Ok(GroupsState::Taking) => Some(format!(
            "the groups had no cut after {} s of freeze",
            CUT_DEADLINE.as_secs()
        )),
        Ok(_) => None,
        Err(e) if groups::not_served(&e) => {
            let _ = group_create_failed(snapshot, ctx, uid, e).await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
        Err(e) => Some(e.to_string()),
    };
    if let Some(failure) = failure {
        let leftovers = groups::list(client, &namespace, uid).await?;
        groups::delete(client, &namespace, &leftovers, false).await?;
        groups::unlabel_claims(client, &namespace, &plan::selector_label(uid)).await?;
        let message = format!(
            "{failure}; the guest was thawed after {frozen_ms} ms and the groups were deleted"
        );
        let mut d = decision(
            Phase::Failed,
            Health::Stalled,
            "GroupSnapshotFailed",
            &message,
            300,
        );
        set(&mut d, "guestFreeze", &freeze_status);
        set(&mut d, "indications", &indications);
        write(snapshot, ctx, &d).await?;
        return Ok(requeue(&d));
    }
    let note = format!(
        "the guest of VirtualMachine {vm} was frozen for {frozen_ms} ms around the cut of {} group(s)",
        names.len()
    );
    publish(ctx, snapshot, EventType::Normal, "GuestThawed", &note).await;
    let mut d = decision(
        Phase::Running,
        Health::InProgress,
        "SnapshotInProgress",
        &format!("{note}; waiting for the groups to be ready"),
        FOLLOW_SECONDS,
    );
    set(&mut d, "guestFreeze", &freeze_status);
    set(&mut d, "indications", &indications);
    write(snapshot, ctx, &d).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Polls the groups until each has its cut (or one fails, or the deadline passes).
async fn wait_for_cut(
    ctx: &SnapshotContext,
    namespace: &str,
    names: &[String],
) -> Result<(GroupsState, Vec<plan::GroupFacts>), Error> {
    let started = Instant::now();
    loop {
        let mut facts = Vec::with_capacity(names.len());
        for name in names {
            facts.push(groups::facts(&ctx.client, namespace, name).await?);
        }
        let state = plan::groups_state(&facts);
        if state != GroupsState::Taking || started.elapsed() >= CUT_DEADLINE {
            return Ok((state, facts));
        }
        tokio::time::sleep(CUT_POLL).await;
    }
}

/// The volume handles each group of a started snapshot must hold, from its status's volume
/// lines (group `n` is the `n`th node in order) and the claims' volumes.
async fn expected_from_status(
    ctx: &SnapshotContext,
    namespace: &str,
    status: &DiskSnapshotStatus,
) -> Result<Vec<Vec<String>>, Error> {
    let volumes: Vec<plan::VmVolume> = status
        .volumes
        .iter()
        .filter(|v| v.skipped.is_none())
        .filter_map(|v| {
            Some(plan::VmVolume {
                name: v.name.clone(),
                source: plan::VolumeSource::Claim {
                    claim: v.claim_name.clone()?,
                },
            })
        })
        .collect();
    let claims = lookup::claims(&ctx.client, namespace, &volumes).await?;
    let mut by_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in status.volumes.iter().filter(|v| v.skipped.is_none()) {
        let (Some(node), Some(claim)) = (&line.node_name, &line.claim_name) else {
            continue;
        };
        if let Some(handle) = claims.get(claim).and_then(|c| c.volume_handle.clone()) {
            by_node.entry(node.clone()).or_default().push(handle);
        }
    }
    Ok(by_node.into_values().collect())
}

/// Follows groups already asked for until they are ready; fills in the member snapshots.
async fn follow(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    uid: &str,
    status: &DiskSnapshotStatus,
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let client = &ctx.client;
    let names = &status.volume_group_snapshot_names;
    let mut facts = Vec::with_capacity(names.len());
    for name in names {
        facts.push(groups::facts(client, &namespace, name).await?);
    }
    let froze = status.guest_freeze.is_some();
    if facts.iter().any(|f| !f.exists) {
        if froze {
            // Taken inside a freeze, then lost: it cannot be taken again at the same instant.
            let message = "a VolumeGroupSnapshot of this snapshot was deleted by someone else; create a new DiskSnapshot";
            let d = decision(
                Phase::Failed,
                Health::Stalled,
                "VolumeGroupSnapshotLost",
                message,
                300,
            );
            write(snapshot, ctx, &d).await?;
            return Ok(requeue(&d));
        }
        if let Err(e) = create_groups(snapshot, ctx, uid, status.attempt.unwrap_or(0), names).await
        {
            return group_create_failed(snapshot, ctx, uid, e).await;
        }
        return Ok(Action::requeue(Duration::from_secs(FOLLOW_SECONDS)));
    }
    let state = plan::groups_state(&facts);
    if matches!(state, GroupsState::Cut | GroupsState::Ready) {
        let expected = expected_from_status(ctx, &namespace, status).await?;
        if expected
            .iter()
            .zip(&facts)
            .any(|(expected, group)| plan::incomplete(expected, group))
        {
            let why = "a group took other volumes than the VM's claims (the labels had not reached the snapshot-controller)";
            let attempt = status.attempt.unwrap_or(0);
            return restart_attempt(snapshot, ctx, uid, attempt, "GroupIncomplete", why).await;
        }
    }
    match state {
        GroupsState::Failed(error) if names.len() == 1 && !froze => {
            // One node, no freeze: the snapshot-controller retries, as for a claim's snapshot.
            let message = format!("VolumeGroupSnapshot {} reports: {error}", names[0]);
            let mut d = decision(
                Phase::Pending,
                Health::InProgress,
                "SnapshotError",
                &message,
                FOLLOW_SECONDS,
            );
            d.event = EventKind::Warning;
            write(snapshot, ctx, &d).await?;
            Ok(requeue(&d))
        }
        GroupsState::Failed(error) => {
            // Several groups must agree (or a freeze is over): a late retry would not.
            let leftovers = groups::list(client, &namespace, uid).await?;
            groups::delete(client, &namespace, &leftovers, false).await?;
            groups::unlabel_claims(client, &namespace, &plan::selector_label(uid)).await?;
            let message = format!("a group snapshot failed: {error}; the groups were deleted");
            let d = decision(
                Phase::Failed,
                Health::Stalled,
                "GroupSnapshotFailed",
                &message,
                300,
            );
            write(snapshot, ctx, &d).await?;
            Ok(requeue(&d))
        }
        GroupsState::Taking | GroupsState::Cut => {
            let d = decision(
                Phase::Running,
                Health::InProgress,
                "SnapshotInProgress",
                &format!(
                    "waiting for VolumeGroupSnapshot(s) {} to be ready",
                    names.join(", ")
                ),
                FOLLOW_SECONDS,
            );
            write(snapshot, ctx, &d).await?;
            Ok(requeue(&d))
        }
        GroupsState::Ready => ready(snapshot, ctx, uid, status, &facts).await,
    }
}

async fn ready(
    snapshot: &DiskSnapshot,
    ctx: &SnapshotContext,
    uid: &str,
    status: &DiskSnapshotStatus,
    facts: &[plan::GroupFacts],
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let names = &status.volume_group_snapshot_names;
    let members = groups::members(&ctx.client, &namespace, names).await?;
    let mut volumes: Vec<VirtualMachineVolumeSnapshot> = status.volumes.clone();
    let mut missing = Vec::new();
    for volume in volumes.iter_mut().filter(|v| v.skipped.is_none()) {
        let claim = volume.claim_name.clone().unwrap_or_default();
        match members.get(&claim) {
            Some(member) => {
                volume.volume_snapshot_name = Some(member.volume_snapshot.clone());
                volume.restore_size = member.restore_size.clone();
            }
            None => missing.push(claim),
        }
    }
    if !missing.is_empty() {
        // The member VolumeSnapshots appear with the group's readiness; rarely a pass earlier.
        let d = decision(
            Phase::Running,
            Health::InProgress,
            "SnapshotInProgress",
            &format!(
                "waiting for the member VolumeSnapshots of {}",
                missing.join(", ")
            ),
            FOLLOW_SECONDS,
        );
        write(snapshot, ctx, &d).await?;
        return Ok(requeue(&d));
    }
    groups::unlabel_claims(&ctx.client, &namespace, &plan::selector_label(uid)).await?;
    let taken = volumes.iter().filter(|v| v.skipped.is_none()).count();
    let consistency = consistency(status, names.len());
    let message = format!(
        "{taken} volume(s) in {} VolumeGroupSnapshot(s), {consistency}",
        names.len()
    );
    let mut d = decision(Phase::Ready, Health::Ready, "SnapshotReady", &message, 300);
    set(&mut d, "volumes", &volumes);
    if let Some(time) = facts.iter().filter_map(|f| f.creation_time.clone()).max() {
        set(&mut d, "creationTime", time);
    }
    write(snapshot, ctx, &d).await?;
    Ok(requeue(&d))
}

/// Pure: what the snapshot's instants mean, in words for the Ready message.
fn consistency(status: &DiskSnapshotStatus, groups: usize) -> String {
    let frozen = status
        .guest_freeze
        .as_ref()
        .is_some_and(|f| f.state == GuestFreezeState::Thawed);
    let online = status.indications.iter().any(|i| i.indication == "Online");
    match (frozen, groups > 1, online) {
        (true, false, _) => "one instant inside a guest freeze".into(),
        (true, true, _) => "per-node crash-consistent inside a guest freeze".into(),
        (false, false, true) => "one crash-consistent instant (the guest was not frozen)".into(),
        (false, true, true) => "per-node instants of a paused VM".into(),
        (false, _, false) => "taken while the VM was stopped".into(),
    }
}

/// One step of the deletion of a VM snapshot: `Some` to look again later, `None` when nothing
/// is left and the finalizer may come off.
async fn deletion(snapshot: &DiskSnapshot, ctx: &SnapshotContext) -> Result<Option<Action>, Error> {
    let namespace = snapshot.namespace().unwrap_or_default();
    let uid = uid_of(snapshot)?;
    let status = snapshot.status.clone().unwrap_or_default();
    // A guest left frozen by an interrupted pass is thawed before anything else.
    if let Some(vm) = &snapshot.spec.source.virtual_machine_name
        && ctx.vm_attempts.get(&uid).is_none()
        && status.guest_freeze.as_ref().is_some_and(|f| {
            matches!(
                f.state,
                GuestFreezeState::Freezing | GuestFreezeState::Frozen
            )
        })
    {
        let _ = freeze::unfreeze(&ctx.client, &namespace, vm).await;
    }
    let retain = snapshot.spec.deletion_policy == DeletionPolicy::Retain;
    let left = groups::list(&ctx.client, &namespace, &uid).await?;
    if !left.is_empty() {
        groups::delete(&ctx.client, &namespace, &left, retain).await?;
        let message = format!(
            "deleting VolumeGroupSnapshot(s) {}{}",
            left.iter()
                .map(|g| g.name_any())
                .collect::<Vec<_>>()
                .join(", "),
            if retain {
                " (their contents are retained)"
            } else {
                ""
            }
        );
        let d = decision(
            Phase::Deleting,
            Health::InProgress,
            "Deleting",
            &message,
            FOLLOW_SECONDS,
        );
        write(snapshot, ctx, &d).await?;
        return Ok(Some(requeue(&d)));
    }
    groups::unlabel_claims(&ctx.client, &namespace, &plan::selector_label(&uid)).await?;
    ctx.vm_attempts.forget(&uid);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(frozen: bool, online: bool) -> DiskSnapshotStatus {
        DiskSnapshotStatus {
            guest_freeze: frozen.then(|| GuestFreeze {
                state: GuestFreezeState::Thawed,
                ..Default::default()
            }),
            indications: if online {
                vec![SnapshotIndication {
                    indication: "Online".into(),
                    message: String::new(),
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_ready_message_says_what_the_instants_mean() {
        assert_eq!(
            consistency(&status(true, true), 1),
            "one instant inside a guest freeze"
        );
        assert_eq!(
            consistency(&status(true, true), 2),
            "per-node crash-consistent inside a guest freeze"
        );
        assert!(consistency(&status(false, true), 1).contains("not frozen"));
        assert!(consistency(&status(false, false), 2).contains("stopped"));
    }

    #[test]
    fn a_status_older_than_this_process_wrote_is_stale() {
        // Started attempt 2 here: a status of attempt 1, or of 2 without its groups, lags.
        assert!(stale(Some(Attempt::Started(2)), 1, true));
        assert!(stale(Some(Attempt::Started(2)), 2, false));
        assert!(!stale(Some(Attempt::Started(2)), 2, true));
        // Discarded attempt 2 here: the next pass starts attempt 3.
        assert!(stale(Some(Attempt::Discarded(2)), 2, true));
        assert!(!stale(Some(Attempt::Discarded(2)), 3, false));
        assert!(!stale(None, 0, false));
    }

    #[test]
    fn json_nulls_clear_fields() {
        let mut d = decision(Phase::Pending, Health::InProgress, "r", "m", 1);
        set(&mut d, "guestFreeze", Value::Null);
        assert_eq!(d.fields["guestFreeze"], json!(null));
    }
}
