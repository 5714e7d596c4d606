//! The webhook sink: each event is POSTed as JSON to an HTTPS endpoint (system roots plus an
//! optional `ca_file`), from a socket tagged as the agent's own. Events go through the
//! on-disk [`Spool`] first (a thread writes them), so they survive a receiver that is down
//! and an agent restart; a task delivers them oldest first, retrying with backoff. An event
//! is removed from the spool only after a 2xx answer: delivery is at-least-once (a crash
//! between the answer and the removal sends it again).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{Backoff, EventStats, EventsError, Msg, config::WebhookSink, spool::Spool};

/// Longest wait between two attempts at a receiver that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Rescan the spool this often even without news (another process, `airlock verify`, may
/// have spooled an event).
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
    pub fn open(cfg: WebhookSink, stats: Arc<EventStats>) -> Result<Delivery, EventsError> {
        let spool = Spool::open(&cfg.spool_dir, cfg.spool_max_bytes, cfg.spool_max_files).map_err(
            |source| EventsError::Spool {
                path: cfg.spool_dir.clone(),
                source,
            },
        )?;
        stats
            .webhook
            .spooled
            .store(spool.usage().0 as u64, Ordering::Relaxed);
        let mut extra = Vec::new();
        if let Some(path) = &cfg.ca_file {
            let ca_err = |message: String| EventsError::CaFile {
                path: path.clone(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                extra.push(c.map_err(|e| ca_err(format!("not a PEM certificate: {e}")))?);
            }
            if extra.is_empty() {
                return Err(ca_err("holds no certificate".into()));
            }
        }
        let tls = crate::pipeline::approval::client_tls(&extra).map_err(|message| {
            EventsError::CaFile {
                path: cfg.ca_file.clone().unwrap_or_default(),
                message,
            }
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

    /// Deliver the spool, oldest first, forever (the agent's task).
    pub async fn run(self: Arc<Self>, own: Arc<crate::kernel::OwnSockets>) {
        let s = &self.stats.webhook;
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut warned = false;
        let timeout = Duration::from_secs(self.cfg.timeout_secs);
        loop {
            let next = match self.spool.oldest() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the events spool");
                    None
                }
            };
            let Some(path) = next else {
                let _ = tokio::time::timeout(RESCAN, self.wake.notified()).await;
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
            match crate::pipeline::approval::post_json(
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
                        tracing::info!(url = %loggable(&self.cfg.url), "events webhook reachable again");
                        warned = false;
                    }
                }
                Err(e) => {
                    s.failed.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(url = %loggable(&self.cfg.url), error = %e, "events webhook failed; events stay spooled and are retried");
                        warned = true;
                    }
                    tokio::time::sleep(backoff.step()).await;
                }
            }
        }
    }
}

/// The URL without its query or user info (a token may ride in either): what logs show.
fn loggable(url: &http::Uri) -> String {
    let host = url.host().unwrap_or("");
    let port = url.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{host}{port}{}",
        url.scheme_str().unwrap_or("https"),
        url.path()
    )
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
    #[test]
    fn logged_urls_carry_no_query_or_user_info() {
        let u: http::Uri = "https://siem.example:8443/in?token=SECRET".parse().unwrap();
        assert_eq!(super::loggable(&u), "https://siem.example:8443/in");
    }
}
