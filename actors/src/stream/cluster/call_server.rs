//! A host's call server: answers the calls its peers on this machine
//! write into its call mailbox (see [`super::peers`]).
//!
//! One thread reads every slot. A call to a service that cannot wait
//! (`Service::may_block` false: an ASP pull) is answered on that thread;
//! one that may wait (a BSP pull waits for the round's pushes) goes to a
//! thread of the caller's own, so it holds up no other caller. Answers
//! are written into the caller's reply mailbox, in its slot for this host.
//! The thread ends when its host is dropped.

use super::peers::{frame, unframe, PeerHost, RingAnswer, RingCall, SERVICE_WAIT};
use super::Shared;
use crate::stream::mailbox;
use crate::stream::service;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long the server sleeps before it checks that its host still exists.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Where a caller's answers go: its reply mailbox's slot for this host
/// (shared by the server thread and the caller's blocking thread).
type ReplyTo = Arc<Mutex<mailbox::Sender>>;

struct Server {
    calls: mailbox::Receiver,
    me: usize,
    /// Peers by their number in the attempt.
    peers: HashMap<usize, PeerHost>,
    replies: HashMap<usize, Option<ReplyTo>>,
    blocking: HashMap<usize, crossbeam_channel::Sender<(u64, RingCall)>>,
}

/// Starts the call server of the host `shared` (subtask number `me`),
/// reading `calls`, answering `peers`.
pub(super) fn spawn(
    shared: Weak<Shared>,
    calls: mailbox::Receiver,
    me: usize,
    peers: Vec<PeerHost>,
) -> std::io::Result<()> {
    let mut server = Server {
        calls,
        me,
        peers: peers.into_iter().map(|p| (p.index, p)).collect(),
        replies: HashMap::new(),
        blocking: HashMap::new(),
    };
    std::thread::Builder::new()
        .name(format!("braid-calls-{me}"))
        .spawn(move || server.run(shared))
        .map(|_| ())
}

impl Server {
    fn run(&mut self, shared: Weak<Shared>) {
        let slots = self.calls.slots();
        loop {
            let mut got = false;
            for slot in 0..slots {
                match self.calls.try_frame(slot) {
                    Ok(Some(f)) => {
                        got = true;
                        self.handle(slot, &f);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("calls from subtask {slot} are corrupt: {e}");
                    }
                }
            }
            if got {
                continue;
            }
            let signal = self.calls.prepare_sleep();
            if self.calls.pending(0..slots) {
                self.calls.awake();
                continue;
            }
            if !self.calls.sleep(signal, IDLE_CHECK) && shared.strong_count() == 0 {
                return;
            }
        }
    }

    /// Where caller `slot`'s answers go, if it can be reached.
    fn reply_to(&mut self, slot: usize) -> Option<ReplyTo> {
        let me = self.me;
        let peers = &self.peers;
        self.replies
            .entry(slot)
            .or_insert_with(|| {
                let addr = peers.get(&slot)?.mailboxes.replies?;
                mailbox::Sender::open(addr, me)
                    .map_err(|e| tracing::warn!("cannot answer subtask {slot}: {e}"))
                    .ok()
                    .map(|s| Arc::new(Mutex::new(s)))
            })
            .clone()
    }

    fn handle(&mut self, slot: usize, f: &[u8]) {
        let Some(reply_to) = self.reply_to(slot) else {
            return;
        };
        let Some((id, body)) = unframe(f) else {
            tracing::warn!("a call from subtask {slot} without a number");
            return;
        };
        let call: RingCall = match braid::store::codec::decode(body) {
            Ok(c) => c,
            Err(e) => {
                answer(
                    &reply_to,
                    id,
                    Err(format!("a call that does not decode: {e}")),
                );
                return;
            }
        };
        if let Some(offered) = service::find(&call.service).filter(|s| !s.may_block()) {
            let answered = offered
                .call(&call.request)
                .map_err(|e| service::CallError::Failed(call.service, e).to_string());
            answer(&reply_to, id, answered);
            return;
        }
        let queue = self.blocking.entry(slot).or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<(u64, RingCall)>();
            let reply_to = reply_to.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("braid-call-{slot}"))
                .spawn(move || {
                    for (id, call) in rx {
                        let answered =
                            service::call_local(&call.service, &call.request, SERVICE_WAIT)
                                .map_err(|e| e.to_string());
                        answer(&reply_to, id, answered);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("no thread for subtask {slot}'s calls: {e}");
            }
            tx
        });
        if let Err(crossbeam_channel::SendError((id, _))) = queue.send((id, call)) {
            answer(
                &reply_to,
                id,
                Err("the call server has no thread for it".into()),
            );
        }
    }
}

/// Writes the answer to call `id`.
fn answer(reply_to: &ReplyTo, id: u64, answered: Result<Vec<u8>, String>) {
    let answered: RingAnswer = answered.map(serde_bytes::ByteBuf::from);
    let sent =
        frame(id, &answered).and_then(|f| reply_to.lock().send(&f).map_err(|e| e.to_string()));
    if let Err(e) = sent {
        tracing::warn!("an answer was lost: {e}");
    }
}
