//! What the agent tells the replicas about its tasks: one queued report as the worker API's
//! message, and how many go in one request (`ReportTaskStatuses`).

use super::state_file::PendingReport;
use gangway_proto::pb;

/// The most task reports one request carries: the replicas' bound (`MAX_BATCH_REPORTS` in the
/// state machine); a longer queue goes in several requests, in order.
pub const MAX_REPORTS_PER_REQUEST: usize = 256;

/// The message of a queued task report (`None` for a report about something else).
pub fn task_status_report(node: &str, report: &PendingReport) -> Option<pb::TaskStatusReport> {
    let PendingReport::Task {
        key,
        state,
        exit_code,
        message,
    } = report
    else {
        return None;
    };
    Some(pb::TaskStatusReport {
        node: node.to_owned(),
        job_id: key.job.clone(),
        task: key.task,
        epoch: key.epoch,
        state: state.to_pb().into(),
        has_exit_code: exit_code.is_some(),
        exit_code: exit_code.unwrap_or(0),
        message: message.clone(),
    })
}
