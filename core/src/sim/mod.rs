//! The trace-driven simulator behind `gangway sim`: the production engine under a discrete-event clock.

pub mod clock;
pub mod cluster_file;
pub mod error;
pub mod failures;
pub mod fgd;
pub mod metrics;
pub mod openb;
pub mod philly;
pub mod plot;
pub mod replay;
pub mod report;
pub mod synth;
mod world;

pub use cluster_file::SimCluster;
pub use error::SimError;
pub use failures::{FailureMetrics, FailureModel, FailureOptions};
pub use metrics::ReplayMetrics;
pub use replay::{
    compress_arrivals, jobs_from_trace, replay, DefragOptions, PreemptMode, ReplayOptions, SimJob,
};
