//! The deterministic simulator's command line (filled in with the engine).
fn main() {
    eprintln!("replicator-sim: the simulator is not built yet");
    std::process::exit(2);
}
