//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several controller
//! replicas exactly one reconciles.
//!
//! ```text
//!  every retryPeriod:  GET lease
//!    absent            → POST (holder = me)                         409 → someone else won
//!    held by me        → PUT renewTime = now   (resourceVersion!)   409 → lost it
//!    held, not expired → follower
//!    expired / free    → PUT holder = me, transitions + 1 (rv!)     409 → someone else won
//! ```
//!
//! Every write carries the resourceVersion that was read, so two candidates can never both
//! succeed. A leader that cannot renew for `renewDeadline` (< `leaseDuration`) steps down before
//! anyone else may take over. On graceful shutdown the leader releases the lease (empty holder),
//! so a successor starts at once instead of waiting for expiry.

use super::clock::{from_k8s_timestamp, to_k8s_timestamp, Clock};
use super::{api_status_code, Error, Result};
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Which Lease, who we are, and the timing (client-go's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per controller instance (the pod name).
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops acting (must be < `lease_duration`).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseSettings {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaseSettings {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The result of one acquire-or-renew attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Leader,
    Follower { holder: Option<String> },
}

/// One Lease, seen by one candidate.
pub struct LeaseLock {
    api: Api<Lease>,
    settings: LeaseSettings,
    clock: Arc<dyn Clock>,
}

fn micro_time(time: DateTime<Utc>) -> MicroTime {
    MicroTime(to_k8s_timestamp(time))
}

fn lease_seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl LeaseLock {
    pub fn new(client: Client, settings: LeaseSettings, clock: Arc<dyn Clock>) -> Self {
        LeaseLock {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            clock,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn my_spec(&self, now: DateTime<Utc>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(lease_seconds(self.settings.lease_duration)),
            acquire_time: Some(micro_time(now)),
            renew_time: Some(micro_time(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Try once to become (or stay) the leader.
    pub async fn try_acquire_or_renew(&self) -> Result<LeaseOutcome> {
        let now = self.clock.now();
        let name = &self.settings.name;
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.my_spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(LeaseOutcome::Leader),
                Err(e) if api_status_code(&e) == Some(409) => {
                    Ok(LeaseOutcome::Follower { holder: None })
                }
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.settings.identity.as_str()) {
            let mut renewed = spec;
            renewed.renew_time = Some(micro_time(now));
            renewed.lease_duration_seconds = Some(lease_seconds(self.settings.lease_duration));
            lease.spec = Some(renewed);
        } else {
            let expires = spec.renew_time.as_ref().map(|t| {
                from_k8s_timestamp(t.0)
                    + chrono::Duration::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(0)))
            });
            if holder.is_some() && expires.is_some_and(|expires| expires > now) {
                return Ok(LeaseOutcome::Follower { holder });
            }
            let transitions = spec.lease_transitions.unwrap_or(0).saturating_add(1);
            lease.spec = Some(self.my_spec(now, transitions));
        }
        // `lease` carries the resourceVersion we read: a concurrent writer makes this a 409.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(LeaseOutcome::Leader),
            Err(e) if api_status_code(&e) == Some(409) => Ok(LeaseOutcome::Follower { holder }),
            Err(e) => Err(e.into()),
        }
    }

    /// Give the lease up (if we hold it) so a successor need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if api_status_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(Error::Lease(format!(
                "could not release Lease {}/{}: {e}",
                self.settings.namespace, self.settings.name
            ))),
        }
    }
}

/// Runs the election loop until `shutdown` turns true, publishing whether we lead. On shutdown
/// a leader releases the lease before the loop returns.
pub async fn run_election(
    lock: LeaseLock,
    is_leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = lock.settings().clone();
    let mut last_renewal: Option<tokio::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        match lock.try_acquire_or_renew().await {
            Ok(LeaseOutcome::Leader) => {
                last_renewal = Some(tokio::time::Instant::now());
                if !*is_leader.borrow() {
                    tracing::info!(identity = %settings.identity, lease = %settings.name, "became the leader");
                }
                is_leader.send_replace(true);
            }
            Ok(LeaseOutcome::Follower { holder }) => {
                if *is_leader.borrow() {
                    tracing::warn!(identity = %settings.identity, ?holder, "lost the lease; stopping reconciles");
                }
                last_renewal = None;
                is_leader.send_replace(false);
            }
            Err(e) => {
                let overdue = last_renewal.is_none_or(|at| at.elapsed() >= settings.renew_deadline);
                tracing::warn!(error = %e, overdue, "could not acquire or renew the lease");
                if overdue && *is_leader.borrow() {
                    tracing::warn!(identity = %settings.identity, "renew deadline passed; stepping down");
                    is_leader.send_replace(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.retry_period) => {}
            _ = shutdown.changed() => {}
        }
    }
    if *is_leader.borrow() {
        is_leader.send_replace(false);
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "could not release the lease; a successor waits for it to expire");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::clock::TokioClock;
    use fledge_testkit::fake_api::FakeApiServer;
    use serde_json::json;

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/fledge-system/leases/fledge";

    fn lock(server: &FakeApiServer, identity: &str, clock: TokioClock) -> LeaseLock {
        LeaseLock::new(
            server.client(identity),
            LeaseSettings::new("fledge-system", "fledge", identity),
            Arc::new(clock),
        )
    }

    fn lines(server: &FakeApiServer) -> Vec<String> {
        server
            .take_requests()
            .iter()
            .map(|r| format!("{} {} {}", r.client, r.line(), r.status))
            .collect()
    }

    fn holder(server: &FakeApiServer) -> serde_json::Value {
        server
            .get("coordination.k8s.io", "leases", "fledge-system", "fledge")
            .map(|l| l["spec"]["holderIdentity"].clone())
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_renew_wait_take_over_and_release() {
        let server = FakeApiServer::new();
        let clock =
            TokioClock::starting_at(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        let a = lock(&server, "a", clock);
        let b = lock(&server, "b", clock);

        assert_eq!(
            a.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Leader
        );
        assert_eq!(
            b.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Follower {
                holder: Some("a".into())
            }
        );
        assert_eq!(
            a.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Leader
        );
        assert_eq!(
            lines(&server),
            [
                format!("a GET {LEASE} 404"),
                "a POST /apis/coordination.k8s.io/v1/namespaces/fledge-system/leases 201"
                    .to_string(),
                format!("b GET {LEASE} 200"),
                format!("a GET {LEASE} 200"),
                format!("a PUT {LEASE} 200"),
            ]
        );

        // a stops renewing; after the lease duration b takes it over.
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(matches!(
            b.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Follower { .. }
        ));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            b.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Leader
        );
        let lease = server
            .get("coordination.k8s.io", "leases", "fledge-system", "fledge")
            .unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        // a comes back: the lease is b's now.
        assert_eq!(
            a.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Follower {
                holder: Some("b".into())
            }
        );

        // b releases on shutdown; a may take over at once.
        b.release().await.unwrap();
        assert!(holder(&server).is_null());
        assert_eq!(
            a.try_acquire_or_renew().await.unwrap(),
            LeaseOutcome::Leader
        );
        // Releasing a lease we do not hold changes nothing.
        server.take_requests();
        b.release().await.unwrap();
        assert_eq!(lines(&server), [format!("b GET {LEASE} 200")]);
        assert_eq!(holder(&server), json!("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn two_candidates_racing_for_an_expired_lease_cannot_both_win() {
        let server = FakeApiServer::new();
        let clock =
            TokioClock::starting_at(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        let old = lock(&server, "old", clock);
        old.try_acquire_or_renew().await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        let a = lock(&server, "a", clock);
        // b takes the lease between a's read and a's write.
        let b_takes_over = clock.now();
        server.before_next("PUT", "leases/fledge", move |s| {
            s.edit(
                "coordination.k8s.io",
                "leases",
                "fledge-system",
                "fledge",
                |lease| {
                    lease["spec"]["holderIdentity"] = json!("b");
                    lease["spec"]["renewTime"] = json!(b_takes_over.to_rfc3339());
                },
            )
        });
        let outcome = a.try_acquire_or_renew().await.unwrap();
        assert!(
            matches!(outcome, LeaseOutcome::Follower { .. }),
            "{outcome:?}"
        );
        assert_eq!(holder(&server), json!("b"));
        let statuses: Vec<(String, u16)> = server
            .requests()
            .iter()
            .filter(|r| r.method == "PUT")
            .map(|r| (r.client.clone(), r.status))
            .collect();
        assert_eq!(statuses, [("a".to_string(), 409)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_election_loop_publishes_leadership_and_releases_on_shutdown() {
        let server = FakeApiServer::new();
        let clock =
            TokioClock::starting_at(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap());
        let (leader_tx, mut leader) = watch::channel(false);
        let (stop, stopped) = watch::channel(false);
        let election = tokio::spawn(run_election(lock(&server, "a", clock), leader_tx, stopped));
        leader.wait_for(|l| *l).await.unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        let puts = server
            .requests()
            .iter()
            .filter(|r| r.method == "PUT")
            .count();
        assert!(puts >= 3, "renewed every retry period ({puts} renewals)");
        stop.send_replace(true);
        election.await.unwrap();
        assert!(!*leader.borrow());
        assert!(holder(&server).is_null(), "released");
    }
}
