//! The tokio data runtime's metrics, ztunnel's (its `TokioRuntimeCollector`), read from the
//! runtime's counters at each scrape:
//!
//! | metric | type | what |
//! |---|---|---|
//! | `tokio_num_workers` | gauge | worker threads |
//! | `tokio_global_queue_depth` | gauge | tasks in the global queue |
//! | `tokio_num_alive_tasks` | gauge | tasks alive |
//! | `tokio_worker_total_busy_duration_seconds_total{worker}` | counter | time each worker was busy |
//! | `tokio_worker_park_count{worker}` | counter | times each worker parked |
//! | `tokio_worker_park_unpark_count{worker}` | counter | times each worker parked and unparked |
//!
//! The two park counts are written as ztunnel writes them: typed counter, sampled without the
//! `_total` suffix, so that a query written against ztunnel finds them. Only the `ztunnel` (tokio)
//! binary has them; the io_uring build runs no tokio data runtime.
//!
//! ```
//! use meshwire_dataplane::telemetry::runtime::TokioRuntimeCollector;
//! use prometheus_client::registry::Registry;
//!
//! let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build()?;
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(TokioRuntimeCollector::new(runtime.handle())));
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.lines().any(|l| l == "tokio_num_workers 2"));
//! assert!(text.lines().any(|l| l.starts_with("tokio_worker_park_count{worker=\"1\"} ")));
//! assert!(text.lines().any(|l| l.starts_with("tokio_worker_total_busy_duration_seconds_total{worker=\"0\"} ")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::runtime::{Handle, RuntimeMetrics};

/// The collector of a tokio runtime's metrics (see the [module](self) table).
#[derive(Debug)]
pub struct TokioRuntimeCollector {
    metrics: RuntimeMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: usize,
}

impl TokioRuntimeCollector {
    /// The collector of the runtime of `handle`.
    pub fn new(handle: &Handle) -> Self {
        Self {
            metrics: handle.metrics(),
        }
    }
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: usize) -> fmt::Result {
    let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for TokioRuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.metrics;
        gauge(
            &mut encoder,
            "tokio_num_workers",
            "the number of worker threads used by the runtime",
            m.num_workers(),
        )?;
        gauge(
            &mut encoder,
            "tokio_global_queue_depth",
            "the number of tasks currently scheduled in the runtime's global queue",
            m.global_queue_depth(),
        )?;
        gauge(
            &mut encoder,
            "tokio_num_alive_tasks",
            "the number of alive tasks in the runtime",
            m.num_alive_tasks(),
        )?;
        let workers = 0..m.num_workers();
        let mut busy = encoder.encode_descriptor(
            "tokio_worker_total_busy_duration_seconds",
            "the amount of time worker threads have been busy",
            None,
            MetricType::Counter,
        )?;
        for worker in workers.clone() {
            let value = ConstCounter::new(m.worker_total_busy_duration(worker).as_secs_f64());
            value.encode(busy.encode_family(&WorkerLabels { worker })?)?;
        }
        type Count = fn(&RuntimeMetrics, usize) -> u64;
        let counts: [(&str, &str, Count); 2] = [
            (
                "tokio_worker_park_count",
                "the total number of times the given worker thread has parked",
                RuntimeMetrics::worker_park_count,
            ),
            (
                "tokio_worker_park_unpark_count",
                "the total number of times the given worker thread has parked and unparked",
                RuntimeMetrics::worker_park_unpark_count,
            ),
        ];
        for (name, help, count) in counts {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for worker in workers.clone() {
                // As ztunnel: a gauge's sample (no `_total`) under a counter's type.
                let value = ConstGauge::new(i64::try_from(count(m, worker)).unwrap_or(i64::MAX));
                value.encode(family.encode_family(&WorkerLabels { worker })?)?;
            }
        }
        Ok(())
    }
}
