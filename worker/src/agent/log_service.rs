//! The agent API: task logs, read (and followed) over gRPC by `gangway logs`.

use crate::driver::TaskDriver;
use gangway_proto::pb;
use gangway_proto::pb::agent_api_server::AgentApi;
use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for growth.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub struct LogService {
    driver: Arc<TaskDriver>,
}

impl LogService {
    pub fn new(driver: Arc<TaskDriver>) -> Self {
        Self { driver }
    }
}

/// A job id as the scheduler makes them: it becomes a path component, so nothing else passes.
fn check_job_id(id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "field `job_id`: expected a job id (letters, digits, '-', '_', '.'), got {id:?}"
        )))
    }
}

/// Reads from `offset` to the end of the file (at most `CHUNK` per item) into the channel.
fn read_from(
    path: &std::path::Path,
    offset: &mut u64,
    tx: &mpsc::Sender<Result<pb::LogChunk, Status>>,
) -> Result<bool, std::io::Error> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        *offset += n as u64;
        if tx
            .blocking_send(Ok(pb::LogChunk {
                data: buf[..n].to_vec(),
            }))
            .is_err()
        {
            return Ok(false);
        }
    }
}

#[tonic::async_trait]
impl AgentApi for LogService {
    type ReadLogStream = Pin<Box<dyn futures::Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

    async fn read_log(
        &self,
        req: Request<pb::ReadLogRequest>,
    ) -> Result<Response<Self::ReadLogStream>, Status> {
        let req = req.into_inner();
        check_job_id(&req.job_id)?;
        let path = self.driver.log_path(&req.job_id, req.task);
        if !path.exists() {
            return Err(Status::not_found(format!(
                "no log for task {} of job {} on this host",
                req.task, req.job_id
            )));
        }
        let (tx, rx) = mpsc::channel(8);
        let follow = req.follow;
        let mut offset = req.offset;
        tokio::task::spawn_blocking(move || loop {
            match read_from(&path, &mut offset, &tx) {
                Ok(true) if follow => std::thread::sleep(FOLLOW_POLL),
                Ok(_) => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::internal(format!(
                        "reading {}: {e}",
                        path.display()
                    ))));
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_that_could_escape_the_log_directory_are_refused() {
        for bad in ["", "../etc", "a/b", ".hidden", "x y"] {
            let err = check_job_id(bad).unwrap_err();
            assert!(err.message().contains("field `job_id`"), "{bad}: {err}");
        }
        check_job_id("train-12").unwrap();
    }
}
