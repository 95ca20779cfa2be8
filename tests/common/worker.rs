//! `gangway worker` processes with fake devices for the end-to-end and chaos tests: a data
//! directory that survives restarts, a log file, the task shims it leaves behind, and the signals
//! tests send.

use super::{free_ports, BIN};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One host: a `gangway worker` agent with fake devices.
pub struct WorkerProcess {
    pub name: String,
    rack: String,
    port: u16,
    pub data: PathBuf,
    /// `--checkpoint-dir`: `dir/checkpoints`, shared by every worker of the test.
    pub checkpoints: PathBuf,
    pub log: PathBuf,
    servers: Vec<String>,
    /// `--fake-devices` (default `8xH100`).
    pub devices: &'static str,
    /// `--grace`: also how long before the lease deadline the task is stopped (at most a quarter
    /// of the lease). Default 1 s.
    pub grace: &'static str,
    /// Extra environment for the agent (and so for its tasks).
    pub env: Vec<(String, String)>,
    /// Who tasks run as: `--task-user-same-as-agent` unless a test isolates its tasks (e.g.
    /// `--task-uid-range A-B`, which needs root and a passable `dir`).
    pub task_users: Vec<String>,
    /// Extra flags for `gangway worker` (e.g. `--fake-fault-file PATH`).
    pub args: Vec<String>,
    /// Mutual TLS with `worker/<name>` of the test CA (default); false: plain TCP toward a
    /// scripted scheduler the test plays itself.
    pub tls: bool,
    child: Option<Child>,
}

impl WorkerProcess {
    /// A worker named `name` in `rack`, its files under `dir`, not started yet. Every worker of a
    /// test shares `dir/checkpoints`, as hosts share storage.
    pub fn new(dir: &Path, name: &str, rack: &str, servers: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            rack: rack.to_owned(),
            port: free_ports(1)[0],
            data: dir.join(format!("worker-{name}")),
            checkpoints: dir.join("checkpoints"),
            log: dir.join(format!("worker-{name}.log")),
            servers,
            devices: "8xH100",
            grace: "1s",
            env: Vec::new(),
            task_users: vec!["--task-user-same-as-agent".to_owned()],
            args: Vec::new(),
            tls: true,
            child: None,
        }
    }

    /// Starts (or restarts, on the same data directory) the agent.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open worker log");
        let child = Command::new(BIN)
            .arg("worker")
            .args(if self.tls {
                super::pki::pki().flags(&format!("worker/{}", self.name))
            } else {
                vec!["--insecure".to_owned()]
            })
            .arg("--servers")
            .arg(self.servers.join(","))
            .arg("--node")
            .arg(&self.name)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--advertise")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--fake-devices")
            .arg(self.devices)
            .arg("--topology")
            .arg(format!("dc=dc1,zone=z1,pod=p1,rack={}", self.rack))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--checkpoint-dir")
            .arg(&self.checkpoints)
            .arg("--grace")
            .arg(self.grace)
            .args(&self.task_users)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn gangway worker");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9 of the agent alone: its tasks run on under their shims.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The whole host dies at once: the agent, every shim and every task, all by SIGKILL.
    pub fn crash(&mut self) {
        self.kill_agent();
        kill_shims(&self.data);
    }

    /// What rank `task` of `job` printed on this host, across its leases.
    pub fn task_log(&self, job: &str, task: u32) -> String {
        std::fs::read_to_string(
            self.data
                .join("logs")
                .join(job)
                .join(format!("task-{task}.log")),
        )
        .unwrap_or_default()
    }

    /// Where the shim of rank `task` of `job` records how lease `epoch`'s run ended.
    pub fn exit_file(&self, job: &str, task: u32, epoch: u64) -> PathBuf {
        self.data
            .join("tasks")
            .join(job)
            .join(format!("task-{task}"))
            .join(format!("exit-{epoch}.json"))
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// SIGKILLs the process group of every task shim whose command line names `marker` (a worker's
/// data directory, or the whole test directory). Found through /proc rather than the agent's
/// state file: a shim launched just before its agent died may not be in the file yet. Only a
/// process that leads its own group is signalled as a group: pids are reused, and killing a
/// recycled process group could take down anything on the machine.
pub fn kill_shims(marker: &Path) {
    let marker = marker.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let shim =
            cmdline.contains("task-shim") || cmdline.contains(gangway_worker::driver::SHIM_BINARY);
        if !(shim && cmdline.contains(&marker)) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name: state, ppid, pgrp.
        let pgrp = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|s| s.parse::<u32>().ok());
        if pgrp == Some(pid) {
            // `--`: without it procps `kill -9 -11` reads "-11" as a signal and kills every
            // process (kill(-1)).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// Sends `signal` ("STOP", "CONT") to one process (never a group).
pub fn signal(pid: u32, signal: &str) {
    assert!(pid > 1, "refusing to signal pid {pid}");
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status();
}
