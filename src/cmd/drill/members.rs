//! [`Members`]: the replicas of the cluster under drill, each asked directly (not through the
//! leader-following client): a drill needs each replica's own view of who leads, and must aim its
//! fault at one replica.

use crate::client::{normalize_addr, Client, ClientError, Resend};
use gangway_proto::pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long one replica gets to answer a status question; a drill polls often.
const STATUS_TIMEOUT: Duration = Duration::from_millis(800);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// One replica: id, `host:port`, and a lazily (re)connecting channel.
struct Member {
    address: String,
    voter: bool,
    channel: Channel,
}

/// The members as the leader listed them when the drill began.
pub struct Members {
    members: BTreeMap<u64, Member>,
}

impl Members {
    /// From a leader's `ClusterStatus` reply.
    pub fn from_status(status: &pb::ClusterStatusReply) -> Result<Self, ClientError> {
        let mut members = BTreeMap::new();
        for m in &status.members {
            let uri = normalize_addr(&m.address).map_err(|e| {
                ClientError::Other(format!(
                    "replica {} has an address the drill cannot dial ({:?}): {e}",
                    m.id, m.address
                ))
            })?;
            let endpoint = Endpoint::from_shared(uri)
                .map_err(|e| ClientError::Other(format!("replica {}: {e}", m.id)))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(STATUS_TIMEOUT)
                .tcp_nodelay(true);
            let channel = crate::client::credentials::current().lazy(&endpoint);
            members.insert(
                m.id,
                Member {
                    address: m.address.clone(),
                    voter: m.voter,
                    channel,
                },
            );
        }
        Ok(Self { members })
    }

    pub fn voters(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, m)| m.voter)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn address(&self, id: u64) -> String {
        self.members
            .get(&id)
            .map(|m| m.address.clone())
            .unwrap_or_default()
    }

    /// Every member's address, for a leader-following client that must outlive any one replica.
    pub fn client_addrs(&self) -> Vec<String> {
        self.members
            .values()
            .filter_map(|m| normalize_addr(&m.address).ok())
            .collect()
    }

    /// One replica's own view, or `None` when it does not answer in time.
    pub async fn status(&self, id: u64) -> Option<pb::ClusterStatusReply> {
        status_on(self.members.get(&id)?.channel.clone()).await
    }

    /// Asks every replica at once for its own view.
    fn ask_all(&self) -> tokio::task::JoinSet<Option<pb::ClusterStatusReply>> {
        let mut asks = tokio::task::JoinSet::new();
        for m in self.members.values() {
            asks.spawn(status_on(m.channel.clone()));
        }
        asks
    }

    /// The first answer `wanted` takes, as soon as it arrives: a replica slow to answer (one cut
    /// off waits out the status timeout) does not delay another's news. `None` once all answered.
    pub async fn first<T>(
        &self,
        mut wanted: impl FnMut(&pb::ClusterStatusReply) -> Option<T>,
    ) -> Option<T> {
        let mut asks = self.ask_all();
        while let Some(done) = asks.join_next().await {
            if let Some(found) = done.ok().flatten().as_ref().and_then(&mut wanted) {
                return Some(found);
            }
        }
        None
    }

    /// Every replica that answers that it leads, as it answered itself (all asked at once).
    pub async fn leaders(&self) -> Vec<pb::ClusterStatusReply> {
        let mut asks = self.ask_all();
        let mut answers = Vec::new();
        while let Some(done) = asks.join_next().await {
            if let Ok(Some(s)) = done {
                if s.role == "leader" {
                    answers.push(s);
                }
            }
        }
        answers
    }

    /// Sends one drill action to replica `id` (never forwarded; it runs there).
    pub async fn drill(
        &self,
        id: u64,
        req: pb::DrillRequest,
        timeout: Duration,
    ) -> Result<pb::DrillReply, ClientError> {
        let addr = normalize_addr(&self.address(id)).map_err(ClientError::Other)?;
        // A one-address client: the Drill call never answers `not_leader`, so it stays on `id`.
        let mut client = Client::new(vec![addr], timeout);
        client
            .call("Drill", Resend::UnlessOutcomeUnknown, |mut api| {
                let req = req.clone();
                async move { api.drill(req).await }
            })
            .await
    }
}

async fn status_on(channel: Channel) -> Option<pb::ClusterStatusReply> {
    let mut api = crate::client::credentials::current().api(channel);
    tokio::time::timeout(STATUS_TIMEOUT, api.cluster_status(pb::Empty {}))
        .await
        .ok()?
        .ok()
        .map(tonic::Response::into_inner)
}
