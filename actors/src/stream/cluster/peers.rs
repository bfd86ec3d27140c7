//! How a host's subtask calls its peers' services: [`HostPeers`], the
//! attempt's other hosts by task and subtask.
//!
//! A peer on this machine (one store) is called through mailboxes: the
//! caller writes the request into its own call slot of the peer's mailbox
//! and waits on its reply mailbox's slot for that peer, where the peer's
//! call server ([`super::call_server`]) writes the answer. A peer on
//! another machine is called with an actor call on its host.

use super::SubtaskHostHandle;
use crate::stream::edges::{ChannelMeter, Meters};
use crate::stream::mailbox::{self, MailboxAddr};
use crate::stream::service::{CallError, PeerCall, Peers};
use braid::Runtime;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// How long a call waits for its service to be offered: the driver starts
/// an attempt's hosts one by one, so a caller's subtask may run before the
/// one it calls is built.
pub(super) const SERVICE_WAIT: Duration = Duration::from_secs(60);

/// How long a caller sleeps on its reply mailbox before it checks that
/// the peers it waits for still live.
const LIVENESS_CHECK: Duration = Duration::from_millis(20);

/// Where a host's mailboxes are: its input channels', the one its peers
/// write calls into (a slot per subtask of the attempt), and the one it
/// reads answers from (a slot per subtask it calls).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct HostMailboxes {
    /// Input channels, a slot per input.
    pub(super) inputs: Option<MailboxAddr>,
    /// Calls from peers: the mailbox, and its first call slot (caller
    /// `i` writes slot `first + i`).
    pub(super) calls: Option<(MailboxAddr, usize)>,
    /// Answers from peers, a slot per subtask of the attempt.
    pub(super) replies: Option<MailboxAddr>,
}

/// A call as a peer's call server reads it from its mailbox: the
/// service's name and the request.
#[derive(Deserialize)]
pub(super) struct RingCall {
    pub(super) service: String,
    #[serde(with = "serde_bytes")]
    pub(super) request: Vec<u8>,
}

/// [`RingCall`] as the caller writes it (same encoding, borrowed).
#[derive(Serialize)]
struct RingCallRef<'a> {
    service: &'a str,
    #[serde(with = "serde_bytes")]
    request: &'a [u8],
}

/// An answer written into the caller's reply mailbox.
pub(super) type RingAnswer = Result<serde_bytes::ByteBuf, String>;

/// A frame: a call's number (8 bytes, little-endian), then its bincode
/// body. The number comes first so a body that does not decode can still
/// be answered.
pub(super) fn frame<T: Serialize>(id: u64, body: &T) -> Result<Vec<u8>, String> {
    let mut out = id.to_le_bytes().to_vec();
    braid::store::codec::encode_append(body, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A frame's call number and body.
pub(super) fn unframe(frame: &[u8]) -> Option<(u64, &[u8])> {
    let (id, body) = frame.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*id), body))
}

/// The attempt's hosts, as a subtask calls their services.
pub(super) struct HostPeers {
    rt: Runtime,
    hosts: HashMap<(String, usize), PeerHost>,
    /// This subtask's output channels by the subtask they lead to.
    channels: HashMap<(String, usize), usize>,
    meters: Meters,
    /// This subtask's index in the attempt: its slot in peers' call
    /// mailboxes.
    me: usize,
    seat: braid::store::StoreSeat,
    rings: Mutex<RingCalls>,
}

/// Calls to peers on this machine.
struct RingCalls {
    /// Where answers arrive, a slot per peer.
    replies: Option<mailbox::Receiver>,
    /// This subtask's slot in each peer's call mailbox, by the peer's
    /// index (`None`: the peer is called by actor calls).
    senders: HashMap<usize, Option<mailbox::Sender>>,
    next_id: u64,
}

impl HostPeers {
    /// The peers `hosts` of subtask number `me`, which sits at `seat` and
    /// reads answers from `replies`.
    pub(super) fn new(
        rt: Runtime,
        hosts: HashMap<(String, usize), PeerHost>,
        channels: HashMap<(String, usize), usize>,
        meters: Meters,
        me: usize,
        replies: Option<mailbox::Receiver>,
    ) -> Self {
        HostPeers {
            seat: rt.store_seat(),
            rt,
            hosts,
            channels,
            meters,
            me,
            rings: Mutex::new(RingCalls {
                replies,
                senders: HashMap::new(),
                next_id: 0,
            }),
        }
    }

    /// Writes `call` into `peer`'s call mailbox, if it is on this machine
    /// and this host reads answers; its number, or `None` to call it by
    /// an actor call instead.
    fn send_ring(
        &self,
        rings: &mut RingCalls,
        peer: &PeerHost,
        call: &PeerCall,
    ) -> Option<Result<u64, CallError>> {
        rings.replies.as_ref()?;
        let me = self.me;
        let sender = rings.senders.entry(peer.index).or_insert_with(|| {
            let (addr, first) = peer.mailboxes.calls?;
            if !peer.seat.same_store(&self.seat) {
                return None;
            }
            mailbox::Sender::open(addr, first + me)
                .map_err(|e| tracing::warn!("calls to {} go by actor calls: {e}", peer.task))
                .ok()
        });
        let sender = sender.as_ref()?;
        let id = rings.next_id;
        rings.next_id += 1;
        let body = RingCallRef {
            service: &call.service,
            request: &call.request,
        };
        let sent = frame(id, &body)
            .map_err(|e| CallError::Failed(call.service.clone(), e))
            .and_then(|f| {
                sender
                    .send(&f)
                    .map_err(|e| CallError::Unreachable(call.service.clone(), e.to_string()))
            });
        Some(sent.map(|()| id))
    }

    /// Waits for the answers to `waiting` (call number, peer index and
    /// position in `answers`), failing those whose peer dies first.
    fn await_rings(
        &self,
        rings: &mut RingCalls,
        mut waiting: Vec<(u64, usize, usize, String)>,
        answers: &mut [Option<Result<Vec<u8>, CallError>>],
    ) {
        let RingCalls {
            replies, senders, ..
        } = rings;
        let Some(replies) = replies.as_mut() else {
            return;
        };
        while !waiting.is_empty() {
            let mut got = false;
            let mut i = 0;
            while i < waiting.len() {
                let (id, peer, at, ref service) = waiting[i];
                match replies.try_frame(peer) {
                    Ok(Some(f)) => {
                        got = true;
                        let answer = match unframe(&f) {
                            Some((n, body)) if n == id => {
                                braid::store::codec::decode::<RingAnswer>(body)
                                    .map_err(|e| CallError::Failed(service.clone(), e.to_string()))
                                    .and_then(|a| {
                                        a.map(|b| b.into_vec())
                                            .map_err(|why| CallError::Failed(service.clone(), why))
                                    })
                            }
                            _ => Err(CallError::Failed(
                                service.clone(),
                                "an answer to another call".into(),
                            )),
                        };
                        answers[at] = Some(answer);
                        waiting.swap_remove(i);
                    }
                    Ok(None) => i += 1,
                    Err(e) => {
                        answers[at] =
                            Some(Err(CallError::Unreachable(service.clone(), e.to_string())));
                        waiting.swap_remove(i);
                    }
                }
            }
            if got || waiting.is_empty() {
                continue;
            }
            let signal = replies.prepare_sleep();
            if replies.pending(waiting.iter().map(|w| w.1)) {
                replies.awake();
                continue;
            }
            if replies.sleep(signal, LIVENESS_CHECK) {
                continue;
            }
            waiting.retain(|(_, peer, at, service)| {
                let alive = senders
                    .get(peer)
                    .and_then(Option::as_ref)
                    .is_some_and(mailbox::Sender::receiver_alive);
                if !alive {
                    answers[*at] = Some(Err(CallError::Unreachable(
                        service.clone(),
                        "the peer's process is gone".into(),
                    )));
                }
                alive
            });
        }
    }
}

/// A subtask of the attempt, as its peers reach it: its task's head
/// vertex, its index, its host, where the host sits on its node's
/// store, its number in the attempt and its mailboxes.
#[derive(Clone, Serialize, Deserialize)]
pub struct PeerHost {
    pub(super) task: String,
    pub(super) subtask: usize,
    pub(super) host: SubtaskHostHandle,
    pub(super) seat: braid::store::StoreSeat,
    /// Its position among the plan's subtasks.
    pub(super) index: usize,
    pub(super) mailboxes: HostMailboxes,
}

impl Peers for HostPeers {
    fn call_many(&self, calls: Vec<PeerCall>) -> Vec<Result<Vec<u8>, CallError>> {
        let mut answers: Vec<Option<Result<Vec<u8>, CallError>>> =
            (0..calls.len()).map(|_| None).collect();
        let mut by_call = Vec::new();
        let mut waiting = Vec::new();
        let mut rings = self.rings.lock();
        for (at, c) in calls.into_iter().enumerate() {
            let Some(peer) = self.hosts.get(&(c.task.clone(), c.subtask)) else {
                answers[at] = Some(Err(CallError::NoService(format!(
                    "{}[{}]: {}",
                    c.task, c.subtask, c.service
                ))));
                continue;
            };
            match self.send_ring(&mut rings, peer, &c) {
                Some(Ok(id)) => waiting.push((id, peer.index, at, c.service)),
                Some(Err(e)) => answers[at] = Some(Err(e)),
                None => by_call.push((at, peer.host.clone(), c)),
            }
        }
        let called: Vec<_> = by_call
            .into_iter()
            .map(|(at, host, c)| {
                let handle = self.rt.spawn(async move {
                    match host.call(c.service.clone(), c.request).await {
                        Ok(answer) => Ok(answer),
                        Err(e) => match e.downcast::<String>() {
                            Some(why) => Err(CallError::Failed(c.service, why)),
                            None => Err(CallError::Unreachable(c.service, e.to_string())),
                        },
                    }
                });
                (at, handle)
            })
            .collect();
        self.await_rings(&mut rings, waiting, &mut answers);
        drop(rings);
        for (at, handle) in called {
            answers[at] = Some(
                self.rt
                    .block_on(handle)
                    .unwrap_or_else(|e| Err(CallError::Unreachable(String::new(), e.to_string()))),
            );
        }
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| Err(CallError::Unreachable(String::new(), "no answer".into())))
            })
            .collect()
    }

    fn seat(&self, task: &str, subtask: usize) -> Option<braid::store::StoreSeat> {
        self.hosts.get(&(task.to_string(), subtask)).map(|p| p.seat)
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
        let call = PeerCall {
            task: task.to_string(),
            subtask,
            service: service.to_string(),
            request,
        };
        self.call_many(vec![call]).pop().unwrap_or_else(|| {
            Err(CallError::Unreachable(
                service.to_string(),
                "no answer".into(),
            ))
        })
    }
}
