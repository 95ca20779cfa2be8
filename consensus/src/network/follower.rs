//! The follower's end of the replication stream: each append request handed to Raft and its reply
//! sent back, in order.
//!
//! The leader says in the stream's metadata how many requests it keeps awaiting replies (its
//! window, [`WINDOW_KEY`]). With one, the next request never comes before this reply has gone, so
//! the follower takes each request, waits for Raft to persist it and answers, all in the task that
//! sends the replies (one request in flight gains nothing from a second task). Otherwise (a wider
//! window, or a leader that does not say) openraft's own `Raft::stream_append` takes the requests:
//! a task of its own feeds Raft the next request while an earlier one is being persisted.
//!
//! Either way the stream ends after the first reply that is not a success (a conflict, a newer
//! vote, or Raft stopped), as openraft's does: the leader opens a new one from where it stands.

use std::num::NonZeroU32;

use futures::stream::BoxStream;
use futures::Stream;
use futures::StreamExt;
use openraft::errors::Fatal;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::StreamAppendResult;

use crate::types::RaftOf;
use crate::types::TypeConfig;

/// Metadata of a `StreamAppend` stream: the leader's window, requests awaiting replies at once.
pub(crate) const WINDOW_KEY: &str = "x-gangway-raft-window";

/// One reply as Raft gives it: persisted up to a log id, refused, or Raft is gone.
pub(crate) type AppendReply = Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>;

/// The window a stream's leader declared, if it declared a valid one.
pub(crate) fn window<T>(req: &tonic::Request<T>) -> Option<NonZeroU32> {
    super::transport::tag(req, WINDOW_KEY)
}

/// Tags a stream's request with the leader's window.
pub(crate) fn declare_window<T>(req: &mut tonic::Request<T>, window: NonZeroU32) {
    req.metadata_mut().insert(
        WINDOW_KEY,
        tonic::metadata::MetadataValue::from(window.get()),
    );
}

/// The replies to `requests`, in order, for a leader with `window` requests in flight.
pub(crate) fn replies<A, S>(
    raft: RaftOf<A>,
    requests: S,
    window: Option<NonZeroU32>,
) -> BoxStream<'static, AppendReply>
where
    A: crate::app::StateMachine,
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static,
{
    if window == Some(NonZeroU32::MIN) {
        one_at_a_time(raft, requests).boxed()
    } else {
        raft.stream_append(requests).boxed()
    }
}

/// Each request persisted and answered before the next is read.
fn one_at_a_time<A, S>(raft: RaftOf<A>, requests: S) -> impl Stream<Item = AppendReply>
where
    A: crate::app::StateMachine,
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + 'static,
{
    answer_until_refused(requests, move |rpc| {
        let raft = raft.clone();
        async move {
            let prev = rpc.prev_log_id;
            let last = rpc.entries.last().map(|e| e.log_id).or(prev);
            let resp = raft
                .append_entries(rpc)
                .await
                .map_err(|e| e.unwrap_fatal())?;
            Ok(resp.into_stream_result(prev, last))
        }
    })
}

/// `answer` applied to each request in turn, the next read only once the last is answered; after
/// the first answer that is not a success nothing more is read.
fn answer_until_refused<R, S, F, Fut>(requests: S, answer: F) -> impl Stream<Item = AppendReply>
where
    S: Stream<Item = R> + Send + 'static,
    F: FnMut(R) -> Fut,
    Fut: std::future::Future<Output = AppendReply>,
{
    let requests = Box::pin(requests);
    futures::stream::unfold(Some((requests, answer)), |state| async move {
        let (mut requests, mut answer) = state?;
        let reply = answer(requests.next().await?).await;
        let go_on = matches!(reply, Ok(Ok(_)));
        Some((reply, go_on.then_some((requests, answer))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(index: u64) -> crate::types::LogId {
        let leader = openraft::impls::leader_id_adv::LeaderId {
            term: 1,
            node_id: 1,
        };
        crate::types::LogId::new(leader, index)
    }

    #[test]
    fn a_leader_declares_its_window_and_the_follower_reads_it() {
        let mut req = tonic::Request::new(());
        assert_eq!(window(&req), None, "an older leader says nothing");
        declare_window(&mut req, NonZeroU32::new(4).unwrap());
        assert_eq!(window(&req), NonZeroU32::new(4));
        let mut bad = tonic::Request::new(());
        bad.metadata_mut()
            .insert(WINDOW_KEY, tonic::metadata::MetadataValue::from_static("0"));
        assert_eq!(window(&bad), None, "a zero window is no window");
    }

    #[tokio::test]
    async fn after_the_first_reply_that_is_not_a_success_no_request_is_read() {
        use openraft::raft::StreamAppendError;
        let ok = |i| -> AppendReply { Ok(Ok(Some(log_id(i)))) };
        let conflict: AppendReply = Ok(Err(StreamAppendError::Conflict(log_id(2))));
        let newer: AppendReply = Ok(Err(StreamAppendError::HigherVote(crate::types::Vote::new(
            2, 3,
        ))));
        // Raft's answers, one per request in turn, and how many requests are read.
        let table: Vec<(Vec<AppendReply>, usize)> = vec![
            (vec![ok(1), ok(2), ok(3)], 3),
            (vec![ok(1), conflict.clone(), ok(3)], 2),
            (vec![conflict, ok(2)], 1),
            (vec![newer, ok(2)], 1),
            (vec![ok(1), Err(Fatal::Stopped), ok(3)], 2),
            (vec![], 0),
        ];
        for (answers, read) in table {
            let want = format!("{:?}", &answers[..read]);
            let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = taken.clone();
            let requests = futures::stream::iter(0..answers.len()).inspect(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            let mut answers = answers.into_iter();
            let got: Vec<_> = answer_until_refused(requests, |_| {
                futures::future::ready(answers.next().unwrap())
            })
            .collect()
            .await;
            assert_eq!(format!("{got:?}"), want);
            assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), read);
        }
    }
}
