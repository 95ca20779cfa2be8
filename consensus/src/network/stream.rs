//! The replication stream from a leader to one follower: one gRPC bidirectional stream
//! (`StreamAppend`), held open, on which the leader sends AppendEntries requests, up to
//! [`Pace::in_flight`] of them awaiting replies, and the follower answers each, in order, once it is
//! persisted. The next request is taken from openraft only when the window has room, so it carries
//! every entry submitted meanwhile (with one in flight: one request per round trip, as many entries
//! as came).
//!
//! Two things a unary call gets for free are kept here per message: a deadline (a reply owed and not
//! come within `reply_timeout` ends the stream, so a follower that stops answering is noticed as it
//! was with one call at a time; an idle stream, owing nothing, has no deadline), and the injected
//! faults (each request asks the `from -> to` link, each reply the `to -> from` link; a lost message
//! ends the stream, as a broken connection would, and openraft opens a new one after its backoff).

use std::num::NonZeroU32;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::sync::watch;

use super::transport::lost_reply;
use super::transport::lost_request;
use super::transport::status_error;
use super::transport::tagged;
use super::transport::CallError;
use super::transport::Transport;
use crate::pb;
use crate::types::NodeId;

/// The two ends of one stream's link, and what each side tells the other.
#[derive(Clone)]
struct Link {
    transport: Transport,
    from: NodeId,
    to: NodeId,
    /// How many requests may await their replies at once.
    in_flight: u64,
    /// How many requests have left (set by the request side, read by the reply side).
    sent: Arc<watch::Sender<u64>>,
    /// How many replies have come (set by the reply side, read by the request side).
    received: Arc<watch::Sender<u64>>,
    /// Whether the request side stopped because the injector lost a request.
    dropped: Arc<AtomicBool>,
}

impl Link {
    /// Waits until fewer than `in_flight` requests await replies. Only then is the next request
    /// taken from openraft, so it carries every entry submitted while the window was full.
    async fn window_open(&self) {
        let sent = *self.sent.borrow();
        let mut received = self.received.subscribe();
        let _ = received
            .wait_for(|r| sent.saturating_sub(*r) < self.in_flight)
            .await;
    }

    /// The next request to send: `None` ends the requests (openraft's stream ended, or the injector
    /// lost this one).
    async fn next_request(
        &self,
        requests: &mut (impl Stream<Item = pb::RaftPayload> + Unpin),
    ) -> Option<pb::RaftPayload> {
        self.window_open().await;
        let msg = requests.next().await?;
        if !self.transport.gate(self.from, self.to).await {
            self.dropped.store(true, Ordering::Release);
            return None;
        }
        self.sent.send_modify(|n| *n += 1);
        Some(msg)
    }
}

/// How a stream paces itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// A reply owed and not come within this ends the stream.
    pub reply_timeout: Duration,
    /// How many requests may await their replies at once.
    pub in_flight: NonZeroU32,
}

/// Opens the stream to `to` at `addr` and returns its replies. `requests` are sent as they come,
/// up to `pace.in_flight` of them unanswered; the reply stream yields one reply per request, in
/// order, then ends (after an error item if the stream broke, timed out or lost a message).
pub(crate) async fn open(
    transport: &Transport,
    (from, to): (NodeId, NodeId),
    addr: &str,
    pace: Pace,
    requests: impl Stream<Item = pb::RaftPayload> + Send + Unpin + 'static,
) -> Result<impl Stream<Item = Result<pb::RaftPayload, CallError>> + Send + 'static, CallError> {
    let reply_timeout = pace.reply_timeout;
    let mut client = transport.client(addr)?;
    let link = Link {
        transport: transport.clone(),
        from,
        to,
        in_flight: u64::from(pace.in_flight.get()),
        sent: Arc::new(watch::channel(0u64).0),
        received: Arc::new(watch::channel(0u64).0),
        dropped: Arc::new(AtomicBool::new(false)),
    };
    // The requests end when the replies are dropped (openraft ended the session, or the replica
    // stopped): else the HTTP/2 stream would stay open on this side, and with it openraft's
    // request stream and the log reader it holds (the log store's lock, for a restart).
    let (replies_held, replies_dropped) = oneshot::channel::<()>();
    let outgoing = futures::stream::unfold(
        (requests, link.clone()),
        |(mut requests, link)| async move {
            let msg = link.next_request(&mut requests).await?;
            Some((msg, (requests, link)))
        },
    )
    .take_until(replies_dropped);
    let mut request = tagged(from, outgoing);
    super::follower::declare_window(&mut request, pace.in_flight);
    let opened = tokio::time::timeout(reply_timeout, client.stream_append(request))
        .await
        .map_err(|_| CallError::Timeout(reply_timeout))?
        .map_err(status_error)?;
    let replies = Replies {
        _held: replies_held,
        replies: opened.into_inner(),
        sent: link.sent.subscribe(),
        reply_timeout,
        link,
    };
    Ok(futures::stream::unfold(Some(replies), |state| async move {
        let mut state = state?;
        match state.next().await {
            Some(Ok(msg)) => Some((Ok(msg), Some(state))),
            Some(Err(e)) => Some((Err(e), None)),
            None => None,
        }
    }))
}

/// The reply side of one stream.
struct Replies {
    /// Dropped with the replies, which ends the requests.
    _held: oneshot::Sender<()>,
    replies: tonic::Streaming<pb::RaftPayload>,
    sent: watch::Receiver<u64>,
    reply_timeout: Duration,
    link: Link,
}

impl Replies {
    /// The next reply; `None` when the stream ended cleanly.
    async fn next(&mut self) -> Option<Result<pb::RaftPayload, CallError>> {
        let (from, to) = (self.link.from, self.link.to);
        let next = loop {
            let owed = *self.sent.borrow_and_update() > *self.link.received.borrow();
            if owed {
                match tokio::time::timeout(self.reply_timeout, self.replies.next()).await {
                    Ok(next) => break next,
                    Err(_) => return Some(Err(CallError::Timeout(self.reply_timeout))),
                }
            }
            // Every reply owed is in: a lost request ends the stream here.
            if self.link.dropped.load(Ordering::Acquire) {
                return Some(Err(lost_request(from, to)));
            }
            tokio::select! {
                next = self.replies.next() => break next,
                more = self.sent.changed() => {
                    if more.is_err() && !self.link.dropped.load(Ordering::Acquire) {
                        // The requests ended: nothing more is owed; the follower ends the stream.
                        break self.replies.next().await;
                    }
                }
            }
        };
        match next {
            None => None,
            Some(Err(status)) => Some(Err(status_error(status))),
            Some(Ok(msg)) => {
                self.link.received.send_modify(|n| *n += 1);
                if self.link.transport.gate(to, from).await {
                    Some(Ok(msg))
                } else {
                    Some(Err(lost_reply(from, to)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use tokio::sync::mpsc;
    use tokio::sync::Mutex;
    use tonic::transport::server::TcpIncoming;
    use tonic::Request;
    use tonic::Response;
    use tonic::Status;
    use tonic::Streaming;

    use super::*;
    use crate::network::FaultInjector;
    use crate::pb::raft_transport_server::RaftTransport;
    use crate::pb::raft_transport_server::RaftTransportServer;

    type Replies = Pin<Box<dyn Stream<Item = Result<pb::RaftPayload, Status>> + Send>>;

    /// A follower that reports each request it receives and answers only when the test says so.
    struct Follower {
        received: mpsc::UnboundedSender<Vec<u8>>,
        answers: Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    }

    fn unused() -> Status {
        Status::unimplemented("not part of this test")
    }

    #[tonic::async_trait]
    impl RaftTransport for Follower {
        type StreamAppendStream = Replies;
        type PresenceStream = Replies;

        async fn stream_append(
            &self,
            req: Request<Streaming<pb::RaftPayload>>,
        ) -> Result<Response<Replies>, Status> {
            let mut requests = req.into_inner();
            let received = self.received.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = requests.next().await {
                    let _ = received.send(msg.data);
                }
                // The requests ended (an empty message marks it).
                let _ = received.send(Vec::new());
            });
            let answers = self
                .answers
                .lock()
                .await
                .take()
                .expect("one stream per test");
            let replies = tokio_stream::wrappers::UnboundedReceiverStream::new(answers)
                .map(|data| Ok(pb::RaftPayload { data }));
            Ok(Response::new(Box::pin(replies)))
        }
        async fn append_entries(
            &self,
            _: Request<pb::RaftPayload>,
        ) -> Result<Response<pb::RaftPayload>, Status> {
            Err(unused())
        }
        async fn vote(
            &self,
            _: Request<pb::RaftPayload>,
        ) -> Result<Response<pb::RaftPayload>, Status> {
            Err(unused())
        }
        async fn pre_vote(
            &self,
            _: Request<pb::RaftPayload>,
        ) -> Result<Response<pb::RaftPayload>, Status> {
            Err(unused())
        }
        async fn transfer_leader(
            &self,
            _: Request<pb::RaftPayload>,
        ) -> Result<Response<pb::RaftPayload>, Status> {
            Err(unused())
        }
        async fn install_snapshot(
            &self,
            _: Request<Streaming<pb::SnapshotChunk>>,
        ) -> Result<Response<pb::RaftPayload>, Status> {
            Err(unused())
        }
        async fn forward_write(
            &self,
            _: Request<pb::ForwardWriteRequest>,
        ) -> Result<Response<pb::ForwardWriteReply>, Status> {
            Err(unused())
        }
        async fn presence(&self, _: Request<pb::RaftPayload>) -> Result<Response<Replies>, Status> {
            Err(unused())
        }
    }

    /// The test's ends: requests in, what the follower received, the follower's answers.
    struct Harness {
        addr: String,
        received: mpsc::UnboundedReceiver<Vec<u8>>,
        answer: mpsc::UnboundedSender<Vec<u8>>,
    }

    async fn follower() -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (received_tx, received) = mpsc::unbounded_channel();
        let (answer, answers) = mpsc::unbounded_channel();
        let svc = RaftTransportServer::new(Follower {
            received: received_tx,
            answers: Mutex::new(Some(answers)),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Harness {
            addr,
            received,
            answer,
        }
    }

    /// A stream from replica 1 to the follower: where to push requests, and its replies.
    async fn stream_to(
        f: &Harness,
        transport: &Transport,
        pace: Pace,
    ) -> (
        mpsc::UnboundedSender<pb::RaftPayload>,
        Pin<Box<impl Stream<Item = Result<pb::RaftPayload, CallError>>>>,
    ) {
        let (requests, input) = mpsc::unbounded_channel();
        let input = tokio_stream::wrappers::UnboundedReceiverStream::new(input);
        let replies = open(transport, (1, 2), &f.addr, pace, input).await.unwrap();
        (requests, Box::pin(replies))
    }

    fn pace(reply_timeout_ms: u64, in_flight: u32) -> Pace {
        Pace {
            reply_timeout: Duration::from_millis(reply_timeout_ms),
            in_flight: NonZeroU32::new(in_flight).unwrap(),
        }
    }

    fn msg(n: u8) -> pb::RaftPayload {
        pb::RaftPayload { data: vec![n] }
    }

    #[tokio::test]
    async fn requests_go_out_before_earlier_replies_come_back_and_replies_keep_their_order() {
        let mut f = follower().await;
        let (requests, mut replies) = stream_to(&f, &Transport::tcp(), pace(10_000, 3)).await;
        for n in 1..=3 {
            requests.send(msg(n)).unwrap();
        }
        // All three reach the follower while it has answered none: nothing waits for a reply.
        for n in 1..=3 {
            assert_eq!(f.received.recv().await.unwrap(), vec![n]);
        }
        for n in [10, 20, 30] {
            f.answer.send(vec![n]).unwrap();
        }
        for n in [10, 20, 30] {
            assert_eq!(replies.next().await.unwrap().unwrap().data, vec![n]);
        }
    }

    #[tokio::test]
    async fn with_one_request_in_flight_the_next_waits_for_the_reply() {
        let mut f = follower().await;
        let (requests, mut replies) = stream_to(&f, &Transport::tcp(), pace(10_000, 1)).await;
        requests.send(msg(1)).unwrap();
        requests.send(msg(2)).unwrap();
        assert_eq!(f.received.recv().await.unwrap(), vec![1]);
        let early = tokio::time::timeout(Duration::from_millis(300), f.received.recv()).await;
        assert!(early.is_err(), "sent before the first reply: {early:?}");
        f.answer.send(vec![10]).unwrap();
        assert_eq!(replies.next().await.unwrap().unwrap().data, vec![10]);
        assert_eq!(f.received.recv().await.unwrap(), vec![2]);
    }

    #[tokio::test]
    async fn dropping_the_replies_ends_the_requests() {
        // openraft drops the replies when a session ends or the replica stops; the request side
        // must end too, or the stream (and the log reader openraft's requests hold) stays open.
        let mut f = follower().await;
        let (requests, replies) = stream_to(&f, &Transport::tcp(), pace(10_000, 2)).await;
        requests.send(msg(1)).unwrap();
        assert_eq!(f.received.recv().await.unwrap(), vec![1]);
        drop(replies);
        let ended = tokio::time::timeout(Duration::from_secs(10), f.received.recv()).await;
        assert_eq!(
            ended.unwrap().unwrap(),
            Vec::<u8>::new(),
            "the requests ended"
        );
        drop(requests);
    }

    #[tokio::test]
    async fn a_follower_that_stops_answering_is_noticed_but_an_idle_stream_owing_nothing_is_not() {
        let f = follower().await;
        let deadline = Duration::from_millis(100);
        let (requests, mut replies) = stream_to(&f, &Transport::tcp(), pace(100, 1)).await;
        let idle = tokio::time::timeout(deadline * 4, replies.next()).await;
        assert!(idle.is_err(), "an idle stream yielded {idle:?}");
        requests.send(msg(1)).unwrap();
        match replies.next().await {
            Some(Err(CallError::Timeout(d))) => assert_eq!(d, deadline),
            other => panic!("expected the reply deadline, got {other:?}"),
        }
        assert!(replies.next().await.is_none(), "the stream ends after it");
    }

    #[tokio::test]
    async fn a_request_lost_to_an_injected_fault_ends_the_stream_as_not_sent() {
        let mut f = follower().await;
        let faults = Arc::new(FaultInjector::new(1));
        let transport = Transport::tcp().with_faults(faults.clone());
        let (requests, mut replies) = stream_to(&f, &transport, pace(10_000, 2)).await;
        requests.send(msg(1)).unwrap();
        assert_eq!(f.received.recv().await.unwrap(), vec![1]);
        faults.block_one_way(1, 2);
        requests.send(msg(2)).unwrap();
        // The reply owed for the first request still comes; then the loss ends the stream.
        f.answer.send(vec![10]).unwrap();
        assert_eq!(replies.next().await.unwrap().unwrap().data, vec![10]);
        match replies.next().await {
            Some(Err(CallError::NotSent(m))) => assert!(m.contains("1->2"), "{m}"),
            other => panic!("expected the injected drop, got {other:?}"),
        }
        assert!(replies.next().await.is_none());
        let next = tokio::time::timeout(Duration::from_secs(10), f.received.recv()).await;
        assert_eq!(
            next.unwrap().unwrap(),
            Vec::<u8>::new(),
            "the lost request never reached the follower: the requests ended there"
        );
    }

    #[tokio::test]
    async fn a_lost_reply_ends_the_stream() {
        let f = follower().await;
        let faults = Arc::new(FaultInjector::new(1));
        let transport = Transport::tcp().with_faults(faults.clone());
        let (requests, mut replies) = stream_to(&f, &transport, pace(10_000, 2)).await;
        requests.send(msg(1)).unwrap();
        faults.block_one_way(2, 1);
        f.answer.send(vec![10]).unwrap();
        match replies.next().await {
            Some(Err(CallError::NoReply(m))) => assert!(m.contains("2->1"), "{m}"),
            other => panic!("expected the lost reply, got {other:?}"),
        }
        assert!(replies.next().await.is_none());
    }
}
