//! The transport over real sockets: identity and role checks, every accept/refuse case of
//! the handshake, frame limits, slow and half-open peers, many streams, cancellation,
//! deadlines, backpressure and reconnection.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{Bytes, Cluster, Event, Number, TestServer, fast_config};
use flotilla::ca::{Role, tls};
use flotilla::net::{CallOptions, Transport};
use flotilla::wire::{Code, STREAM_WINDOW_MESSAGES};

const TIMEOUT: Duration = Duration::from_secs(10);

fn opts() -> CallOptions {
    CallOptions::timeout(TIMEOUT)
}

fn echo(channel: &flotilla::net::Channel, data: &[u8]) -> Result<Bytes, flotilla::wire::Status> {
    channel.unary(
        "test.Echo",
        &Bytes {
            data: data.to_vec(),
            caller: String::new(),
        },
        opts(),
    )
}

/// Waits for the next event that matches, failing the test after `TIMEOUT`.
/// An encoded test `Bytes` request carrying `data`.
fn request(data: &[u8]) -> bytes::Bytes {
    use prost::Message;
    bytes::Bytes::from(
        Bytes {
            data: data.to_vec(),
            caller: String::new(),
        }
        .encode_to_vec(),
    )
}

fn expect_event(server: &TestServer, wanted: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let event = server
            .events
            .recv_deadline(deadline)
            .expect("expected event did not arrive");
        if wanted(&event) {
            return event;
        }
    }
}

#[test]
fn unary_call_carries_the_callers_verified_identity() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let worker = cluster.identity(Role::Worker);
    let channel = client.channel(&server.target(), &cluster.client_tls_for(&worker));
    let reply = echo(&channel, b"hello").unwrap();
    assert_eq!(reply.data, b"hello");
    assert_eq!(reply.caller, worker.node_id());
    let server_id = channel
        .peer_identity()
        .expect("server identity known after connect");
    assert_eq!(server_id.role, Role::Manager);
    assert_eq!(server_id.cluster_id, cluster.ca.cluster_id());
}

#[test]
fn unknown_method_is_unimplemented_and_the_connection_survives() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Manager));
    let err = channel
        .unary::<Bytes, Bytes>("test.NoSuchMethod", &Bytes::default(), opts())
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented, "{err}");
    assert_eq!(echo(&channel, b"still here").unwrap().data, b"still here");
}

#[test]
fn role_allow_lists_are_enforced() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let worker = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let manager = client.channel(&server.target(), &cluster.client_tls(Role::Manager));
    let err = worker
        .unary::<Bytes, Bytes>("test.ManagersOnly", &Bytes::default(), opts())
        .unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied, "{err}");
    manager
        .unary::<Bytes, Bytes>("test.ManagersOnly", &Bytes::default(), opts())
        .unwrap();
}

#[test]
fn anonymous_callers_reach_bootstrap_methods_only() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let pinned = Arc::new(tls::pinned_root_client_config(cluster.ca.root()).unwrap());
    let anonymous = client.channel(&server.target(), &pinned);
    let reply: Bytes = anonymous
        .unary("test.Bootstrap", &Bytes::default(), opts())
        .unwrap();
    assert_eq!(reply.caller, "anonymous");
    let err = echo(&anonymous, b"x").unwrap_err();
    assert_eq!(err.code, Code::Unauthenticated, "{err}");
    let unverified = Arc::new(tls::bootstrap_client_config().unwrap());
    let reply: Bytes = client
        .channel(&server.target(), &unverified)
        .unary("test.Bootstrap", &Bytes::default(), opts())
        .unwrap();
    assert_eq!(reply.caller, "anonymous");
}

/// Calls with `tls` and expects the connection to be refused during the handshake.
fn assert_refused(server: &TestServer, tls: Arc<rustls::ClientConfig>) -> String {
    let client = Transport::start(fast_config()).unwrap();
    let err = echo(&client.channel(&server.target(), &tls), b"x").unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    err.message
}

#[test]
fn certificate_from_another_cluster_is_refused_at_the_handshake() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let other = Cluster::new();
    let message = assert_refused(&server, other.client_tls(Role::Manager));
    assert!(
        message.contains("TLS") || message.contains("closed"),
        "{message}"
    );
    // The reverse: our client refuses a server of another cluster.
    let other_server = TestServer::start(&other, fast_config());
    let message = assert_refused(&other_server, cluster.client_tls(Role::Manager));
    assert!(message.contains("TLS"), "{message}");
}

#[test]
fn expired_certificate_is_refused_at_the_handshake() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let long_ago = SystemTime::now() - Duration::from_secs(200 * 24 * 3600);
    let expired = cluster
        .ca
        .issue_local_identity(Role::Manager, long_ago)
        .unwrap();
    assert!(!expired.is_valid_at(SystemTime::now()));
    assert_refused(&server, cluster.client_tls_for(&expired));
}

#[test]
fn oversized_request_is_refused_by_the_sender() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let err = echo(&channel, &vec![7u8; 5 * 1024 * 1024]).unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("stream it in chunks"), "{err}");
    // Just under the limit passes.
    let big = vec![7u8; 4 * 1024 * 1024 - 1024];
    assert_eq!(echo(&channel, &big).unwrap().data.len(), big.len());
}

/// A raw TLS client (no RPC layer) with a worker certificate, for sending bad bytes.
fn raw_tls(
    server: &TestServer,
    cluster: &Cluster,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let config = cluster.client_tls(Role::Worker);
    let conn = rustls::ClientConnection::new(config, tls::server_name()).unwrap();
    let sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Reads until the server closes; fails if it does not within `TIMEOUT`.
fn assert_closed_by_server(mut stream: impl Read) {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("server did not close the connection: {e}")
            }
            Err(_) => return, // reset or TLS alert: closed
        }
    }
}

#[test]
fn oversized_frame_from_a_peer_closes_its_connection() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let mut stream = raw_tls(&server, &cluster);
    // Announce a 64 MiB frame; the server must refuse it from the header alone.
    stream
        .write_all(&(64u32 * 1024 * 1024).to_be_bytes())
        .unwrap();
    stream.flush().unwrap();
    assert_closed_by_server(stream);
}

#[test]
fn client_that_never_finishes_tls_is_closed() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let mut sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.write_all(&[0x16, 0x03, 0x01]).unwrap(); // the start of a ClientHello, then silence
    assert_closed_by_server(sock);
}

#[test]
fn client_that_sends_half_a_frame_is_closed() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let mut stream = raw_tls(&server, &cluster);
    stream.write_all(&[0, 0, 0, 10, 1, 2]).unwrap(); // 10 bytes announced, 2 sent
    stream.flush().unwrap();
    assert_closed_by_server(stream);
}

#[test]
fn idle_connection_is_closed_but_callers_reconnect_transparently() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let stream = raw_tls(&server, &cluster);
    assert_closed_by_server(stream);
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    echo(&channel, b"one").unwrap();
    std::thread::sleep(Duration::from_millis(fast_config().idle_timeout_ms + 500));
    // The server closed the idle connection; the next call dials again.
    echo(&channel, b"two").unwrap();
}

#[test]
fn open_stream_is_kept_alive_by_pings_past_the_idle_timeout() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    // The server holds the call for longer than the idle timeout; only pings keep it open.
    let wait = fast_config().idle_timeout_ms as i64 * 2;
    let reply: Number = channel
        .unary("test.Sleep", &Number { value: wait }, opts())
        .unwrap();
    assert_eq!(reply.value, wait);
}

#[test]
fn thousand_concurrent_streams_share_one_connection() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let messages = 5;
    let mut streams = Vec::new();
    for _ in 0..1000 {
        streams.push(
            channel
                .server_stream::<Number, Number>("test.Count", &Number { value: messages }, opts())
                .unwrap(),
        );
    }
    for stream in &mut streams {
        let mut got = Vec::new();
        while let Some(n) = stream.recv().unwrap() {
            got.push(n.value);
        }
        assert_eq!(got, (0..messages).collect::<Vec<_>>());
    }
    let peers: HashSet<_> = server
        .events
        .try_iter()
        .filter_map(|e| match e {
            Event::Peer(addr) => Some(addr),
            _ => None,
        })
        .collect();
    assert_eq!(
        peers.len(),
        1,
        "all streams must use one connection: {peers:?}"
    );
}

#[test]
fn client_streaming_sums_and_server_can_fail_the_upload_early() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let mut upload = channel
        .client_stream::<Number, Number>("test.Sum", opts())
        .unwrap();
    for value in 1..=100 {
        upload.send(&Number { value }).unwrap();
    }
    assert_eq!(upload.finish().unwrap().value, 5050);

    let mut upload = channel
        .client_stream::<Number, Number>("test.Sum", opts())
        .unwrap();
    upload.send(&Number { value: -1 }).unwrap();
    // The server fails the call; further sends stop with its status.
    let mut last = Ok(());
    for value in 0..10_000 {
        last = upload.send(&Number { value });
        if last.is_err() {
            break;
        }
    }
    let err = last.expect_err("sends must fail once the server rejected the upload");
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
}

#[test]
fn deadline_fails_the_call_and_cancels_the_handler() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let err = channel
        .unary::<Number, Number>(
            "test.Sleep",
            &Number { value: 60_000 },
            CallOptions::timeout(Duration::from_millis(200)),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    expect_event(&server, |e| *e == Event::SleepCancelled);
}

#[test]
fn caller_cancelling_a_stream_stops_the_server() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let mut stream = channel
        .server_stream::<Number, Number>("test.Count", &Number { value: 1_000_000 }, opts())
        .unwrap();
    assert_eq!(stream.recv().unwrap().unwrap().value, 0);
    stream.cancel();
    let event = expect_event(&server, |e| matches!(e, Event::SendFailed(_)));
    assert_eq!(event, Event::SendFailed(Code::Cancelled));
}

#[test]
fn slow_reader_holds_the_sender_to_the_flow_control_window() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let total = 200;
    let mut stream = channel
        .server_stream::<Number, Number>("test.Count", &Number { value: total }, opts())
        .unwrap();
    // The server sends a whole window without any reading on our side...
    let window = i64::from(STREAM_WINDOW_MESSAGES);
    expect_event(&server, |e| *e == Event::Sent(window - 1));
    // ...and then no more, however long it is given.
    std::thread::sleep(Duration::from_millis(300));
    let sent_beyond_window = server
        .events
        .try_iter()
        .filter(|e| matches!(e, Event::Sent(_)))
        .count();
    assert_eq!(sent_beyond_window, 0);
    // Reading returns credit and the rest flows.
    for expected in 0..total {
        assert_eq!(stream.recv().unwrap().unwrap().value, expected);
    }
    assert!(stream.recv().unwrap().is_none());
}

#[test]
fn caller_reconnects_after_the_server_restarts() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let addr = server.addr;
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&addr.to_string(), &cluster.client_tls(Role::Worker));
    echo(&channel, b"before").unwrap();
    server.stop();
    let err = echo(&channel, b"during").unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    let _restarted = TestServer::start_at(&cluster, fast_config(), addr);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match echo(&channel, b"after") {
            Ok(reply) => {
                assert_eq!(reply.data, b"after");
                break;
            }
            Err(e) if e.code == Code::Unavailable && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no reconnection: {e}"),
        }
    }
}

#[test]
fn shutdown_fails_in_flight_calls_with_unavailable() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let caller = {
        let channel = channel.clone();
        std::thread::spawn(move || {
            channel.unary::<Number, Number>("test.Sleep", &Number { value: 60_000 }, opts())
        })
    };
    // Wait until the call is in flight, then stop the client's transport under it.
    std::thread::sleep(Duration::from_millis(200));
    client.shutdown();
    let err = caller.join().unwrap().unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    expect_event(&server, |e| *e == Event::SleepCancelled);
    let err = echo(&channel, b"after").unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
}

#[test]
fn silent_server_is_detected_by_keepalive_and_the_call_fails() {
    let cluster = Cluster::new();
    let server_tls = cluster.server_tls();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A peer that completes TLS, then never reads or answers again (a half-open link).
    let silent = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(server_tls).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, sock);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        std::thread::sleep(Duration::from_secs(6));
    });
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&addr.to_string(), &cluster.client_tls(Role::Worker));
    let err = channel
        .unary::<Number, Number>(
            "test.Sleep",
            &Number { value: 1 },
            CallOptions::timeout(Duration::from_secs(60)),
        )
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(err.message.contains("keepalive"), "{err}");
    silent.join().unwrap();
}

#[test]
fn large_streamed_upload_never_strands_queued_frames() {
    // Keepalive pings would rescue a stranded send queue within a second in fast_config;
    // here they come only every minute, so a stranded frame fails the call's deadline.
    let config = flotilla::net::TransportConfig {
        keepalive_interval_ms: 60_000,
        idle_timeout_ms: 180_000,
        ..fast_config()
    };
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, config.clone());
    let client = Transport::start(config).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    for _ in 0..5 {
        let chunk = Bytes {
            data: vec![3; 1024 * 1024],
            caller: String::new(),
        };
        let mut upload = channel
            .client_stream::<Bytes, Number>(
                "test.Sink",
                CallOptions::timeout(Duration::from_secs(30)),
            )
            .unwrap();
        for _ in 0..64 {
            upload.send(&chunk).unwrap();
        }
        assert_eq!(upload.finish().unwrap().value, 64 * 1024 * 1024);
    }
}

#[test]
fn deferred_unary_is_answered_from_another_thread_or_fails_when_dropped() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                channel.unary::<Number, Number>("test.Later", &Number { value: 50 + i }, opts())
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.join().unwrap().unwrap().value, 50 + i as i64);
    }
    let err = channel
        .unary::<Number, Number>("test.Later", &Number { value: -1 }, opts())
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(err.message.contains("without answering"), "{err}");
}

#[test]
fn per_message_timeouts_bound_each_chunk_not_the_whole_upload() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));

    // A steady upload longer than the per-message bound in total succeeds.
    let mut upload = channel
        .client_stream::<Number, Number>("test.Paced", opts())
        .unwrap();
    for value in 0..10 {
        upload
            .send_timeout(&Number { value }, Duration::from_secs(1))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = upload.finish_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(reply.value, 10);

    // A gap longer than the server's per-message bound fails the upload.
    let mut upload = channel
        .client_stream::<Number, Number>("test.Paced", opts())
        .unwrap();
    upload.send(&Number { value: 1 }).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let err = upload.finish().unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");

    // A receiver that stops reading makes the sender's per-message bound fire long before
    // the call's own deadline.
    let mut upload = channel
        .client_stream::<Number, Number>("test.Stall", opts())
        .unwrap();
    upload.send(&Number { value: 3_000 }).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    let err = loop {
        match upload.send_timeout(&Number { value: sent }, Duration::from_millis(100)) {
            Ok(()) => sent += 1,
            Err(err) => break err,
        }
        assert!(
            sent <= 2 * STREAM_WINDOW_MESSAGES as i64,
            "credit never ran out"
        );
    };
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(
        started.elapsed() < TIMEOUT,
        "the call deadline fired, not the per-message one"
    );
}

#[test]
fn inline_handlers_answer_from_the_reactor_with_the_callers_identity() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let identity = cluster.identity(Role::Worker);
    let channel = client.channel(&server.target(), &cluster.client_tls_for(&identity));
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                let request = Bytes {
                    data: vec![i; 100],
                    caller: String::new(),
                };
                channel.unary::<Bytes, Bytes>("test.InlineEcho", &request, opts())
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.join().unwrap().unwrap();
        assert_eq!(reply.data, vec![i as u8; 100]);
        assert_eq!(reply.caller, identity.node_id());
    }
    // The connection keeps serving pooled methods beside inline ones.
    assert_eq!(echo(&channel, b"still here").unwrap().data, b"still here");
}

#[test]
fn unix_socket_listener_serves_the_same_methods_with_the_same_identities() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("control.sock");
    // A stale socket file from a crashed process is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    server
        .transport
        .listen_local(&path, cluster.server_tls(), server.router.clone())
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let client = Transport::start(fast_config()).unwrap();
    let identity = cluster.identity(Role::Worker);
    let target = format!("unix:{}", path.display());
    let channel = client.channel(&target, &cluster.client_tls_for(&identity));
    let reply = echo(&channel, b"over unix").unwrap();
    assert_eq!(reply.data, b"over unix");
    assert_eq!(reply.caller, identity.node_id());
    // Role checks apply here too.
    let err = channel
        .unary::<Bytes, Bytes>("test.ManagersOnly", &Bytes::default(), opts())
        .unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied, "{err}");

    // A regular file in the way is not removed.
    let file = tmp.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err = server
        .transport
        .listen_local(&file, cluster.server_tls(), server.router.clone())
        .unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");

    // Stopping the transport removes the socket file.
    server.stop();
    assert!(!path.exists(), "the socket file outlived its listener");
}

#[test]
fn nowait_calls_need_a_live_connection_and_report_replies_and_failures_to_their_hook() {
    use prost::Message;
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let (tx, rx) = crossbeam_channel::unbounded();
    let hook = |tx: crossbeam_channel::Sender<_>| -> flotilla::net::ReplyCallback {
        Box::new(move |reply| tx.send(reply).unwrap())
    };
    // No connection yet: refused at once, and it never dials.
    let err = channel
        .unary_nowait("test.Echo", request(b"early"), TIMEOUT, hook(tx.clone()))
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(
        rx.try_recv().is_err(),
        "a refused call's hook is dropped unrun"
    );
    echo(&channel, b"connect").unwrap();
    // In order (an inline method answers in arrival order), each hook with its own reply.
    for i in 0..10u8 {
        channel
            .unary_nowait("test.InlineEcho", request(&[i]), TIMEOUT, hook(tx.clone()))
            .unwrap();
    }
    for i in 0..10u8 {
        let reply = rx.recv_timeout(TIMEOUT).unwrap().unwrap();
        assert_eq!(Bytes::decode(reply).unwrap().data, [i]);
    }
    // A call cut off by the server going away reports the failure.
    channel
        .unary_nowait(
            "test.Sleep",
            bytes::Bytes::from(Number { value: 60_000 }.encode_to_vec()),
            TIMEOUT,
            hook(tx.clone()),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.stop();
    let err = rx.recv_timeout(TIMEOUT).unwrap().unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
}

#[test]
fn oneway_calls_run_inline_handlers_in_order_and_nothing_comes_back() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    let err = channel
        .send_oneway("test.InlineRecord", request(b"early"))
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "no connection yet: {err}");
    echo(&channel, b"connect").unwrap();
    for i in 0..20u8 {
        channel
            .send_oneway("test.InlineRecord", request(&[i]))
            .unwrap();
    }
    for i in 0..20u8 {
        let event = expect_event(&server, |e| matches!(e, Event::Recorded(_)));
        assert_eq!(event, Event::Recorded(vec![i]));
    }
    // A pooled method cannot be called one-way: refused without a reply, and the
    // connection goes on serving.
    channel.send_oneway("test.Echo", request(b"x")).unwrap();
    assert_eq!(echo(&channel, b"still here").unwrap().data, b"still here");
}

#[test]
fn small_frames_are_written_by_their_sender_and_wait_behind_queued_big_ones() {
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, fast_config());
    let client = Transport::start(fast_config()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    echo(&channel, b"connect").unwrap();
    // Every third record is too big to be written inline (more than 64 KiB), so it goes
    // through the reactor's queue; the small ones sent right after it must not overtake it.
    let record_len = |i: u8| if i % 3 == 1 { 100 * 1024 } else { 1 };
    let before = client.frames_written_inline();
    for i in 0..30u8 {
        channel
            .send_oneway("test.InlineRecord", request(&vec![i; record_len(i)]))
            .unwrap();
    }
    for i in 0..30u8 {
        match expect_event(&server, |e| matches!(e, Event::Recorded(_))) {
            Event::Recorded(data) => {
                assert_eq!((data[0], data.len()), (i, record_len(i)), "record {i}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The first record found the connection idle, and so does every echo below once its
    // predecessor was answered: the fast path must be taken, not just be possible.
    assert!(client.frames_written_inline() > before);
    let before = client.frames_written_inline();
    for _ in 0..10 {
        assert_eq!(echo(&channel, b"again").unwrap().data, b"again");
    }
    assert!(
        client.frames_written_inline() > before,
        "requests on an idle connection are written by the caller"
    );
    assert!(
        server.transport.frames_written_inline() > 0,
        "replies from a pool thread are written by that thread"
    );
}
