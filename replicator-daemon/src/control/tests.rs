//! The control server over a real Unix socket with a scripted fake handler:
//! every command, bad input, socket file rules, event streams, limits.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::client::{ControlClient, StreamItem};
use super::protocol::{
    ConnectionState, Event, EventKind, EventObject, Request, Response, MAX_REQUEST_BYTES,
};
use super::server::{bind, ControlError, MAX_CONTROL_CONNECTIONS, SOCKET_MODE};
use super::testing::{sample_status, wait_until, FakeHandler, Fixture, TEST_DEADLINE_MS};

fn deadline() -> Duration {
    Duration::from_millis(TEST_DEADLINE_MS)
}

/// Send raw bytes and read one response line.
async fn raw_exchange(stream: &mut BufReader<UnixStream>, bytes: &[u8]) -> Response {
    stream.get_mut().write_all(bytes).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(deadline(), stream.read_line(&mut line))
        .await
        .expect("no answer in time")
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
}

fn all_commands() -> Vec<Request> {
    vec![
        Request::Primary { force: false },
        Request::Primary { force: true },
        Request::Secondary { force: false },
        Request::Secondary { force: true },
        Request::Connect,
        Request::Disconnect,
        Request::Resync,
        Request::Verify,
        Request::Invalidate,
        Request::InvalidateRemote,
        Request::PauseSync,
        Request::ResumeSync,
        Request::NewCurrentUuid {
            clear_bitmap: false,
        },
        Request::NewCurrentUuid { clear_bitmap: true },
    ]
}

#[tokio::test]
async fn every_command_round_trips_to_the_handler_and_back() {
    // Proves each request reaches the handler intact, in order, over one
    // connection, and its response comes back to the client unchanged.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mut client = ControlClient::connect(&fx.path).await.unwrap();
    for request in all_commands() {
        let response = client.request(&request).await.unwrap();
        assert_eq!(
            response,
            Response::ok_with(format!("{} done", request.name()))
        );
    }
    assert_eq!(
        client.request(&Request::Status).await.unwrap(),
        Response::Status(Box::new(sample_status()))
    );
    let mut expected = all_commands();
    expected.push(Request::Status);
    assert_eq!(fx.handler.requests(), expected);
    fx.shutdown().await;
}

#[tokio::test]
async fn handler_refusal_reaches_the_client_as_an_error_sentence() {
    // Proves `{"ok":false,"error":...}` from the handler is passed through.
    let mut fx = Fixture::start(FakeHandler::refusing("The local disk is Outdated."), 16);
    let mut client = ControlClient::connect(&fx.path).await.unwrap();
    let response = client
        .request(&Request::Primary { force: false })
        .await
        .unwrap();
    assert_eq!(response, Response::error("The local disk is Outdated."));
    fx.shutdown().await;
}

#[tokio::test]
async fn malformed_json_gets_an_error_and_the_connection_and_server_survive() {
    // Proves bad JSON, an unknown command and non-UTF-8 each get an error
    // line, then the same connection and another one still work.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mut raw = BufReader::new(UnixStream::connect(&fx.path).await.unwrap());
    for bad in [
        &b"this is not json\n"[..],
        b"{\"command\":\"format-disk\"}\n",
        b"\xff\xff\n",
        b"{\"command\":\"primary\",\"force\":\"yes\"}\n",
    ] {
        match raw_exchange(&mut raw, bad).await {
            Response::Error(sentence) => {
                assert!(sentence.starts_with("malformed request"), "{sentence}")
            }
            other => panic!("expected an error for {bad:?}, got {other:?}"),
        }
    }
    let answer = raw_exchange(&mut raw, b"{\"command\":\"status\"}\n").await;
    assert!(matches!(answer, Response::Status(_)), "{answer:?}");
    let mut other = ControlClient::connect(&fx.path).await.unwrap();
    assert!(matches!(
        other.request(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    // Nothing malformed reached the handler.
    assert_eq!(
        fx.handler.requests(),
        vec![Request::Status, Request::Status]
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn oversized_request_gets_an_error_and_the_connection_survives() {
    // Proves a request line over MAX_REQUEST_BYTES is refused with a
    // sentence naming the limit, is not passed on, and the next request on
    // the same connection is served.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mut raw = BufReader::new(UnixStream::connect(&fx.path).await.unwrap());
    let mut huge = vec![b' '; MAX_REQUEST_BYTES * 16];
    huge.extend_from_slice(b"{\"command\":\"connect\"}\n");
    match raw_exchange(&mut raw, &huge).await {
        Response::Error(sentence) => {
            assert!(
                sentence.contains(&MAX_REQUEST_BYTES.to_string()),
                "{sentence}"
            )
        }
        other => panic!("expected an error, got {other:?}"),
    }
    let answer = raw_exchange(&mut raw, b"{\"command\":\"disconnect\"}\n").await;
    assert_eq!(answer, Response::ok_with("disconnect done"));
    assert_eq!(fx.handler.requests(), vec![Request::Disconnect]);
    fx.shutdown().await;
}

#[tokio::test]
async fn socket_file_is_mode_0600() {
    // Proves only the owner can connect: the socket file's mode is 0600.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mode = std::fs::metadata(&fx.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, SOCKET_MODE);
    assert_eq!(SOCKET_MODE, 0o600);
    fx.shutdown().await;
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    // Proves a socket file nobody listens on (a crashed daemon's) does not
    // stop a new daemon from binding.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale file should remain");
    let listener = bind(&path).expect("a stale socket should be replaced");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(listener);
    assert!(
        !path.exists(),
        "the socket file is removed when the listener goes"
    );
}

#[tokio::test]
async fn live_socket_is_refused_with_a_clear_error() {
    // Proves a second daemon on the same socket is refused, names the path,
    // and leaves the first one working.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let err = bind(&fx.path).expect_err("a live socket must be refused");
    assert!(
        matches!(err, ControlError::AlreadyRunning { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&fx.path.display().to_string()));
    let mut client = ControlClient::connect(&fx.path).await.unwrap();
    assert!(matches!(
        client.request(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    fx.shutdown().await;
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    // Proves the daemon never deletes a file that is not a socket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = bind(&path).expect_err("a regular file must be refused");
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn missing_parent_directory_is_created() {
    // Proves /run/replicator-style parents need not exist beforehand.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/replicator/vm1-alpha.sock");
    let listener = bind(&path).unwrap();
    assert!(path.exists());
    drop(listener);
}

#[tokio::test]
async fn shutdown_removes_the_socket_file_and_ends_event_streams() {
    // Proves a stopped server leaves no socket behind and closes
    // subscribers' streams (they see EOF, not a hang).
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let client = ControlClient::connect(&fx.path).await.unwrap();
    let mut stream = client.subscribe().await.unwrap().unwrap();
    for _ in 0..5 {
        stream.next().await.unwrap().unwrap();
    }
    fx.shutdown().await;
    assert!(!fx.path.exists());
    let end = tokio::time::timeout(deadline(), stream.next())
        .await
        .expect("stream did not end");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn events_stream_starts_with_the_exists_dump_and_end_marker_then_changes() {
    // Proves the events2-style stream: ok, one `exists` per object, the
    // `exists -` marker, then each published change in order.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let client = ControlClient::connect(&fx.path).await.unwrap();
    let mut stream = client.subscribe().await.unwrap().unwrap();
    let mut dump = Vec::new();
    loop {
        match stream.next().await.unwrap().unwrap() {
            StreamItem::Event(e) if e.is_end_of_dump() => break,
            StreamItem::Event(e) => dump.push(e),
            StreamItem::Ended(s) => panic!("stream ended: {s}"),
        }
    }
    let objects: Vec<_> = dump.iter().map(|e| (e.kind, e.object)).collect();
    assert_eq!(
        objects,
        [
            (EventKind::Exists, EventObject::Resource),
            (EventKind::Exists, EventObject::Connection),
            (EventKind::Exists, EventObject::Device),
            (EventKind::Exists, EventObject::PeerDevice),
        ]
    );
    assert_eq!(dump[0].fields["role"], "Primary");
    let mut old = sample_status();
    let mut published = Vec::new();
    for state in [ConnectionState::Connecting, ConnectionState::Connected] {
        let mut new = old.clone();
        new.connection = state;
        for event in super::protocol::change_events(&old, &new, "t") {
            fx.events.send(event.clone()).unwrap();
            published.push(event);
        }
        old = new;
    }
    for expected in published {
        let got = tokio::time::timeout(deadline(), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, StreamItem::Event(expected));
    }
    fx.shutdown().await;
}

#[tokio::test]
async fn event_publisher_sends_only_differences_between_snapshots() {
    // Proves the daemon-side helper: the first snapshot is a baseline, an
    // unchanged one sends nothing, a change sends one line per object.
    let publisher_statuses = {
        let mut s = sample_status();
        s.role = super::protocol::Role::Secondary;
        s
    };
    let mut publisher = super::server::EventPublisher::new();
    let mut rx = publisher.sender().subscribe();
    assert_eq!(publisher.publish(&sample_status()), 0);
    assert_eq!(publisher.publish(&sample_status()), 0);
    assert_eq!(publisher.publish(&publisher_statuses), 1);
    let event = rx.try_recv().unwrap();
    assert_eq!(event.kind, EventKind::Change);
    assert_eq!(event.object, EventObject::Resource);
    assert_eq!(event.fields["role"], "Secondary");
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn event_publisher_rate_limits_progress_but_not_state_changes() {
    // Proves a resync's counters produce at most one event per
    // PROGRESS_EVENT_INTERVAL_MS (carrying the latest values), while a
    // state change (the resync ending) goes out at once.
    use super::protocol::{Progress, ReplicationState};
    use super::server::{EventPublisher, PROGRESS_EVENT_INTERVAL_MS};
    use std::time::Instant;
    let at = |done: u64| {
        let mut s = sample_status();
        s.replication = ReplicationState::SyncSource;
        s.out_of_sync_bytes = 100 - done;
        s.resync = Some(Progress {
            done_bytes: done,
            total_bytes: 100,
            rate_bytes_per_s: 1,
            eta_s: Some(100 - done),
        });
        s
    };
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut publisher = EventPublisher::new();
    let mut rx = publisher.sender().subscribe();
    assert_eq!(publisher.publish_at(&sample_status(), ms(0)), 0);
    // The resync starting is a state change: published.
    assert_eq!(publisher.publish_at(&at(0), ms(1)), 1);
    // First counter-only change: published, then held back for a while.
    assert_eq!(publisher.publish_at(&at(10), ms(2)), 1);
    for (done, t) in [(20, 3), (30, 500), (40, PROGRESS_EVENT_INTERVAL_MS)] {
        assert_eq!(publisher.publish_at(&at(done), ms(t)), 0, "at {t} ms");
    }
    assert_eq!(
        publisher.publish_at(&at(50), ms(2 + PROGRESS_EVENT_INTERVAL_MS)),
        1
    );
    // The end (replication back to Established, resync null): at once.
    assert_eq!(
        publisher.publish_at(&sample_status(), ms(3 + PROGRESS_EVENT_INTERVAL_MS)),
        1
    );
    let events: Vec<Event> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].fields["replication"], "SyncSource");
    assert_eq!(events[2].fields["resync"]["done_bytes"], 50);
    assert_eq!(events[3].fields["replication"], "Established");
    assert_eq!(events[3].fields["resync"], serde_json::Value::Null);
}

#[tokio::test]
async fn lagging_event_subscriber_is_dropped_with_a_reason() {
    // Proves a subscriber that falls a whole channel behind is cut off with
    // an error line (memory stays bounded by the channel), and the server
    // and other connections carry on.
    const CAPACITY_EVENTS: usize = 4;
    let mut fx = Fixture::start(
        FakeHandler::scripted(vec![sample_status()]),
        CAPACITY_EVENTS,
    );
    let client = ControlClient::connect(&fx.path).await.unwrap();
    let mut stream = client.subscribe().await.unwrap().unwrap();
    for _ in 0..5 {
        stream.next().await.unwrap().unwrap();
    }
    // On this single-threaded runtime the server task cannot run while
    // these are sent, so the subscriber necessarily lags.
    for _ in 0..CAPACITY_EVENTS * 4 {
        fx.events.send(Event::end_of_dump("t".into())).unwrap();
    }
    let mut ended = None;
    while let Some(item) = tokio::time::timeout(deadline(), stream.next())
        .await
        .expect("stream hung")
        .unwrap()
    {
        if let StreamItem::Ended(sentence) = item {
            ended = Some(sentence);
        }
    }
    let sentence = ended.expect("the subscriber should be told it was dropped");
    assert!(sentence.contains("fell 12 events behind"), "{sentence}");
    wait_until("the dropped subscriber is gone", || {
        fx.events.receiver_count() == 0
    })
    .await;
    let mut other = ControlClient::connect(&fx.path).await.unwrap();
    assert!(matches!(
        other.request(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    fx.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_get_a_busy_error_and_others_still_work() {
    // Proves the connection limit: the one over MAX_CONTROL_CONNECTIONS is
    // told so and closed; once one closes, a new connection is served.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mut held = Vec::new();
    for _ in 0..MAX_CONTROL_CONNECTIONS {
        let mut client = ControlClient::connect(&fx.path).await.unwrap();
        // A round trip proves the server accepted it and holds its slot.
        client.request(&Request::Connect).await.unwrap();
        held.push(client);
    }
    let mut extra = UnixStream::connect(&fx.path).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(deadline(), extra.read_to_string(&mut text))
        .await
        .expect("the extra connection was not closed")
        .unwrap();
    let response: Response = serde_json::from_str(text.trim_end()).unwrap();
    assert!(
        matches!(&response, Response::Error(s) if s.contains("already serves")),
        "{response:?}"
    );
    drop(held.pop());
    // The freed slot is released when its task sees EOF: poll for it.
    let deadline_at = tokio::time::Instant::now() + deadline();
    loop {
        let mut client = ControlClient::connect(&fx.path).await.unwrap();
        if let Ok(Response::Status(_)) = client.request(&Request::Status).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline_at,
            "slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fx.shutdown().await;
}

#[tokio::test]
async fn client_reports_unreachable_when_no_daemon_listens() {
    // Proves connecting to a missing socket is a distinct, named error.
    let dir = tempfile::tempdir().unwrap();
    let err = ControlClient::connect(&dir.path().join("none.sock"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, super::client::ClientError::Unreachable { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn event_subscriber_that_disconnects_is_released() {
    // Proves a subscriber going away frees its broadcast receiver (no
    // per-subscriber state is left behind to fill up).
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let client = ControlClient::connect(&fx.path).await.unwrap();
    let mut stream = client.subscribe().await.unwrap().unwrap();
    for _ in 0..5 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(fx.events.receiver_count(), 1);
    drop(stream);
    wait_until("the subscriber is released", || {
        fx.events.receiver_count() == 0
    })
    .await;
    fx.shutdown().await;
}

#[tokio::test]
async fn idle_connection_is_told_and_closed_after_the_idle_timeout() {
    // Proves a client that connects and says nothing does not hold its slot
    // forever: after the idle timeout it gets an error line and EOF.
    const IDLE_TIMEOUT_MS: u64 = 200;
    let options = super::server::ServerOptions {
        idle_timeout_ms: IDLE_TIMEOUT_MS,
    };
    let mut fx = Fixture::start_with(FakeHandler::scripted(vec![sample_status()]), 16, options);
    let mut idle = UnixStream::connect(&fx.path).await.unwrap();
    let mut text = String::new();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(deadline(), idle.read_to_string(&mut text))
        .await
        .expect("idle connection never closed")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(IDLE_TIMEOUT_MS),
        "closed too early"
    );
    let response: Response = serde_json::from_str(text.trim_end()).unwrap();
    assert!(
        matches!(&response, Response::Error(s) if s.contains("idle")),
        "{response:?}"
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn serve_binds_serves_and_cleans_up_on_shutdown() {
    // Proves the one-call entry point: it answers requests on the path and,
    // once the shutdown future completes, returns Ok with the socket gone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let (events, _) = tokio::sync::broadcast::channel(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handler: std::sync::Arc<dyn super::server::ControlHandler> =
        FakeHandler::scripted(vec![sample_status()]);
    let server = tokio::spawn({
        let path = path.clone();
        async move {
            super::server::serve(&path, handler, events, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let deadline_at = tokio::time::Instant::now() + deadline();
    let mut client = loop {
        if let Ok(client) = ControlClient::connect(&path).await {
            break client;
        }
        assert!(tokio::time::Instant::now() < deadline_at, "never bound");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(
        client.request(&Request::Connect).await.unwrap(),
        Response::ok_with("connect done")
    );
    stop.send(()).unwrap();
    let result = tokio::time::timeout(deadline(), server)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(!path.exists());
}

/// Panics on `connect`, answers everything else like [`FakeHandler`].
struct PanickingHandler(std::sync::Arc<FakeHandler>);

impl super::server::ControlHandler for PanickingHandler {
    fn handle(
        &self,
        request: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>> {
        assert!(request != Request::Connect, "scripted handler bug");
        self.0.handle(request)
    }
}

#[tokio::test]
async fn a_panicking_handler_closes_only_its_own_connection() {
    // Proves a handler bug on one connection ends that connection (the
    // client sees it closed without an answer) while the server and other
    // connections keep working.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let listener = bind(&path).unwrap();
    let (events, _) = tokio::sync::broadcast::channel(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handler = std::sync::Arc::new(PanickingHandler(FakeHandler::scripted(vec![
        sample_status(),
    ])));
    let server = tokio::spawn(super::server::run(listener, handler, events, async {
        let _ = stopped.await;
    }));
    let mut bystander = ControlClient::connect(&path).await.unwrap();
    let mut victim = ControlClient::connect(&path).await.unwrap();
    let err = victim.request(&Request::Connect).await.unwrap_err();
    assert!(
        matches!(
            err,
            super::client::ClientError::Closed { .. } | super::client::ClientError::Io { .. }
        ),
        "{err:?}"
    );
    assert!(matches!(
        bystander.request(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    let mut fresh = ControlClient::connect(&path).await.unwrap();
    assert_eq!(
        fresh.request(&Request::Disconnect).await.unwrap(),
        Response::ok_with("disconnect done")
    );
    stop.send(()).unwrap();
    tokio::time::timeout(deadline(), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_request_times_out_when_the_daemon_never_answers() {
    // Proves a stuck daemon cannot hang replctl: a request to a socket that
    // accepts but never answers fails with TimedOut after the set limit.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut client = ControlClient::connect(&path).await.unwrap();
    client.set_timeout(Duration::from_millis(100));
    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(deadline(), client.request(&Request::Status))
        .await
        .expect("the client's own timeout did not fire")
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(
        matches!(
            err,
            super::client::ClientError::TimedOut {
                timeout_ms: 100,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("did not answer within 100 ms"));
    mute.abort();
}
