//! Serves a sparse in-memory export for manual checks with real clients:
//! `cargo run -p nbd-frontend --example mem_server -- SOCKET_PATH [SIZE_MIB]`
//! (or with no arguments under socket activation, e.g. `nbdinfo [ mem_server ]`).
//! Stops on SIGINT/SIGTERM. Nothing is durable.

use std::sync::Arc;

use nbd_frontend::mem::MemTarget;
use nbd_frontend::{serve, ExportConfig, Listener};
use tokio::signal::unix::{signal, SignalKind};

const DEFAULT_SIZE_MIB: u64 = 64;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mib = match args.get(1).map(|s| s.parse::<u64>()) {
        None => DEFAULT_SIZE_MIB,
        Some(Ok(n)) => n,
        Some(Err(e)) => exit(&format!("SIZE_MIB {:?} is not a number: {e}", args[1])),
    };
    let mut listeners = nbd_frontend::activation::listeners_from_env()
        .unwrap_or_else(|e| exit(&format!("socket activation: {e}")));
    if listeners.is_empty() {
        let Some(path) = args.first() else {
            exit("usage: mem_server SOCKET_PATH [SIZE_MIB] (or run under socket activation)");
        };
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .unwrap_or_else(|e| exit(&format!("cannot listen on {path}: {e}")));
        listeners.push(Listener::Unix(l));
    }
    let export = ExportConfig {
        name: "mem".into(),
        description: format!("{size_mib} MiB in memory"),
    };
    let target = Arc::new(MemTarget::new(size_mib << 20));
    let stop = async {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    if let Err(e) = serve(listeners, export, target, stop).await {
        exit(&format!("server failed: {e}"));
    }
    if let Some(path) = args.first() {
        let _ = std::fs::remove_file(path);
    }
}

fn exit(msg: &str) -> ! {
    eprintln!("mem_server: {msg}");
    std::process::exit(1)
}
