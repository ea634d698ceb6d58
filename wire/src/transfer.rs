//! The agent-to-agent requests of a volume transfer: the query of
//! `POST /v1/volumes/NAME/receive`, its answer, and the body of
//! `POST /v1/volumes/NAME/handoff`. The receiving agent checks every value again (names,
//! ownership) before it acts on them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Why a receive query could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("receive: missing query parameter {0:?}")]
    Missing(String),
    #[error("receive: {key}={value:?} is not a number")]
    NotANumber { key: String, value: String },
}

/// Query of `POST /v1/volumes/NAME/receive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveParams {
    pub snapshot: String,
    pub base: Option<String>,
    /// The sender's ownership record, which the received copy adopts.
    pub owner: String,
    pub epoch: u64,
    pub from: String,
    pub quota: Option<u64>,
    /// The target's copy is a stale replica sharing no snapshot with the sender: replace it
    /// with this full stream. Never honoured for a copy the target owns.
    pub replace: bool,
    /// A move's final push hands the volume off with its stream: once the stream verified,
    /// the receiver records itself as owner at this epoch (exactly one above the record the
    /// stream carries, as a separate handoff would).
    pub handoff: Option<u64>,
}

impl ReceiveParams {
    /// Parses `a=b&c=d` (names are restricted, so no percent-decoding is needed).
    pub fn parse(query: &str) -> Result<Self, ParamsError> {
        let map: HashMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let get = |k: &str| {
            map.get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| ParamsError::Missing(k.to_string()))
        };
        let num = |k: &str, v: &str| {
            v.parse::<u64>().map_err(|_| ParamsError::NotANumber {
                key: k.to_string(),
                value: v.to_string(),
            })
        };
        Ok(ReceiveParams {
            snapshot: get("snapshot")?,
            base: map.get("base").map(|s| s.to_string()),
            owner: get("owner")?,
            epoch: num("epoch", &get("epoch")?)?,
            from: get("from")?,
            quota: map.get("quota").map(|q| num("quota", q)).transpose()?,
            replace: map.get("replace") == Some(&"1"),
            handoff: map.get("handoff").map(|e| num("handoff", e)).transpose()?,
        })
    }

    /// The query string [`ReceiveParams::parse`] reads.
    pub fn query(&self) -> String {
        let mut q = format!(
            "snapshot={}&owner={}&epoch={}&from={}",
            self.snapshot, self.owner, self.epoch, self.from
        );
        if let Some(b) = &self.base {
            q.push_str(&format!("&base={b}"));
        }
        if let Some(quota) = self.quota {
            q.push_str(&format!("&quota={quota}"));
        }
        if self.replace {
            q.push_str("&replace=1");
        }
        if let Some(epoch) = self.handoff {
            q.push_str(&format!("&handoff={epoch}"));
        }
        q
    }
}

/// Answer of a receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    pub snapshot: String,
    pub bytes: u64,
    /// The receiver's record once the stream was committed: with a handoff, the receiver
    /// itself at the handoff's epoch. Absent from agents before the folded handoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Body of `POST /v1/volumes/NAME/handoff`: "you own it at `epoch`", sent by `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeOverRequest {
    pub epoch: u64,
    pub from: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_round_trips_and_names_what_is_wrong() {
        let p = ReceiveParams {
            snapshot: "push-0000000002".into(),
            base: Some("push-0000000001".into()),
            owner: "198.18.0.11".into(),
            epoch: 3,
            from: "198.18.0.11".into(),
            quota: Some(1 << 20),
            replace: true,
            handoff: Some(4),
        };
        assert_eq!(ReceiveParams::parse(&p.query()), Ok(p.clone()));
        let plain = ReceiveParams {
            handoff: None,
            ..p.clone()
        };
        assert_eq!(ReceiveParams::parse(&plain.query()), Ok(plain));
        assert!(matches!(
            ReceiveParams::parse(&format!("{}&handoff=x", p.query())),
            Err(ParamsError::NotANumber { .. })
        ));
        assert_eq!(
            ReceiveParams::parse("snapshot=s&owner=o&from=f"),
            Err(ParamsError::Missing("epoch".into()))
        );
        assert!(matches!(
            ReceiveParams::parse("snapshot=s&owner=o&from=f&epoch=-1"),
            Err(ParamsError::NotANumber { .. })
        ));
    }
}
