//! The persistent signal store of a reconnecting [`Peer`](crate::Peer) ([`ReconnectOptions::store`](crate::ReconnectOptions::store)): one
//! SQLite file (WAL journal, `synchronous = FULL`). A persistent signal is written before
//! its send completes and deleted only by the receiver's acknowledgement (or its expiry).
//!
//! The store also keeps the sender's stream id and a *sequence ceiling*: every sequence
//! number the stream may have used is below it. Signals that are not persistent take
//! sequence numbers too, without being stored, so the ceiling is raised in blocks of
//! [`RESERVE`] (one synced write per block). After a restart the stream continues at the
//! ceiling, above anything sent before the crash: the receiver's duplicate detection
//! (which keeps the highest sequence number it accepted per stream) never mistakes a new
//! signal for an old one.
//!
//! The store needs the `persistence` feature (rusqlite, which compiles SQLite from C).
//! Without it, [`Store`] is a type without values: a peer's `Option<Store>` is always
//! `None`, and [`Store::open`] refuses with [`ReconnectError::PersistenceNotCompiledIn`].

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(feature = "persistence")]
use rusqlite::{params, Connection, OptionalExtension};

use crate::ReconnectError;

/// A signal loaded from the store at start-up.
#[cfg_attr(not(feature = "persistence"), allow(dead_code))]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) payload: Vec<u8>,
    /// Wall-clock expiry, milliseconds since the Unix epoch.
    pub(crate) expires_ms: u64,
}

/// What a store holds when it is opened.
#[cfg_attr(not(feature = "persistence"), allow(dead_code))]
pub(crate) struct Loaded {
    pub(crate) stream: u64,
    pub(crate) next_seq: u64,
    pub(crate) signals: Vec<Stored>,
}

/// The SQLite file of persistent signals.
#[cfg(feature = "persistence")]
pub(crate) struct Store {
    db: Connection,
    /// Every sequence number below this may have been used (durably recorded).
    ceiling: u64,
}

/// Without the `persistence` feature there is no store: this type has no values, so the
/// peer code that would use one is never reached.
#[cfg(not(feature = "persistence"))]
#[derive(Debug)]
pub(crate) enum Store {}

/// How many sequence numbers one write of the ceiling reserves.
#[cfg(feature = "persistence")]
pub(crate) const RESERVE: u64 = 4096;

#[cfg(feature = "persistence")]
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

#[cfg(feature = "persistence")]
impl Store {
    /// Opens (creating if needed) the store at `path`; a new store gets `fresh_stream` as
    /// its stream id.
    pub(crate) fn open(path: &Path, fresh_stream: u64) -> Result<(Store, Loaded), ReconnectError> {
        Store::open_sqlite(path, fresh_stream).map_err(ReconnectError::Store)
    }

    fn open_sqlite(path: &Path, fresh_stream: u64) -> Result<(Store, Loaded), String> {
        let db = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        db.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS chatter_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS chatter_signals (
                 seq INTEGER PRIMARY KEY, expires_ms INTEGER NOT NULL, payload BLOB NOT NULL);",
        )
        .map_err(err)?;
        let get = |key: &str| -> Result<Option<i64>, String> {
            db.query_row(
                "SELECT value FROM chatter_meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)
        };
        let stream = match get("stream")? {
            Some(v) => v as u64,
            None => {
                db.execute(
                    "INSERT INTO chatter_meta (key, value) VALUES ('stream', ?1)",
                    [fresh_stream as i64],
                )
                .map_err(err)?;
                fresh_stream
            }
        };
        // The key says "next_seq" for compatibility with stores of earlier versions, which
        // kept the next sequence number there; it is the ceiling now.
        let mut next_seq = get("next_seq")?.map_or(1, |v| v as u64).max(1);
        let mut signals = Vec::new();
        {
            let mut stmt = db
                .prepare("SELECT seq, expires_ms, payload FROM chatter_signals ORDER BY seq")
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(Stored {
                        seq: r.get::<_, i64>(0)? as u64,
                        expires_ms: r.get::<_, i64>(1)? as u64,
                        payload: r.get(2)?,
                    })
                })
                .map_err(err)?;
            for row in rows {
                let row = row.map_err(err)?;
                next_seq = next_seq.max(row.seq + 1);
                signals.push(row);
            }
        }
        Ok((
            Store {
                db,
                ceiling: next_seq,
            },
            Loaded {
                stream,
                next_seq,
                signals,
            },
        ))
    }

    /// Records a persistent signal durably (one transaction, synced) before it is
    /// accepted, raising the ceiling past it if needed.
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        payload: &[u8],
        expires_ms: u64,
    ) -> Result<(), String> {
        let tx = self.db.transaction().map_err(err)?;
        tx.execute(
            "INSERT OR REPLACE INTO chatter_signals (seq, expires_ms, payload) VALUES (?1, ?2, ?3)",
            params![seq as i64, expires_ms as i64, payload],
        )
        .map_err(err)?;
        let ceiling = if seq >= self.ceiling {
            let ceiling = seq.saturating_add(RESERVE);
            set_ceiling(&tx, ceiling)?;
            Some(ceiling)
        } else {
            None
        };
        tx.commit().map_err(err)?;
        if let Some(ceiling) = ceiling {
            self.ceiling = ceiling;
        }
        Ok(())
    }

    /// Makes sure `seq` is below the durable ceiling before a signal that is not stored
    /// uses it (a synced write once per [`RESERVE`] signals).
    pub(crate) fn reserve(&mut self, seq: u64) -> Result<(), String> {
        if seq < self.ceiling {
            return Ok(());
        }
        let ceiling = seq.saturating_add(RESERVE);
        set_ceiling(&self.db, ceiling)?;
        self.ceiling = ceiling;
        Ok(())
    }

    /// Forgets a signal (acknowledged, expired or dropped).
    pub(crate) fn delete(&mut self, seq: u64) {
        if let Err(e) = self
            .db
            .execute("DELETE FROM chatter_signals WHERE seq = ?1", [seq as i64])
        {
            tracing::warn!(seq, error = %e, "signal store: cannot delete a signal");
        }
    }
}

#[cfg(not(feature = "persistence"))]
impl Store {
    /// Refuses: this build has no store.
    pub(crate) fn open(path: &Path, _fresh_stream: u64) -> Result<(Store, Loaded), ReconnectError> {
        Err(ReconnectError::PersistenceNotCompiledIn {
            path: path.to_owned(),
        })
    }

    pub(crate) fn insert(&mut self, _: u64, _: &[u8], _: u64) -> Result<(), String> {
        match *self {}
    }

    pub(crate) fn reserve(&mut self, _: u64) -> Result<(), String> {
        match *self {}
    }

    pub(crate) fn delete(&mut self, _: u64) {
        match *self {}
    }
}

#[cfg(feature = "persistence")]
fn err(e: rusqlite::Error) -> String {
    e.to_string()
}

#[cfg(feature = "persistence")]
fn set_ceiling(db: &Connection, ceiling: u64) -> Result<(), String> {
    db.execute(
        "INSERT OR REPLACE INTO chatter_meta (key, value) VALUES ('next_seq', ?1)",
        [i64::try_from(ceiling).unwrap_or(i64::MAX)],
    )
    .map(drop)
    .map_err(err)
}

/// Milliseconds since the Unix epoch, `d` from now (saturating).
pub(crate) fn wall_ms_after(d: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(now.saturating_add(d.as_millis())).unwrap_or(u64::MAX)
}

/// How long until the wall-clock instant `ms` (zero if it passed).
pub(crate) fn wall_ms_remaining(ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    Duration::from_millis(u64::try_from(u128::from(ms).saturating_sub(now)).unwrap_or(0))
}

#[cfg(all(test, feature = "persistence"))]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sequence_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("chatter-store-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let (mut store, loaded) = Store::open(&dir, 42).expect("open");
        assert_eq!((loaded.stream, loaded.next_seq), (42, 1));
        store.insert(1, b"one", 10).expect("insert");
        store.insert(2, b"two", 20).expect("insert");
        store.delete(1);
        store.delete(2);
        drop(store);
        // The ceiling, not the last stored signal, decides where the stream continues:
        // signals 3.. may have been sent unstored before the restart.
        let (mut store, loaded) = Store::open(&dir, 7).expect("reopen");
        assert_eq!((loaded.stream, loaded.next_seq), (42, 1 + RESERVE));
        assert!(loaded.signals.is_empty());
        let seq = loaded.next_seq;
        store.insert(seq, b"three", 30).expect("insert");
        drop(store);
        let (_, loaded) = Store::open(&dir, 7).expect("reopen");
        assert_eq!(loaded.signals.len(), 1);
        assert_eq!(loaded.signals[0].payload, b"three");
        assert_eq!(loaded.next_seq, seq + RESERVE);
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn unstored_signals_reserve_their_sequence_numbers_in_blocks() {
        let path = std::env::temp_dir().join(format!("chatter-store-r-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (mut store, loaded) = Store::open(&path, 9).expect("open");
        assert_eq!(loaded.next_seq, 1);
        for seq in 1..=RESERVE + 10 {
            store.reserve(seq).expect("reserve");
        }
        drop(store);
        let (_, loaded) = Store::open(&path, 9).expect("reopen");
        // Past every sequence number used, within one block.
        assert!(loaded.next_seq > RESERVE + 10, "{}", loaded.next_seq);
        assert!(loaded.next_seq <= 2 * RESERVE + 10, "{}", loaded.next_seq);
        let _ = std::fs::remove_file(&path);
    }
}
