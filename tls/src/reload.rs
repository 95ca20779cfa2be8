//! A value built from files and rebuilt when they change: how a server or agent picks up rotated
//! certificates without a restart. Files are looked at no more than once a second, on use; a
//! rebuild that fails (a half-written file, a key that does not match) keeps the previous value and
//! says why once per change.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::TlsError;

type Build<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

/// How often files are checked for changes.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: Mutex<Current<T>>,
}

struct Current<T> {
    value: Arc<T>,
    stamps: Vec<Option<SystemTime>>,
    checked: Instant,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl<T> Reloading<T> {
    /// Builds the first value now (an error here is a start-up error).
    pub fn new(
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let value = Arc::new(build()?);
        let current = Current {
            value,
            stamps: stamps(&paths),
            checked: Instant::now(),
        };
        Ok(Reloading {
            paths,
            build: Box::new(build),
            current: Mutex::new(current),
        })
    }

    /// The current value, rebuilt first if a file changed since the last look.
    pub fn get(&self) -> Arc<T> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.checked.elapsed() >= CHECK_EVERY {
            cur.checked = Instant::now();
            let now = stamps(&self.paths);
            if now != cur.stamps {
                cur.stamps = now;
                match (self.build)() {
                    Ok(v) => {
                        tracing::info!(files = ?self.paths, "TLS files changed: reloaded");
                        cur.value = Arc::new(v);
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS files changed but cannot be used; keeping the previous certificates"
                    ),
                }
            }
        }
        cur.value.clone()
    }
}
