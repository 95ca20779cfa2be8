//! `gangway server`: the replica process. Today it holds the server's validated configuration; the
//! gRPC services, the leader's loops and the HTTP endpoints join it with the scheduler service.

pub mod config;
