//! Each row is a story: what the host has, the set that arrives, what the agent then does.

use super::*;

fn key(job: &str, task: u32, epoch: u64) -> TaskKey {
    TaskKey {
        job: job.into(),
        task,
        epoch,
    }
}

/// Task `task` of `job` under lease `epoch`, holding `devices` whole.
fn alloc(job: &str, task: u32, epoch: u64, devices: &[u32]) -> pb::Allocation {
    pb::Allocation {
        job_id: job.into(),
        task,
        task_count: 1,
        epoch,
        devices: devices
            .iter()
            .map(|&index| pb::AllocatedDevice {
                index,
                uuid: format!("GPU-{index}"),
                milli: 1000,
            })
            .collect(),
        ..Default::default()
    }
}

fn asking_checkpoint(mut a: pb::Allocation, request: u64) -> pb::Allocation {
    a.checkpoint_request = request;
    a
}

fn set(revision: u64, allocations: Vec<pb::Allocation>) -> pb::AllocationSet {
    pb::AllocationSet {
        revision,
        allocations,
        device_epochs: Vec::new(),
    }
}

/// A host with devices 0..4 that has accepted revision 5 and runs nothing.
fn host() -> Local {
    Local {
        revision: 5,
        devices: (0..4).collect(),
        ..Local::default()
    }
}

fn running(devices: &[u32]) -> LocalTask {
    LocalTask {
        devices: devices.to_vec(),
        running: true,
        ..LocalTask::default()
    }
}

fn ended(devices: &[u32]) -> LocalTask {
    LocalTask {
        devices: devices.to_vec(),
        ended: true,
        ..LocalTask::default()
    }
}

fn with_task(mut local: Local, k: TaskKey, task: LocalTask) -> Local {
    local
        .device_epochs
        .extend(task.devices.iter().map(|d| (*d, k.epoch)));
    local.tasks.insert(k, task);
    local
}

struct Story {
    story: &'static str,
    local: Local,
    set: pb::AllocationSet,
    says: Vec<&'static str>,
}

#[test]
fn each_set_becomes_the_actions_the_story_expects() {
    let stories = vec![
        Story {
            story: "a new allocation launches",
            local: host(),
            set: set(6, vec![alloc("j1", 0, 3, &[0, 1])]),
            says: vec!["launch j1/task-0@epoch-3"],
        },
        Story {
            story: "an allocation older than its device's newest epoch is refused",
            local: Local {
                device_epochs: [(1, 4)].into(),
                ..host()
            },
            set: set(6, vec![alloc("j1", 0, 3, &[0, 1])]),
            says: vec![
                "refuse j1/task-0@epoch-3: its lease epoch 3 is older than epoch 4, already seen for device 1",
            ],
        },
        Story {
            story: "within one set, a newer lease on a device fences an older one",
            local: host(),
            set: set(6, vec![alloc("j2", 0, 7, &[2]), alloc("j1", 0, 3, &[2])]),
            says: vec![
                "refuse j1/task-0@epoch-3: its lease epoch 3 is older than epoch 7, already seen for device 2",
                "launch j2/task-0@epoch-7",
            ],
        },
        Story {
            story: "a device this host does not have is refused",
            local: host(),
            set: set(6, vec![alloc("j1", 0, 3, &[7])]),
            says: vec!["refuse j1/task-0@epoch-3: device 7 does not exist on this host"],
        },
        Story {
            story: "a stale task of a job still running here is not refused twice",
            local: Local {
                refused: [key("j1", 1, 2)].into(),
                ..with_task(host(), key("j1", 0, 3), running(&[0]))
            },
            set: set(6, vec![alloc("j1", 0, 3, &[0]), alloc("j1", 1, 2, &[0])]),
            says: vec![],
        },
        Story {
            story: "an older revision is ignored whole: nothing stops, nothing launches",
            local: with_task(host(), key("j0", 0, 1), running(&[0])),
            set: set(4, vec![alloc("j1", 0, 9, &[1])]),
            says: vec!["ignore revision 4 (seen 5)"],
        },
        Story {
            story: "the same revision again is accepted (a re-sent set)",
            local: with_task(host(), key("j0", 0, 1), running(&[0])),
            set: set(5, vec![alloc("j0", 0, 1, &[0])]),
            says: vec![],
        },
        Story {
            story: "a task no longer desired is stopped",
            local: with_task(host(), key("j0", 0, 1), running(&[0])),
            set: set(6, vec![]),
            says: vec!["stop j0/task-0@epoch-1"],
        },
        Story {
            story: "a launch onto the devices of a task still stopping waits for its exit",
            local: with_task(host(), key("j0", 0, 1), running(&[0, 1])),
            set: set(6, vec![alloc("j1", 0, 2, &[1, 2]), alloc("j2", 0, 2, &[3])]),
            says: vec![
                "stop j0/task-0@epoch-1",
                "launch j1/task-0@epoch-2 after j0/task-0@epoch-1",
                "launch j2/task-0@epoch-2",
            ],
        },
        Story {
            story: "an ended task is never relaunched, even when asked to checkpoint",
            local: with_task(host(), key("j1", 0, 3), ended(&[0])),
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 1)]),
            says: vec![],
        },
        Story {
            story: "an ended task the set no longer lists is forgotten",
            local: with_task(host(), key("j1", 0, 3), ended(&[0])),
            set: set(6, vec![]),
            says: vec!["forget j1/task-0@epoch-3"],
        },
        Story {
            story: "a grown checkpoint request is relayed",
            local: with_task(host(), key("j1", 0, 3), running(&[0])),
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 2)]),
            says: vec!["checkpoint j1/task-0@epoch-3 for request 2"],
        },
        Story {
            story: "a checkpoint under way is not relayed again",
            local: Local {
                checkpointing: [key("j1", 0, 3)].into(),
                ..with_task(host(), key("j1", 0, 3), running(&[0]))
            },
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 2)]),
            says: vec![],
        },
        Story {
            story: "an answered checkpoint request is not relayed again",
            local: with_task(
                host(),
                key("j1", 0, 3),
                LocalTask {
                    checkpoints_done: 2,
                    ..running(&[0])
                },
            ),
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 2)]),
            says: vec![],
        },
        Story {
            story: "a launch that waits keeps the newest checkpoint request for its start",
            local: Local {
                waiting: [(key("j1", 0, 3), 1)].into(),
                ..host()
            },
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 2)]),
            says: vec!["note checkpoint request 2 for waiting j1/task-0@epoch-3"],
        },
        Story {
            story: "a launch that waits is not launched a second time",
            local: Local {
                waiting: [(key("j1", 0, 3), 2)].into(),
                ..host()
            },
            set: set(6, vec![asking_checkpoint(alloc("j1", 0, 3, &[0]), 2)]),
            says: vec![],
        },
    ];
    for s in stories {
        let said: Vec<String> = plan(&s.set, &s.local)
            .actions
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(said, s.says, "{}", s.story);
    }
}

#[test]
fn an_accepted_set_raises_the_floors_of_whole_devices_only() {
    let mut shared = alloc("j2", 0, 8, &[2]);
    shared.devices[0].milli = 500;
    let local = Local {
        device_epochs: [(0, 9)].into(),
        ..host()
    };
    let accepted = plan(&set(6, vec![alloc("j1", 0, 3, &[1]), shared]), &local)
        .accepted
        .expect("accepted");
    assert_eq!(accepted.revision, 6);
    assert_eq!(accepted.device_epochs, [(0, 9), (1, 3)].into());
    assert_eq!(
        accepted.desired,
        [key("j1", 0, 3), key("j2", 0, 8)].into(),
        "both launch"
    );
}

#[test]
fn refusals_are_remembered_while_their_job_is_listed() {
    let local = with_task(host(), key("j1", 0, 3), running(&[0]));
    let stale = alloc("j1", 1, 2, &[0]);
    let listed = plan(
        &set(6, vec![alloc("j1", 0, 3, &[0]), stale.clone()]),
        &local,
    );
    let accepted = listed.accepted.expect("accepted");
    assert_eq!(accepted.refused, [key("j1", 1, 2)].into());
    assert!(!accepted.desired.contains(&key("j1", 1, 2)));

    let gone = Local {
        refused: accepted.refused,
        ..local
    };
    let accepted = plan(&set(7, vec![]), &gone).accepted.expect("accepted");
    assert!(accepted.refused.is_empty(), "the job left: forgotten");
}

#[test]
fn an_ignored_set_changes_no_bookkeeping() {
    let plan = plan(&set(1, vec![alloc("j1", 0, 3, &[0])]), &host());
    assert_eq!(plan.accepted, None);
}
