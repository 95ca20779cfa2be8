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
//! # What comes next: the agent loop
//!
//! * **register**: send the inventory and the host's topology labels to the scheduler;
//! * **heartbeat**: send telemetry on a period, carrying the lease the scheduler answers with;
//! * **watch allocations**: stream the gangs placed on this host from the leader;
//! * **task driver**: start, watch and stop task processes with `CUDA_VISIBLE_DEVICES` set to the
//!   allocated devices, and report their exits;
//! * **checkpoint**: relay checkpoint requests to tasks and report when they are durable, so
//!   preemption and migration do not lose work;
//! * **fencing**: stop every task when the lease lapses (partitioned from the scheduler), so a gang
//!   the scheduler has already rescheduled elsewhere never runs twice.

pub mod devices;
pub mod driver;
