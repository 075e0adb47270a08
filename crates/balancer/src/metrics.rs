//! The balancer's series (the contract is `docs/metrics.md`), registered in the process registry.

use ferry_telemetry::prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Open tunnels by upstream (its advertised URL).
    pub connections: IntGaugeVec,
    /// Tunnels opened, by reason.
    pub picks: IntCounterVec,
    pub connect_errors: IntCounterVec,
    /// By direction: `client_to_upstream`, `upstream_to_client`.
    pub bytes: IntCounterVec,
    /// Connections answered by the balancer itself, by reason.
    pub rejected: IntCounterVec,
    /// Tunnels ended, by reason: `closed`, `idle_timeout`, `drain`, `error`.
    pub closed: IntCounterVec,
    /// Gateways in the last membership read, by state.
    pub members: IntGaugeVec,
    pub membership_errors: IntCounter,
    /// 1 while draining.
    pub draining: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, ferry_telemetry::prometheus::Error> {
        let m = Self {
            connections: IntGaugeVec::new(
                Opts::new(
                    "ferry_balancer_connections",
                    "Open client connections proxied by the balancer, by upstream gateway (its advertised URL).",
                ),
                &["upstream"],
            )?,
            picks: IntCounterVec::new(
                Opts::new(
                    "ferry_balancer_picks_total",
                    "Client connections handed to a gateway, by why that gateway: owner (of the subject's \
                     partition), fallback (next in the partition's order: the owner is over the load bound or \
                     recently unreachable), least_loaded (no subject: plain HTTP, no or unreadable token), \
                     retry (after a failed connect).",
                ),
                &["reason"],
            )?,
            connect_errors: IntCounterVec::new(
                Opts::new(
                    "ferry_balancer_upstream_connect_errors_total",
                    "Failed connects (refused, timed out, TLS) to a gateway, by upstream.",
                ),
                &["upstream"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "ferry_balancer_bytes_total",
                    "Bytes proxied, by direction: client_to_upstream (request heads included), \
                     upstream_to_client.",
                ),
                &["direction"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "ferry_balancer_rejected_total",
                    "Client connections answered by the balancer itself, by reason: bad_head (400), \
                     head_too_large (431), header_timeout (408), no_upstream (503: no eligible gateway, or \
                     none could be reached), tls_handshake (failed or timed out; no answer).",
                ),
                &["reason"],
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "ferry_balancer_tunnels_closed_total",
                    "Proxied connections ended, by reason: closed (by either side), idle_timeout, drain \
                     (still open at the end of --drain-ms), error.",
                ),
                &["reason"],
            )?,
            members: IntGaugeVec::new(
                Opts::new(
                    "ferry_balancer_gateways",
                    "Gateways in the last membership read, by state: ready, draining, unready.",
                ),
                &["state"],
            )?,
            membership_errors: IntCounter::new(
                "ferry_balancer_membership_errors_total",
                "Failed membership reads (the last good one stays in use).",
            )?,
            draining: IntGauge::new(
                "ferry_balancer_draining",
                "1 once SIGTERM/SIGINT arrived: no new connections, open ones kept up to --drain-ms.",
            )?,
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.picks.clone()))?;
        registry.register(Box::new(m.connect_errors.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        registry.register(Box::new(m.members.clone()))?;
        registry.register(Box::new(m.membership_errors.clone()))?;
        registry.register(Box::new(m.draining.clone()))?;
        for r in ["owner", "fallback", "least_loaded", "retry"] {
            m.picks.with_label_values(&[r]);
        }
        for d in ["client_to_upstream", "upstream_to_client"] {
            m.bytes.with_label_values(&[d]);
        }
        for s in ["ready", "draining", "unready"] {
            m.members.with_label_values(&[s]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_in_the_catalogue() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.connections.with_label_values(&["http://x"]).inc();
        m.connect_errors.with_label_values(&["http://x"]).inc();
        m.rejected.with_label_values(&["bad_head"]).inc();
        m.closed.with_label_values(&["closed"]).inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert_eq!(names.len(), 9, "{names:?}");
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/metrics.md"),
        )
        .unwrap();
        for n in names {
            assert!(
                doc.contains(&format!("`{n}`")),
                "{n} is not in docs/metrics.md"
            );
        }
    }
}
