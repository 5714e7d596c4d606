//! Values read at scrape time: the build, the proxy's connection counters, the kernel's
//! redirect counters, the archive's statistics, pending approvals and shipping's backlog.
//! Reading them costs the scrape, never the data path.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::ShipStats;
use crate::proxy::Proxy;

/// `airlock_build_info{version} 1`.
#[derive(Debug)]
pub struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mut m = enc.encode_descriptor(
            "airlock_build_info",
            "The running agent's version (always 1)",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)
    }
}

/// The agent's state, read on each scrape.
pub struct AgentCollector {
    pub proxy: Arc<Proxy>,
    /// Absent when shipping is off (then so are its metrics).
    pub ship: Option<Arc<dyn ShipStats>>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector")
            .field("ship", &self.ship)
            .finish_non_exhaustive()
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// One counter family with a single label.
fn labelled_counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let p = &self.proxy;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        let c = &p.counters;
        counter(
            &mut enc,
            "airlock_connections_accepted",
            "Connections accepted on the agent's listeners (redirected by the kernel, or not: see rejected)",
            None,
            load(&c.accepted),
        )?;
        labelled_counters(
            &mut enc,
            "airlock_connections_rejected",
            "Connections refused before any byte was relayed, by reason",
            "reason",
            [
                ("unattributed", load(&c.rejected_unattributed)),
                ("attribution_failed", load(&c.rejected_attribution)),
                ("stale", load(&c.rejected_stale)),
                ("archive", load(&c.rejected_archive)),
                ("over_capacity", load(&c.rejected_over_capacity)),
            ],
        )?;
        counter(
            &mut enc,
            "airlock_connections_upstream_failed",
            "Connections whose original destination could not be reached",
            None,
            load(&c.upstream_failed),
        )?;
        labelled_counters(
            &mut enc,
            "airlock_egress_proxy_requests",
            "Requests on connections to egress proxies, by outcome: passed to the proxy, tunnels to MCP backends intercepted, refused",
            "outcome",
            [
                ("passed", load(&c.egress_passed)),
                ("intercepted", load(&c.egress_intercepted)),
                ("refused", load(&c.egress_refused)),
            ],
        )?;
        gauge(
            &mut enc,
            "airlock_connections_live",
            "Intercepted connections open now",
            None,
            p.registry.live_count() as i64,
        )?;

        // The kernel's per-CPU counters, summed (a few map reads; the lock is the refresh
        // task's, held briefly).
        let kernel = p.kernel.lock().map(|k| k.counters()).unwrap_or_default();
        labelled_counters(
            &mut enc,
            "airlock_kernel_events",
            "The connect and sock_ops programs' counters (AIRLOCK_COUNTER), by name: redirects, misses, refusals (refused_no_storage), flow-table failures",
            "counter",
            kernel,
        )?;

        let a = &p.archive.stats;
        counter(
            &mut enc,
            "airlock_archive_records",
            "Records made durable in the write-ahead log",
            None,
            load(&a.records),
        )?;
        counter(
            &mut enc,
            "airlock_archive_files",
            "Parquet files published (sealed, signed in the manifest)",
            None,
            load(&a.files),
        )?;
        counter(
            &mut enc,
            "airlock_archive_written",
            "Bytes of the Parquet files published",
            Some(&Unit::Bytes),
            load(&a.bytes),
        )?;
        counter(
            &mut enc,
            "airlock_archive_errors",
            "Archive write, fsync or publish failures (group and strict recording refuse traffic after one)",
            None,
            load(&a.errors),
        )?;
        counter(
            &mut enc,
            "airlock_archive_dropped_records",
            "Buffered records given up after the retry queue filled (buffered recording only)",
            None,
            load(&a.dropped),
        )?;
        gauge(
            &mut enc,
            "airlock_archive_unpublished_records",
            "Durable records not yet in a published Parquet file",
            None,
            a.unpublished() as i64,
        )?;
        gauge(
            &mut enc,
            "airlock_archive_publish_lag",
            "How long the oldest durable record has waited for its Parquet file (0: none waits)",
            Some(&Unit::Seconds),
            a.publish_lag_secs(crate::pipeline::now_us().max(0) as u64),
        )?;
        let (sum, count, buckets) = a.commits.snapshot();
        enc.encode_descriptor(
            "airlock_archive_commit_duration",
            "Duration of the write-ahead log's group commits (fsync)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;

        let pending = p
            .pipeline
            .approvals
            .lock()
            .map(|a| a.pending_count())
            .unwrap_or_else(|poisoned| poisoned.into_inner().pending_count());
        gauge(
            &mut enc,
            "airlock_approvals_pending",
            "Calls held now, waiting for `airlock approvals approve|deny`",
            None,
            pending as i64,
        )?;

        // stdio servers of governed jobs (`airlock govern`).
        let stdio = crate::stdio::counters();
        let get = |k: &str| stdio.get(k).copied().unwrap_or(0);
        counter(
            &mut enc,
            "airlock_stdio_jobs",
            "Jobs started under `airlock govern` whose exec filter the agent took",
            None,
            get("stdio_jobs"),
        )?;
        counter(
            &mut enc,
            "airlock_stdio_execs",
            "Execs of governed jobs the agent answered",
            None,
            get("stdio_execs"),
        )?;
        counter(
            &mut enc,
            "airlock_stdio_execs_refused",
            "Execs of governed jobs refused (a matching server that could not be relayed, or an exec that could not be read)",
            None,
            get("stdio_execs_refused"),
        )?;
        counter(
            &mut enc,
            "airlock_stdio_relays",
            "stdio MCP servers relayed through the pipeline",
            None,
            get("stdio_relays"),
        )?;
        counter(
            &mut enc,
            "airlock_stdio_unmanaged",
            "stdio MCP server processes found running outside governed jobs (each reported once)",
            None,
            get("stdio_unmanaged"),
        )?;
        gauge(
            &mut enc,
            "airlock_stdio_relays_live",
            "stdio MCP servers being relayed now",
            None,
            get("stdio_relays_live") as i64,
        )?;

        // Audit events: per configured sink (absent without `[events]`).
        let events = crate::events::counters();
        if let Some(emitted) = events.get("events_emitted") {
            counter(
                &mut enc,
                "airlock_events_emitted",
                "OCSF audit events produced (before the sinks)",
                None,
                *emitted,
            )?;
            let per_sink = |what: &str| {
                ["file", "syslog", "webhook"]
                    .into_iter()
                    .filter_map(|sink| {
                        events
                            .get(&format!("events_{sink}_{what}"))
                            .map(|n| (sink, *n))
                    })
                    .collect::<Vec<_>>()
            };
            labelled_counters(
                &mut enc,
                "airlock_events_sent",
                "Audit events written, sent, or acknowledged (webhook), by sink",
                "sink",
                per_sink("sent"),
            )?;
            labelled_counters(
                &mut enc,
                "airlock_events_dropped",
                "Audit events dropped because the sink's queue was full, by sink (the webhook's spool: `spool_dropped`)",
                "sink",
                per_sink("dropped"),
            )?;
            labelled_counters(
                &mut enc,
                "airlock_events_failed",
                "Failed writes, sends or POSTs of audit events (each retried), by sink",
                "sink",
                per_sink("failed"),
            )?;
            if let Some(n) = events.get("events_webhook_spool_dropped") {
                counter(
                    &mut enc,
                    "airlock_events_spool_dropped",
                    "Spooled webhook events dropped (oldest first) because the spool was full",
                    None,
                    *n,
                )?;
            }
        }

        if let Some(s) = &self.ship {
            gauge(
                &mut enc,
                "airlock_ship_backlog_files",
                "Sealed archive files not yet uploaded",
                None,
                s.backlog_files() as i64,
            )?;
            gauge(
                &mut enc,
                "airlock_ship_backlog",
                "Bytes of the archive files not yet uploaded",
                Some(&Unit::Bytes),
                s.backlog_bytes() as i64,
            )?;
            counter(
                &mut enc,
                "airlock_ship_failures",
                "Failed uploads (each retry counts)",
                None,
                s.failures(),
            )?;
            gauge(
                &mut enc,
                "airlock_ship_backlog_lines",
                "Manifest lines not yet uploaded",
                None,
                s.backlog_lines() as i64,
            )?;
            gauge(
                &mut enc,
                "airlock_ship_oldest_pending",
                "How long the oldest archive line not yet uploaded has waited",
                Some(&Unit::Seconds),
                s.oldest_pending_seconds() as i64,
            )?;
            counter(
                &mut enc,
                "airlock_ship_conflicts",
                "Bucket objects that differ from the local file (never overwritten)",
                None,
                s.conflicts(),
            )?;
        }
        Ok(())
    }
}
