//! Gangway's host agent (`gangway worker`).
//!
//! Empty on purpose: the worker issue builds the device backends (NVML, fake), the task driver, the
//! checkpoint protocol and fencing here. No code pretends to run tasks before then.
