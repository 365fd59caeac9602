use super::*;
use std::time::{Duration, Instant};
use tandem_proto::v1;

/// A payload of a Unix socket link, as bytes.
async fn fetch(links: &Links, r: &v1::KvLinkRef) -> Result<Vec<u8>, String> {
    match links.fetch(r).await? {
        Payload::Host(p) => Ok(p),
        Payload::Device(p) => Err(format!("a device payload on a Unix socket link: {p:?}")),
    }
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A listener at a fresh temporary path and a sender connected to it, with the link registered on the receiver.
fn pair() -> (LinkListener, std::sync::Arc<LinkSender>) {
    let l = LinkListener::bind_temp(Links::default()).unwrap();
    let s = LinkSender::connect(l.path()).unwrap();
    let started = Instant::now();
    while l.links().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "link never registered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    (l, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_come_back_whole_whatever_order_their_headers_arrive_in() {
    let (l, s) = pair();
    let sent: Vec<Vec<u8>> = (0..6)
        .map(|i| payload(i as u8, 1000 + 70_000 * i))
        .collect();
    let refs: Vec<v1::KvLinkRef> = sent.iter().map(|p| s.send(p.clone()).unwrap()).collect();
    assert_eq!(
        refs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    // Headers in reverse order, all at once: each waits its turn and gets its own payload.
    let links = l.links();
    let fetches: Vec<_> = refs
        .iter()
        .rev()
        .map(|r| {
            let (links, r) = (links.clone(), *r);
            tokio::spawn(async move { fetch(&links, &r).await })
        })
        .collect();
    for (f, want) in fetches.into_iter().zip(sent.iter().rev()) {
        assert_eq!(&f.await.unwrap().unwrap(), want);
    }
    // A payload read once is gone.
    let e = fetch(&links, &refs[2]).await.unwrap_err();
    assert!(e.contains("already read"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_whose_header_never_comes_is_skipped_after_the_wait() {
    let (l, s) = pair();
    let lost = s.send(payload(1, 5000)).unwrap();
    let kept = s.send(payload(2, 3000)).unwrap();
    let started = Instant::now();
    let got = fetch(&l.links(), &kept).await.unwrap();
    assert_eq!(got, payload(2, 3000));
    let waited = started.elapsed();
    assert!(
        waited >= unix::HEADER_WAIT && waited < unix::HEADER_WAIT * 3,
        "{waited:?}"
    );
    let e = fetch(&l.links(), &lost).await.unwrap_err();
    assert!(e.contains("skipped"), "{e}");
    // The link goes on.
    let next = s.send(payload(3, 10)).unwrap();
    assert_eq!(fetch(&l.links(), &next).await.unwrap(), payload(3, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_refused_without_reading() {
    let (l, s) = pair();
    let links = l.links();
    let mut r = s.send(payload(4, 100)).unwrap();
    let too_big = v1::KvLinkRef {
        bytes: MAX_PAYLOAD + 1,
        ..r
    };
    let e = fetch(&links, &too_big).await.unwrap_err();
    assert!(e.contains("limit"), "{e}");
    let unknown = v1::KvLinkRef {
        link_id: r.link_id ^ 1,
        ..r
    };
    let e = fetch(&links, &unknown).await.unwrap_err();
    assert!(e.contains("not connected"), "{e}");
    // A header whose length disagrees with the stream breaks the link rather than misreading it.
    r.bytes = 99;
    let e = fetch(&links, &r).await.unwrap_err();
    assert!(e.contains("out of step"), "{e}");
    let started = Instant::now();
    while !links.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_sender_whose_receiver_is_gone_gives_payloads_back() {
    let (l, s) = pair();
    drop(l);
    // The first writes may still land in the socket buffer; within a few the writer sees the closed end.
    let started = Instant::now();
    loop {
        match s.send(payload(5, 64 << 10)) {
            Err(p) => {
                assert_eq!(p, payload(5, 64 << 10));
                break;
            }
            Ok(_) => {
                assert!(started.elapsed() < Duration::from_secs(5), "never broke");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    assert!(s.is_broken());
}

#[test]
fn senders_take_only_offers_from_this_host_and_reconnect_after_a_break() {
    let Some(host) = host_id() else {
        return; // Not Linux: no links at all, which `for_offer` below would also show.
    };
    let l = LinkListener::bind_temp(Links::default()).unwrap();
    let offer = l.offer().unwrap();
    assert_eq!(offer.host_id, host);
    let senders = LinkSenders::new(true);
    assert!(senders.for_offer(None).is_none());
    let elsewhere = v1::KvLinkOffer {
        host_id: format!("{host}-other"),
        ..offer.clone()
    };
    assert!(senders.for_offer(Some(&elsewhere)).is_none());
    assert!(LinkSenders::new(false).for_offer(Some(&offer)).is_none());
    let a = senders.for_offer(Some(&offer)).unwrap();
    let b = senders.for_offer(Some(&offer)).unwrap();
    assert_eq!(a.id(), b.id(), "one link per socket");
    // The receiver restarts at the same path: the old link breaks, and the next transfer connects anew.
    let path = l.path().to_path_buf();
    drop(l);
    let l2 = LinkListener::bind(&path, Links::default()).unwrap();
    while a.send(vec![0; 64 << 10]).is_ok() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = senders.for_offer(Some(&offer)).unwrap();
    assert_ne!(c.id(), a.id());
    drop(l2);
    // A socket nobody listens on is declined (and not retried at once).
    let gone = v1::KvLinkOffer {
        unix_socket: path.join("missing.sock").to_string_lossy().into_owned(),
        ..offer
    };
    assert!(senders.for_offer(Some(&gone)).is_none());
}

/// A receiver (session table, `Push` service, link socket) on loopback, as a decode worker has one.
struct Receiver {
    sessions: crate::Sessions,
    link: Option<LinkListener>,
    url: String,
}

async fn receiver() -> Receiver {
    let sessions = crate::Sessions::new(crate::test_support::layout(), 2);
    let link = LinkListener::bind_temp(Links::default()).unwrap();
    let service = crate::KvTransferService::new(sessions.clone(), link.links());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
    );
    Receiver {
        sessions,
        link: Some(link),
        url,
    }
}

/// Pushes `n` chunks of one session (blocks 0 and 1, alternate layers) with payloads on `link`; returns the
/// transfer's figures and the blocks the receiver's sink got.
async fn push(
    r: &Receiver,
    link: Option<std::sync::Arc<LinkSender>>,
    n: u32,
) -> (crate::TransferStats, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let got = std::sync::Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let blocks = [tandem_engine::kv::BlockId(0), tandem_engine::kv::BlockId(1)];
    let guard = r.sessions.open(
        &blocks,
        deadline,
        Box::new(move |d| {
            let crate::Delivered::Host(d) = d else {
                return Err("a staged chunk".into());
            };
            g.fetch_add(d.data.len(), Ordering::SeqCst);
            Ok(())
        }),
    );
    let channel = tonic::transport::Endpoint::from_shared(r.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sender = crate::Sender::open(channel, guard.id(), deadline, link);
    let pusher = sender.pusher();
    for i in 0..n {
        pusher.push(crate::test_support::chunk_at(
            guard.id(),
            i,
            &[0, 1],
            i as usize % 2,
        ));
    }
    drop(pusher);
    let stats = sender.finish().await.unwrap();
    (stats, got.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_cross_with_payloads_on_the_link_and_are_resent_inline_when_it_goes() {
    let mut r = receiver().await;
    let link = LinkSender::connect(r.link.as_ref().unwrap().path()).unwrap();
    let (stats, got) = push(&r, Some(link.clone()), 6).await;
    assert_eq!(got, 12);
    assert_eq!(stats.chunks, 6);
    assert!(stats.payload_bytes > 0);
    assert_eq!(
        stats.link_bytes, stats.payload_bytes,
        "every payload on the link"
    );
    // The receiver's socket goes (a restart of its link side): chunks still arrive, inline.
    drop(r.link.take());
    let (stats, got) = push(&r, Some(link.clone()), 6).await;
    assert_eq!(got, 12);
    assert_eq!(stats.chunks, 6);
    assert_eq!(stats.link_bytes, 0, "every payload arrived inline");
    // Without a link at all, nothing goes on one.
    let (stats, got) = push(&r, None, 3).await;
    assert_eq!((got, stats.link_bytes), (6, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_chunk_whose_device_payload_is_lost_fails_its_transfer_without_a_resend() {
    let r = receiver().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let guard = r.sessions.open(
        &[tandem_engine::kv::BlockId(0)],
        deadline,
        Box::new(|_| Ok(())),
    );
    let channel = tonic::transport::Endpoint::from_shared(r.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Sent (as the engine thread would have) on a device link this receiver never opened.
    let header = crate::chunk::ChunkHeader {
        session: guard.id(),
        index: 0,
        layers: 1..2,
        blocks: vec![tandem_engine::kv::BlockId(0)],
        fills: Vec::new(),
    };
    let at = v1::KvLinkRef {
        link_id: 7,
        seq: 0,
        bytes: 4096,
    };
    let staged = crate::chunk::staged(&header, &crate::test_support::layout(), at);
    assert!(staged.staged && staged.payload.is_empty());
    let sender = crate::Sender::open(channel, guard.id(), deadline, None);
    sender.pusher().push(staged);
    let e = sender.finish().await.unwrap_err();
    assert!(
        matches!(&e, crate::TransferError::Transport(m) if m.contains("device link lost")),
        "{e}"
    );
}

#[test]
fn staged_chunks_reach_their_session_after_the_header_checks() {
    use tandem_engine::backend::link::DevicePayload;
    let s = crate::Sessions::new(crate::test_support::layout(), 2);
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let guard = s.open(
        &[tandem_engine::kv::BlockId(3)],
        Instant::now() + Duration::from_secs(60),
        Box::new(move |d| {
            let crate::Delivered::Device(c) = d else {
                return Err("a host chunk".into());
            };
            g.lock().unwrap().push((c.layer, c.blocks, c.payload.bytes));
            Ok(())
        }),
    );
    let payload = || DevicePayload {
        buf: Box::new(0u8),
        bytes: 64,
    };
    let chunk = |layers: std::ops::Range<usize>, block: u32| {
        let header = crate::chunk::ChunkHeader {
            session: guard.id(),
            index: 0,
            layers,
            blocks: vec![tandem_engine::kv::BlockId(block)],
            fills: Vec::new(),
        };
        let at = v1::KvLinkRef {
            link_id: 1,
            seq: 0,
            bytes: 64,
        };
        crate::chunk::staged(&header, &crate::test_support::layout(), at)
    };
    s.deliver_staged(&chunk(1..2, 3), payload()).unwrap();
    let e = s.deliver_staged(&chunk(0..2, 3), payload()).unwrap_err();
    assert!(e.to_string().contains("one layer"), "{e}");
    let e = s.deliver_staged(&chunk(2..3, 3), payload()).unwrap_err();
    assert!(e.to_string().contains("one layer"), "{e}");
    let e = s.deliver_staged(&chunk(0..1, 4), payload()).unwrap_err();
    assert!(e.to_string().contains("block 4"), "{e}");
    let mut wrong = chunk(0..1, 3);
    wrong.layout.as_mut().unwrap().head_dim = 4;
    let e = s.deliver_staged(&wrong, payload()).unwrap_err();
    assert!(e.to_string().contains("layout"), "{e}");
    let mut other_rope = chunk(0..1, 3);
    other_rope.layout.as_mut().unwrap().key_rotation ^= 1;
    let e = s.deliver_staged(&other_rope, payload()).unwrap_err();
    assert!(e.to_string().contains("key_rotation"), "{e}");
    assert_eq!(
        *got.lock().unwrap(),
        [(1, vec![tandem_engine::kv::BlockId(3)], 64)]
    );
}

/// A device for the device link's bookkeeping alone: each receive gives a host box of its size.
struct Bookkeeping;

impl tandem_engine::backend::link::DeviceLinks for Bookkeeping {
    fn device(&self) -> String {
        "0000:17:00".into()
    }
    fn new_id(&self) -> tandem_engine::error::Result<String> {
        Ok("id".into())
    }
    fn join_receiver(
        &self,
        _id: &str,
    ) -> tandem_engine::error::Result<Box<dyn tandem_engine::backend::link::DeviceReceiver>> {
        Ok(Box::new(Bookkeeping))
    }
    fn join_sender(
        &self,
        _id: &str,
    ) -> tandem_engine::error::Result<tandem_engine::backend::link::SenderLink> {
        Ok(tandem_engine::backend::link::SenderLink(Box::new(())))
    }
}

impl tandem_engine::backend::link::DeviceReceiver for Bookkeeping {
    fn recv(
        &mut self,
        bytes: usize,
    ) -> tandem_engine::error::Result<tandem_engine::backend::link::DevicePayload> {
        Ok(tandem_engine::backend::link::DevicePayload {
            buf: Box::new(bytes),
            bytes,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_payloads_are_received_as_announced_and_claimed_by_their_headers() {
    let links = Links::default().with_devices(std::sync::Arc::new(Bookkeeping), "f16:1".into());
    let open = |cache: &str| v1::KvDeviceLinkRequest {
        link_id: 9,
        nccl_id: "id".into(),
        device_cache: cache.into(),
    };
    let e = links.accept_device(&open("f16:2")).err().unwrap();
    assert!(e.contains("differs"), "{e}");
    let link = links.accept_device(&open("f16:1")).unwrap();
    let at = |seq, bytes| v1::KvLinkRef {
        link_id: 9,
        seq,
        bytes,
    };
    let size = |p: Result<Payload, String>| match p {
        Ok(Payload::Device(d)) => Ok(d.bytes),
        Ok(Payload::Host(_)) => Err("a host payload".to_string()),
        Err(e) => Err(e),
    };
    // A header ahead of its payload's announcement waits for it; one behind finds it kept.
    let early = {
        let links = links.clone();
        tokio::spawn(async move { links.fetch(&at(1, 20)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    link.announce(&at(0, 10)).unwrap();
    link.announce(&at(1, 20)).unwrap();
    assert_eq!(size(early.await.unwrap()), Ok(20));
    assert_eq!(size(links.fetch(&at(0, 10)).await), Ok(10));
    let e = size(links.fetch(&at(0, 10)).await).unwrap_err();
    assert!(e.contains("claimed already"), "{e}");
    // A header whose length disagrees with the announcement gets an error, not the payload.
    link.announce(&at(2, 31)).unwrap();
    let e = size(links.fetch(&at(2, 30)).await).unwrap_err();
    assert!(e.contains("31 bytes"), "{e}");
    // An announcement out of order ends the link: nothing after it is received.
    link.announce(&at(5, 8)).unwrap();
    let e = size(links.fetch(&at(3, 8)).await).unwrap_err();
    assert!(
        e.contains("closed") || e.contains("expected payload 3"),
        "{e}"
    );
    drop(link);
    assert!(links.is_empty());
}
