//! One module per subcommand (group).

pub mod cluster;
pub mod common;
pub mod jobs;
pub mod nodes;
pub mod output;
pub mod queues;
pub mod sim;
