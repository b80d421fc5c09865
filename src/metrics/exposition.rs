//! A [`Snapshot`] in the Prometheus text format (0.0.4), written by `prometheus-client`'s
//! encoder: the counts are already summed in shared memory, so they are handed to the encoder
//! as a [`Collector`] that describes them at scrape time rather than as live metric objects.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::labels::{Event, Level, RestartReason, WarmupOutcome, CLASS_NAMES, METHOD_NAMES};
use super::table::{Durations, Snapshot, TaskTotals, DURATION_BOUNDS_US, OTHER_TASK};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The whole exposition of `snapshot`.
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposed(snapshot)));
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in the collector.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::error!("cannot encode the metrics: {e}");
    }
    text
}

#[derive(Debug)]
struct Exposed(Snapshot);

type Labels<'a> = Vec<(&'a str, &'a str)>;
/// A counter family: name, help and its series.
type Family<'a> = (&'a str, &'a str, Vec<(Labels<'a>, u64)>);

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels, u64)]) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        metric.encode_family(labels)?.encode_counter::<NoLabelSet, _, u64>(value, None)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> std::fmt::Result {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

fn histogram(mut metric: MetricEncoder, durations: &Durations) -> std::fmt::Result {
    let count: u64 = durations.buckets.iter().sum();
    let bounds = DURATION_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).chain([f64::INFINITY]);
    let buckets: Vec<(f64, u64)> = bounds.zip(durations.buckets.iter().copied()).collect();
    metric.encode_histogram::<NoLabelSet>(durations.sum_us as f64 / 1e6, count, &buckets, None)
}

impl Collector for Exposed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let mut requests = Vec::new();
        for (route, totals) in &s.routes {
            for (method, classes) in totals.requests.iter().enumerate() {
                for (class, &count) in classes.iter().enumerate().filter(|(_, &count)| count > 0) {
                    let labels = vec![
                        ("method", METHOD_NAMES[method]),
                        ("route", route.as_str()),
                        ("status", CLASS_NAMES[class]),
                    ];
                    requests.push((labels, count));
                }
            }
        }
        counter(
            &mut encoder,
            "herdsman_http_requests",
            "HTTP requests answered, by method, route template and status class",
            &requests,
        )?;

        let mut durations = encoder.encode_descriptor(
            "herdsman_http_request_duration_seconds",
            "Time from the request's headers to its response, by route template",
            None,
            MetricType::Histogram,
        )?;
        for (route, totals) in &s.routes {
            let labels = vec![("route", route.as_str())];
            histogram(durations.encode_family(&labels)?, &totals.duration)?;
        }
        // Every task the app registered, from the start; `other` only once something is in it.
        let tasks: Vec<(&String, &TaskTotals)> = s
            .warmups
            .iter()
            .filter(|(name, totals)| name.as_str() != OTHER_TASK || totals.outcomes.iter().any(|&n| n > 0))
            .collect();
        let mut warmups = encoder.encode_descriptor(
            "herdsman_warmup_duration_seconds",
            "How long warm-up task attempts took (a timed-out one: its timeout), by task",
            None,
            MetricType::Histogram,
        )?;
        for (task, totals) in &tasks {
            histogram(warmups.encode_family(&vec![("task", task.as_str())])?, &totals.duration)?;
        }
        let attempts: Vec<_> = tasks
            .iter()
            .flat_map(|(task, totals)| {
                WarmupOutcome::ALL.iter().map(|outcome| {
                    (vec![("task", task.as_str()), ("outcome", outcome.as_str())], totals.outcomes[*outcome as usize])
                })
            })
            .collect();
        counter(&mut encoder, "herdsman_warmup_attempts", "Warm-up task attempts by task and outcome", &attempts)?;
        let queue = encoder.encode_descriptor(
            "herdsman_http_request_queue_seconds",
            "Time requests waited between the platform's router (X-Request-Start) and a worker",
            None,
            MetricType::Histogram,
        )?;
        histogram(queue, &s.queue_times)?;

        gauge(
            &mut encoder,
            "herdsman_http_requests_in_flight",
            "Requests being handled now, all workers",
            s.in_flight,
        )?;
        gauge(&mut encoder, "herdsman_workers", "Workers in service and ready", s.workers)?;
        gauge(
            &mut encoder,
            "herdsman_worker_heartbeat_age_seconds",
            "The longest time since a serving worker's last heartbeat",
            s.heartbeat_age_ms as f64 / 1e3,
        )?;
        let restarts: Vec<_> =
            RestartReason::ALL.iter().map(|r| (vec![("reason", r.as_str())], s.restarts[*r as usize])).collect();
        counter(
            &mut encoder,
            "herdsman_worker_restarts",
            "Workers that ended and were replaced, by reason",
            &restarts,
        )?;

        // Events share families: group the series of each family, in table order.
        let mut families: Vec<Family> = Vec::new();
        for event in Event::ALL {
            let series = event.series();
            let value = (series.labels.to_vec(), s.events[event as usize]);
            match families.iter_mut().find(|(name, _, _)| *name == series.metric) {
                Some((_, _, values)) => values.push(value),
                None => families.push((series.metric, series.help, vec![value])),
            }
        }
        for (name, help, series) in &families {
            counter(&mut encoder, name, help, series)?;
        }
        for level in Level::ALL {
            let (name, help) = level.name_and_help();
            gauge(&mut encoder, name, help, s.levels[level as usize])?;
        }
        Ok(())
    }
}
