//! The HTTPS endpoints of the running driver (hack/driver.sh lists them in
//! `.livedisk/csi/metrics-endpoints`): probes, scrapes, and the Prometheus text they return.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use livedisk_telemetry::client::{self, Reply, Tls};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::csi::socket_dir;

/// One server's endpoint: where it listens, the name its certificate carries, how to trust it.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub server_name: String,
    /// `None`: a self-signed certificate, not verifiable (as kubelet's probes treat it).
    pub ca: Option<Vec<CertificateDer<'static>>>,
}

/// The endpoint of `name` (`controller`, `node-a`, `node-b`).
pub fn endpoint(name: &str) -> Result<Endpoint> {
    let list = socket_dir()?.join("metrics-endpoints");
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("reading {} (is the driver running?)", list.display()))?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [entry, addr, server_name, ca] = fields[..]
            && entry == name
        {
            let ca = match ca {
                "-" => None,
                file => Some(
                    CertificateDer::pem_file_iter(file)?
                        .collect::<Result<Vec<_>, _>>()
                        .with_context(|| format!("reading {file}"))?,
                ),
            };
            return Ok(Endpoint {
                addr: addr.parse()?,
                server_name: server_name.to_string(),
                ca,
            });
        }
    }
    bail!("{name} is not in {}", list.display())
}

impl Endpoint {
    /// `GET path`, with a bearer token if given.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Result<Reply> {
        let tls = match &self.ca {
            Some(roots) => Tls::Trust(roots.clone()),
            None => Tls::Unverified,
        };
        let authorization = token.map(|t| format!("Bearer {t}"));
        client::get(
            self.addr,
            &self.server_name,
            &tls,
            path,
            authorization.as_deref(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("GET https://{}{path}: {e}", self.addr))
    }

    /// The metrics, parsed; fails unless the scrape answers 200.
    pub async fn scrape(&self, token: &str) -> Result<Samples> {
        let reply = self.get("/metrics", Some(token)).await?;
        if reply.status != 200 {
            bail!(
                "scrape of {} answered {}: {}",
                self.addr,
                reply.status,
                reply.body
            );
        }
        Ok(Samples::parse(&reply.body))
    }
}

/// One sample: its labels and its value.
type Sample = (BTreeMap<String, String>, f64);

/// The samples of one scrape, by metric name.
#[derive(Debug, Default)]
pub struct Samples(HashMap<String, Vec<Sample>>);

impl Samples {
    /// Parses the Prometheus text format (comments skipped; label values without escapes, as
    /// livedisk's are).
    pub fn parse(text: &str) -> Self {
        let mut samples = Samples::default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            samples
                .0
                .entry(name.to_string())
                .or_default()
                .push((labels, value));
        }
        samples
    }

    /// The sum of the samples of `name` whose labels include all of `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.get(*k).is_some_and(|h| h == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}
