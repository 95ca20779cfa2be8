//! The container deployment, end to end: the image `deploy/image/build-image.sh` assembles from this
//! build's binary, brought up with `deploy/compose/docker-compose.yml` (three replicas, two workers
//! with fake GPUs), a gang running in the worker containers, and the leader cut off the network with
//! `docker network disconnect`. A new leader must take over with the gang's lease unchanged, and the
//! cut-off replica must rejoin and catch up on what was written while it was away.
//!
//! Needs a Docker engine and compose (`docker compose` or `docker-compose`); without them the test
//! says so and passes. It publishes no fixed host port (the compose file's ports are set to 0) and
//! talks to the replicas at their container addresses, so it runs beside other tests and clusters.

mod common;

use common::{client, local, local_leases, status, submit};
use gangway_proto::pb;
use std::future::Future;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A Docker command that must not hang the test: killed after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after {limit:?}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    child.wait_with_output().map_err(|e| format!("{what}: {e}"))
}

/// Stdout of a command that must succeed.
fn run_ok(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let out = run(cmd, limit)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn docker(args: &[&str]) -> Result<String, String> {
    run_ok(Command::new("docker").args(args), Duration::from_secs(60))
}

/// Why this machine cannot run the test, if it cannot.
fn missing_docker() -> Option<String> {
    match run(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(20),
    ) {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(e),
    }
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever answers.
fn compose_command() -> Option<Vec<&'static str>> {
    [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|c| {
            run(
                Command::new(c[0]).args(&c[1..]).arg("version"),
                Duration::from_secs(20),
            )
            .is_ok_and(|o| o.status.success())
        })
}

/// The image for this build, built (or found up to date) by the deployment's own script. Each
/// binary gets its own tag, so runs of different builds side by side do not swap images.
fn build_image() -> Result<String, String> {
    // Images of earlier builds pile up otherwise. Only those no container uses and older than an
    // hour go, so a run beside this one keeps its image. Pruned before this build's image is
    // looked for: afterwards, an image of this same binary built over an hour ago (found up to
    // date) would go too, just before its use.
    let _ = docker(&[
        "image",
        "prune",
        "-a",
        "-f",
        "--filter",
        &format!("label={E2E_LABEL}"),
        "--filter",
        "until=1h",
    ]);
    let out = run_ok(
        Command::new("bash")
            .arg(format!("{ROOT}/deploy/image/build-image.sh"))
            .args(["--binary", common::BIN, "--tag", "gangway:e2e-{hash}"])
            .args(["--label", E2E_LABEL]),
        Duration::from_secs(300),
    )?;
    out.lines()
        .last()
        .map(str::to_owned)
        .ok_or_else(|| "build-image.sh printed no tag".to_owned())
}

/// Marks the images this test builds.
const E2E_LABEL: &str = "org.gangway.e2e=1";

/// One compose project: its own network, volumes and containers. Dropping it runs `down -v`.
struct Project {
    compose: Vec<&'static str>,
    name: String,
    image: String,
}

impl Project {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.name, "-f"])
            .arg(format!("{ROOT}/deploy/compose/docker-compose.yml"))
            .args(args)
            .env("GANGWAY_IMAGE", &self.image)
            // A free host port each: other tests and `make dev` use 7101 and 8101.
            .env("GANGWAY_GRPC_PORT", "0")
            .env("GANGWAY_HTTP_PORT", "0");
        c
    }

    fn compose(&self, args: &[&str]) -> Result<String, String> {
        run_ok(&mut self.command(args), Duration::from_secs(120))
    }

    fn container(&self, service: &str) -> String {
        self.compose(&["ps", "-q", service])
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// Compose names the network `<project>_<network>` (v1 and v2 alike).
    fn network(&self) -> String {
        format!("{}_gangway", self.name)
    }

    /// The container's address on the project's network ("" while disconnected).
    fn ip(&self, container: &str) -> String {
        docker(&[
            "inspect",
            "-f",
            &format!(
                "{{{{with index .NetworkSettings.Networks \"{}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}",
                self.network()
            ),
            container,
        ])
        .unwrap_or_else(|e| self.fail(&e))
    }

    fn health(&self, container: &str) -> String {
        docker(&["inspect", "-f", "{{.State.Health.Status}}", container]).unwrap_or_default()
    }

    fn logs(&self) -> String {
        match run(
            &mut self.command(&["logs", "--no-color", "--tail", "40"]),
            Duration::from_secs(30),
        ) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => e,
        }
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n--- compose logs ---\n{}", self.logs())
    }

    /// Polls `probe` until it yields a value; fails with the containers' logs after `limit`.
    async fn wait<T, F, Fut>(&self, limit: Duration, what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let until = Instant::now() + limit;
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            if Instant::now() > until {
                self.fail(&format!("timed out after {limit:?} waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- compose logs ---\n{}", self.logs());
        }
        if let Err(e) = run(
            &mut self.command(&["down", "-v", "--remove-orphans", "-t", "2"]),
            Duration::from_secs(120),
        ) {
            eprintln!("compose down failed: {e}");
        }
    }
}

/// A replica seen from the host: its container and its gRPC address on the project network.
struct Replica {
    id: u64,
    container: String,
    addr: String,
}

const GANG: &str = r#"name = "gang-2x8"
tasks = 2
command = ["sleep", "3600"]
[resources]
devices = 8
kind = "gpu"
[topology]
required = "pod"
"#;

const AFTER: &str = r#"name = "written-during-partition"
command = ["sleep", "3600"]
[resources]
devices = 1
"#;

async fn job(addr: &str, id: &str) -> Option<pb::JobDetail> {
    let mut c = client(addr).await?;
    c.get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The leader as every listed replica reports it, once they agree and it says so itself.
async fn agreed_leader(replicas: &[&Replica]) -> Option<u64> {
    let mut leader = None;
    for r in replicas {
        let s = status(&r.addr).await?;
        if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
            return None;
        }
        leader = Some(s.leader_id);
    }
    let l = leader?;
    let me = replicas.iter().find(|r| r.id == l)?;
    (status(&me.addr).await?.role == "leader").then_some(l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_survives_its_leader_cut_off_the_network() {
    if let Some(why) = missing_docker() {
        eprintln!("skipped: no Docker engine ({why})");
        return;
    }
    let Some(compose) = compose_command() else {
        eprintln!(
            "skipped: no Docker compose (neither `docker compose` nor `docker-compose` runs)"
        );
        return;
    };

    // Phase 1: the image from this build's binary (the script skips the import when the binary
    // is unchanged), and the compose project under a name no other run uses.
    let image = build_image().unwrap_or_else(|e| panic!("building the image: {e}"));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let project = Project {
        compose,
        name: format!("gangwaye2e{}x{nanos}", std::process::id()),
        image,
    };
    project
        .compose(&["up", "-d"])
        .unwrap_or_else(|e| project.fail(&e));

    // Phase 2: Docker's own health checks (`gangway health ... /readyz` inside each replica)
    // turn healthy, which needs a leader, and all three agree on it.
    let replicas: Vec<Replica> = (1..=3)
        .map(|id| {
            let container = project.container(&format!("replica-{id}"));
            let addr = format!("{}:7101", project.ip(&container));
            Replica {
                id,
                container,
                addr,
            }
        })
        .collect();
    project
        .wait(Duration::from_secs(60), "three healthy replicas", || {
            let healthy = replicas
                .iter()
                .all(|r| project.health(&r.container) == "healthy");
            async move { healthy.then_some(()) }
        })
        .await;
    // The cluster's CA and client/admin certificate, as the compose file's pki service made them:
    // the test speaks to the replicas with them.
    let tls = tempfile::tempdir().unwrap();
    docker(&[
        "cp",
        &format!("{}:/etc/gangway/tls/.", replicas[0].container),
        &tls.path().display().to_string(),
    ])
    .unwrap_or_else(|e| project.fail(&e));
    common::pki::speak_as(gangway_tls::TlsFiles::in_dir(tls.path(), "client-admin"));
    let all: Vec<&Replica> = replicas.iter().collect();
    let leader = project
        .wait(Duration::from_secs(30), "an agreed leader", || {
            agreed_leader(&all)
        })
        .await;
    let by_id = |id: u64| &replicas[id as usize - 1];
    let leader_addr = by_id(leader).addr.clone();

    // Phase 3: both workers registered their fake GPUs, and a 2x8 gang runs across them: each rank
    // is a real process (`sleep`, from the image) started by the agent in its container.
    project
        .wait(Duration::from_secs(30), "two ready workers", || {
            let addr = leader_addr.clone();
            async move {
                let mut c = client(&addr).await?;
                let nodes = c
                    .list_nodes(pb::PageRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
            }
        })
        .await;
    let gang = submit(&leader_addr, GANG, "gang")
        .await
        .unwrap_or_else(|e| project.fail(&format!("submit the gang: {e}")))
        .job_id;
    project
        .wait(Duration::from_secs(30), "both ranks running", || {
            let (addr, gang) = (leader_addr.clone(), gang.clone());
            async move {
                let d = job(&addr, &gang).await?;
                (d.tasks.len() == 2 && d.tasks.iter().all(|t| t.state().word() == "running"))
                    .then_some(())
            }
        })
        .await;
    let leases = local_leases(&leader_addr)
        .await
        .unwrap_or_else(|| project.fail("reading the leases"));
    assert_eq!(leases.len(), 1, "{leases:?}");
    let mut hosts = leases[0].2.clone();
    hosts.sort();
    assert_eq!(hosts, ["worker-1", "worker-2"], "{leases:?}");

    // Phase 4: the leader loses its network. The other two elect a new leader, which holds the
    // gang's lease exactly as it was (same epoch, same hosts): a failover re-leases nothing.
    let old = by_id(leader);
    docker(&["network", "disconnect", &project.network(), &old.container])
        .unwrap_or_else(|e| project.fail(&e));
    let others: Vec<&Replica> = replicas.iter().filter(|r| r.id != leader).collect();
    let new_leader = project
        .wait(Duration::from_secs(30), "a new leader", || {
            agreed_leader(&others)
        })
        .await;
    assert_ne!(new_leader, leader);
    let new = by_id(new_leader);
    assert_eq!(
        local_leases(&new.addr).await,
        Some(leases.clone()),
        "the new leader's leases differ from the old leader's"
    );
    let d = job(&new.addr, &gang)
        .await
        .unwrap_or_else(|| project.fail("reading the gang on the new leader"));
    assert_eq!(
        d.summary.as_ref().map(|s| s.state().word()),
        Some("running")
    );

    // Phase 5: the majority keeps accepting writes while the old leader is away.
    let after = submit(&new.addr, AFTER, "after")
        .await
        .unwrap_or_else(|e| project.fail(&format!("submit on the new leader: {e}")))
        .job_id;
    let committed = status(&new.addr)
        .await
        .unwrap_or_else(|| project.fail("status of the new leader"))
        .commit_index;

    // Phase 6: back on the network (under its service name, which the others dial), the old
    // leader follows the new one, applies what it missed, and its own state, read locally, has
    // both jobs and the unchanged lease.
    docker(&[
        "network",
        "connect",
        "--alias",
        &format!("replica-{leader}"),
        &project.network(),
        &old.container,
    ])
    .unwrap_or_else(|e| project.fail(&e));
    let rejoined = format!("{}:7101", project.ip(&old.container));
    project
        .wait(
            Duration::from_secs(30),
            "the old leader to follow and catch up",
            || {
                let addr = rejoined.clone();
                async move {
                    let s = status(&addr).await?;
                    (s.leader_id == new_leader && s.applied_index >= committed).then_some(())
                }
            },
        )
        .await;
    let mut c = client(&rejoined)
        .await
        .unwrap_or_else(|| project.fail("connecting to the rejoined replica"));
    let mut ids: Vec<String> = c
        .list_jobs(local(pb::ListJobsRequest::default()))
        .await
        .unwrap_or_else(|e| project.fail(&format!("local job list: {e}")))
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    ids.sort();
    let mut want = vec![gang.clone(), after.clone()];
    want.sort();
    assert_eq!(ids, want, "the rejoined replica's jobs");
    assert_eq!(
        local_leases(&rejoined).await,
        Some(leases),
        "the rejoined replica's leases"
    );
}
