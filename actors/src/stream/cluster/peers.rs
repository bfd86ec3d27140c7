//! How a host's subtask calls its peers' services: [`HostPeers`], the
//! attempt's other hosts by task and subtask.

use super::SubtaskHostHandle;
use crate::stream::edges::{ChannelMeter, Meters};
use crate::stream::service::{CallError, Peers};
use braid::Runtime;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// How long a call waits for its service to be offered: the driver starts
/// an attempt's hosts one by one, so a caller's subtask may run before the
/// one it calls is built.
pub(super) const SERVICE_WAIT: Duration = Duration::from_secs(60);

/// The attempt's hosts, as a subtask calls their services.
pub(super) struct HostPeers {
    pub(super) rt: Runtime,
    pub(super) hosts: HashMap<(String, usize), (SubtaskHostHandle, braid::store::StoreSeat)>,
    /// This subtask's output channels by the subtask they lead to.
    pub(super) channels: HashMap<(String, usize), usize>,
    pub(super) meters: Meters,
}

/// A subtask of the attempt, as its peers reach it: its task's head
/// vertex, its index, its host and where the host sits on its node's
/// store.
#[derive(Clone, Serialize, Deserialize)]
pub struct PeerHost {
    pub(super) task: String,
    pub(super) subtask: usize,
    pub(super) host: SubtaskHostHandle,
    pub(super) seat: braid::store::StoreSeat,
}

impl Peers for HostPeers {
    fn call_many(
        &self,
        calls: Vec<crate::stream::service::PeerCall>,
    ) -> Vec<Result<Vec<u8>, CallError>> {
        let mut pending = Vec::with_capacity(calls.len());
        for c in calls {
            let host = self
                .hosts
                .get(&(c.task.clone(), c.subtask))
                .map(|(host, _)| host.clone());
            pending.push((c, host));
        }
        let answers = self.rt.block_on(async move {
            let calls = pending.into_iter().map(|(c, host)| async move {
                let Some(host) = host else {
                    return Err(CallError::NoService(format!(
                        "{}[{}]: {}",
                        c.task, c.subtask, c.service
                    )));
                };
                match host.call(c.service.clone(), c.request).await {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(why)) => Err(CallError::Failed(c.service, why)),
                    Err(e) => Err(CallError::Unreachable(c.service, e.to_string())),
                }
            });
            futures::future::join_all(calls).await
        });
        answers
    }

    fn seat(&self, task: &str, subtask: usize) -> Option<braid::store::StoreSeat> {
        self.hosts
            .get(&(task.to_string(), subtask))
            .map(|(_, seat)| *seat)
    }

    fn meter(&self, task: &str, subtask: usize) -> Option<&ChannelMeter> {
        let channel = self.channels.get(&(task.to_string(), subtask))?;
        self.meters.get(*channel)
    }

    fn call(
        &self,
        task: &str,
        subtask: usize,
        service: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, CallError> {
        let (host, _) = self
            .hosts
            .get(&(task.to_string(), subtask))
            .ok_or_else(|| CallError::NoService(format!("{task}[{subtask}]: {service}")))?;
        match self.rt.block_on(host.call(service.to_string(), request)) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(why)) => Err(CallError::Failed(service.to_string(), why)),
            Err(e) => Err(CallError::Unreachable(service.to_string(), e.to_string())),
        }
    }
}
