//! chatter-rpc streams: upload a file far larger than one frame to a server and download it
//! back, with a progress bar, checking its SHA-256 on both sides.
//!
//! A method that takes a `stream::Receiver<Bytes>` reads an upload chunk by chunk; one that
//! returns a `Receiver<Bytes>` sends a download. Each stream has its own flow control
//! (`PeerOptions::stream_window`), so neither side ever holds more than a window of the
//! file in memory, whatever its size.
//!
//! Run with `cargo run --release --example files [MEGABYTES]` (default 300).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use chatter_rpc::stream::{self, Receiver};
use chatter_rpc::{listen, remote, serve, Options, Peer, PeerOptions};
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Chunks of 256 KiB: large enough that per-message costs vanish, small enough to fit the
/// default frame size (4 MiB), with several in the default stream window (1 MiB).
const CHUNK: usize = 256 * 1024;

/// What the server stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum FilesError {
    #[error("bad file name `{0}`")]
    BadName(String),
    #[error("no file `{0}`")]
    NotFound(String),
    #[error("storage failed: {0}")]
    Io(String),
    #[error("the upload was cut short: {0}")]
    Interrupted(String),
}

#[remote]
pub trait Files {
    /// Stores the chunks of `data` as `name`; answers with the size and hash it wrote.
    async fn upload(&self, name: String, data: Receiver<Bytes>) -> Result<Stored, FilesError>;
    /// Sends the file `name` in chunks.
    async fn download(&self, name: String) -> Result<Receiver<Bytes>, FilesError>;
}

/// A server storing files in a directory.
struct Store {
    dir: PathBuf,
}

impl Store {
    fn path(&self, name: &str) -> Result<PathBuf, FilesError> {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !plain || name.starts_with('.') {
            return Err(FilesError::BadName(name.to_owned()));
        }
        Ok(self.dir.join(name))
    }
}

impl Files for Store {
    async fn upload(&self, name: String, mut data: Receiver<Bytes>) -> Result<Stored, FilesError> {
        let path = self.path(&name)?;
        let io = |e: std::io::Error| FilesError::Io(e.to_string());
        let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
        let (mut hash, mut bytes) = (Context::new(&SHA256), 0u64);
        while let Some(chunk) = data.recv().await {
            let chunk = chunk.map_err(|e| FilesError::Interrupted(e.to_string()))?;
            hash.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        Ok(Stored {
            bytes,
            sha256: hex(hash.finish().as_ref()),
        })
    }

    async fn download(&self, name: String) -> Result<Receiver<Bytes>, FilesError> {
        let path = self.path(&name)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| FilesError::NotFound(name))?;
        // The reader's window paces this task: `send` waits while the client is behind.
        let (tx, rx) = stream::channel(4);
        tokio::spawn(async move {
            loop {
                let mut chunk = vec![0; CHUNK];
                match file.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(Bytes::from(chunk)).await.is_err() {
                            break; // The client went away.
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A one-line progress bar on stderr.
struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    shown: Instant,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            label,
            total,
            done: 0,
            start: now,
            shown: now,
        }
    }

    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.shown.elapsed().as_millis() >= 100 || self.done == self.total {
            self.shown = Instant::now();
            self.draw();
        }
    }

    fn draw(&self) {
        let share = self.done as f64 / self.total.max(1) as f64;
        let filled = (share * 30.0) as usize;
        let rate = self.done as f64 / self.start.elapsed().as_secs_f64().max(1e-9) / 1e6;
        eprint!(
            "\r{:<9} [{}{}] {:5.1}% {:7.1} MB/s",
            self.label,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            share * 100.0,
            rate
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        self.draw();
        eprintln!();
    }
}

/// The file's content: a deterministic pseudo-random sequence (xorshift), `len` bytes.
fn content(len: u64) -> impl Iterator<Item = Bytes> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(CHUNK as u64) as usize;
        left -= n as u64;
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.extend_from_slice(&state.to_le_bytes());
        }
        chunk.truncate(n);
        Some(Bytes::from(chunk))
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let megabytes: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("not a number of megabytes: {arg}"))?,
        None => 300,
    };
    let total = megabytes * 1_000_000;
    let options = PeerOptions::default();

    // The server: files in a fresh temporary directory.
    let dir = std::env::temp_dir().join(format!("chatter-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let address = listener.addresses()[0].clone();
    let server_dir = dir.clone();
    let server = serve(listener, options.clone(), move |peer: &Peer| {
        let store = Store {
            dir: server_dir.clone(),
        };
        peer.register("files", FilesServer::new(store));
    });

    let peer = Peer::with_options(
        chatter_rpc::connect(&address, Options::default()).await?,
        options,
    );
    let files = FilesClient::new(&peer, "files");

    // Upload: the chunks are made, hashed and counted as the stream takes them.
    let (tx, rx) = stream::channel(4);
    let feed = tokio::spawn(async move {
        let (mut hash, mut progress) = (Context::new(&SHA256), Progress::new("upload", total));
        for chunk in content(total) {
            hash.update(&chunk);
            let n = chunk.len();
            if tx.send(chunk).await.is_err() {
                break;
            }
            progress.add(n);
        }
        progress.finish();
        hex(hash.finish().as_ref())
    });
    let started = Instant::now();
    let stored = files.upload("big.bin".into(), rx).await?;
    let sent_hash = feed.await?;
    println!(
        "uploaded {} bytes in {:.2} s, server's SHA-256 {}",
        stored.bytes,
        started.elapsed().as_secs_f64(),
        stored.sha256
    );
    assert_eq!(stored.sha256, sent_hash, "the server stored what was sent");

    // Download it back.
    let started = Instant::now();
    let mut chunks = files.download("big.bin".into()).await?;
    let (mut hash, mut progress) = (
        Context::new(&SHA256),
        Progress::new("download", stored.bytes),
    );
    while let Some(chunk) = chunks.recv().await {
        let chunk = chunk?;
        hash.update(&chunk);
        progress.add(chunk.len());
    }
    progress.finish();
    let got_hash = hex(hash.finish().as_ref());
    println!(
        "downloaded {} bytes in {:.2} s, SHA-256 {}",
        progress.done,
        started.elapsed().as_secs_f64(),
        got_hash
    );
    assert_eq!(got_hash, sent_hash, "the download is what was uploaded");
    println!("hashes match");

    peer.close().await;
    server.close().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
