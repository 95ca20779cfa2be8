//! The environment a task starts with: who it is in its gang, which devices it may touch, where
//! it checkpoints and what it resumes from.

use crate::devices::{DeviceInfo, DeviceKind};
use gangway_proto::pb;
use std::collections::BTreeMap;
use std::path::Path;

/// The checkpoint directory of one job on the shared storage.
pub fn checkpoint_dir(root: &Path, job: &str) -> std::path::PathBuf {
    root.join(job)
}

/// The task's checkpoint directory under `root`, if it gets one: its job can checkpoint (its
/// spec has a `[checkpoint]` section, which the lease carries as the signal) or resumes from a
/// checkpoint. Any other job is never asked to checkpoint, so a directory made for it would only
/// leave one empty directory per job on the shared storage, and cost a launch a `mkdir` there.
pub fn task_checkpoint_dir(root: &Path, alloc: &pb::Allocation) -> Option<std::path::PathBuf> {
    let checkpoints = !alloc.checkpoint_signal.is_empty() || !alloc.restore_from.is_empty();
    checkpoints.then(|| checkpoint_dir(root, &alloc.job_id))
}

/// Variables set for every task; the spec's own `env` comes first, so these win over it.
pub fn task_env(
    alloc: &pb::Allocation,
    inventory: &[DeviceInfo],
    checkpoint_root: &Path,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = alloc
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The spec's [secret_env]: only in the task's environment (never in a file or a log line).
    for secret in &alloc.secret_env {
        env.insert(secret.name.clone(), secret.value.clone());
    }
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("GANGWAY_JOB_ID", alloc.job_id.clone());
    set("GANGWAY_TASK_INDEX", alloc.task.to_string());
    set("GANGWAY_TASK_COUNT", alloc.task_count.to_string());
    set("GANGWAY_LEASE_EPOCH", alloc.epoch.to_string());
    set("GANGWAY_MASTER_ADDR", alloc.master_addr.clone());
    if let Some((host, port)) = alloc.master_addr.rsplit_once(':') {
        // The names torch.distributed reads.
        set("MASTER_ADDR", host.to_owned());
        set("MASTER_PORT", port.to_owned());
        set("RANK", alloc.task.to_string());
        set("WORLD_SIZE", alloc.task_count.to_string());
    }
    if let Some(dir) = task_checkpoint_dir(checkpoint_root, alloc) {
        set("GANGWAY_CHECKPOINT_DIR", dir.display().to_string());
    }
    if !alloc.restore_from.is_empty() {
        set("GANGWAY_RESTORE_FROM", alloc.restore_from.clone());
    }
    if !alloc.checkpoint_signal.is_empty() {
        set("GANGWAY_CHECKPOINT_SIGNAL", alloc.checkpoint_signal.clone());
    }
    let kind_of = |index: u32| inventory.iter().find(|d| d.index == index).map(|d| d.kind);
    let tpu = alloc
        .devices
        .iter()
        .any(|d| kind_of(d.index) == Some(DeviceKind::Tpu));
    if tpu {
        let chips: Vec<String> = alloc.devices.iter().map(|d| d.index.to_string()).collect();
        set("TPU_VISIBLE_CHIPS", chips.join(","));
    } else {
        // UUIDs, not indices: they name the same device whatever order CUDA enumerates in. Empty
        // hides every GPU from a task that leased none.
        let uuids: Vec<String> = alloc.devices.iter().map(|d| d.uuid.clone()).collect();
        set("CUDA_VISIBLE_DEVICES", uuids.join(","));
    }
    let fraction = alloc.devices.iter().find(|d| d.milli < 1000);
    if let Some(d) = fraction {
        set("GANGWAY_DEVICE_MILLI", d.milli.to_string());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{DeviceBackend, FakeBackend};

    fn alloc(devices: &[(u32, &str, u32)]) -> pb::Allocation {
        pb::Allocation {
            job_id: "train-4".into(),
            task: 1,
            task_count: 2,
            epoch: 12,
            devices: devices
                .iter()
                .map(|(index, uuid, milli)| pb::AllocatedDevice {
                    index: *index,
                    uuid: (*uuid).into(),
                    milli: *milli,
                })
                .collect(),
            command: vec!["python3".into()],
            env: [
                ("GANGWAY_TASK_INDEX".to_owned(), "99".to_owned()),
                ("LR".to_owned(), "0.1".to_owned()),
            ]
            .into(),
            master_addr: "10.0.0.5:29512".into(),
            restore_from: "/ck/train-4/step-40".into(),
            checkpoint_signal: "SIGUSR1".into(),
            secret_env: vec![pb::SecretVar {
                name: "HF_TOKEN".into(),
                value: "hf_s3cret".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn ranks_devices_and_restore_point_reach_the_task() {
        let gpus = FakeBackend::parse("4xH100", "h1")
            .unwrap()
            .inventory()
            .unwrap();
        let env = task_env(
            &alloc(&[(2, "GPU-a", 1000), (3, "GPU-b", 1000)]),
            &gpus,
            Path::new("/ck"),
        );
        assert_eq!(
            env["GANGWAY_TASK_INDEX"], "1",
            "the agent's value wins over the spec's"
        );
        assert_eq!(env["LR"], "0.1");
        assert_eq!(env["HF_TOKEN"], "hf_s3cret", "a secret reaches the task");
        assert_eq!(env["GANGWAY_TASK_COUNT"], "2");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
        assert_eq!(env["GANGWAY_MASTER_ADDR"], "10.0.0.5:29512");
        assert_eq!(env["MASTER_PORT"], "29512");
        assert_eq!(env["GANGWAY_CHECKPOINT_DIR"], "/ck/train-4");
        assert_eq!(env["GANGWAY_RESTORE_FROM"], "/ck/train-4/step-40");
        assert!(!env.contains_key("TPU_VISIBLE_CHIPS"));

        let tpus = FakeBackend::parse("4xTPU-v5p", "t1")
            .unwrap()
            .inventory()
            .unwrap();
        let env = task_env(
            &alloc(&[(0, "TPU-x", 1000), (1, "TPU-y", 1000)]),
            &tpus,
            Path::new("/ck"),
        );
        assert_eq!(env["TPU_VISIBLE_CHIPS"], "0,1");
        assert!(!env.contains_key("CUDA_VISIBLE_DEVICES"));

        let env = task_env(&alloc(&[]), &gpus, Path::new("/ck"));
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "", "a CPU task sees no GPU");
    }

    #[test]
    fn only_a_job_that_checkpoints_or_resumes_gets_a_checkpoint_directory() {
        let gpus = FakeBackend::parse("1xH100", "h1")
            .unwrap()
            .inventory()
            .unwrap();
        let dir_of = |signal: &str, restore: &str| {
            let a = pb::Allocation {
                checkpoint_signal: signal.into(),
                restore_from: restore.into(),
                ..alloc(&[(0, "GPU-a", 1000)])
            };
            (
                task_checkpoint_dir(Path::new("/ck"), &a).is_some(),
                task_env(&a, &gpus, Path::new("/ck"))
                    .get("GANGWAY_CHECKPOINT_DIR")
                    .cloned(),
            )
        };
        let dir = Some("/ck/train-4".to_owned());
        // (signal: the spec's [checkpoint], restore point) -> (a directory, its variable)
        let table = [
            (("SIGUSR1", ""), (true, dir.clone())),
            (("SIGUSR1", "/ck/train-4/step-40"), (true, dir.clone())),
            (("", "/ck/train-4/step-40"), (true, dir)),
            (("", ""), (false, None)),
        ];
        for ((signal, restore), want) in table {
            assert_eq!(
                dir_of(signal, restore),
                want,
                "signal {signal:?}, restore {restore:?}"
            );
        }
    }
}
