//! The `kubernetes` reboot lock backend: `coordination.k8s.io/v1` Lease objects as an
//! N-holder semaphore.
//!
//! Scheme: a group with N slots is N Leases named `imgbuild-reboot-<group>-<i>`
//! (`i` in `0..N`) in one namespace. A slot is held when its `holderIdentity` is set and
//! `renewTime + leaseDurationSeconds` is in the future; a holder that dies stops renewing
//! and its slot is free again after the lease duration (expiry compares the renew time
//! written by the holder with this node's clock, as Kubernetes' own leader election
//! does, so clocks must agree to well within the lease duration). Every write is a
//! create (HTTP 409 if another node created the slot first) or an update carrying the
//! `resourceVersion` that was read (HTTP 409 if anyone wrote in between), so two nodes
//! can never both take the same slot: the loser re-reads and tries the next slot.
//! Acquiring is idempotent (a node that holds a slot gets `true` again and renews it).
//!
//! Failed releases are kept as JSON in the annotation `imgbuild.io/failed-releases` of
//! the Lease `imgbuild-reboot-<group>-releases` (no holder), updated the same way, so the
//! backend needs RBAC for Leases only. This module never cordons or reboots anything.

use std::time::Duration;

use jiff::Timestamp;

use super::{FailedRelease, LockError, NodeIdentity, RebootLock};
use crate::kube::{KubeClient, KubeError, Lease, LeaseSpec, ObjectMeta};

/// Annotation that holds the JSON list of failed releases.
pub const FAILED_RELEASES_ANNOTATION: &str = "imgbuild.io/failed-releases";
/// Label put on every Lease of the lock, with the group as value.
pub const GROUP_LABEL: &str = "imgbuild.io/reboot-group";
/// How often a write that lost a race (HTTP 409) is retried before giving up.
const CONFLICT_RETRIES: usize = 8;

/// Configuration of the Lease lock.
#[derive(Debug, Clone)]
pub struct LeaseLockConfig {
    /// Namespace of the Leases (e.g. `kube-system` or the updater's own).
    pub namespace: String,
    /// This node and its reboot group.
    pub node: NodeIdentity,
    /// N: how many nodes of the group may hold the lock at once.
    pub slots: u32,
    /// A holder that does not renew within this time loses its slot.
    pub lease_duration: Duration,
}

/// The Lease-backed [`RebootLock`].
#[derive(Debug, Clone)]
pub struct LeaseLock {
    client: KubeClient,
    config: LeaseLockConfig,
}

impl LeaseLock {
    /// Check the configuration (names must be valid Kubernetes names).
    pub fn new(client: KubeClient, config: LeaseLockConfig) -> Result<LeaseLock, LockError> {
        let group = &config.node.group;
        let group_ok = !group.is_empty()
            && group.len() <= 40
            && group
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !group.starts_with('-')
            && !group.ends_with('-');
        if !group_ok {
            return Err(LockError::Protocol(format!(
                "group {group:?} must be 1-40 lower-case letters, digits and '-' (it is part of Lease names)"
            )));
        }
        if config.node.id.is_empty() || config.node.id.len() > 253 {
            return Err(LockError::Protocol(
                "node id must be 1-253 characters".into(),
            ));
        }
        if config.slots == 0 || config.slots > 1000 {
            return Err(LockError::Protocol(format!(
                "slots = {} must be between 1 and 1000",
                config.slots
            )));
        }
        if config.lease_duration < Duration::from_secs(1) {
            return Err(LockError::Protocol(
                "lease duration must be at least 1 s".into(),
            ));
        }
        Ok(LeaseLock { client, config })
    }

    /// Name of slot `i`.
    pub fn slot_name(&self, i: u32) -> String {
        format!("imgbuild-reboot-{}-{i}", self.config.node.group)
    }

    fn releases_name(&self) -> String {
        format!("imgbuild-reboot-{}-releases", self.config.node.group)
    }

    fn ns(&self) -> &str {
        &self.config.namespace
    }

    async fn slots(&self) -> Result<Vec<(String, Option<Lease>)>, LockError> {
        let mut out = Vec::new();
        for i in 0..self.config.slots {
            let name = self.slot_name(i);
            let lease = self.client.get_lease(self.ns(), &name).await.map_err(map)?;
            out.push((name, lease));
        }
        Ok(out)
    }

    fn held_by(&self, lease: &Lease, now: Timestamp) -> Option<String> {
        live_holder(lease, now)
    }

    fn stamp(&self, lease: &mut Lease, now: Timestamp, new_holder: bool) {
        let t = micro_time(now);
        if new_holder {
            lease.spec.acquire_time = Some(t.clone());
            lease.spec.lease_transitions = Some(lease.spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec.holder_identity = Some(self.config.node.id.clone());
        lease.spec.lease_duration_seconds =
            Some(i64::try_from(self.config.lease_duration.as_secs()).unwrap_or(i64::MAX));
        lease.spec.renew_time = Some(t);
    }

    /// One pass over the slots. `Ok(None)` means a write lost a race: read again.
    async fn acquire_once(&self) -> Result<Option<bool>, LockError> {
        let now = Timestamp::now();
        let slots = self.slots().await?;
        // Idempotent: already holding one (live or not, it is ours to renew).
        for (_, lease) in &slots {
            if let Some(mut lease) = lease.clone() {
                if lease.spec.holder_identity.as_deref() == Some(self.config.node.id.as_str()) {
                    self.stamp(&mut lease, now, false);
                    return match self.client.update_lease(self.ns(), &lease).await {
                        Ok(_) => Ok(Some(true)),
                        Err(e) if e.is_conflict() => Ok(None),
                        Err(e) => Err(map(e)),
                    };
                }
            }
        }
        for (name, lease) in slots {
            match lease {
                None => {
                    let mut lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name),
                            namespace: Some(self.ns().to_string()),
                            labels: [(GROUP_LABEL.to_string(), self.config.node.group.clone())]
                                .into(),
                            ..Default::default()
                        },
                        spec: LeaseSpec::default(),
                    };
                    self.stamp(&mut lease, now, true);
                    return match self.client.create_lease(self.ns(), &lease).await {
                        Ok(_) => Ok(Some(true)),
                        Err(e) if e.is_conflict() => Ok(None),
                        Err(e) => Err(map(e)),
                    };
                }
                Some(mut lease) if self.held_by(&lease, now).is_none() => {
                    self.stamp(&mut lease, now, true);
                    return match self.client.update_lease(self.ns(), &lease).await {
                        Ok(_) => Ok(Some(true)),
                        Err(e) if e.is_conflict() => Ok(None),
                        Err(e) => Err(map(e)),
                    };
                }
                Some(_) => {}
            }
        }
        Ok(Some(false))
    }

    /// Find our slot, apply `change`, write it back; retried on conflicts.
    /// Returns false when we hold no slot.
    async fn update_own(&self, change: impl Fn(&mut Lease, Timestamp)) -> Result<bool, LockError> {
        for _ in 0..CONFLICT_RETRIES {
            let now = Timestamp::now();
            let mine = self.slots().await?.into_iter().find_map(|(_, l)| {
                l.filter(|l| {
                    l.spec.holder_identity.as_deref() == Some(self.config.node.id.as_str())
                })
            });
            let Some(mut lease) = mine else {
                return Ok(false);
            };
            change(&mut lease, now);
            match self.client.update_lease(self.ns(), &lease).await {
                Ok(_) => return Ok(true),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(map(e)),
            }
        }
        Err(LockError::Conflict(format!(
            "slot of {} kept changing under {CONFLICT_RETRIES} attempts",
            self.config.node.id
        )))
    }
}

#[async_trait::async_trait]
impl RebootLock for LeaseLock {
    async fn try_acquire(&self) -> Result<bool, LockError> {
        for _ in 0..CONFLICT_RETRIES {
            if let Some(got) = self.acquire_once().await? {
                return Ok(got);
            }
        }
        Err(LockError::Conflict(format!(
            "lost {CONFLICT_RETRIES} races for a slot of group {}",
            self.config.node.group
        )))
    }

    async fn renew(&self) -> Result<(), LockError> {
        let id = self.config.node.id.clone();
        let held = self
            .update_own(|lease, now| {
                // A renewal after expiry is still ours only if nobody took the slot,
                // which the resourceVersion check guarantees.
                lease.spec.renew_time = Some(micro_time(now));
            })
            .await?;
        if held {
            Ok(())
        } else {
            Err(LockError::Refused(format!("{id} holds no slot to renew")))
        }
    }

    async fn release(&self) -> Result<(), LockError> {
        // Releasing a lock we do not hold is not an error: release is idempotent.
        self.update_own(|lease, _| {
            lease.spec.holder_identity = None;
            lease.spec.renew_time = None;
            lease.spec.acquire_time = None;
        })
        .await
        .map(|_| ())
    }

    async fn holders(&self) -> Result<Vec<String>, LockError> {
        let now = Timestamp::now();
        let mut out: Vec<String> = self
            .slots()
            .await?
            .into_iter()
            .filter_map(|(_, l)| l.and_then(|l| self.held_by(&l, now)))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn mark_release_failed(&self, version: &str, reason: &str) -> Result<(), LockError> {
        let entry = FailedRelease {
            version: version.to_string(),
            node: self.config.node.id.clone(),
            reason: reason.to_string(),
        };
        for _ in 0..CONFLICT_RETRIES {
            let name = self.releases_name();
            let existing = self.client.get_lease(self.ns(), &name).await.map_err(map)?;
            let mut lease = existing.clone().unwrap_or_else(|| Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.ns().to_string()),
                    labels: [(GROUP_LABEL.to_string(), self.config.node.group.clone())].into(),
                    ..Default::default()
                },
                spec: LeaseSpec::default(),
            });
            let mut list = parse_failed(&lease)?;
            if list.iter().any(|f| f.version == entry.version) {
                return Ok(());
            }
            list.push(entry.clone());
            let json = serde_json::to_string(&list)
                .map_err(|e| LockError::Protocol(format!("encoding failed releases: {e}")))?;
            lease
                .metadata
                .annotations
                .insert(FAILED_RELEASES_ANNOTATION.to_string(), json);
            let written = if existing.is_some() {
                self.client.update_lease(self.ns(), &lease).await
            } else {
                self.client.create_lease(self.ns(), &lease).await
            };
            match written {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(map(e)),
            }
        }
        Err(LockError::Conflict(format!(
            "{} kept changing under {CONFLICT_RETRIES} attempts",
            self.releases_name()
        )))
    }

    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError> {
        match self
            .client
            .get_lease(self.ns(), &self.releases_name())
            .await
            .map_err(map)?
        {
            Some(lease) => parse_failed(&lease),
            None => Ok(Vec::new()),
        }
    }
}

/// The live holder of a slot at `now`, if any.
pub fn live_holder(lease: &Lease, now: Timestamp) -> Option<String> {
    let holder = lease
        .spec
        .holder_identity
        .as_ref()
        .filter(|h| !h.is_empty())?;
    let renewed: Timestamp = lease.spec.renew_time.as_deref()?.parse().ok()?;
    let duration = lease.spec.lease_duration_seconds?;
    let expires = renewed
        .checked_add(jiff::SignedDuration::from_secs(duration))
        .ok()?;
    (expires > now).then(|| holder.clone())
}

fn parse_failed(lease: &Lease) -> Result<Vec<FailedRelease>, LockError> {
    match lease.metadata.annotations.get(FAILED_RELEASES_ANNOTATION) {
        None => Ok(Vec::new()),
        Some(s) => serde_json::from_str(s).map_err(|e| {
            LockError::Protocol(format!("annotation {FAILED_RELEASES_ANNOTATION}: {e}"))
        }),
    }
}

/// Kubernetes MicroTime: RFC 3339, UTC, microseconds.
pub fn micro_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn map(e: KubeError) -> LockError {
    match e {
        KubeError::Transport(m) => LockError::Unreachable(m),
        KubeError::Api { status: 409, .. } => LockError::Conflict(e.to_string()),
        KubeError::Api {
            status: 401 | 403, ..
        } => LockError::Refused(e.to_string()),
        KubeError::Api { status, .. } if status >= 500 => LockError::Unreachable(e.to_string()),
        other => LockError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renew: Option<&str>, secs: Option<i64>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: LeaseSpec {
                holder_identity: holder.map(String::from),
                renew_time: renew.map(String::from),
                lease_duration_seconds: secs,
                ..Default::default()
            },
        }
    }

    #[test]
    fn live_holder_table() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let cases = [
            (
                lease(Some("a"), Some("2026-01-01T00:00:45.000000Z"), Some(30)),
                Some("a"),
            ),
            (
                lease(Some("a"), Some("2026-01-01T00:00:29.999999Z"), Some(30)),
                None,
            ),
            (
                lease(Some("a"), Some("2026-01-01T00:00:30.000000Z"), Some(30)),
                None,
            ),
            (
                lease(None, Some("2026-01-01T00:00:59.000000Z"), Some(30)),
                None,
            ),
            (
                lease(Some(""), Some("2026-01-01T00:00:59.000000Z"), Some(30)),
                None,
            ),
            (lease(Some("a"), None, Some(30)), None),
            (lease(Some("a"), Some("2026-01-01T00:00:59Z"), None), None),
            (lease(Some("a"), Some("garbage"), Some(30)), None),
        ];
        for (i, (l, want)) in cases.iter().enumerate() {
            assert_eq!(live_holder(l, now).as_deref(), *want, "case {i}");
        }
    }

    #[test]
    fn micro_time_has_microseconds_and_parses_back() {
        let t: Timestamp = "2026-01-01T00:00:01.5Z".parse().unwrap();
        let s = micro_time(t);
        assert_eq!(s, "2026-01-01T00:00:01.500000Z");
        assert_eq!(s.parse::<Timestamp>().unwrap(), t);
    }

    #[test]
    fn errors_map_to_lock_errors() {
        let api = |status| KubeError::Api {
            method: "PUT".into(),
            path: "/x".into(),
            status,
            reason: String::new(),
            message: String::new(),
        };
        assert!(matches!(map(api(409)), LockError::Conflict(_)));
        assert!(matches!(map(api(403)), LockError::Refused(_)));
        assert!(matches!(map(api(503)), LockError::Unreachable(_)));
        assert!(matches!(map(api(422)), LockError::Protocol(_)));
        assert!(matches!(
            map(KubeError::Transport("x".into())),
            LockError::Unreachable(_)
        ));
    }
}
