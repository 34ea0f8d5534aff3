//! The workload lifecycle (Kubernetes mode, with `spec.targetRef`): from a changed Deployment
//! in Git to a retired old version, with no hands.
//!
//! Fledge keeps a copy of the target Deployment, `<target>-primary`, that serves the stable
//! version; the pod label `trackLabel` (`fledge.dev/track`) is `stable` on its pods and `canary`
//! on the target's, and the DestinationRule's subsets select by it. A change of the target's pod
//! template is a new *revision*: the target is scaled up, the rollout state machine
//! ([`crate::rollout`]) analyses it, and then either the template is copied into the primary
//! (promotion) or not (rollback); either way all traffic returns to the primary and the target
//! goes back to 0 replicas.
//!
//! ```text
//!  Initializing ─▶ Initialized ─┐ (at rest: primary serves, target 0, weights stable 100)
//!   (adopt)                     │ new revision
//!            ┌──────────────────┘
//!            ▼
//!  [Waiting] ─▶ ScalingUp ─▶ Progressing ──Promoted──▶ Promoting ─▶ Finalising ─▶ Succeeded
//!  confirm-     target up     the analysis             copy template   weights 100/0,
//!  rollout      and available                          wait primary    target → 0
//!                              ──RolledBack / deadline──▶ RollingBack ─────────▶ Failed
//! ```
//!
//! [`step`] is pure, like the rollout state machine: (spec, status, observed objects, now) →
//! (new status, actions). The controller reads the objects, calls it, persists the status and
//! then performs the actions, all idempotent. Everything it needs to continue is in the status
//! and the objects themselves (the primary's revision is read off its template), so a
//! restarted controller or a new leader continues where the last one stopped and never repeats
//! a copy or a scale-down.
//!
//! **The invariant, in every phase:** no weight points at a subset with no available pods while
//! the other has some; the weights are held (or moved) to where pods are ready and the status
//! says so ([`WorkloadStatus::weights_held`]).

mod objects;
mod spec;
#[cfg(test)]
mod tests;

pub use objects::{
    check_autoscaler, check_target, images, is_owned_by, primary_autoscaler, primary_object,
    primary_revision, primary_selector, primary_spec, target_revision,
    target_template_from_primary, template_hash, without_owner, Autoscaler, Deployment, Owner,
};
pub use spec::{
    is_label_key, validate_spec, AutoscalerRef, TargetRef, DEFAULT_PROGRESS_DEADLINE,
    DEFAULT_SCALE_DOWN_DELAY, DEFAULT_TRACK_LABEL, PRIMARY_SUFFIX, TRACK_CANARY, TRACK_STABLE,
};

use crate::rollout::{self, CanaryStatus, Gates, Input, Phase, Transition, HISTORY_LIMIT};
use crate::spec::{CanarySpec, SpecError};
use crate::webhook::WebhookType;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the workload is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WorkloadPhase {
    /// Adopting the target: creating the primary, waiting for it, moving traffic to it.
    #[default]
    Initializing,
    /// Adopted; no revision released yet. At rest.
    Initialized,
    /// A new revision waits for the confirm-rollout webhooks.
    Waiting,
    /// The target is scaled up for the new revision; waiting until it is available.
    ScalingUp,
    /// The analysis runs (the rollout state machine moves the weights).
    Progressing,
    /// The new revision's template was copied into the primary; waiting for its rollout.
    Promoting,
    /// All traffic back on the primary (now the new revision); the target goes to 0.
    Finalising,
    /// All traffic back on the primary (the old revision); the target goes to 0.
    RollingBack,
    /// The revision was promoted: the primary runs it, the target has 0 replicas. At rest.
    Succeeded,
    /// The revision was rolled back: the primary runs the old one, the target has 0 replicas.
    /// At rest until the template changes (or `fledge retry`).
    Failed,
    /// The Canary is being deleted.
    Terminating,
}

impl WorkloadPhase {
    /// The analysis intervals run only in this phase (the target serves the revision).
    pub fn analysing(self) -> bool {
        self == WorkloadPhase::Progressing
    }

    pub fn at_rest(self) -> bool {
        matches!(
            self,
            WorkloadPhase::Initialized | WorkloadPhase::Succeeded | WorkloadPhase::Failed
        )
    }
}

/// Desired and available replicas of one Deployment, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct Replicas {
    pub desired: i32,
    pub available: i32,
}

impl Replicas {
    fn of(deployment: Option<&Value>) -> Replicas {
        deployment
            .map(|d| Replicas {
                desired: Deployment(d).replicas(),
                available: Deployment(d).available(),
            })
            .unwrap_or_default()
    }
}

/// The workload part of a Canary's status (`.status.workload`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
// Every field defaults when read: an older status must stay readable.
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadStatus {
    pub phase: WorkloadPhase,
    /// When `phase` was entered; deadlines count from here.
    pub phase_since: Option<DateTime<Utc>>,
    /// The target's revision (pod template hash) the current or last rollout is about.
    pub revision: Option<String>,
    /// Its container images.
    pub image: Option<String>,
    /// The revision the primary was last brought to (adopted or promoted).
    pub stable_revision: Option<String>,
    pub stable_image: Option<String>,
    pub primary: Replicas,
    pub target: Replicas,
    /// The canary weight to route: the rollout's, or the phase's, corrected by the invariant.
    /// `None` until the lifecycle routes anything (bad input before adoption routes nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_weight: Option<u8>,
    /// Why the weights differ from what the phase wants (a subset without available pods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_held: Option<String>,
    /// What the lifecycle is doing or waiting for, in one line.
    pub message: String,
    /// Since when the route has been seen at stable 100 in a phase that scales the target down
    /// (it is scaled down `scaleDownDelay` later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stable_since: Option<DateTime<Utc>>,
    /// Why the last rollout failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The primary's HPA Fledge created (to delete it if `autoscalerRef` goes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_autoscaler: Option<String>,
    /// A progress deadline passed in a phase that cannot roll back (adoption): said once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stalled: bool,
}

/// What the controller read for one call of [`step`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub owner: Owner,
    /// The target Deployment (`None`: not found).
    pub target: Option<Value>,
    /// The primary Deployment (`None`: not created yet).
    pub primary: Option<Value>,
    /// The HPA named by `autoscalerRef` (`None`: not found, or none named).
    pub autoscaler: Option<Value>,
    /// The primary's HPA (`None`: not created yet).
    pub primary_autoscaler: Option<Value>,
    /// The canary weight the route has now (`None`: unknown).
    pub routed: Option<u8>,
    /// The DestinationRule subsets' pod labels (stable, canary), when found.
    pub subsets: Option<(Value, Value)>,
    /// In phase Waiting: the confirm-rollout webhooks' answer (`Err`: not approved, why).
    pub rollout_confirmed: Option<Result<(), String>>,
    /// An operator's retry was just given to the rollout state machine (`fledge retry`): a
    /// Failed revision is rolled out again.
    pub retry: bool,
}

/// A side effect, performed after the status is persisted. All are idempotent.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create the primary Deployment (the full object).
    CreatePrimary(Value),
    /// Replace these fields of the primary's `spec` (the template copy, rollout settings, and
    /// `replicas` unless an HPA scales the primary).
    UpdatePrimary(Value),
    /// Set the target's replicas (scale subresource).
    ScaleTarget(i32),
    /// Create the primary's HPA, or make the existing one's spec this.
    ApplyPrimaryAutoscaler(Value),
    /// Delete the primary's HPA of this name (`autoscalerRef` was removed).
    DeletePrimaryAutoscaler(String),
    /// Replace the target's pod template (revertOnDeletion).
    RevertTarget(Value),
    /// Remove the Canary's ownerReference from the primary (and its HPA), so they outlive the
    /// Canary: `(deployment, hpa)` names.
    ReleaseOwned {
        deployment: String,
        autoscaler: Option<String>,
    },
    /// Tell humans (log, Kubernetes Event, event webhooks).
    Event {
        reason: &'static str,
        warning: bool,
        message: String,
    },
    /// Call the post-rollout webhooks (the release is over: Succeeded or Failed).
    PostRollout,
}

/// What one call of [`step`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: WorkloadStatus,
    /// The rollout's status to persist instead of the current one: a new revision restarts it,
    /// a deadline rolls it back, a finished promotion records the weights going back.
    pub rollout: Option<CanaryStatus>,
    /// The rollout state machine's actions that came with `rollout` (events).
    pub rollout_actions: Vec<rollout::Action>,
    /// The canary weight to route now; `None`: route nothing (bad input before adoption).
    pub canary_weight: Option<u8>,
    /// Whether the analysis (the rollout state machine's tick) may run now.
    pub analysis: bool,
    pub actions: Vec<Action>,
    /// Bad input: `Ready=False` with these; nothing is scaled.
    pub problems: Vec<SpecError>,
}

/// Event reasons (Kubernetes Events and logs).
pub mod reason {
    pub const CREATING_PRIMARY: &str = "CreatingPrimary";
    pub const INITIALIZED: &str = "Initialized";
    pub const NEW_REVISION: &str = "NewRevision";
    pub const WAITING: &str = "WaitingForConfirmation";
    pub const SCALING_UP: &str = "ScalingUp";
    pub const ANALYSIS_STARTED: &str = "AnalysisStarted";
    pub const PROMOTING: &str = "Promoting";
    pub const FINALISING: &str = "Finalising";
    pub const ROLLING_BACK: &str = "RollingBack";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const DEADLINE: &str = "ProgressDeadlineExceeded";
    pub const WEIGHTS_HELD: &str = "WeightsHeld";
    pub const PRIMARY_MISSING: &str = "PrimaryMissing";
}

/// One call of the lifecycle. Pure: the same arguments always give the same decision.
pub fn step(
    spec: &CanarySpec,
    status: &WorkloadStatus,
    rollout: &CanaryStatus,
    facts: &Facts,
    now: DateTime<Utc>,
) -> Decision {
    let mut machine = Lifecycle {
        spec,
        track: spec.track_label(),
        status: status.clone(),
        rollout,
        facts,
        now,
        out: Decision {
            status: WorkloadStatus::default(),
            rollout: None,
            rollout_actions: Vec::new(),
            canary_weight: None,
            analysis: false,
            actions: Vec::new(),
            problems: Vec::new(),
        },
    };
    if spec.target_ref.is_some() {
        machine.run();
    }
    machine.out.status = machine.status;
    machine.out
}

/// What the lifecycle wants this call: a canary weight, and whether the analysis runs.
struct Want {
    canary_weight: u8,
    analysis: bool,
}

const STABLE_ONLY: Want = Want {
    canary_weight: 0,
    analysis: false,
};

struct Lifecycle<'a> {
    spec: &'a CanarySpec,
    track: &'a str,
    status: WorkloadStatus,
    rollout: &'a CanaryStatus,
    facts: &'a Facts,
    now: DateTime<Utc>,
    out: Decision,
}

/// Phase changes handled in one call (each new phase acts at once, e.g. a new revision scales
/// the target up in the same call); a bound, not a tuning knob.
const MAX_TRANSITIONS_PER_STEP: usize = 4;

impl<'a> Lifecycle<'a> {
    fn run(&mut self) {
        if self.status.phase_since.is_none() {
            self.status.phase_since = Some(self.now);
        }
        self.status.target = Replicas::of(self.facts.target.as_ref());
        self.status.primary = Replicas::of(self.owned_primary());
        let problems = self.problems();
        let (Some(target), true) = (self.facts.target.as_ref(), problems.is_empty()) else {
            self.out.problems = problems;
            // Nothing is scaled; once adopted, the weights still go where pods are.
            if self.owned_primary().is_some() {
                let weight = self.hold(0);
                self.out.canary_weight = Some(weight);
            }
            return;
        };
        self.sync_autoscaler();
        let mut want = STABLE_ONLY;
        for _ in 0..MAX_TRANSITIONS_PER_STEP {
            let phase = self.status.phase;
            want = self.act(target);
            if self.status.phase == phase {
                break;
            }
        }
        self.out.analysis = want.analysis;
        let weight = self.hold(want.canary_weight);
        self.out.canary_weight = Some(weight);
    }

    fn target_name(&self) -> &str {
        self.spec
            .target_ref
            .as_ref()
            .map(|t| t.name.as_str())
            .unwrap_or_default()
    }

    fn primary_name(&self) -> String {
        self.spec
            .target_ref
            .as_ref()
            .map(TargetRef::primary_name)
            .unwrap_or_default()
    }

    /// The primary, if it exists and this Canary owns it.
    fn owned_primary(&self) -> Option<&'a Value> {
        self.facts
            .primary
            .as_ref()
            .filter(|p| is_owned_by(p, &self.facts.owner))
    }

    /// Bad input: every reason the workload cannot be managed, naming the field and the fix.
    fn problems(&self) -> Vec<SpecError> {
        let namespace = &self.facts.owner.namespace;
        let Some(target) = &self.facts.target else {
            return vec![SpecError {
                field: "spec.targetRef.name".into(),
                problem: format!(
                    "Deployment {namespace}/{} not found",
                    self.target_name()
                ),
                fix: "create the Deployment (in Git), or name an existing one in the Canary's namespace".into(),
            }];
        };
        let mut problems = check_target(target, self.track);
        if let Some(hpa_ref) = &self.spec.autoscaler_ref {
            match &self.facts.autoscaler {
                None => problems.push(SpecError {
                    field: "spec.autoscalerRef.name".into(),
                    problem: format!(
                        "HorizontalPodAutoscaler {namespace}/{} not found",
                        hpa_ref.name
                    ),
                    fix: "create the HPA (autoscaling/v2) of the target, or remove autoscalerRef"
                        .into(),
                }),
                Some(hpa) => problems.extend(check_autoscaler(hpa, self.target_name())),
            }
        }
        if let Some(primary) = &self.facts.primary {
            let name = self.primary_name();
            if !is_owned_by(primary, &self.facts.owner) {
                problems.push(SpecError {
                    field: "spec.targetRef.name".into(),
                    problem: format!("Deployment {namespace}/{name} exists and is not this Canary's primary copy"),
                    fix: format!("rename or delete deployments/{name} (Fledge creates and owns `<target>-primary`)"),
                });
            } else if primary.pointer("/spec/selector")
                != Some(&primary_selector(target, self.track))
            {
                problems.push(SpecError {
                    field: format!("deployments/{}: spec.selector", self.target_name()),
                    problem: format!("changed since deployments/{name} was copied from it (a selector cannot change)"),
                    fix: format!("delete deployments/{name}: Fledge copies it again (its pods go first; move traffic elsewhere before)"),
                });
            }
        }
        if let Some((stable, canary)) = &self.facts.subsets {
            for (subset, labels, value) in [
                (&self.spec.stable.subset, stable, TRACK_STABLE),
                (&self.spec.canary.subset, canary, TRACK_CANARY),
            ] {
                if labels.get(self.track).and_then(Value::as_str) != Some(value) {
                    problems.push(SpecError {
                        field: format!("destinationrule subset {subset}: labels"),
                        problem: format!("selects {labels}, not `{}: {value}`", self.track),
                        fix: format!(
                            "select the subset by the track label: `labels: {{{}: {value}}}` (the primary's pods are `{TRACK_STABLE}`, the target's `{TRACK_CANARY}`)",
                            self.track
                        ),
                    });
                }
            }
        }
        problems
    }

    /// Keep the primary's HPA a copy of the target's (an HPA change is not a revision).
    fn sync_autoscaler(&mut self) {
        let Some(hpa_ref) = &self.spec.autoscaler_ref else {
            if let Some(name) = self.status.primary_autoscaler.take() {
                if self.facts.primary_autoscaler.is_some() {
                    self.out.actions.push(Action::DeletePrimaryAutoscaler(name));
                }
            }
            return;
        };
        let (Some(hpa), Some(_)) = (&self.facts.autoscaler, self.owned_primary()) else {
            return;
        };
        let desired = primary_autoscaler(hpa, &self.primary_name(), &self.facts.owner);
        let current_spec = self
            .facts
            .primary_autoscaler
            .as_ref()
            .and_then(|h| h.get("spec"));
        if current_spec != desired.get("spec") {
            self.out
                .actions
                .push(Action::ApplyPrimaryAutoscaler(desired));
        }
        self.status.primary_autoscaler = Some(hpa_ref.primary_name());
    }

    /// The rollout's status as this call left it (a restart or a deadline replaces it).
    fn rollout(&self) -> &CanaryStatus {
        self.out.rollout.as_ref().unwrap_or(self.rollout)
    }

    fn deadline(&self) -> chrono::Duration {
        self.spec.progress_deadline().to_chrono()
    }

    fn past_deadline(&self) -> bool {
        self.status
            .phase_since
            .is_some_and(|since| self.now - since > self.deadline())
    }

    fn enter(
        &mut self,
        phase: WorkloadPhase,
        reason: &'static str,
        warning: bool,
        message: String,
    ) {
        self.status.phase = phase;
        self.status.phase_since = Some(self.now);
        self.status.stable_since = None;
        self.status.stalled = false;
        self.status.message = message.clone();
        self.event(reason, warning, message);
    }

    fn event(&mut self, reason: &'static str, warning: bool, message: String) {
        self.out.actions.push(Action::Event {
            reason,
            warning,
            message,
        });
    }

    /// One phase's work; returns what it wants routed.
    fn act(&mut self, target: &'a Value) -> Want {
        let primary = self.owned_primary();
        if primary.is_none() && self.status.phase != WorkloadPhase::Initializing {
            let name = self.primary_name();
            self.enter(
                WorkloadPhase::Initializing,
                reason::PRIMARY_MISSING,
                true,
                format!("the primary Deployment {name} is gone: creating it again from the target"),
            );
        }
        let revision = target_revision(target);
        match (self.status.phase, primary) {
            (WorkloadPhase::Initializing, _) | (_, None) => self.adopt(target, primary, revision),
            (phase, Some(primary)) if phase.at_rest() => self.at_rest(target, primary, revision),
            (WorkloadPhase::Waiting, Some(primary)) => self.waiting(target, primary, revision),
            (WorkloadPhase::ScalingUp, Some(primary)) => self.scaling_up(target, primary, revision),
            (WorkloadPhase::Progressing, Some(primary)) => {
                self.progressing(target, primary, revision)
            }
            (WorkloadPhase::Promoting, Some(primary)) => self.promoting(target, primary, revision),
            (WorkloadPhase::Finalising | WorkloadPhase::RollingBack, Some(_)) => {
                self.finish(target)
            }
            (_, Some(_)) => STABLE_ONLY,
        }
    }

    /// Replicas for a new primary: the target's (at least 1), within the HPA's bounds.
    fn initial_primary_replicas(&self, target: &Value) -> i32 {
        let replicas = Deployment(target).replicas().max(1);
        match &self.facts.autoscaler {
            Some(hpa) if self.spec.autoscaler_ref.is_some() => Autoscaler(hpa).clamp(replicas),
            _ => replicas,
        }
    }

    /// Replicas for the target during a rollout: the primary's, within the HPA's bounds.
    fn rollout_replicas(&self, primary: &Value) -> i32 {
        let replicas = Deployment(primary).replicas().max(1);
        match &self.facts.autoscaler {
            Some(hpa) if self.spec.autoscaler_ref.is_some() => Autoscaler(hpa).clamp(replicas),
            _ => replicas,
        }
    }

    /// The primary's spec for a copy of the target; `replicas` is left out when an HPA scales
    /// the primary.
    fn copy_spec(&self, target: &Value, replicas: i32) -> Value {
        let mut spec = primary_spec(target, self.track, replicas);
        if self.spec.autoscaler_ref.is_some() {
            if let Some(spec) = spec.as_object_mut() {
                spec.remove("replicas");
            }
        }
        spec
    }

    /// Adoption: create the primary from the target, wait until it serves, move the traffic to
    /// it, scale the target to 0.
    fn adopt(&mut self, target: &Value, primary: Option<&Value>, revision: String) -> Want {
        let name = self.primary_name();
        let Some(primary) = primary else {
            let replicas = self.initial_primary_replicas(target);
            self.out.actions.push(Action::CreatePrimary(primary_object(
                target,
                self.track,
                replicas,
                &self.facts.owner,
            )));
            let message = format!(
                "creating the primary {name} ({replicas} replicas) from {} ({})",
                self.target_name(),
                images(target)
            );
            if self.status.message != message {
                self.status.message = message.clone();
                self.event(reason::CREATING_PRIMARY, false, message);
            }
            return STABLE_ONLY;
        };
        if primary_revision(primary, self.track) != revision {
            // The target changed during adoption: the primary follows it (nothing is released
            // yet; adoption makes the primary what the target is).
            let replicas = Deployment(primary).replicas();
            self.out
                .actions
                .push(Action::UpdatePrimary(self.copy_spec(target, replicas)));
            self.status.message =
                format!("copying {}'s pod template into {name}", self.target_name());
            return STABLE_ONLY;
        }
        if !Deployment(primary).rollout_complete() {
            self.status.message = format!(
                "waiting for the primary {name}: {}",
                Deployment(primary).progress()
            );
            if self.past_deadline() && !self.status.stalled {
                self.status.stalled = true;
                let message = format!(
                    "progress deadline ({}) exceeded: the primary {name} is not available ({}); the target keeps serving meanwhile",
                    self.spec.progress_deadline(),
                    Deployment(primary).progress()
                );
                self.event(reason::DEADLINE, true, message);
            }
            return STABLE_ONLY;
        }
        if self.scale_down_target(target) {
            self.status.revision = Some(revision.clone());
            self.status.image = Some(images(target));
            self.status.stable_revision = Some(revision);
            self.status.stable_image = Some(images(target));
            self.enter(
                WorkloadPhase::Initialized,
                reason::INITIALIZED,
                false,
                format!(
                    "adopted {}: the primary {name} serves {}, the target has 0 replicas",
                    self.target_name(),
                    images(target)
                ),
            );
        }
        STABLE_ONLY
    }

    /// With the route at stable 100, wait `scaleDownDelay`, then scale the target to 0. True
    /// once the target has 0 replicas.
    fn scale_down_target(&mut self, target: &Value) -> bool {
        if self.facts.routed != Some(0) {
            self.status.stable_since = None;
            self.status.message = format!(
                "moving all traffic to the primary before {} is scaled down",
                self.target_name()
            );
            return false;
        }
        let since = *self.status.stable_since.get_or_insert(self.now);
        if Deployment(target).replicas() == 0 {
            return true;
        }
        let delay = self.spec.scale_down_delay();
        if self.now - since >= delay.to_chrono() {
            self.out.actions.push(Action::ScaleTarget(0));
            self.status.message = format!("scaling {} down to 0 replicas", self.target_name());
        } else {
            self.status.message = format!(
                "all traffic on the primary; scaling {} down {delay} after that",
                self.target_name()
            );
        }
        false
    }

    /// At rest: the target stays at 0 until its template changes (a new revision), or a retry.
    fn at_rest(&mut self, target: &Value, primary: &Value, revision: String) -> Want {
        let retried = self.status.phase == WorkloadPhase::Failed
            && self.facts.retry
            && self.rollout().phase == Phase::Initializing
            && self.status.revision.as_deref() == Some(revision.as_str());
        if retried {
            self.status.failure = None;
            let message = format!(
                "retry: rolling out revision {} ({}) again",
                short(&revision),
                images(target)
            );
            self.start(message);
            return STABLE_ONLY;
        }
        if self.status.revision.as_deref() != Some(revision.as_str()) {
            if primary_revision(primary, self.track) == revision {
                self.status.revision = Some(revision);
                self.status.image = Some(images(target));
                self.status.failure = None;
                self.enter(
                    WorkloadPhase::Initialized,
                    reason::INITIALIZED,
                    false,
                    format!(
                        "the target's template ({}) is what the primary runs: nothing to roll out",
                        images(target)
                    ),
                );
            } else {
                self.new_revision(target, revision);
            }
            return STABLE_ONLY;
        }
        if Deployment(target).replicas() != 0 {
            // Scaled up at rest (by hand, or GitOps restoring its replicas): back to 0.
            self.scale_down_target(target);
        } else if self.status.stable_since.take().is_some() {
            self.status.message = self.rest_message(target);
        }
        STABLE_ONLY
    }

    fn rest_message(&self, target: &Value) -> String {
        let images = self
            .status
            .stable_image
            .clone()
            .unwrap_or_else(|| images(target));
        match self.status.phase {
            WorkloadPhase::Failed => format!(
                "revision {} ({}) was rolled back{}; the primary serves {images}; waiting for a new revision (or `fledge retry`)",
                self.status.revision.as_deref().map(short).unwrap_or_default(),
                self.status.image.clone().unwrap_or_default(),
                self.status.failure.as_deref().map(|f| format!(": {f}")).unwrap_or_default(),
            ),
            _ => format!("the primary serves {images}; waiting for a new revision of {}", self.target_name()),
        }
    }

    /// A new revision of the target: restart the rollout (all traffic on stable meanwhile).
    fn new_revision(&mut self, target: &Value, revision: String) {
        let message = format!(
            "new revision {} of {} ({}): starting a rollout",
            short(&revision),
            self.target_name(),
            images(target)
        );
        self.status.revision = Some(revision);
        self.status.image = Some(images(target));
        self.status.failure = None;
        let mut restarted = CanaryStatus {
            history: self.rollout().history.clone(),
            ..CanaryStatus::default()
        };
        push_transition(
            &mut restarted,
            Phase::Initializing,
            0,
            message.clone(),
            self.now,
        );
        self.out.rollout = Some(restarted);
        self.event(reason::NEW_REVISION, false, message.clone());
        self.start(message);
    }

    /// Start the rollout of `status.revision`: ask the confirm-rollout hooks, or scale up.
    fn start(&mut self, message: String) {
        let gated = self
            .spec
            .webhooks
            .iter()
            .any(|h| h.kind == WebhookType::ConfirmRollout);
        if gated {
            self.enter(
                WorkloadPhase::Waiting,
                reason::WAITING,
                false,
                format!("{message}; waiting for the confirm-rollout webhooks"),
            );
        } else {
            self.enter(WorkloadPhase::ScalingUp, reason::SCALING_UP, false, message);
        }
    }

    /// The rollout state machine finished (an operator's abort or full promotion, or the
    /// analysis): follow it.
    fn follow_rollout(&mut self) -> bool {
        match self.rollout().phase {
            Phase::Promoted => {
                let message = format!(
                    "promoting revision {} ({}): copying its template into the primary {}",
                    self.status
                        .revision
                        .as_deref()
                        .map(short)
                        .unwrap_or_default(),
                    self.status.image.clone().unwrap_or_default(),
                    self.primary_name()
                );
                self.enter(WorkloadPhase::Promoting, reason::PROMOTING, false, message);
                true
            }
            Phase::RolledBack => {
                let failure = self.rollout().message.clone();
                self.status.failure = Some(failure.clone());
                self.enter(
                    WorkloadPhase::RollingBack,
                    reason::ROLLING_BACK,
                    true,
                    format!(
                        "rolling back revision {}: {failure}",
                        self.status
                            .revision
                            .as_deref()
                            .map(short)
                            .unwrap_or_default()
                    ),
                );
                true
            }
            _ => false,
        }
    }

    fn waiting(&mut self, target: &Value, _primary: &Value, revision: String) -> Want {
        if self.status.revision.as_deref() != Some(revision.as_str()) {
            self.new_revision(target, revision);
            return STABLE_ONLY;
        }
        if self.follow_rollout() {
            return STABLE_ONLY;
        }
        match &self.facts.rollout_confirmed {
            Some(Ok(())) => {
                let message = format!(
                    "confirm-rollout approved revision {} ({})",
                    short(&revision),
                    images(target)
                );
                self.enter(WorkloadPhase::ScalingUp, reason::SCALING_UP, false, message);
            }
            Some(Err(why)) => {
                self.status.message = format!("waiting for confirm-rollout: {why}");
            }
            None => {}
        }
        STABLE_ONLY
    }

    fn scaling_up(&mut self, target: &Value, primary: &Value, revision: String) -> Want {
        if self.status.revision.as_deref() != Some(revision.as_str()) {
            self.new_revision(target, revision);
            return STABLE_ONLY;
        }
        if self.follow_rollout() {
            return STABLE_ONLY;
        }
        let name = self.target_name().to_string();
        let deployment = Deployment(target);
        if deployment.replicas() == 0 {
            let replicas = self.rollout_replicas(primary);
            self.out.actions.push(Action::ScaleTarget(replicas));
            self.status.message = format!(
                "scaling {name} up to {replicas} replicas for revision {} ({})",
                short(&revision),
                images(target)
            );
        } else if deployment.rollout_complete() {
            let message = format!(
                "{name} serves revision {} ({}) on {} replicas: starting the analysis",
                short(&revision),
                images(target),
                deployment.available()
            );
            self.enter(
                WorkloadPhase::Progressing,
                reason::ANALYSIS_STARTED,
                false,
                message,
            );
        } else if self.past_deadline() {
            self.deadline_rollback(format!(
                "the target {name} did not become available with revision {} within {}: {}",
                short(&revision),
                self.spec.progress_deadline(),
                deployment.progress()
            ));
        } else {
            self.status.message = format!(
                "waiting for {name} to serve revision {}: {}",
                short(&revision),
                deployment.progress()
            );
        }
        STABLE_ONLY
    }

    fn progressing(&mut self, target: &Value, primary: &Value, revision: String) -> Want {
        if self.status.revision.as_deref() != Some(revision.as_str()) {
            // All traffic back to stable first; the analysis restarts once the target serves
            // the new revision.
            self.new_revision(target, revision);
            return STABLE_ONLY;
        }
        if self.follow_rollout() {
            return STABLE_ONLY;
        }
        if let Some(since) = halted_since(self.rollout()) {
            if self.now - since > self.deadline() {
                self.deadline_rollback(format!(
                    "the rollout was Halted for longer than {}: {}",
                    self.spec.progress_deadline(),
                    self.rollout().message
                ));
                return STABLE_ONLY;
            }
        }
        if Deployment(target).replicas() == 0 {
            // Someone scaled the target down mid-rollout (the invariant keeps the traffic on
            // stable meanwhile).
            let replicas = self.rollout_replicas(primary);
            self.out.actions.push(Action::ScaleTarget(replicas));
        }
        self.status.message = format!(
            "analysing revision {} ({}): {}",
            short(&revision),
            images(target),
            self.rollout().message
        );
        Want {
            canary_weight: self.rollout().canary_weight,
            analysis: true,
        }
    }

    fn promoting(&mut self, target: &Value, primary: &Value, revision: String) -> Want {
        let candidate = self.status.revision.clone().unwrap_or_default();
        let name = self.primary_name();
        // A newer target revision's pods were never analysed: no traffic for them.
        let canary_weight = if revision == candidate { 100 } else { 0 };
        if primary_revision(primary, self.track) != candidate {
            if revision != candidate {
                // The template changed before it was copied: the primary keeps the stable
                // revision, and the newer one gets a rollout of its own.
                self.new_revision(target, revision);
                return STABLE_ONLY;
            }
            let replicas = if self.spec.autoscaler_ref.is_some() {
                Deployment(primary).replicas()
            } else {
                Deployment(target).replicas().max(1)
            };
            self.out
                .actions
                .push(Action::UpdatePrimary(self.copy_spec(target, replicas)));
            self.status.message = format!(
                "copying revision {} ({}) into the primary {name}",
                short(&candidate),
                images(target)
            );
            return Want {
                canary_weight,
                analysis: false,
            };
        }
        let deployment = Deployment(primary);
        if deployment.rollout_complete() {
            self.status.stable_revision = Some(candidate.clone());
            self.status.stable_image = self.status.image.clone();
            let message = format!(
                "the primary {name} runs revision {} ({}): all traffic to the primary, then {} goes to 0 replicas",
                short(&candidate),
                self.status.image.clone().unwrap_or_default(),
                self.target_name()
            );
            self.enter(
                WorkloadPhase::Finalising,
                reason::FINALISING,
                false,
                message,
            );
            return STABLE_ONLY;
        }
        if self.past_deadline() {
            self.deadline_rollback(format!(
                "the primary {name} did not complete its rollout of revision {} within {} ({}); it keeps trying: fix the cause, or revert the target in Git",
                short(&candidate),
                self.spec.progress_deadline(),
                deployment.progress()
            ));
            return STABLE_ONLY;
        }
        self.status.message = format!(
            "waiting for the primary {name} to roll out revision {}: {}",
            short(&candidate),
            deployment.progress()
        );
        Want {
            canary_weight,
            analysis: false,
        }
    }

    /// Finalising and RollingBack: all traffic on the primary, then the target to 0.
    fn finish(&mut self, target: &Value) -> Want {
        if !self.scale_down_target(target) {
            return STABLE_ONLY;
        }
        let revision = self
            .status
            .revision
            .as_deref()
            .map(short)
            .unwrap_or_default();
        let image = self.status.image.clone().unwrap_or_default();
        if self.status.phase == WorkloadPhase::Finalising {
            let message = format!(
                "promotion completed: the primary {} runs revision {revision} ({image}); {} has 0 replicas",
                self.primary_name(),
                self.target_name()
            );
            let mut rollout = self.rollout().clone();
            if rollout.canary_weight != 0 {
                // The promoted version now serves as stable: record the weights going back.
                rollout.canary_weight = 0;
                rollout.message = message.clone();
                let phase = rollout.phase;
                push_transition(&mut rollout, phase, 0, message.clone(), self.now);
                self.out.rollout = Some(rollout);
            }
            self.enter(WorkloadPhase::Succeeded, reason::SUCCEEDED, false, message);
        } else {
            let failure = self.status.failure.clone().unwrap_or_default();
            let message = format!(
                "revision {revision} ({image}) rolled back: {failure}; the primary serves {}; {} has 0 replicas",
                self.status.stable_image.clone().unwrap_or_default(),
                self.target_name()
            );
            self.enter(WorkloadPhase::Failed, reason::FAILED, true, message);
        }
        self.out.actions.push(Action::PostRollout);
        STABLE_ONLY
    }

    /// A progress deadline passed: roll the rollout back with the reason.
    fn deadline_rollback(&mut self, why: String) {
        let reason = format!("progress deadline exceeded: {why}");
        let mut rollout = self.rollout().clone();
        if rollout.phase.is_terminal() {
            // Promoted, and the primary could not roll it out.
            rollout.canary_weight = 0;
            rollout.phase = Phase::RolledBack;
            rollout.message = format!("rolling back: {reason}");
            let message = rollout.message.clone();
            push_transition(&mut rollout, Phase::RolledBack, 0, message, self.now);
        } else {
            let gates = Gates {
                rollback_requested: Some(reason.clone()),
                ..Gates::default()
            };
            let decision =
                rollout::step_with_gates(self.spec, &rollout, &Input::default(), &gates, self.now);
            rollout = decision.status;
            self.out.rollout_actions = decision.actions;
        }
        self.out.rollout = Some(rollout);
        self.status.failure = Some(reason.clone());
        self.event(reason::DEADLINE, true, reason.clone());
        self.enter(
            WorkloadPhase::RollingBack,
            reason::ROLLING_BACK,
            true,
            format!("rolling back: {reason}"),
        );
    }

    /// The invariant: no weight on a subset without available pods while the other has some.
    fn hold(&mut self, wanted: u8) -> u8 {
        let stable = self
            .owned_primary()
            .map_or(0, |p| Deployment(p).available());
        let canary = self
            .facts
            .target
            .as_ref()
            .map_or(0, |t| Deployment(t).available());
        let (weight, held) = if wanted > 0 && canary == 0 && stable > 0 {
            (
                0,
                Some(format!(
                    "the canary subset ({}) has no available pods: all traffic stays on stable",
                    self.target_name()
                )),
            )
        } else if wanted < 100 && stable == 0 && canary > 0 {
            (
                100,
                Some(format!(
                    "the stable subset ({}) has no available pods: all traffic goes to the canary subset ({}) until it has",
                    self.primary_name(),
                    self.target_name()
                )),
            )
        } else {
            (wanted, None)
        };
        if held.is_some() && held != self.status.weights_held {
            let message = format!(
                "holding the weights at canary {weight}% (wanted {wanted}%): {}",
                held.clone().unwrap_or_default()
            );
            self.event(reason::WEIGHTS_HELD, true, message);
        }
        self.status.weights_held = held;
        self.status.canary_weight = Some(weight);
        weight
    }
}

/// When the rollout entered Halted, if it is Halted now: the oldest of the Halted transitions
/// at the end of its history.
fn halted_since(rollout: &CanaryStatus) -> Option<DateTime<Utc>> {
    if rollout.phase != Phase::Halted {
        return None;
    }
    rollout
        .history
        .iter()
        .rev()
        .take_while(|t| t.phase == Phase::Halted)
        .last()
        .map(|t| t.at)
}

fn push_transition(
    rollout: &mut CanaryStatus,
    phase: Phase,
    canary_weight: u8,
    reason: String,
    now: DateTime<Utc>,
) {
    rollout.message = reason.clone();
    rollout.history.push(Transition {
        at: now,
        phase,
        canary_weight,
        step: rollout.step,
        reason,
    });
    let excess = rollout.history.len().saturating_sub(HISTORY_LIMIT);
    rollout.history.drain(..excess);
}

/// A revision hash as shown to people (the first 10 hex digits).
pub fn short(revision: &str) -> String {
    revision.chars().take(10).collect()
}

/// What deleting the Canary needs done.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleanup {
    pub status: WorkloadStatus,
    /// The canary weight to route; `None`: leave the routes alone.
    pub canary_weight: Option<u8>,
    pub actions: Vec<Action>,
    /// Everything is done: the Canary may go.
    pub done: bool,
}

/// Deleting the Canary. By default all traffic goes to stable and the primary (and its HPA)
/// are released from the Canary so they keep serving after it is gone. With
/// `revertOnDeletion`, the primary's template is copied back into the target, the target is
/// scaled up and given all traffic, and then the primary goes with the Canary.
pub fn on_deletion(
    spec: &CanarySpec,
    status: &WorkloadStatus,
    facts: &Facts,
    now: DateTime<Utc>,
) -> Cleanup {
    let mut status = status.clone();
    let mut actions = Vec::new();
    let owner = &facts.owner;
    let primary = facts.primary.as_ref().filter(|p| is_owned_by(p, owner));
    let (Some(target_ref), Some(primary)) = (&spec.target_ref, primary) else {
        return Cleanup {
            status,
            canary_weight: None,
            actions,
            done: true,
        };
    };
    if status.phase != WorkloadPhase::Terminating {
        status.phase = WorkloadPhase::Terminating;
        status.phase_since = Some(now);
        status.stable_since = None;
    }
    let track = spec.track_label();
    let stable = Deployment(primary).available();
    let target = facts.target.as_ref();
    let canary = target.map_or(0, |t| Deployment(t).available());
    let revert_target = target.filter(|_| spec.revert_on_deletion);
    let (wanted, ready_to_go) = match revert_target {
        Some(target) => {
            let copied = target_revision(target) == primary_revision(primary, track);
            if !copied {
                actions.push(Action::RevertTarget(target_template_from_primary(
                    primary, track,
                )));
            }
            if Deployment(target).replicas() == 0 {
                actions.push(Action::ScaleTarget(Deployment(primary).replicas().max(1)));
            }
            let serving = copied && Deployment(target).rollout_complete();
            status.message = if serving {
                format!("Canary deleted: {} serves the primary's template; all traffic to it, then the primary goes", target_ref.name)
            } else {
                format!(
                    "Canary deleted: reverting {} to the primary's template ({})",
                    target_ref.name,
                    Deployment(target).progress()
                )
            };
            (if serving { 100 } else { 0 }, serving)
        }
        None => {
            status.message = format!(
                "Canary deleted: all traffic to the primary {}, which keeps serving",
                target_ref.primary_name()
            );
            (0, true)
        }
    };
    let weight = match wanted {
        w if w > 0 && canary == 0 && stable > 0 => 0,
        w if w < 100 && stable == 0 && canary > 0 => 100,
        w => w,
    };
    status.canary_weight = Some(weight);
    let routed = facts.routed == Some(weight);
    let settled = if routed {
        let since = *status.stable_since.get_or_insert(now);
        !spec.revert_on_deletion || now - since >= spec.scale_down_delay().to_chrono()
    } else {
        status.stable_since = None;
        false
    };
    let mut done = ready_to_go && weight == wanted && settled;
    if done && !spec.revert_on_deletion {
        let autoscaler = facts
            .primary_autoscaler
            .as_ref()
            .filter(|h| is_owned_by(h, owner))
            .and_then(|h| h.pointer("/metadata/name").and_then(Value::as_str))
            .map(str::to_string);
        actions.push(Action::ReleaseOwned {
            deployment: target_ref.primary_name(),
            autoscaler,
        });
        // Released by the action above; the Canary may go once it is done.
        done = true;
    }
    Cleanup {
        status,
        canary_weight: Some(weight),
        actions,
        done,
    }
}
