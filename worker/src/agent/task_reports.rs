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

/// Whether every report is about a task's state: acknowledged, such reports leave the saved
/// outbox with the next save (one sent again after a restart is a repeat the replicas settle),
/// where a health or checkpoint report sent again could undo what came after it.
pub fn only_task_reports(reports: &[PendingReport]) -> bool {
    reports
        .iter()
        .all(|r| matches!(r, PendingReport::Task { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state_file::{ReportedHealth, ReportedState};
    use crate::driver::TaskKey;

    #[test]
    fn only_a_batch_of_task_reports_waits_for_the_next_save() {
        let task = PendingReport::Task {
            key: TaskKey {
                job: "j".into(),
                task: 0,
                epoch: 1,
            },
            state: ReportedState::Succeeded,
            exit_code: Some(0),
            message: String::new(),
        };
        let health = PendingReport::DeviceHealth {
            uuid: "a".into(),
            health: ReportedHealth::Failed,
            cause: "XID 79".into(),
        };
        let checkpoint = PendingReport::Checkpoint {
            key: TaskKey {
                job: "j".into(),
                task: 0,
                epoch: 1,
            },
            request: 1,
            result: Err("no manifest".into()),
        };
        for (batch, want) in [
            (vec![task.clone()], true),
            (vec![task.clone(), task.clone()], true),
            (vec![task.clone(), health], false),
            (vec![checkpoint, task], false),
        ] {
            assert_eq!(only_task_reports(&batch), want, "{batch:?}");
        }
    }
}
