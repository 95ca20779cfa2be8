//! Gangway's host agent (`gangway worker`).
//!
//! # What exists: the device layer
//!
//! [`devices`] answers "what accelerators does this host have, and how are they doing?" behind
//! one trait, [`devices::DeviceBackend`]:
//!
//! * [`devices::NvmlBackend`] reads NVIDIA GPUs through NVML, loaded at run time from
//!   `libnvidia-ml.so.1`; without it the agent exits with an error that says to install the driver
//!   or run with `--fake-devices`. Its tests run the real NVML code path on machines without a GPU
//!   against a fake `libnvidia-ml` written in C (`tests/fake_nvml/`), built by the tests.
//! * [`devices::FakeBackend`] declares devices (`--fake-devices 8xH100`,
//!   `2xH100+2xA100-80G:nvlink=0-1,2-3`, `4xTPU-v5p`) whose utilization the agent sets from what its
//!   tasks do and into which faults can be injected.
//!
//! The inventory (UUID, short model name the scheduler matches, memory, NVLink domain, PCI bus,
//! NUMA node) is what the agent registers; the telemetry (utilization, memory used, health and
//! XID/ECC events) is what each heartbeat carries.
//!
//! # The task driver
//!
//! [`driver`] runs the agent's decisions: it starts each task under a supervisor *shim* (the same
//! binary as `gangway task-shim`) in a process group of its own, signals and stops the group,
//! reports exits, and re-adopts running tasks after an agent restart. The shim records the task's
//! exit in a file, so a restarted agent still learns it, and enforces the lease deadline from a
//! lease file the agent renews, so a worker cut off from the scheduler stops its tasks in time
//! even if the agent itself is dead.
//!
//! # The agent loop
//!
//! [`agent`] is `gangway worker`: it registers the inventory and topology labels, heartbeats with
//! telemetry (every answer moves the lease deadline forward), holds the leader's stream of desired
//! allocations and diffs it against what runs: launches with the gang's environment, stops what is
//! no longer leased, relays checkpoint requests and reports manifests, refuses stale directives
//! (fencing by allocation revision and by per-device lease epoch), and retries every report until
//! a replica acknowledges it. Its intent is persisted, so a restarted agent re-adopts its tasks.

pub mod agent;
pub mod devices;
pub mod driver;
