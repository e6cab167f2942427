//! The database nodes the pool may use: `DB_HOST` lists one server, or the nodes of a cluster
//! (MariaDB Galera). The pool connects to one node at a time; when a statement on it fails in a
//! way that says the node, not the statement, is at fault (the connection is gone, the server
//! is shutting down, the node has left the cluster's primary component), the pool moves to the
//! next node and says so once. Connections opened before the move are closed as they come back
//! or are asked for, so the old node's connections are not used again.
//!
//! sqlx's pool takes one host: the move is `Pool::set_connect_options` with the next node's
//! options, and the `before_acquire` / `after_release` hooks drop the connections older than
//! the move.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnectOptions, MySqlPool};
use tracing::warn;

use super::sql::error_number;
use crate::config::Endpoint;

/// When the pool last moved, readable by the pool's hooks.
#[derive(Debug)]
pub(super) struct MoveClock {
    base: Instant,
    /// Nanoseconds from `base` to the last move; 0: never moved.
    at: AtomicU64,
}

impl MoveClock {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            at: AtomicU64::new(0),
        })
    }

    fn mark(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.at.store(nanos, Ordering::Release);
    }

    /// Whether a connection of this `age` was opened before the last move (to a node the pool
    /// has left).
    pub(super) fn predates_move(&self, age: Duration) -> bool {
        let at = self.at.load(Ordering::Acquire);
        if at == 0 {
            return false;
        }
        let since_move = self.base.elapsed().saturating_sub(Duration::from_nanos(at));
        age > since_move
    }
}

/// The nodes of `DB_HOST` and the one in use.
#[derive(Debug)]
pub struct Nodes {
    pool: MySqlPool,
    nodes: Vec<(Endpoint, MySqlConnectOptions)>,
    current: AtomicUsize,
    moves: AtomicU64,
    clock: Arc<MoveClock>,
    /// Held while moving: the new options and the move's time are in place before another
    /// attempt can see the new node.
    moving: Mutex<()>,
}

/// Which node a database attempt used, taken before it (see [`Nodes::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeTurn(usize);

impl Nodes {
    pub(super) fn new(
        pool: MySqlPool,
        nodes: Vec<(Endpoint, MySqlConnectOptions)>,
        clock: Arc<MoveClock>,
    ) -> Self {
        Self {
            pool,
            nodes,
            current: AtomicUsize::new(0),
            moves: AtomicU64::new(0),
            clock,
            moving: Mutex::new(()),
        }
    }

    /// The pool (connected to the node in use).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The node in use now, to pass to [`Nodes::failed`] if the attempt fails.
    pub fn turn(&self) -> NodeTurn {
        NodeTurn(self.current.load(Ordering::Acquire))
    }

    /// The node in use.
    pub fn current(&self) -> &Endpoint {
        &self.nodes[self.current.load(Ordering::Acquire) % self.nodes.len()].0
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the list is empty (never: settings hold at least one host).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How often the pool has moved to another node.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// An attempt begun on `turn` failed with `error`. When the error says the node is at
    /// fault ([`is_node_failure`]) and no other attempt has moved the pool since, the pool
    /// moves to the next node. Returns whether it moved.
    pub fn failed(&self, turn: NodeTurn, error: &sqlx::Error) -> bool {
        if self.nodes.len() < 2 || !is_node_failure(error) {
            return false;
        }
        // A pool whose every connection is busy times out too: that is load, not the node.
        if matches!(error, sqlx::Error::PoolTimedOut)
            && self.pool.num_idle() == 0
            && self.pool.size() >= self.pool.options().get_max_connections()
        {
            return false;
        }
        let _moving = self.moving.lock().unwrap_or_else(|e| e.into_inner());
        if self.current.load(Ordering::Acquire) != turn.0 {
            return false; // another attempt moved it already
        }
        let next = (turn.0 + 1) % self.nodes.len();
        self.pool.set_connect_options(self.nodes[next].1.clone());
        self.clock.mark();
        self.current.store(next, Ordering::Release);
        self.moves.fetch_add(1, Ordering::Relaxed);
        warn!(
            from = %self.nodes[turn.0].0,
            to = %self.nodes[next].0,
            error = %error,
            "database node unusable; moving to the next node of DB_HOST"
        );
        true
    }
}

/// Whether an error says the node is at fault rather than the statement: the connection is
/// gone or could not be made (a pool timeout while connections were free to open), the server
/// is shutting down, or a cluster node is not ready to serve (Galera outside the primary
/// component answers 1047) or takes no writes.
pub fn is_node_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Protocol(_) => true,
        _ => matches!(
            error_number(error),
            Some(
                1047 // unknown command: Galera "WSREP has not yet prepared node for application use"
                | 1053 // server shutdown in progress
                | 1290 // read-only (--read-only / super_read_only)
                | 1792 // read-only transaction
                | 1927 // connection was killed
                | 2006 // server has gone away
                | 2013 // lost connection during query
                | 4031 // disconnected for inactivity
            )
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_older_than_the_move_predate_it() {
        let clock = MoveClock::new();
        assert!(
            !clock.predates_move(Duration::from_secs(3600)),
            "never moved"
        );
        clock.mark();
        assert!(clock.predates_move(Duration::from_secs(1)));
        assert!(!clock.predates_move(Duration::ZERO));
    }

    #[test]
    fn node_failures_are_the_nodes_not_the_statements() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_node_failure(&io));
        assert!(is_node_failure(&sqlx::Error::PoolTimedOut));
        assert!(!is_node_failure(&sqlx::Error::RowNotFound));
    }
}
