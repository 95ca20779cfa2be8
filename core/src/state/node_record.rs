//! A host as the cluster remembers it.

use super::command::NodeRegistration;
use crate::engine::NodeState;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub registration: NodeRegistration,
    pub state: NodeState,
    /// Why it is in that state (operator's words, or "missed heartbeats").
    pub state_reason: String,
    pub registered_at_ms: u64,
    pub state_changed_at_ms: u64,
}
