use std::{
    marker::PhantomData,
    sync::{Arc, Mutex},
    vec,
};

use burn_communication::{CommunicationChannel, Message, Protocol, ProtocolClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, RwLock};

use crate::{NodeId, global::shared::GlobalCollectiveError, node::base::NodeState};

/// How long a node waits at the end-of-operation barrier for the others.
pub(crate) const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Handles the status of sync requests from other nodes
pub(crate) struct SyncService<P: Protocol> {
    /// Current node's state, shared with the thread that does aggregations
    node_state: Arc<RwLock<Option<NodeState>>>,
    /// The number of peers that have requested to sync with us since the last successful sync.
    syncing_peers: Mutex<Vec<NodeId>>,
    /// Notification on each incoming sync request
    sync_notif: Notify,

    _p: PhantomData<P>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SyncRequest(NodeId);

impl<P: Protocol> SyncService<P> {
    pub fn new(node_state: Arc<RwLock<Option<NodeState>>>) -> Self {
        Self {
            node_state,
            syncing_peers: Mutex::new(vec![]),
            sync_notif: Notify::new(),
            _p: PhantomData,
        }
    }

    fn add_syncing_peer(&self, peer: NodeId) {
        let mut syncing_peers = self.syncing_peers.lock().unwrap();
        syncing_peers.push(peer);
    }

    /// Sync with all peers.
    /// Waits until every node has reached this barrier. A peer that cannot be reached, or that
    /// does not arrive within [`SYNC_TIMEOUT`] (every node has finished its transfers of the
    /// operation when it syncs, so the others are due within moments), is reported as lost.
    pub async fn sync(&self) -> Result<(), GlobalCollectiveError> {
        // we can't sync while we register
        let node_state = self.node_state.read().await;
        let node_state = node_state
            .as_ref()
            .ok_or(GlobalCollectiveError::AllReduceBeforeRegister)?;

        // this peer is syncing
        self.add_syncing_peer(node_state.node_id);
        for (id, addr) in &node_state.nodes {
            if *id == node_state.node_id {
                continue;
            }

            let lost = || GlobalCollectiveError::PeerLostAt(addr.to_string());
            let mut connection = P::Client::connect(addr.clone(), "sync")
                .await
                .ok_or_else(lost)?;
            let msg = SyncRequest(node_state.node_id);
            let sync_bytes = rmp_serde::to_vec(&msg).unwrap();
            connection
                .send(Message::new(sync_bytes.into()))
                .await
                .map_err(|_| lost())?;
        }
        let mut all_node_ids = node_state.nodes.keys().cloned().collect::<Vec<_>>();
        all_node_ids.sort();
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        loop {
            // register before checking: no lost notify_waiters()
            let notified = self.sync_notif.notified();
            {
                let mut syncing_peers = self.syncing_peers.lock().unwrap();
                if all_node_ids.iter().all(|id| syncing_peers.contains(id)) {
                    // consume one entry per node (keeps early requests of the next barrier)
                    for id in &all_node_ids {
                        let pos = syncing_peers.iter().position(|p| p == id).unwrap();
                        syncing_peers.remove(pos);
                    }
                    return Ok(());
                }
            }
            // Wait for the next sync to come in
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let syncing_peers = self.syncing_peers.lock().unwrap();
                let missing = all_node_ids
                    .iter()
                    .filter(|id| !syncing_peers.contains(id))
                    .map(|id| node_state.nodes[id].to_string())
                    .collect::<Vec<_>>();
                return Err(GlobalCollectiveError::PeerLostAt(missing.join(", ")));
            }
        }
    }

    pub async fn handle_sync_connection<C: CommunicationChannel>(&self, mut channel: C) {
        let Ok(Some(msg)) = channel.recv().await else {
            log::warn!("[Sync] a peer closed its connection before syncing");
            return;
        };

        let Ok(msg) = rmp_serde::from_slice::<SyncRequest>(&msg.data) else {
            log::warn!("[Sync] a peer sent an invalid sync message");
            return;
        };

        self.add_syncing_peer(msg.0);

        self.sync_notif.notify_waiters();
    }
}
