//! Test support: a scripted fake [`ControlHandler`] and a running control
//! server in a temporary directory. Test-only; the daemon never uses it.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use super::protocol::{
    ConnectionState, DiskState, Event, PeerRole, ReplicationProtocol, ReplicationState, Request,
    Response, Role, StatusReport,
};
use super::server::{bind, run_with, ControlHandler, ServerOptions};

/// Longest any test waits for a condition, in milliseconds.
pub const TEST_DEADLINE_MS: u64 = 10_000;

/// A connected, in-sync primary.
pub fn sample_status() -> StatusReport {
    StatusReport {
        resource: "vm1".into(),
        node: "alpha".into(),
        role: Role::Primary,
        disk: DiskState::UpToDate,
        connection: ConnectionState::Connected,
        replication: ReplicationState::Established,
        peer_role: PeerRole::Secondary,
        peer_disk: DiskState::UpToDate,
        size_bytes: 1 << 30,
        out_of_sync_bytes: 0,
        resync: None,
        peer_node: "bravo".into(),
        protocol: ReplicationProtocol::C,
        verify: None,
        split_brain: false,
        last_refusal: None,
        connection_error: None,
        disk_error: None,
        nbd: Some("127.0.0.1:10809".into()),
        nbd_clients: 0,
        resync_transferred_bytes: 0,
        resync_disk_wait_s: None,
        resync_disk_wait_peer: false,
        peer_resync_disk_wait: false,
    }
}

/// A handler that records every request, answers `Status` from a script of
/// statuses (the last one repeats) and every other command with
/// `{"ok":true,"message":"<command> done"}`, or with `refusal` if set.
#[derive(Debug)]
pub struct FakeHandler {
    /// Every request received, in order.
    pub log: Mutex<Vec<Request>>,
    statuses: Mutex<VecDeque<StatusReport>>,
    refusal: Option<String>,
}

impl FakeHandler {
    /// Answers `Status` with the scripted statuses in turn.
    pub fn scripted(statuses: Vec<StatusReport>) -> Arc<Self> {
        assert!(!statuses.is_empty(), "a script needs at least one status");
        Arc::new(FakeHandler {
            log: Mutex::new(Vec::new()),
            statuses: Mutex::new(statuses.into()),
            refusal: None,
        })
    }

    /// Refuses every command but `Status` with `sentence`.
    pub fn refusing(sentence: &str) -> Arc<Self> {
        Arc::new(FakeHandler {
            log: Mutex::new(Vec::new()),
            statuses: Mutex::new(vec![sample_status()].into()),
            refusal: Some(sentence.to_owned()),
        })
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    fn next_status(&self) -> StatusReport {
        let mut statuses = self.statuses.lock().unwrap();
        if statuses.len() > 1 {
            statuses.pop_front().unwrap()
        } else {
            statuses.front().unwrap().clone()
        }
    }
}

impl ControlHandler for FakeHandler {
    fn handle(&self, request: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        self.log.lock().unwrap().push(request.clone());
        let response = match (&request, &self.refusal) {
            (Request::Status, _) => Response::Status(Box::new(self.next_status())),
            (_, Some(sentence)) => Response::error(sentence.clone()),
            (other, None) => Response::ok_with(format!("{} done", other.name())),
        };
        Box::pin(async move { response })
    }
}

/// A control server running on a socket in a temporary directory.
#[derive(Debug)]
pub struct Fixture {
    /// Keeps the directory alive.
    pub _dir: tempfile::TempDir,
    /// The socket path.
    pub path: PathBuf,
    /// Publishes events to subscribers.
    pub events: broadcast::Sender<Event>,
    /// The handler the server uses.
    pub handler: Arc<FakeHandler>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Fixture {
    /// Bind a socket and serve it with `handler`; `event_capacity` sizes the
    /// broadcast channel.
    pub fn start(handler: Arc<FakeHandler>, event_capacity: usize) -> Fixture {
        Self::start_with(handler, event_capacity, ServerOptions::default())
    }

    /// [`Fixture::start`] with explicit server options.
    pub fn start_with(
        handler: Arc<FakeHandler>,
        event_capacity: usize,
        options: ServerOptions,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).unwrap();
        let (events, _) = broadcast::channel(event_capacity);
        let (stop, stopped) = oneshot::channel::<()>();
        let dyn_handler: Arc<dyn ControlHandler> = handler.clone();
        let stop_signal = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(run_with(
            listener,
            dyn_handler,
            events.clone(),
            stop_signal,
            options,
        ));
        Fixture {
            _dir: dir,
            path,
            events,
            handler,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stop the server and wait (bounded) for it to finish.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_millis(TEST_DEADLINE_MS), task)
                .await
                .expect("server did not stop in time")
                .unwrap();
        }
    }
}

/// Poll `condition` every few milliseconds until it holds or the deadline
/// passes (then panic with `what`).
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(TEST_DEADLINE_MS);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
