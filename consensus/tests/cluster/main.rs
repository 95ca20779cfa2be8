//! Multi-replica tests over real gRPC on loopback with RocksDB in temp dirs.
//!
//! Tests in this binary take a global lock and run one at a time: every cluster uses short
//! election timeouts, and several clusters fighting for 2 CI cores would turn CPU starvation into
//! election storms that test nothing.

#[path = "../common/mod.rs"]
mod common;

mod basic;
mod failover;
mod membership;
mod partition;
mod random_faults;
mod restart;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Hold this for the whole test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    common::init_tracing();
    SERIAL.lock().await
}
