//! `gangway logs JOB [--task N] [--follow]`: a task's output, read from the agent of the host it
//! ran on (the scheduler says which host; the host's agent serves the file).

use super::common::ClientOpts;
use crate::client::ClientError;
use clap::Args;
use gangway_proto::pb;
use gangway_proto::pb::agent_api_client::AgentApiClient;
use std::io::Write;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The job id.
    pub job: String,
    /// Which task (rank).
    #[arg(long, default_value_t = 0)]
    pub task: u32,
    /// Keep printing what the task writes until the job ends (or Ctrl-C).
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// The host that runs (or last ran) task `task` of the job.
fn task_host(detail: &pb::JobDetail, task: u32) -> Option<String> {
    detail
        .tasks
        .iter()
        .find(|t| t.index == task)
        .map(|t| t.host.clone())
        .or_else(|| detail.last_hosts.get(task as usize).cloned())
        .filter(|h| !h.is_empty())
}

pub async fn logs(args: LogsArgs) -> Result<(), ClientError> {
    let mut client = args.opts.client();
    let detail = client.get_job(&args.job).await?;
    let Some(host) = task_host(&detail, args.task) else {
        let tasks = detail.summary.as_ref().map_or(0, |s| s.tasks);
        return Err(if args.task >= tasks && tasks > 0 {
            ClientError::Usage(format!(
                "--task: job {} has tasks 0..{}, not {}",
                args.job,
                tasks - 1,
                args.task
            ))
        } else {
            ClientError::Other(format!(
                "task {} of job {} has not run anywhere yet",
                args.task, args.job
            ))
        });
    };
    let nodes = client.list_nodes().await?;
    let Some(node) = nodes.iter().find(|n| n.name == host) else {
        return Err(ClientError::Other(format!(
            "host {host} (where task {} ran) is not registered",
            args.task
        )));
    };
    let uri = format!("http://{}", node.address);
    let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| ClientError::Other(format!("bad agent address {uri}: {e}")))?
        .connect_timeout(Duration::from_secs(3));
    // The agent must prove it is that host's agent.
    let expect = gangway_tls::Identity::new(gangway_tls::Kind::Worker, &host)
        .map(gangway_tls::Expect::Exactly)
        .map_err(|e| ClientError::Other(format!("host name {host:?}: {e}")))?;
    let creds = crate::client::credentials::current();
    let dialer = creds
        .dialer
        .expecting(expect)
        .map_err(|e| ClientError::Other(e.to_string()))?;
    let channel = dialer.connect(&endpoint).await.map_err(|e| {
        ClientError::Other(format!(
            "cannot reach the agent of {host} at {}: {e}",
            node.address
        ))
    })?;
    let mut agent = AgentApiClient::new(channel);
    let mut stream = agent
        .read_log(pb::ReadLogRequest {
            job_id: args.job.clone(),
            task: args.task,
            offset: 0,
            follow: args.follow,
        })
        .await
        .map_err(|s| ClientError::Other(format!("{host}: {}", s.message())))?
        .into_inner();
    let mut out = std::io::stdout();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let mut ending: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            chunk = stream.message() => match chunk {
                Ok(Some(c)) => {
                    let _ = out.write_all(&c.data);
                    let _ = out.flush();
                }
                Ok(None) => return Ok(()),
                Err(s) => return Err(ClientError::Other(format!("{host}: {}", s.message()))),
            },
            _ = poll.tick(), if args.follow => {
                if let Some(t) = ending {
                    if tokio::time::Instant::now() >= t {
                        return Ok(());
                    }
                    continue;
                }
                // Stop following once the job has ended, after what it wrote last arrives.
                if let Ok(d) = client.get_job(&args.job).await {
                    if d.summary.as_ref().is_some_and(|s| s.state().is_terminal()) {
                        ending = Some(tokio::time::Instant::now() + Duration::from_millis(600));
                    }
                }
            }
        }
    }
}
