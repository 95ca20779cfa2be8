//! [`CoalescedWrites`]: a server connection whose replies go out together. Wrapped around each
//! accepted connection (under tonic, over TLS when there is TLS), it holds what the connection
//! writes and puts its first flush off once, behind the other tasks ready to run, so that the
//! replies finished meanwhile leave in one write (and, with TLS, in fewer records).
//!
//! Why: every reply of a gRPC server is finished by its own task, which wakes the connection's
//! task; tokio runs a task just woken next (its LIFO slot), so without this the connection writes
//! once per reply: at 256 clients, one `writev` per replicated write on the leader. grpc-go, which
//! etcd serves with, batches its replies in one writer loop instead.
//!
//! A flush is put off by waking the connection's own task and answering `Pending`: a task that
//! woke itself goes to the back of its runtime's queue. Its next flush writes everything held.
//! Reads pass straight through; a write larger than [`HOLD_AT_MOST`] is not copied when nothing
//! is held; holding more than that waits until the held bytes are written.

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::ready;
use std::task::Context;
use std::task::Poll;

use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::io::ReadBuf;
use tonic::transport::server::Connected;

/// The most a connection holds before its next write goes out first.
pub const HOLD_AT_MOST: usize = 64 * 1024;

/// An accepted connection whose writes are held until its second flush (see the module docs).
#[derive(Debug)]
pub struct CoalescedWrites<T> {
    inner: T,
    /// Bytes written to this connection and not yet to `inner`, from `sent` on.
    held: Vec<u8>,
    sent: usize,
    /// A flush has been put off once since the last one that wrote.
    put_off: bool,
}

impl<T> CoalescedWrites<T> {
    /// Holds the writes made to `inner` until its second flush.
    pub fn new(inner: T) -> Self {
        CoalescedWrites {
            inner,
            held: Vec::new(),
            sent: 0,
            put_off: false,
        }
    }

    fn holding(&self) -> usize {
        self.held.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes everything held to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.held.clear();
        if self.held.capacity() > HOLD_AT_MOST {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: writes what is held first when they would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.holding() > 0 && self.holding() + len > HOLD_AT_MOST {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_room(cx, len))?;
        if this.holding() == 0 && len >= HOLD_AT_MOST {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.holding() > 0 {
            if !this.put_off {
                // Back of the queue: the replies other tasks finish meanwhile join these.
                this.put_off = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.put_off = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CoalescedWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::Wake;
    use std::task::Waker;

    /// The far end of a connection: what reached it, write call by write call.
    #[derive(Default)]
    struct Wire {
        writes: Vec<Vec<u8>>,
        /// Accept at most this many bytes per call (0: all).
        per_call: usize,
        /// Answer `Pending` to writes (a full socket) until cleared.
        full: bool,
        fail: bool,
        flushed: usize,
        shut: bool,
    }

    impl AsyncRead for Wire {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Wire {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.fail {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if this.full {
                return Poll::Pending;
            }
            let n = match this.per_call {
                0 => data.len(),
                k => k.min(data.len()),
            };
            this.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushed += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Counts the wake-ups of the task it stands for.
    #[derive(Default)]
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Wakes>, Waker) {
        let w = Arc::new(Wakes::default());
        (w.clone(), Waker::from(w))
    }

    fn write(c: &mut CoalescedWrites<Wire>, cx: &mut Context<'_>, data: &[u8]) -> Poll<usize> {
        Pin::new(c).poll_write(cx, data).map(|r| r.unwrap())
    }

    fn flush(c: &mut CoalescedWrites<Wire>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(c).poll_flush(cx)
    }

    #[test]
    fn replies_written_before_the_put_off_flush_and_while_it_waits_leave_in_one_write() {
        let (wakes, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Wire::default());
        assert_eq!(write(&mut c, &mut cx, b"reply-1;"), Poll::Ready(8));
        assert!(
            flush(&mut c, &mut cx).is_pending(),
            "the first flush is put off"
        );
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "the task woke itself to come back"
        );
        assert!(c.inner.writes.is_empty());
        // Other tasks finish their replies meanwhile; the connection writes them when polled.
        assert_eq!(write(&mut c, &mut cx, b"reply-2;"), Poll::Ready(8));
        let two = [IoSlice::new(b"reply-3"), IoSlice::new(b";")];
        let n = Pin::new(&mut c).poll_write_vectored(&mut cx, &two);
        assert!(matches!(n, Poll::Ready(Ok(8))));
        assert!(matches!(flush(&mut c, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(c.inner.writes, vec![b"reply-1;reply-2;reply-3;".to_vec()]);
        assert_eq!(c.inner.flushed, 1);
        // The next reply is put off again, once.
        assert_eq!(write(&mut c, &mut cx, b"reply-4;"), Poll::Ready(8));
        assert!(flush(&mut c, &mut cx).is_pending());
        assert!(matches!(flush(&mut c, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(c.inner.writes.len(), 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_flush_with_nothing_held_is_not_put_off() {
        let (wakes, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Wire::default());
        assert!(matches!(flush(&mut c, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        assert_eq!(c.inner.flushed, 1);
    }

    #[test]
    fn a_large_write_with_nothing_held_goes_straight_through() {
        let (_, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Wire::default());
        let big = vec![7u8; HOLD_AT_MOST];
        assert_eq!(write(&mut c, &mut cx, &big), Poll::Ready(HOLD_AT_MOST));
        assert_eq!(c.inner.writes, vec![big]);
        assert_eq!(c.holding(), 0);
    }

    #[test]
    fn what_would_overflow_the_hold_waits_for_the_held_bytes_to_go_out_first_in_order() {
        let (_, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Wire {
            full: true,
            ..Wire::default()
        });
        let first = vec![1u8; HOLD_AT_MOST - 10];
        assert_eq!(write(&mut c, &mut cx, &first), Poll::Ready(first.len()));
        // The socket is full: 20 more bytes cannot be held, nor the held ones sent.
        assert!(write(&mut c, &mut cx, &[2u8; 20]).is_pending());
        assert_eq!(c.holding(), first.len());
        // It drains in pieces once the socket takes bytes again, then takes the new ones.
        c.inner.full = false;
        c.inner.per_call = 1000;
        assert_eq!(write(&mut c, &mut cx, &[2u8; 20]), Poll::Ready(20));
        let out: Vec<u8> = c.inner.writes.concat();
        assert_eq!(out, first);
        assert_eq!(c.holding(), 20);
        assert!(flush(&mut c, &mut cx).is_pending());
        assert!(matches!(flush(&mut c, &mut cx), Poll::Ready(Ok(()))));
        let out: Vec<u8> = c.inner.writes.concat();
        assert_eq!(&out[first.len()..], &[2u8; 20]);
    }

    #[test]
    fn a_failed_write_underneath_fails_the_flush_and_shutdown_writes_what_is_held() {
        let (_, waker) = task();
        let mut cx = Context::from_waker(&waker);
        let mut c = CoalescedWrites::new(Wire::default());
        assert_eq!(write(&mut c, &mut cx, b"last words"), Poll::Ready(10));
        assert!(matches!(
            Pin::new(&mut c).poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.inner.writes, vec![b"last words".to_vec()]);
        assert!(c.inner.shut);

        let mut c = CoalescedWrites::new(Wire {
            fail: true,
            ..Wire::default()
        });
        assert_eq!(write(&mut c, &mut cx, b"lost"), Poll::Ready(4));
        assert!(flush(&mut c, &mut cx).is_pending());
        match flush(&mut c, &mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("expected the write's error, got {other:?}"),
        }
    }

    /// A gRPC service whose calls all wait for one gate, then echo their bytes: the replies
    /// finish together, as the writes applied in one batch do.
    #[derive(Clone)]
    struct Gated {
        arrived: Arc<AtomicUsize>,
        open: tokio::sync::watch::Receiver<bool>,
    }

    const GATED: &str = "/test.Gated/Echo";

    impl tonic::server::NamedService for Gated {
        const NAME: &'static str = "test.Gated";
    }

    type Body = tonic::body::Body;

    impl tonic::codegen::Service<tonic::codegen::http::Request<Body>> for Gated {
        type Response = tonic::codegen::http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: tonic::codegen::http::Request<Body>) -> Self::Future {
            let me = self.clone();
            Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<Reply, Request>::default();
                Ok(tonic::server::Grpc::new(codec).unary(me, req).await)
            })
        }
    }

    type Request = crate::pb::ForwardWriteRequest;
    type Reply = crate::pb::ForwardWriteReply;

    impl tonic::server::UnaryService<Request> for Gated {
        type Response = Reply;
        type Future = tonic::codegen::BoxFuture<tonic::Response<Reply>, tonic::Status>;

        fn call(&mut self, req: tonic::Request<Request>) -> Self::Future {
            let mut me = self.clone();
            Box::pin(async move {
                me.arrived.fetch_add(1, Ordering::SeqCst);
                let _ = me.open.wait_for(|open| *open).await;
                Ok(tonic::Response::new(Reply {
                    data: req.into_inner().command,
                }))
            })
        }
    }

    /// Counts the writes that reach the TCP stream under the wrapper.
    struct Counting<T>(T, Arc<AtomicUsize>);

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, b)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.0).poll_write(cx, d);
            if r.is_ready() {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl<T: Connected> Connected for Counting<T> {
        type ConnectInfo = T::ConnectInfo;
        fn connect_info(&self) -> Self::ConnectInfo {
            self.0.connect_info()
        }
    }

    /// Serves [`Gated`] on loopback, each connection counted under `wrap`; returns the address.
    async fn serve_gated<W, IO>(gated: Gated, writes: Arc<AtomicUsize>, wrap: W) -> String
    where
        W: Fn(Counting<tokio::net::TcpStream>) -> IO + Send + 'static,
        IO: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::StreamExt::map(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            move |s| s.map(|s| wrap(Counting(s, writes.clone()))),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(gated)
                .serve_with_incoming(incoming),
        );
        format!("http://{addr}")
    }

    /// `calls` calls on one connection answered together; the writes the server made for them.
    async fn burst<W, IO>(calls: usize, wrap: W) -> usize
    where
        W: Fn(Counting<tokio::net::TcpStream>) -> IO + Send + 'static,
        IO: AsyncRead + AsyncWrite + Connected + Send + Unpin + 'static,
    {
        let (open, gate) = tokio::sync::watch::channel(false);
        let arrived = Arc::new(AtomicUsize::new(0));
        let writes = Arc::new(AtomicUsize::new(0));
        let gated = Gated {
            arrived: arrived.clone(),
            open: gate,
        };
        let addr = serve_gated(gated, writes.clone(), wrap).await;
        let ch = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let pending: Vec<_> = (0..calls)
            .map(|i| {
                let ch = ch.clone();
                tokio::spawn(async move {
                    let mut g = tonic::client::Grpc::new(ch);
                    g.ready().await.unwrap();
                    let codec = tonic_prost::ProstCodec::<Request, Reply>::default();
                    let path = tonic::codegen::http::uri::PathAndQuery::from_static(GATED);
                    let req = tonic::Request::new(Request {
                        command: vec![i as u8; 100],
                    });
                    g.unary(req, path, codec).await.unwrap().into_inner().data
                })
            })
            .collect();
        while arrived.load(Ordering::SeqCst) < calls {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Let the server send what it owes for the requests (window updates) before counting.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let before = writes.load(Ordering::SeqCst);
        open.send_replace(true);
        for (i, call) in pending.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), vec![i as u8; 100], "reply {i}");
        }
        writes.load(Ordering::SeqCst) - before
    }

    /// The whole point, end to end over loopback with tonic on a multi-threaded runtime: 128
    /// replies finished together reach the socket in a handful of writes, every reply intact.
    /// The same burst on the bare connection (printed beside it) took 15-64 writes for 64 replies
    /// in six runs, usually one per reply (4 once with the machine busy, when its tasks batch).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_grpc_replies_shares_writes() {
        const CALLS: usize = 128;
        let bare = burst(CALLS, |tcp| tcp).await;
        let coalesced = burst(CALLS, CoalescedWrites::new).await;
        eprintln!("{CALLS} replies: {coalesced} writes coalesced, {bare} bare");
        assert!(
            coalesced <= CALLS / 4,
            "{CALLS} replies took {coalesced} writes coalesced ({bare} bare)"
        );
    }
}
