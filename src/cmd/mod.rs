//! One module per subcommand (group).

pub mod access;
pub mod audit;
pub mod cluster;
pub mod common;
pub mod defrag;
pub mod dev;
pub mod drill;
pub mod health;
pub mod huge_pages;
pub mod jobs;
pub mod logs;
pub mod nodes;
pub mod output;
pub mod queues;
pub mod server;
pub mod sim;
pub mod tls;
pub mod worker;

/// Exit code for invalid input: a bad spec, file, flag or field.
pub use crate::client::EXIT_INVALID;
