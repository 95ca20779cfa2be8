//! The `gangway` CLI against a real three-replica cluster: what people and scripts see. Output is
//! read through `-o json`; exit codes are the documented ones.

mod common;

use common::*;

use serde_json::Value;
use std::process::Output;
use std::time::Duration;

/// Runs `gangway ARGS...` off the async runtime (the CLI blocks).
fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", explain(out));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The item of `listing[list]` whose `key` is `value` (a job by id, a node by name).
fn item(listing: &Value, list: &str, key: &str, value: &str) -> Value {
    listing[list]
        .as_array()
        .and_then(|items| items.iter().find(|i| i[key] == value))
        .cloned()
        .unwrap_or_else(|| panic!("no {key} {value} in {list}: {listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_lists_drains_and_snapshots_through_any_replica() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    // Each replica turned transparent huge pages off for itself (src/cmd/server.rs).
    for id in 1..=3 {
        let pid = cluster.replica(id).pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("THP_enabled:\t0"), "replica {id}: {status}");
    }
    let fleet = two_hosts(cluster.addrs()).await;
    // A follower first in the list: the CLI must find the leader by itself.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let addrs = format!("{},{}", cluster.addr(follower), cluster.addr(leader));

    // Phase 1: submit a gang from a file, wait until it runs.
    let spec = cluster.dir.path().join("gang.toml");
    std::fs::write(&spec, GANG_2X8_RACK).unwrap();
    let out = gangway(&[
        "submit",
        spec.to_str().unwrap(),
        "--addr",
        &addrs,
        "--wait",
        "20s",
        "-o",
        "json",
    ])
    .await;
    let submitted = json(&out);
    let id = submitted["job_id"].as_str().expect("job id").to_owned();

    // Phase 2: the listing and the job's status show the lease.
    let jobs = json(&gangway(&["jobs", "--addr", &addrs, "-o", "json"]).await);
    let listed = &jobs["jobs"][0];
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["state"], "running");
    assert_eq!(listed["finished_at_ms"], 0, "not ended: {listed}");
    let status = json(&gangway(&["job", "status", &id, "--addr", &addrs, "-o", "json"]).await);
    let tasks = status["task_placements"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2, "{status}");
    let mut hosts: Vec<&str> = tasks.iter().map(|t| t["host"].as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, vec!["host-1", "host-2"]);

    // Phase 3: an invalid spec exits 3 and names the field, without creating anything.
    let bad = cluster.dir.path().join("bad.toml");
    std::fs::write(&bad, GANG_2X8_RACK.replace("tasks = 2", "tasks = 0")).unwrap();
    let out = gangway(&["submit", bad.to_str().unwrap(), "--addr", &addrs]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tasks"),
        "{out:?}"
    );

    // Phase 3b: a job array is one request: three jobs, in order, each with its index; a batch
    // with a bad file creates none.
    let one = cluster.dir.path().join("one.toml");
    std::fs::write(
        &one,
        "name = \"arr\"\ncommand = [\"true\"]\n[resources]\ndevices = 1\n",
    )
    .unwrap();
    let out = gangway(&[
        "submit",
        one.to_str().unwrap(),
        "--array",
        "3",
        "--addr",
        &addrs,
        "-o",
        "json",
    ])
    .await;
    let ids: Vec<String> = json(&out)
        .as_array()
        .expect("one view per job")
        .iter()
        .map(|v| v["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let third = json(&gangway(&["job", "status", &ids[2], "--addr", &addrs, "-o", "json"]).await);
    assert_eq!(third["env"]["GANGWAY_ARRAY_INDEX"], "2", "{third}");
    assert_eq!(third["env"]["GANGWAY_ARRAY_SIZE"], "3", "{third}");
    // An ended job's listing says when it ended (the leader's clock), as its status does.
    let out = gangway(&["cancel", &ids[0], "--addr", &addrs]).await;
    assert!(out.status.success(), "{out:?}");
    let listed = json(&gangway(&["jobs", "--addr", &addrs, "-o", "json"]).await);
    let first = item(&listed, "jobs", "id", &ids[0]);
    let ended = first["finished_at_ms"].as_u64().unwrap_or(0);
    assert!(
        first["state"] == "cancelled" && ended >= first["submitted_at_ms"].as_u64().unwrap(),
        "{first}"
    );
    let status = json(&gangway(&["job", "status", &ids[0], "--addr", &addrs, "-o", "json"]).await);
    assert_eq!(status["finished_at_ms"].as_u64(), Some(ended), "{status}");
    let before = json(&gangway(&["jobs", "--addr", &addrs, "-o", "json"]).await)["jobs"]
        .as_array()
        .unwrap()
        .len();
    let out = gangway(&[
        "submit",
        one.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--addr",
        &addrs,
    ])
    .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml"),
        "{out:?}"
    );
    let after = json(&gangway(&["jobs", "--addr", &addrs, "-o", "json"]).await)["jobs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "nothing created");

    // Phase 4: drain a node; cluster status names the leader; a snapshot is saved.
    let out = gangway(&["node", "drain", "host-1", "--addr", &addrs]).await;
    assert!(out.status.success(), "{out:?}");
    let nodes = json(&gangway(&["nodes", "--addr", &addrs, "-o", "json"]).await);
    let host1 = item(&nodes, "nodes", "name", "host-1");
    assert_eq!(host1["state"], "draining", "{nodes}");
    let cs = json(&gangway(&["cluster", "status", "--addr", &addrs, "-o", "json"]).await);
    assert_eq!(cs["leader_id"], leader);
    // Limits: the ones given change, the others stay; a zero is refused as a usage error.
    let out = gangway(&[
        "cluster",
        "limits",
        "--max-pending-per-queue",
        "5000",
        "--finished-retention",
        "2d",
        "--addr",
        &addrs,
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("finished jobs kept 2days (at most 100000)"),
        "{said}"
    );
    assert!(
        said.contains("at most 5000 pending jobs per queue"),
        "{said}"
    );
    let out = gangway(&["cluster", "limits", "--max-finished", "0", "--addr", &addrs]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let snap = cluster.dir.path().join("backup.json");
    let out = gangway(&[
        "cluster",
        "snapshot",
        "save",
        snap.to_str().unwrap(),
        "--addr",
        &addrs,
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let saved: Value = serde_json::from_slice(&std::fs::read(&snap).unwrap()).unwrap();
    assert!(
        saved.to_string().contains(&id),
        "the snapshot holds the job"
    );
    // A backup loads into an empty cluster only: this one says no and names why.
    let out = gangway(&[
        "cluster",
        "snapshot",
        "restore",
        snap.to_str().unwrap(),
        "--addr",
        &addrs,
    ])
    .await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("empty cluster only"),
        "{out:?}"
    );
    let keep = tempfile::tempdir().unwrap();
    let backup = keep.path().join("backup.json");
    std::fs::copy(&snap, &backup).unwrap();

    // Phase 5: with no replica reachable, the CLI gives up by its deadline with exit code 5.
    let dead = free_ports(2);
    let dead = format!("127.0.0.1:{},127.0.0.1:{}", dead[0], dead[1]);
    let out = gangway(&["jobs", "--addr", &dead, "--timeout", "1s"]).await;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    fleet.stop().await;
    drop(cluster);

    // Phase 6: the old cluster is gone; a new one restores the backup. The gang that ran is back
    // and is placed again from scratch (its lease from before the backup is not trusted).
    let mut fresh = TestCluster::start(1);
    fresh.wait_for_leader(None, Duration::from_secs(30)).await;
    let addr = fresh.addr(1);
    let out = gangway(&[
        "cluster",
        "snapshot",
        "restore",
        backup.to_str().unwrap(),
        "--addr",
        &addr,
        "-o",
        "json",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let restored = json(&out);
    assert_eq!(
        (restored["nodes"].as_u64(), restored["requeued"].as_u64()),
        (Some(2), Some(1)),
        "{restored}"
    );
    let jobs = json(&gangway(&["jobs", "--addr", &addr, "-o", "json"]).await);
    let job = item(&jobs, "jobs", "id", &id);
    // Pending, or already placed again on the restored (worker-less) nodes under a new epoch
    // past the jump: never under its old lease.
    match job["state"].as_str() {
        Some("pending") => {}
        Some("running") => assert!(job["lease_epoch"].as_u64().unwrap() > 1 << 32, "{job}"),
        other => panic!("restored job is {other:?}: {job}"),
    }
}

#[test]
fn gangway_dev_runs_its_demo_and_stops_cleanly() {
    let _serial = TestCluster::serial();
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(1)[0].clamp(20_000, 50_000);
    let out = std::process::Command::new(BIN)
        .args(["dev", "--smoke", "--base-port", &base.to_string(), "--dir"])
        .arg(dir.path())
        .output()
        .expect("run gangway dev");
    assert!(
        out.status.success(),
        "gangway dev --smoke failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("every placeable demo job is running and the trainer steps"),
        "{stdout}"
    );
    // The workers stopped their tasks on the way out: no trainer of this dev cluster survives.
    let trainer = dir.path().join("trainer.py").display().to_string();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&trainer))
        .collect();
    assert!(survivors.is_empty(), "left running: {survivors:?}");
    assert!(
        stdout.contains("pending"),
        "the too-big job stays pending: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_grow_shrink_and_hand_over_the_cluster_from_the_cli() {
    let mut cluster = TestCluster::start(3);
    let leader = cluster.wait_for_leader(None, Duration::from_secs(30)).await;
    let addrs = cluster.addrs().join(",");

    // Phase 1: a fourth replica starts with no initial cluster: it waits to be added.
    let ports = free_ports(2);
    let fourth = format!("127.0.0.1:{}", ports[0]);
    let data = cluster.dir.path().join("data-4");
    let log = std::fs::File::create(cluster.dir.path().join("replica-4.log")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["server", "--id", "4", "--listen", &fourth])
        .args(["--http", &format!("127.0.0.1:{}", ports[1])])
        .args(common::pki::pki().flags("server/4"))
        .args(["--admin", "client/admin"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    // Phase 2: add it as a voter; every replica sees four voters.
    let out = gangway(&[
        "cluster",
        "add-member",
        "--id",
        "4",
        "--address",
        &fourth,
        "--addr",
        &addrs,
    ])
    .await;
    assert!(out.status.success(), "{out:?}\n{}", cluster.logs());
    let cs = json(&gangway(&["cluster", "status", "--addr", &addrs, "-o", "json"]).await);
    let voters = cs["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .count();
    assert_eq!(voters, 4, "{cs}");

    // Phase 3: hand leadership to replica 4 and back to another one.
    let out = gangway(&["cluster", "transfer-leader", "--to", "4", "--addr", &addrs]).await;
    assert!(out.status.success(), "{out:?}");
    let s = status(&fourth).await.expect("replica 4 answers");
    assert_eq!((s.leader_id, s.role.as_str()), (4, "leader"));
    let all = format!("{addrs},{fourth}");
    let out = gangway(&[
        "cluster",
        "transfer-leader",
        "--to",
        &leader.to_string(),
        "--addr",
        &all,
    ])
    .await;
    assert!(out.status.success(), "{out:?}");

    // Phase 4: remove replica 4; the cluster is three voters again and still takes writes.
    let out = gangway(&["cluster", "remove-member", "--id", "4", "--addr", &all]).await;
    assert!(out.status.success(), "{out:?}");
    let cs = json(&gangway(&["cluster", "status", "--addr", &addrs, "-o", "json"]).await);
    let ids: Vec<u64> = cs["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3], "{cs}");
    let spec = cluster.dir.path().join("one.toml");
    std::fs::write(&spec, single("after-shrink", 1)).unwrap();
    let out = gangway(&["submit", spec.to_str().unwrap(), "--addr", &addrs]).await;
    assert!(out.status.success(), "{out:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// `THP_enabled` of a running `gangway ARGS...` (with `env` added), read once it has connected to
/// `silent` (a listener that accepts and never answers: the process is then in `main`, after the
/// constructor that decides), then the process is killed.
fn huge_pages_of(silent: &std::net::TcpListener, args: &[&str], env: &[(&str, &str)]) -> u32 {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn gangway");
    silent.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let connection = loop {
        match silent.accept() {
            Ok((conn, _)) => break Some(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let thp = thp_enabled(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        connection.is_some(),
        "gangway {args:?} did not connect within 10 s"
    );
    thp.unwrap_or_else(|| panic!("no THP_enabled for gangway {args:?}"))
}

#[test]
fn short_commands_and_the_agent_go_without_huge_pages() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let list = ["jobs", "--insecure", "--timeout", "30s", "--addr", &addr];
    assert_eq!(
        huge_pages_of(&silent, &list, &[]),
        0,
        "a client command turns them off"
    );
    assert_eq!(
        huge_pages_of(&silent, &list, &[("MIMALLOC_ALLOW_THP", "1")]),
        1,
        "MIMALLOC_ALLOW_THP is the operator's choice and wins"
    );

    // The agent too (its tasks get them back from their shim: e2e_worker's stale-directive story).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let checkpoints = dir.path().join("ck").display().to_string();
    let listen = format!("127.0.0.1:{}", free_ports(1)[0]);
    let agent = [
        "worker",
        "--insecure",
        "--servers",
        &addr,
        "--node",
        "n1",
        "--listen",
        &listen,
        "--fake-devices",
        "1xH100",
        "--data-dir",
        &data,
        "--checkpoint-dir",
        &checkpoints,
        "--task-user-same-as-agent",
    ];
    assert_eq!(
        huge_pages_of(&silent, &agent, &[]),
        0,
        "the agent turns them off for itself"
    );
}
