//! The webhook sink: each event is POSTed as JSON to an HTTPS endpoint (system roots plus an
//! optional `ca_file`), from a socket tagged as the agent's own. Events go through the
//! on-disk [`Spool`] first (a thread writes them), so they survive a receiver that is down
//! and an agent restart; the delivery thread (`airlock-events-webhook`, a current-thread
//! runtime of its own, like the shipper's) delivers them oldest first, retrying with
//! backoff: no spool I/O runs on the traffic's runtime. An event is removed from the spool
//! only after a 2xx answer: delivery is at-least-once (a crash between the answer and the
//! removal sends it again). Logs name the receiver by scheme, host and port only: chat
//! webhooks (Slack, Discord, Teams) carry their token in the path.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use super::{
    Backoff, EventStats, EventsError, Msg,
    spool::{Role, Spool},
};
use crate::config::events::WebhookSink;

/// Longest wait between two attempts at a receiver that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Rescan the spool this often (another process, `airlock verify`, may have spooled an
/// event); one directory scan per period, never one per event.
const RESCAN: Duration = Duration::from_secs(5);

pub struct Delivery {
    cfg: WebhookSink,
    spool: Spool,
    stats: Arc<EventStats>,
    wake: tokio::sync::Notify,
    tls: Arc<rustls::ClientConfig>,
    /// The `Authorization` header value (a secret: never logged).
    authorization: Option<http::HeaderValue>,
}

impl Delivery {
    /// Open the spool (`role`: the agent owns it; a CLI only adds to it) and read the TLS
    /// and authorization settings.
    pub fn open(
        cfg: WebhookSink,
        stats: Arc<EventStats>,
        role: Role,
    ) -> Result<Delivery, EventsError> {
        let spool = Spool::open(
            &cfg.spool_dir,
            cfg.spool_max_bytes,
            cfg.spool_max_files,
            role,
        )
        .map_err(|source| EventsError::Spool {
            path: cfg.spool_dir.clone(),
            source,
        })?;
        stats
            .webhook
            .spooled
            .store(spool.usage().0 as u64, Ordering::Relaxed);
        let extra = match &cfg.ca_file {
            Some(path) => {
                crate::config::extra_roots(path).map_err(|message| EventsError::CaFile {
                    path: path.clone(),
                    message,
                })?
            }
            None => Vec::new(),
        };
        let tls = crate::egress::tls::system_client(&extra).map_err(|e| EventsError::CaFile {
            path: cfg.ca_file.clone().unwrap_or_default(),
            message: e.to_string(),
        })?;
        let authorization = match &cfg.authorization_file {
            None => None,
            Some(path) => {
                let auth_err = |message: String| EventsError::Authorization {
                    path: path.clone(),
                    message,
                };
                crate::fsperm::check_secret_file(path).map_err(|e| auth_err(e.to_string()))?;
                let text = std::fs::read_to_string(path).map_err(|e| auth_err(e.to_string()))?;
                let mut value = http::HeaderValue::from_str(text.trim())
                    .map_err(|_| auth_err("not a valid header value".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Delivery {
            cfg,
            spool,
            stats,
            wake: tokio::sync::Notify::new(),
            tls,
            authorization,
        })
    }

    fn spool_event(&self, json: &str) {
        let s = &self.stats.webhook;
        match self.spool.push(json.as_bytes()) {
            Ok(dropped) => {
                s.spool_dropped.fetch_add(dropped, Ordering::Relaxed);
                self.wake.notify_one();
            }
            Err(e) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(spool = %self.cfg.spool_dir.display(), error = %e, "cannot spool an event for the webhook");
            }
        }
        s.spooled
            .store(self.spool.usage().0 as u64, Ordering::Relaxed);
    }

    /// The receiver as logs and errors show it: scheme, host and port only.
    pub fn url_for_logs(&self) -> String {
        crate::config::redacted_url(&self.cfg.url)
    }

    /// Deliver the spool, oldest first, forever, on the delivery thread's runtime.
    async fn run(self: Arc<Self>, own: Arc<crate::kernel::OwnSockets>) {
        let s = &self.stats.webhook;
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut warned = false;
        let timeout = Duration::from_secs(self.cfg.timeout_secs);
        let mut scanned = Instant::now();
        loop {
            if scanned.elapsed() >= RESCAN {
                scanned = Instant::now();
                if let Err(e) = self.spool.rescan(true) {
                    tracing::warn!(spool = %self.cfg.spool_dir.display(), error = %e, "cannot read the events spool");
                }
                s.spooled
                    .store(self.spool.usage().0 as u64, Ordering::Relaxed);
            }
            let Some(path) = self.spool.oldest() else {
                let wait = RESCAN.saturating_sub(scanned.elapsed());
                let _ = tokio::time::timeout(wait, self.wake.notified()).await;
                continue;
            };
            let body = match self.spool.read(&path) {
                Ok(b) => b,
                Err(_) => {
                    // Gone (raced with a drop) or not ours: skip it.
                    let _ = self.spool.remove(&path);
                    continue;
                }
            };
            match crate::egress::post_json(
                &self.cfg.url,
                &own,
                bytes::Bytes::from(body),
                self.tls.clone(),
                self.authorization.as_ref(),
                timeout,
            )
            .await
            {
                Ok(()) => {
                    let _ = self.spool.remove(&path);
                    s.sent.fetch_add(1, Ordering::Relaxed);
                    s.spooled
                        .store(self.spool.usage().0 as u64, Ordering::Relaxed);
                    backoff.reset();
                    if warned {
                        tracing::info!(url = %self.url_for_logs(), "events webhook reachable again");
                        warned = false;
                    }
                }
                Err(e) => {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(url = %self.url_for_logs(), error = %e, "events webhook failed; events stay spooled and are retried");
                        warned = true;
                    }
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        }
    }
}

/// Start the delivery thread (`airlock-events-webhook`, a current-thread runtime of its own):
/// the spool's reads, removals and rescans never run on the traffic's runtime.
pub fn spawn_delivery(
    delivery: Arc<Delivery>,
    own: Arc<crate::kernel::OwnSockets>,
) -> Result<std::thread::JoinHandle<()>, EventsError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EventsError::Thread("webhook delivery", e))?;
    std::thread::Builder::new()
        .name("airlock-events-webhook".into())
        .spawn(move || rt.block_on(delivery.run(own)))
        .map_err(|e| EventsError::Thread("webhook delivery", e))
}

/// Start the thread that moves events from the memory queue to the spool.
pub fn spawn_spooler(
    delivery: Arc<Delivery>,
    rx: std::sync::mpsc::Receiver<Msg>,
) -> Result<std::thread::JoinHandle<()>, EventsError> {
    std::thread::Builder::new()
        .name("airlock-events-spool".into())
        .spawn(move || {
            let s = &delivery.stats.webhook;
            while let Some(msg) = super::next(&rx, s) {
                match msg {
                    Msg::Event(e) => delivery.spool_event(&e.json),
                    Msg::Flush(ack) => {
                        let _ = ack.try_send(());
                    }
                }
            }
        })
        .map_err(|e| EventsError::Thread("webhook spool", e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    /// A chat webhook's token rides in the path: what logs and errors show of the URL keeps
    /// neither the path nor the query.
    #[test]
    fn logged_urls_carry_no_path_query_or_user_info() {
        let dir = std::env::temp_dir().join(format!("airlock-hook-url-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sink = super::WebhookSink {
            url: "https://siem.example:8443/services/T0/B0/PATHSECRET?token=QUERYSECRET"
                .parse()
                .unwrap(),
            ca_file: None,
            authorization_file: None,
            timeout_secs: 5,
            spool_dir: dir.join("spool"),
            spool_max_bytes: 1 << 20,
            spool_max_files: 10,
        };
        let shown = format!("{sink:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        let d = super::Delivery::open(
            sink,
            Arc::new(super::EventStats::default()),
            super::Role::Writer,
        )
        .unwrap();
        assert_eq!(d.url_for_logs(), "https://siem.example:8443/…");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
