//! Several `kms-server` nodes over one PostgreSQL database and one SoftHSM2 token directory
//! (a network HSM's partition seen by several hosts, SOFTHSM-NOTES.md), each with its own
//! ports, configuration and logs: the set-up of the cluster tests.

use std::time::Duration;

use crate::{Backend, Database, Options, Server, eventually};

/// A cluster of nodes; every node is killed when it is dropped.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Server>,
    pub database: Database,
}

impl Cluster {
    /// `n` nodes on a new database (in the run's shared PostgreSQL, else one of its own).
    pub fn start(n: usize, options: Options) -> Cluster {
        Cluster::start_on(n, options, Database::create().expect("a PostgreSQL database"))
    }

    /// `n` nodes on `database`: the first provisions the token (and its backup key when asked)
    /// and bootstraps the officer; the others share them.
    pub fn start_on(n: usize, options: Options, database: Database) -> Cluster {
        let options = Options { backend: Backend::Postgres, ..options };
        let first_dir = tempfile::tempdir().expect("temporary directory");
        let token = hsm_sim::Token::open_or_provision(&first_dir.path().join("softhsm"), "kms-cluster").expect("token provisioned");
        let first = Server::start_node(first_dir, token.clone(), options.clone(), Some(database.clone()), None);
        let officer = (first.officer_totp.clone(), first.session.clone());
        let mut nodes = vec![first];
        for _ in 1..n {
            let dir = tempfile::tempdir().expect("temporary directory");
            nodes.push(Server::start_node(dir, token.clone(), options.clone(), Some(database.clone()), Some(officer.clone())));
        }
        Cluster { nodes, database }
    }

    /// One more node, with `options` of its own (on the cluster's token, database and officer).
    pub fn add_node(&mut self, options: Options) -> &Server {
        let first = &self.nodes[0];
        let options = Options { backend: Backend::Postgres, ..options };
        let officer = (first.officer_totp.clone(), first.session.clone());
        let dir = tempfile::tempdir().expect("temporary directory");
        let node = Server::start_node(dir, first.token.clone(), options, Some(self.database.clone()), Some(officer));
        self.nodes.push(node);
        self.nodes.last().expect("just added")
    }

    /// The nodes that say they run the background jobs.
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_running() && self.nodes[i].metric("kms_leader") == Some(1.0)).collect()
    }

    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }

    /// Waits until every node answers with the key (they follow each other's changes within a
    /// second).
    pub fn wait_until_every_node_knows(&self, key: &str) {
        for node in &self.nodes {
            eventually(&format!("node {} knows key {key}", node.admin_addr), Duration::from_secs(10), || {
                node.kmsctl(&["key", "describe", key]).status.success()
            });
        }
    }
}
