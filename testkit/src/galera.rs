//! A private MariaDB Galera cluster: a few [`PrivateMariaDb`] nodes on 127.0.0.1, each with its
//! own data dir, SQL port, group-communication port, IST and SST ports; the first bootstraps the
//! cluster, the others join it by a state transfer (rsync).
//!
//! With two nodes, the second weighs twice the first (`pc.weight=2`): when the first dies, the
//! second alone still holds more than half the weight and stays the primary component, so the
//! cluster goes on. (Two nodes of equal weight would both stop taking writes.)

use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use super::PrivateMariaDb;
use super::db::{connect_once, connect_options};
use super::procs;

/// A joiner receives the whole state before it takes a login: allow for a loaded machine.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// The wsrep provider, where Debian's `galera-4` puts it.
fn provider() -> Option<&'static str> {
    [
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/lib/libgalera_smm.so",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

struct Ports {
    gcomm: u16,
    ist: u16,
    sst: u16,
}

/// A Galera cluster of private nodes; dropping it kills every node.
pub struct PrivateGalera {
    nodes: Vec<PrivateMariaDb>,
    ports: Vec<Ports>,
    name: String,
}

impl PrivateGalera {
    /// Starts `n` nodes and waits until each is synced in a cluster of `n`. Panics with the
    /// nodes' logs on failure.
    pub async fn start(n: usize) -> Self {
        match Self::try_start(n).await {
            Ok(c) => c,
            Err(e) => panic!("PrivateGalera::start failed: {e:#}"),
        }
    }

    pub async fn try_start(n: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(n >= 1, "a cluster has at least one node");
        provider().context(
            "no wsrep provider (libgalera_smm.so): install Debian's galera-4 (scripts/setup.sh --for-tests does)",
        )?;
        let mut cluster = PrivateGalera {
            nodes: Vec::new(),
            ports: (0..n)
                .map(|_| Ports {
                    gcomm: procs::free_port(),
                    ist: procs::free_port(),
                    sst: procs::free_port(),
                })
                .collect(),
            name: crate::unique_name("galera"),
        };
        for i in 0..n {
            let args = cluster.args(i, i == 0);
            // A joiner starts empty: the state transfer brings everything.
            let node = PrivateMariaDb::install_only(args, JOIN_TIMEOUT, i == 0).await?;
            node.open_data_dir()?;
            cluster.nodes.push(node);
        }
        for i in 0..n {
            let launched = cluster.nodes[i].launch_now().await;
            launched.with_context(|| format!("starting Galera node {i}"))?;
            // The next joins a cluster that has this one in it.
            cluster.wait_synced(i, i + 1).await?;
        }
        for i in 0..n {
            // Later restarts join the others, never bootstrap a second cluster.
            let args = cluster.args(i, false);
            cluster.nodes[i].set_extra_args(args);
        }
        Ok(cluster)
    }

    /// The options of node `i`.
    fn args(&self, i: usize, bootstrap: bool) -> Vec<String> {
        let p = &self.ports[i];
        let others: Vec<String> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| format!("127.0.0.1:{}", o.gcomm))
            .collect();
        let address = if bootstrap {
            "gcomm://".to_owned()
        } else {
            format!("gcomm://{}", others.join(","))
        };
        let weight = if self.ports.len() == 2 && i == 1 {
            2
        } else {
            1
        };
        vec![
            "--wsrep-on=ON".into(),
            format!("--wsrep-provider={}", provider().unwrap_or_default()),
            format!("--wsrep-cluster-name={}", self.name),
            format!("--wsrep-cluster-address={address}"),
            format!("--wsrep-node-name=node{i}"),
            format!("--wsrep-node-address=127.0.0.1:{}", p.gcomm),
            format!("--wsrep-sst-receive-address=127.0.0.1:{}", p.sst),
            "--wsrep-sst-method=rsync".into(),
            // Quick to notice a killed node (the defaults take 15 s or more), small caches.
            format!(
                "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{};ist.recv_addr=127.0.0.1:{};gcache.size=32M;pc.weight={weight};evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;evs.inactive_check_period=PT0.5S;evs.install_timeout=PT4S",
                p.gcomm, p.ist
            ),
            "--binlog-format=ROW".into(),
            "--innodb-autoinc-lock-mode=2".into(),
            "--default-storage-engine=InnoDB".into(),
        ]
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &PrivateMariaDb {
        &self.nodes[i]
    }

    /// Node `i`, to kill or restart it.
    pub fn node_mut(&mut self, i: usize) -> &mut PrivateMariaDb {
        &mut self.nodes[i]
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `DB_HOST` naming every node, in order (`127.0.0.1:P1,127.0.0.1:P2`).
    pub fn db_hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}:{}", n.host(), n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until node `i` is synced in a primary component of `size` nodes.
    pub async fn wait_synced(&self, i: usize, size: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let opts = connect_options(node.host(), node.port(), node.user(), node.password(), None);
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let last = match wsrep_state(&opts).await {
                Ok((n, state, ready)) if n == size && state == "Synced" && ready == "ON" => {
                    return Ok(());
                }
                Ok((n, state, ready)) => format!("cluster size {n}, state {state}, ready {ready}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "Galera node {i} not synced in a cluster of {size} within {}s (last: {last})\n{}",
                    SYNC_TIMEOUT.as_secs(),
                    node.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The logs of every node, for a failure message.
    pub fn log_tails(&self) -> String {
        self.nodes.iter().map(PrivateMariaDb::log_tail).collect()
    }
}

async fn wsrep_state(
    opts: &sqlx::mysql::MySqlConnectOptions,
) -> anyhow::Result<(usize, String, String)> {
    let attempt = async {
        let mut conn = connect_once(opts).await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SHOW STATUS WHERE Variable_name IN \
             ('wsrep_cluster_size', 'wsrep_local_state_comment', 'wsrep_ready')",
        )
        .fetch_all(&mut conn)
        .await?;
        let get = |name: &str| {
            rows.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let size = get("wsrep_cluster_size").parse().unwrap_or(0);
        anyhow::Ok((size, get("wsrep_local_state_comment"), get("wsrep_ready")))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("status query timed out")?
}
