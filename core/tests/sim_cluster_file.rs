//! The CLUSTER TOML: the shipped Philly file, and field-path errors for bad input.

use gangway_core::engine::{DeviceKind, TopologyLevel};
use gangway_core::sim::philly::{load_vc_nodes, proportional_quotas};
use gangway_core::sim::{SimCluster, SimError};
use gangway_proto::ids::QueueName;
use std::path::{Path, PathBuf};

const GOOD: &str = r#"
name = "t"

[[models]]
name = "g"
kind = "gpu"

[layout]
hosts_per_rack = 2
racks_per_pod = 2

[[host_groups]]
count = 3
devices = 8
model = "g"
nvlink_domains = 2

[[host_groups]]
count = 1
devices = 4
model = "g"

[[queues]]
name = "a"
guaranteed_devices = 20

[scheduler]
preemption = false
min_runtime_s = 60
max_gangs_per_round = 50

[replay]
tick_s = 30
default_queue = "a"
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn parses_hosts_racks_queues_and_settings() {
    let c = SimCluster::parse(GOOD, Path::new("good.toml")).unwrap();
    assert_eq!(c.hosts.len(), 4);
    assert_eq!(c.total_devices(DeviceKind::Gpu), 28);
    assert_eq!(c.hosts[1].topology.rack, c.hosts[0].topology.rack);
    assert_ne!(c.hosts[2].topology.rack, c.hosts[1].topology.rack);
    assert_eq!(c.hosts[3].topology.pod, c.hosts[0].topology.pod);
    assert_eq!(c.hosts[0].devices[3].nvlink_domain, 0);
    assert_eq!(c.hosts[0].devices[4].nvlink_domain, 1);
    assert_eq!(c.queues[&QueueName::new("a")].guaranteed_milli, 20_000);
    assert!(!c.scheduler.preemption);
    assert_eq!(c.scheduler.min_runtime_ms, 60_000);
    assert_eq!(c.scheduler.max_gangs_per_round, 50);
    assert_eq!(c.replay.tick_ms, 30_000);
    assert_eq!(c.replay.default_queue, Some(QueueName::new("a")));
    let state = c.build_state();
    assert_eq!(state.hosts().len(), 4);
    assert_eq!(
        SimCluster::domain_of(&c.hosts[0], TopologyLevel::Rack),
        SimCluster::domain_of(&c.hosts[1], TopologyLevel::Rack)
    );
}

fn field_error(text: &str) -> (String, String) {
    match SimCluster::parse(text, Path::new("bad.toml")) {
        Err(SimError::Field { field, message, .. }) => (field, message),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn bad_fields_are_named_by_path() {
    let cases: [(&str, &str, &str, &str); 9] = [
        (
            "name = \"t\"",
            "name = \"t\"\nbogus = 1",
            "bogus",
            "unknown field",
        ),
        (
            "racks_per_pod = 2",
            "racks_per_pod = 2\nhosts_per_pod = 3",
            "layout.hosts_per_pod",
            "unknown field",
        ),
        (
            "count = 1\n",
            "count = 1\nspeed = 3\n",
            "host_groups[1].speed",
            "unknown field",
        ),
        (
            "count = 3",
            "count = \"three\"",
            "host_groups[0].count",
            "positive integer",
        ),
        (
            "count = 3",
            "count = 0",
            "host_groups[0].count",
            "positive integer",
        ),
        (
            "hosts_per_rack = 2\n",
            "",
            "layout.hosts_per_rack",
            "missing",
        ),
        (
            "model = \"g\"\nnvlink_domains = 2",
            "model = \"h\"\nnvlink_domains = 2",
            "host_groups[0].model",
            "unknown model",
        ),
        (
            "default_queue = \"a\"",
            "default_queue = \"zz\"",
            "replay.default_queue",
            "not in",
        ),
        (
            "preemption = false",
            "preemption = \"no\"",
            "scheduler.preemption",
            "true or false",
        ),
    ];
    for (from, to, field, msg) in cases {
        assert!(GOOD.contains(from), "test case {from:?} does not apply");
        let text = GOOD.replacen(from, to, 1);
        let (f, m) = field_error(&text);
        assert_eq!(f, field, "for {to:?}: {m}");
        assert!(m.contains(msg), "for {to:?}: {f}: {m}");
    }
}

#[test]
fn error_message_names_file_and_field() {
    let text = GOOD.replacen("kind = \"gpu\"", "kind = \"fpga\"", 1);
    let err = SimCluster::parse(&text, Path::new("bad.toml")).unwrap_err();
    let s = err.to_string();
    assert!(s.starts_with("bad.toml: models[0].kind: expected"), "{s}");
}

#[test]
fn syntax_errors_are_reported() {
    let err = SimCluster::parse("[[models]\nname=", Path::new("bad.toml")).unwrap_err();
    assert!(matches!(err, SimError::TomlSyntax { .. }), "{err:?}");
    assert!(err.to_string().starts_with("bad.toml: "));
}

#[test]
fn shipped_philly_cluster_matches_the_machine_list_and_vc_shares() {
    let path = repo_root().join("deploy/sim/philly-cluster.toml");
    let c = SimCluster::load(&path).unwrap();
    assert_eq!(c.total_devices(DeviceKind::Gpu), 3205);
    assert_eq!(c.hosts.len(), 401);
    let guaranteed: u64 = c.queues.values().map(|q| q.guaranteed_milli / 1000).sum();
    assert_eq!(guaranteed, 3205);
    let vc = repo_root().join("../shared/traces/philly/philly_vc_nodes_helios.csv");
    if !vc.exists() {
        println!("skipping the VC share check: {} is absent", vc.display());
        return;
    }
    let shares = proportional_quotas(3205, &load_vc_nodes(&vc).unwrap());
    for (name, gpus) in shares {
        let q = &c.queues[&QueueName::new(name.clone())];
        assert_eq!(q.guaranteed_milli, gpus * 1000, "queue {name}");
    }
}
