//! Raft transport: the client side (openraft's network trait over gRPC), the follower's end of the
//! replication stream, the pluggable connector, the fault injector used by tests, and the
//! server connection whose replies go out together ([`CoalescedWrites`]).

pub(crate) mod client;
pub(crate) mod coalesce;
pub(crate) mod fault;
pub(crate) mod follower;
pub(crate) mod stream;
pub(crate) mod transport;

pub use coalesce::CoalescedWrites;
pub use fault::FaultInjector;
pub use fault::Verdict;
pub(crate) use transport::sender;
pub(crate) use transport::tagged;
pub use transport::Connector;
pub use transport::TcpConnector;
pub use transport::Transport;
pub(crate) use transport::DROPPED_KEY;
pub use transport::MAX_RAFT_MESSAGE_BYTES;
