//! An actor-style service for Corral's pet tests, std only.
//!
//! Actors are threads with a mailbox (an mpsc channel). A supervisor thread
//! watches them and restarts one that panics, from the state it persisted.
//! The counter actor keeps `count` in STATE (written atomically on every
//! change); each start of the process bumps `boots`. A TCP port answers one
//! line commands:
//!   get          -> "count=N boots=B actor_restarts=R"
//!   inc          -> increments, answers like get
//!   panic        -> the counter actor panics (the supervisor restarts it)
//!   close-health -> stop listening (health checks then fail)
//!   exit N       -> the process exits with code N (a crash from inside)
//! If STATE's directory holds a file named `crash`, the process exits 3 at
//! once (a crash loop).
//!
//! Usage: actor PORT STATE_FILE

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Copy, Default)]
struct State {
    count: u64,
    boots: u64,
}

fn load(path: &Path) -> State {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut state = State::default();
    for part in text.split_whitespace() {
        if let Some((key, value)) = part.split_once('=') {
            let value = value.parse().unwrap_or(0);
            match key {
                "count" => state.count = value,
                "boots" => state.boots = value,
                _ => {}
            }
        }
    }
    state
}

fn save(path: &Path, state: State) {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).expect("create state");
    writeln!(file, "count={} boots={}", state.count, state.boots).expect("write state");
    file.sync_all().expect("sync state");
    fs::rename(&tmp, path).expect("rename state");
}

enum Msg {
    Get(Sender<State>),
    Inc(Sender<State>),
    Panic,
}

/// The counter actor: owns the state, persists every change.
fn counter(path: PathBuf, inbox: Arc<Mutex<Receiver<Msg>>>) {
    let mut state = load(&path);
    loop {
        let msg = match inbox.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(msg) => msg,
            Err(_) => return,
        };
        match msg {
            Msg::Get(reply) => {
                let _ = reply.send(state);
            }
            Msg::Inc(reply) => {
                state.count += 1;
                save(&path, state);
                let _ = reply.send(state);
            }
            Msg::Panic => panic!("counter actor asked to panic"),
        }
    }
}

/// Restarts the counter actor whenever it dies; counts the restarts.
fn supervise(path: PathBuf, inbox: Arc<Mutex<Receiver<Msg>>>, restarts: Arc<AtomicU64>) {
    loop {
        let (p, i) = (path.clone(), inbox.clone());
        let worker = thread::Builder::new()
            .name("counter".into())
            .spawn(move || counter(p, i))
            .expect("spawn counter");
        if worker.join().is_ok() {
            return; // the mailbox closed: shutting down
        }
        restarts.fetch_add(1, Ordering::SeqCst);
        eprintln!("supervisor: counter actor died; restarting it");
    }
}

fn answer(state: State, restarts: &AtomicU64) -> String {
    format!(
        "count={} boots={} actor_restarts={}\n",
        state.count,
        state.boots,
        restarts.load(Ordering::SeqCst)
    )
}

fn serve(
    stream: TcpStream,
    mailbox: &Sender<Msg>,
    restarts: &AtomicU64,
    closing: &AtomicBool,
) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let ask = |make: fn(Sender<State>) -> Msg| -> Option<State> {
        let (tx, rx) = channel();
        mailbox.send(make(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(5)).ok()
    };
    let reply = match words.as_slice() {
        ["get"] => ask(Msg::Get).map(|s| answer(s, restarts)),
        ["inc"] => ask(Msg::Inc).map(|s| answer(s, restarts)),
        ["panic"] => {
            let _ = mailbox.send(Msg::Panic);
            Some("ok\n".to_string())
        }
        ["close-health"] => {
            closing.store(true, Ordering::SeqCst);
            Some("ok\n".to_string())
        }
        ["exit", code] => {
            writer.write_all(b"bye\n")?;
            process::exit(code.parse().unwrap_or(1));
        }
        _ => Some("unknown command\n".to_string()),
    };
    writer.write_all(reply.unwrap_or_else(|| "busy\n".to_string()).as_bytes())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: actor PORT STATE_FILE");
        process::exit(2);
    }
    let port: u16 = args[1].parse().expect("port");
    let path = PathBuf::from(&args[2]);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.join("crash").exists() {
        eprintln!("crash file present: exiting 3");
        process::exit(3);
    }
    let mut state = load(&path);
    state.boots += 1;
    save(&path, state);
    println!("actor up: count={} boots={} port={}", state.count, state.boots, port);

    let (mailbox, inbox) = channel();
    let inbox = Arc::new(Mutex::new(inbox));
    let restarts = Arc::new(AtomicU64::new(0));
    {
        let (path, inbox, restarts) = (path.clone(), inbox.clone(), restarts.clone());
        thread::spawn(move || supervise(path, inbox, restarts));
    }

    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let closing = Arc::new(AtomicBool::new(false));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (tx, count, close) = (mailbox.clone(), restarts.clone(), closing.clone());
        let handler = thread::spawn(move || serve(stream, &tx, &count, &close));
        let _ = handler.join();
        if closing.load(Ordering::SeqCst) {
            break;
        }
    }
    drop(listener);
    println!("health port closed; idling");
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
