//! Several `kms-server` nodes over one PostgreSQL database and one SoftHSM2 token directory
//! (a network HSM's partition seen by several hosts, SOFTHSM-NOTES.md), each with its own
//! ports, configuration and logs: the set-up of the cluster tests.

use std::time::Duration;

use kms_proto::v1::key_management_client::KeyManagementClient;

use crate::{Admin, Backend, Database, Options, Server, eventually};

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

    /// `n` nodes on `database`: the first provisions the token (and its backup key when asked),
    /// the PKI, and bootstraps the officer; the others share them.
    pub fn start_on(n: usize, options: Options, database: Database) -> Cluster {
        let options = Options { backend: Backend::Postgres, ..options };
        let first_dir = tempfile::tempdir().expect("temporary directory");
        let token = hsm_sim::Token::open_or_provision(&first_dir.path().join("softhsm"), "kms-cluster").expect("token provisioned");
        let first = Server::start_node(first_dir, token.clone(), options.clone(), Some(database.clone()), None);
        let mut cluster = Cluster { nodes: vec![first], database };
        for _ in 1..n {
            cluster.add_node(options.clone());
        }
        cluster
    }

    /// One more node, with `options` of its own (on the cluster's token, database and officer).
    pub fn add_node(&mut self, options: Options) -> &Server {
        let first = &self.nodes[0];
        let options = Options { backend: Backend::Postgres, ..options };
        let officer = (first.officer_totp.clone(), first.session.clone());
        let dir = tempfile::tempdir().expect("temporary directory");
        // One PKI for the cluster: the nodes' certificate and the workloads' from one CA.
        crate::copy_dir(&first.pki_dir(), &dir.path().join("pki")).expect("PKI copied");
        let node = Server::start_node(dir, first.token.clone(), options, Some(self.database.clone()), Some(officer));
        self.nodes.push(node);
        self.nodes.last().expect("just added")
    }

    /// The nodes that say they run the background jobs.
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_running() && self.nodes[i].metric("kms_leader") == Some(1.0)).collect()
    }

    /// Every running node's `https://` URL of one plane, from node `from` on (wrapping): the
    /// endpoint list a client fails over along.
    pub fn endpoints(&self, from: usize, plane: impl Fn(&Server) -> &str) -> String {
        let running: Vec<&Server> = self.nodes.iter().filter(|n| n.is_running()).collect();
        (0..running.len()).map(|i| format!("https://{}", plane(running[(from + i) % running.len()]))).collect::<Vec<_>>().join(",")
    }

    /// A data-plane channel over every node, starting at node `from`.
    pub async fn data_channel(&self, from: usize) -> kms_client::Channel {
        kms_client::channel(&self.endpoints(from, |n| &n.data_addr), &self.nodes[0].tls()).await.expect("a node reachable")
    }

    /// The admin plane over every node as the bootstrap officer, starting at node `from`.
    pub async fn admin(&self, from: usize) -> Admin {
        let channel = kms_client::channel(&self.endpoints(from, |n| &n.admin_addr), &self.nodes[0].tls()).await.expect("a node reachable");
        KeyManagementClient::new(kms_client::AdminChannel::new(
            channel,
            kms_client::Bearer::new(Some(&self.nodes[0].session)).expect("a valid token"),
        ))
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
