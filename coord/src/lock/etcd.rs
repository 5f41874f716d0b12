//! etcd backend: a counting semaphore with N slots per group, held under an etcd lease,
//! spoken through etcd's v3 JSON gateway (`/v3/...` on the client port, keys and values
//! base64) so no protoc or gRPC stack is needed.
//!
//! Scheme: slot `i` of a group is the key `/imgbuild/lock/<group>/slots/<i>` for
//! `i < N`, its value `{"node":..,"since":..}`, attached to a lease granted by the
//! holder. A node takes a slot with one transaction per slot, "create if it does not
//! exist" (`create_revision == 0`), so no two nodes can hold the same slot and at most
//! N keys exist: the raw key space itself shows the invariant, with no waiter keys
//! that a ranked (create_revision) semaphore leaves around. A node that dies stops
//! renewing; etcd revokes the lease after the TTL and the key goes with it. The TTL must
//! cover a reboot (the new boot finds its slot by node id and takes over the lease);
//! `max_hold` bounds how long renewals keep a slot alive in total.
//! Failed releases live under `/imgbuild/lock/<group>/failed/<version>`, without lease.
//!
//! This module never blocks waiting for a slot; the caller polls `try_acquire`.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{FailedRelease, LockError, NodeIdentity, RebootLock};

/// Tunables of the etcd semaphore.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Number of slots (nodes rebooting at once) per group.
    pub slots: usize,
    /// Lease TTL: how long a holder survives without renewing (covers a reboot).
    pub ttl: Duration,
    /// Renewals stop working after a slot has been held this long.
    pub max_hold: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            slots: 1,
            ttl: Duration::from_secs(600),
            max_hold: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The value stored in a slot key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotValue {
    /// Holder's node id.
    pub node: String,
    /// When the slot was taken.
    pub since: Timestamp,
}

/// One slot key as read from etcd.
#[derive(Debug, Clone)]
struct SlotKv {
    key: String,
    value: SlotValue,
    lease: i64,
    mod_revision: i64,
}

/// An etcd-backed reboot lock for one node.
#[derive(Debug)]
pub struct EtcdLock {
    endpoint: String,
    identity: NodeIdentity,
    options: EtcdOptions,
    http: reqwest::Client,
}

/// The key prefix of a group.
pub fn group_prefix(group: &str) -> String {
    format!("/imgbuild/lock/{group}/")
}

/// `[key, range_end)` covering every key that starts with `prefix`.
fn prefix_range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: etcd's "to the end of the key space".
    vec![0]
}

/// etcd's gateway encodes int64 as JSON strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode(v: &Value) -> Result<Vec<u8>, LockError> {
    let s = v.as_str().unwrap_or("");
    B64.decode(s)
        .map_err(|e| LockError::Protocol(format!("etcd answer: bad base64: {e}")))
}

impl EtcdLock {
    /// A lock for `identity` on the etcd cluster at `endpoint` (e.g.
    /// `http://127.0.0.1:2379`).
    pub fn new(
        endpoint: &str,
        identity: NodeIdentity,
        options: EtcdOptions,
    ) -> Result<Self, LockError> {
        if options.slots == 0 {
            return Err(LockError::Protocol(
                "etcd lock needs at least one slot".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| LockError::Protocol(format!("building HTTP client: {e}")))?;
        Ok(EtcdLock {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            identity,
            options,
            http,
        })
    }

    fn slots_prefix(&self) -> String {
        format!("{}slots/", group_prefix(&self.identity.group))
    }

    fn failed_prefix(&self) -> String {
        format!("{}failed/", group_prefix(&self.identity.group))
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, LockError> {
        let url = format!("{}/v3/{path}", self.endpoint);
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| LockError::Unreachable(format!("etcd {url}: {e}")))?;
        let status = response.status();
        let value: Value = response
            .json()
            .await
            .map_err(|e| LockError::Protocol(format!("etcd {url}: answer is not JSON: {e}")))?;
        if status.is_success() && value.get("error").is_none() {
            return Ok(value);
        }
        let message = value
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        // gRPC code 14 = UNAVAILABLE, 4 = DEADLINE_EXCEEDED.
        match int(value.get("code").unwrap_or(&Value::Null)) {
            14 | 4 => Err(LockError::Unreachable(format!("etcd {url}: {message}"))),
            _ => Err(LockError::Protocol(format!(
                "etcd {url}: HTTP {}: {message}",
                status.as_u16()
            ))),
        }
    }

    /// Every key/value under `prefix`, in key order.
    async fn range_prefix(&self, prefix: &str) -> Result<Vec<(String, Value)>, LockError> {
        let answer = self
            .call(
                "kv/range",
                json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_range_end(prefix))}),
            )
            .await?;
        let mut out = Vec::new();
        for kv in answer
            .get("kvs")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
        {
            let key = String::from_utf8(decode(&kv["key"])?)
                .map_err(|e| LockError::Protocol(format!("etcd key is not UTF-8: {e}")))?;
            out.push((key, kv.clone()));
        }
        Ok(out)
    }

    async fn slots(&self) -> Result<Vec<SlotKv>, LockError> {
        let mut out = Vec::new();
        for (key, kv) in self.range_prefix(&self.slots_prefix()).await? {
            let value: SlotValue = serde_json::from_slice(&decode(&kv["value"])?)
                .map_err(|e| LockError::Protocol(format!("etcd slot {key}: {e}")))?;
            out.push(SlotKv {
                key,
                value,
                lease: int(&kv["lease"]),
                mod_revision: int(&kv["mod_revision"]),
            });
        }
        Ok(out)
    }

    async fn mine(&self) -> Result<Option<SlotKv>, LockError> {
        Ok(self
            .slots()
            .await?
            .into_iter()
            .find(|s| s.value.node == self.identity.id))
    }

    /// Refresh `lease`; Ok(false) when etcd no longer knows it (expired or revoked).
    async fn keepalive(&self, lease: i64) -> Result<bool, LockError> {
        let answer = self
            .call("lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        Ok(int(answer.pointer("/result/TTL").unwrap_or(&Value::Null)) > 0)
    }

    async fn revoke(&self, lease: i64) -> Result<(), LockError> {
        match self
            .call("lease/revoke", json!({"ID": lease.to_string()}))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(LockError::Protocol(msg)) if msg.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renew a slot we hold, unless it has been held longer than `max_hold`.
    async fn keep(&self, slot: &SlotKv) -> Result<(), LockError> {
        if self.held_too_long(slot.value.since) {
            return Err(LockError::Refused(format!(
                "reboot slot held since {} exceeds max_hold {:?}; letting its lease expire",
                slot.value.since, self.options.max_hold
            )));
        }
        if self.keepalive(slot.lease).await? {
            Ok(())
        } else {
            Err(LockError::Conflict(
                "reboot slot lost: its etcd lease expired".into(),
            ))
        }
    }

    fn held_too_long(&self, since: Timestamp) -> bool {
        let held = Timestamp::now().duration_since(since);
        held.as_secs_f64() > self.options.max_hold.as_secs_f64()
    }
}

#[async_trait::async_trait]
impl RebootLock for EtcdLock {
    async fn try_acquire(&self) -> Result<bool, LockError> {
        // Idempotent: a slot we already hold (perhaps from before a reboot) is renewed.
        if let Some(slot) = self.mine().await? {
            match self.keep(&slot).await {
                Ok(()) => return Ok(true),
                // The lease lapsed between the read and the renewal: the key is gone
                // too, so take a slot afresh.
                Err(LockError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let ttl = self.options.ttl.as_secs().max(1);
        let grant = self
            .call("lease/grant", json!({"TTL": ttl.to_string()}))
            .await?;
        let lease = int(&grant["ID"]);
        if lease == 0 {
            return Err(LockError::Protocol(format!("etcd lease grant: {grant}")));
        }
        let value = SlotValue {
            node: self.identity.id.clone(),
            since: Timestamp::now(),
        };
        let value_json = serde_json::to_vec(&value)
            .map_err(|e| LockError::Protocol(format!("encoding slot value: {e}")))?;
        for i in 0..self.options.slots {
            let key = format!("{}{i}", self.slots_prefix());
            let answer = self
                .call(
                    "kv/txn",
                    json!({
                        "compare": [{"target": "CREATE", "key": B64.encode(&key), "create_revision": "0"}],
                        "success": [{"request_put": {"key": B64.encode(&key), "value": B64.encode(&value_json), "lease": lease.to_string()}}],
                    }),
                )
                .await?;
            if answer.get("succeeded").and_then(|s| s.as_bool()) == Some(true) {
                tracing::info!(key, node = %self.identity.id, "etcd: took reboot slot");
                return Ok(true);
            }
        }
        self.revoke(lease).await?;
        Ok(false)
    }

    async fn renew(&self) -> Result<(), LockError> {
        // Read the slot every time: a key deleted behind our back (by an operator) means
        // the slot is gone even while our lease lives.
        let slot = self
            .mine()
            .await?
            .ok_or_else(|| LockError::Conflict("no reboot slot held to renew".into()))?;
        self.keep(&slot).await
    }

    async fn release(&self) -> Result<(), LockError> {
        for slot in self.slots().await? {
            if slot.value.node != self.identity.id {
                continue;
            }
            // Delete only the key we read, so a slot that expired and was taken by
            // another node in between stays theirs.
            self.call(
                "kv/txn",
                json!({
                    "compare": [{"target": "MOD", "key": B64.encode(&slot.key), "mod_revision": slot.mod_revision.to_string()}],
                    "success": [{"request_delete_range": {"key": B64.encode(&slot.key)}}],
                }),
            )
            .await?;
            self.revoke(slot.lease).await?;
        }
        Ok(())
    }

    async fn holders(&self) -> Result<Vec<String>, LockError> {
        Ok(self
            .slots()
            .await?
            .into_iter()
            .map(|s| s.value.node)
            .collect())
    }

    async fn mark_release_failed(&self, version: &str, reason: &str) -> Result<(), LockError> {
        let record = FailedRelease {
            version: version.to_string(),
            node: self.identity.id.clone(),
            reason: reason.to_string(),
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| LockError::Protocol(format!("encoding failed release: {e}")))?;
        let key = format!("{}{version}", self.failed_prefix());
        self.call(
            "kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value)}),
        )
        .await?;
        Ok(())
    }

    async fn failed_releases(&self) -> Result<Vec<FailedRelease>, LockError> {
        let mut out = Vec::new();
        for (key, kv) in self.range_prefix(&self.failed_prefix()).await? {
            let record: FailedRelease = serde_json::from_slice(&decode(&kv["value"])?)
                .map_err(|e| LockError::Protocol(format!("etcd {key}: {e}")))?;
            out.push(record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_range_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end("ab"), b"ac".to_vec());
    }

    #[test]
    fn int64_as_string_or_number() {
        assert_eq!(int(&json!("7587899050981792005")), 7587899050981792005);
        assert_eq!(int(&json!(5)), 5);
        assert_eq!(int(&Value::Null), 0);
    }
}
