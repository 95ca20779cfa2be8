//! Accelerator kinds.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The family of an accelerator. A job asks for one kind; it never mixes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Gpu,
    Tpu,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Gpu => "gpu",
            DeviceKind::Tpu => "tpu",
        })
    }
}

/// Error for a device kind name other than gpu or tpu.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device kind {0:?}: expected gpu or tpu")]
pub struct UnknownDeviceKind(pub String);

impl std::str::FromStr for DeviceKind {
    type Err = UnknownDeviceKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gpu" => Ok(DeviceKind::Gpu),
            "tpu" => Ok(DeviceKind::Tpu),
            other => Err(UnknownDeviceKind(other.to_owned())),
        }
    }
}
