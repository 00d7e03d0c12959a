//! What a run writes to its output directory: `summary.json` (the
//! figures of docs/cli.md's `weft-sim` contract) and `messages.csv` (one
//! row per message per recipient), and the statistics behind them.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::SimError;

/// One message the workload sent.
#[derive(Clone, Debug)]
pub struct SentMessage {
    pub id: String,
    pub conversation: String,
    pub sender: usize,
    /// When the send request was issued, ms after the workload began.
    pub sent_ms: f64,
    /// The nodes that should show it.
    pub recipients: Vec<usize>,
}

/// Every time a node showed a message (`Event::Message`), ms after the
/// workload began, per message id and node.
pub type Arrivals = HashMap<String, HashMap<usize, Vec<f64>>>;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LagPercentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    /// The transport the nodes ran on (`memory`: libp2p's in-process
    /// transport, no link model).
    pub transport: String,
    /// Messages sent (send requests the nodes accepted).
    pub messages: usize,
    /// Send requests a node refused.
    pub send_errors: usize,
    /// Message × recipient pairs expected, and how many arrived.
    pub expected_deliveries: usize,
    pub delivered: usize,
    pub delivery_ratio: f64,
    /// From the send request to the recipient's first `Event::Message`,
    /// over delivered pairs (wall-clock ms).
    pub latency_ms: Percentiles,
    /// Extra `Event::Message` for an already shown message, per message.
    pub duplicates_per_message: f64,
    /// Bytes each node sent and received on the wire. `null`: not
    /// measured yet (the node does not expose its swarm's bandwidth
    /// counters); never estimated.
    pub bytes_per_node: Option<f64>,
    /// From the last send to the last first-arrival, in seconds, when
    /// every recipient had every message; `null` when some never arrived.
    pub convergence_s: Option<f64>,
    /// How late a 10 ms timer on the simulator's runtime fired.
    pub scheduling_lag_ms: LagPercentiles,
    /// Events a node's broadcast dropped because the recorder lagged
    /// (0 for a trustworthy count).
    pub events_lagged: u64,
    pub duration_secs: u64,
    /// Wall time of the whole run (setup, workload, drain, shutdown).
    pub wall_secs: f64,
    /// Wall time of setup (nodes, contacts, groups).
    pub setup_secs: f64,
}

/// Nearest-rank percentile of sorted `v` (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The delivery figures of `sent` given `arrivals`.
#[derive(Debug, Default)]
pub struct Delivery {
    pub expected: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub latencies: Vec<f64>,
    pub last_arrival_ms: f64,
}

pub fn delivery(sent: &[SentMessage], arrivals: &Arrivals) -> Delivery {
    let mut d = Delivery::default();
    for m in sent {
        let at = arrivals.get(&m.id);
        for r in &m.recipients {
            d.expected += 1;
            if let Some(times) = at.and_then(|a| a.get(r))
                && let Some(first) = times.iter().copied().min_by(f64::total_cmp)
            {
                d.delivered += 1;
                d.duplicates += times.len() - 1;
                d.latencies.push((first - m.sent_ms).max(0.0));
                d.last_arrival_ms = d.last_arrival_ms.max(first);
            }
        }
    }
    d
}

/// Inputs of the summary besides the messages.
#[derive(Debug)]
pub struct RunFacts {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub transport: String,
    pub send_errors: usize,
    pub lag_ms: Vec<f64>,
    pub events_lagged: u64,
    pub duration_secs: u64,
    pub wall_secs: f64,
    pub setup_secs: f64,
}

pub fn summarize(facts: RunFacts, sent: &[SentMessage], arrivals: &Arrivals) -> Summary {
    let d = delivery(sent, arrivals);
    let lat = sorted(d.latencies.clone());
    let lag = sorted(facts.lag_ms);
    let last_send = sent.iter().map(|m| m.sent_ms).fold(0.0, f64::max);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    Summary {
        scenario: facts.scenario,
        seed: facts.seed,
        nodes: facts.nodes,
        transport: facts.transport,
        messages: sent.len(),
        send_errors: facts.send_errors,
        expected_deliveries: d.expected,
        delivered: d.delivered,
        delivery_ratio: if d.expected == 0 {
            1.0
        } else {
            round(d.delivered as f64 / d.expected as f64)
        },
        latency_ms: Percentiles {
            p50: round(percentile(&lat, 50.0)),
            p95: round(percentile(&lat, 95.0)),
            p99: round(percentile(&lat, 99.0)),
            max: round(lat.last().copied().unwrap_or(0.0)),
        },
        duplicates_per_message: if sent.is_empty() {
            0.0
        } else {
            round(d.duplicates as f64 / sent.len() as f64)
        },
        bytes_per_node: None,
        convergence_s: (d.delivered == d.expected)
            .then(|| round(((d.last_arrival_ms - last_send).max(0.0)) / 1000.0)),
        scheduling_lag_ms: LagPercentiles {
            p50: round(percentile(&lag, 50.0)),
            p99: round(percentile(&lag, 99.0)),
            max: round(lag.last().copied().unwrap_or(0.0)),
        },
        events_lagged: facts.events_lagged,
        duration_secs: facts.duration_secs,
        wall_secs: round(facts.wall_secs),
        setup_secs: round(facts.setup_secs),
    }
}

/// Writes `summary.json` and `messages.csv` into `out`.
pub fn write(
    out: &Path,
    summary: &Summary,
    names: &[String],
    sent: &[SentMessage],
    arrivals: &Arrivals,
) -> Result<(), SimError> {
    std::fs::create_dir_all(out).map_err(|e| SimError::io(format!("{}", out.display()), e))?;
    let path = out.join("summary.json");
    let mut json = serde_json::to_string_pretty(summary)
        .map_err(|e| SimError::io("summary.json", std::io::Error::other(e)))?;
    json.push('\n');
    std::fs::write(&path, json).map_err(|e| SimError::io(format!("{}", path.display()), e))?;

    let path = out.join("messages.csv");
    let file =
        std::fs::File::create(&path).map_err(|e| SimError::io(format!("{}", path.display()), e))?;
    let mut w = std::io::BufWriter::new(file);
    let mut rows =
        String::from("message_id,conversation,sender,recipient,sent_ms,received_ms,duplicates\n");
    for m in sent {
        let at = arrivals.get(&m.id);
        for r in &m.recipients {
            let times = at.and_then(|a| a.get(r));
            let first = times.and_then(|t| t.iter().copied().min_by(f64::total_cmp));
            let received = first.map(|t| format!("{t:.3}")).unwrap_or_default();
            let dups = times.map(|t| t.len().saturating_sub(1)).unwrap_or(0);
            rows.push_str(&format!(
                "{},{},{},{},{:.3},{},{}\n",
                m.id, m.conversation, names[m.sender], names[*r], m.sent_ms, received, dups
            ));
        }
    }
    w.write_all(rows.as_bytes())
        .and_then(|()| w.flush())
        .map_err(|e| SimError::io(format!("{}", path.display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0], 1.0), 3.0);
    }

    #[test]
    fn delivery_counts_firsts_and_duplicates() {
        let sent = vec![SentMessage {
            id: "m".into(),
            conversation: "c".into(),
            sender: 0,
            sent_ms: 10.0,
            recipients: vec![1, 2],
        }];
        let mut arrivals = Arrivals::new();
        arrivals
            .entry("m".into())
            .or_default()
            .insert(1, vec![30.0, 25.0]);
        let d = delivery(&sent, &arrivals);
        assert_eq!((d.expected, d.delivered, d.duplicates), (2, 1, 1));
        assert_eq!(d.latencies, vec![15.0]);
    }
}
