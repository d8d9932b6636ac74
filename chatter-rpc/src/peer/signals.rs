//! Signals this side sends: directly, or through the outbox while flow control holds them back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::{CloseCause, Connection, SendError, SendOptions};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::wire::Payload;

use super::*;

#[derive(Default)]
pub(super) struct Queued {
    pub(super) count: AtomicUsize,
    pub(super) drained: Notify,
}

/// Something the outbox task sends: a signal (with its expiry) or a control message.
pub(super) struct Outgoing {
    pub(super) payload: Bytes,
    pub(super) options: SendOptions,
    /// Signals only: drop (and count) if not handed over by then.
    pub(super) expires: Option<Instant>,
}

impl Inner {
    /// The outbox, started on first use.
    pub(super) fn outbox(&self) -> &mpsc::UnboundedSender<Outgoing> {
        self.outbox.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.runtime.spawn(run_outbox(
                self.conn.clone(),
                rx,
                self.queued.clone(),
                self.stats.clone(),
                self.hooks.tracked.clone(),
            ));
            tx
        })
    }

    /// Hands a control message (a cancel) to the connection now if it has credit, else to
    /// the queue of answers (which goes ahead of signals waiting for credit).
    pub(crate) fn send_soon(&self, payload: Payload, options: SendOptions) {
        match self.conn.try_send(&payload, options) {
            Err(SendError::WouldBlock) => self.queue_holding(payload, options, 0),
            Err(e) => tracing::debug!("chatter-rpc: dropping a control message: {e}"),
            Ok(_) => {}
        }
    }

    /// Sends a signal without waiting: directly when nothing is queued before it and the
    /// connection has credit, else through the outbox (dropped if `ttl` runs out first).
    pub(crate) fn signal(
        &self,
        payload: Payload,
        ttl: Duration,
    ) -> Result<(), crate::error::SignalError> {
        use crate::error::SignalError;
        if self.queued.count.load(Ordering::Acquire) == 0 {
            match self.conn.try_send(&payload, SendOptions::new()) {
                Ok(_) => {
                    bump(&self.stats.signals_sent);
                    return Ok(());
                }
                Err(SendError::WouldBlock) => {}
                Err(SendError::Closed(cause)) => return Err(SignalError::ConnectionLost(cause)),
                Err(e) => return Err(SignalError::TooLarge(e.to_string())),
            }
        }
        if ttl.is_zero() {
            bump(&self.stats.signals_expired);
            lock(&self.hooks.tracked).expired_unsent(&payload);
            return Ok(());
        }
        if self.queued.count.load(Ordering::Acquire) >= self.options.max_queued_signals {
            bump(&self.stats.signals_rejected);
            return Err(SignalError::OutboxFull);
        }
        self.queued.count.fetch_add(1, Ordering::AcqRel);
        let item = Outgoing {
            payload: payload.into_bytes(),
            options: SendOptions::new(),
            expires: Some(after(ttl)),
        };
        if self.outbox().send(item).is_err() {
            self.queued.count.fetch_sub(1, Ordering::AcqRel);
            let cause = self.conn.close_cause().unwrap_or(CloseCause::Local);
            return Err(SignalError::ConnectionLost(cause));
        }
        Ok(())
    }
}

pub(super) async fn run_outbox(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<Queued>,
    stats: Arc<Stats>,
    tracked: Arc<Mutex<reliable::Tracked>>,
) {
    while let Some(item) = rx.recv().await {
        let Some(expires) = item.expires else {
            let _ = conn.send_bytes(&item.payload, item.options).await;
            continue;
        };
        let expired = Instant::now() >= expires
            || match tokio::time::timeout_at(expires, conn.send_bytes(&item.payload, item.options))
                .await
            {
                Ok(Ok(_)) => {
                    bump(&stats.signals_sent);
                    false
                }
                Ok(Err(e)) => {
                    tracing::debug!("chatter-rpc: signal not sent: {e}");
                    false
                }
                Err(_) => true,
            };
        if expired {
            bump(&stats.signals_expired);
            lock(&tracked).expired_unsent(&item.payload);
        }
        if queued.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            queued.drained.notify_waiters();
        }
    }
}
