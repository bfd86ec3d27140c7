//! A host's call server: answers the calls its peers on this machine
//! write into the call slots of its mailbox (see [`super::peers`]).
//!
//! A host whose subtask has inputs serves calls on the subtask's own
//! thread, between its input messages ([`super::channels::HostInbox`]):
//! one doorbell wakes it for either, and a pull then reads the shard's
//! table on the core that applies its pushes. A host without inputs (a
//! source), and any host once its subtask's thread has ended, serves them
//! on a thread of its own.
//!
//! A call to a service that cannot wait (`Service::may_block` false: an
//! ASP pull) is answered on the spot; one that may wait (a BSP pull waits
//! for the round's pushes, which the same thread may have to apply) goes
//! to a thread of the caller's own, so it holds up nothing else. Answers
//! are written into the caller's reply mailbox, in its slot for this host.

use super::peers::{frame, unframe, PeerHost, RingAnswer, RingCall, SERVICE_WAIT};
use super::Shared;
use crate::stream::mailbox;
use crate::stream::service;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long a server thread sleeps before it checks that its host still
/// exists.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Where a caller's answers go: its reply mailbox's slot for this host
/// (shared by the server and the caller's blocking thread).
type ReplyTo = Arc<Mutex<mailbox::Sender>>;

/// Answers the calls in a mailbox's call slots.
pub(super) struct CallServer {
    /// The mailbox's first call slot: caller `i` writes slot `base + i`.
    base: usize,
    me: usize,
    /// Peers by their number in the attempt.
    peers: HashMap<usize, PeerHost>,
    replies: HashMap<usize, Option<ReplyTo>>,
    blocking: HashMap<usize, crossbeam_channel::Sender<(u64, RingCall)>>,
}

impl CallServer {
    /// A server for subtask number `me`, whose mailbox's call slots start
    /// at `base`, answering `peers`.
    pub(super) fn new(base: usize, me: usize, peers: Vec<PeerHost>) -> Self {
        CallServer {
            base,
            me,
            peers: peers.into_iter().map(|p| (p.index, p)).collect(),
            replies: HashMap::new(),
            blocking: HashMap::new(),
        }
    }

    /// The call slots.
    pub(super) fn slots(&self, mailbox: &mailbox::Receiver) -> std::ops::Range<usize> {
        self.base..mailbox.slots()
    }

    /// Answers (or hands on) every call waiting in `mailbox`; whether
    /// there was any.
    pub(super) fn serve(&mut self, mailbox: &mut mailbox::Receiver) -> bool {
        let mut got = false;
        for slot in self.slots(mailbox) {
            loop {
                match mailbox.try_frame(slot) {
                    Ok(Some(f)) => {
                        got = true;
                        self.handle(slot - self.base, &f);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("calls from subtask {} are corrupt: {e}", slot - self.base);
                        break;
                    }
                }
            }
        }
        got
    }

    /// Serves `mailbox`'s calls on a thread of its own until the host
    /// `shared` is dropped.
    pub(super) fn spawn(
        mut self,
        mut mailbox: mailbox::Receiver,
        shared: Weak<Shared>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(format!("braid-calls-{}", self.me))
            .spawn(move || loop {
                if self.serve(&mut mailbox) {
                    continue;
                }
                let signal = mailbox.prepare_sleep();
                if mailbox.pending(self.slots(&mailbox)) {
                    mailbox.awake();
                    continue;
                }
                if !mailbox.sleep(signal, IDLE_CHECK) && shared.strong_count() == 0 {
                    return;
                }
            })
            .map(|_| ())
    }

    /// Where caller `caller`'s answers go, if it can be reached.
    fn reply_to(&mut self, caller: usize) -> Option<ReplyTo> {
        let me = self.me;
        let peers = &self.peers;
        self.replies
            .entry(caller)
            .or_insert_with(|| {
                let addr = peers.get(&caller)?.mailboxes.replies?;
                mailbox::Sender::open(addr, me)
                    .map_err(|e| tracing::warn!("cannot answer subtask {caller}: {e}"))
                    .ok()
                    .map(|s| Arc::new(Mutex::new(s)))
            })
            .clone()
    }

    fn handle(&mut self, caller: usize, f: &[u8]) {
        let Some(reply_to) = self.reply_to(caller) else {
            return;
        };
        let Some((id, body)) = unframe(f) else {
            tracing::warn!("a call from subtask {caller} without a number");
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
        let queue = self.blocking.entry(caller).or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<(u64, RingCall)>();
            let reply_to = reply_to.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("braid-call-{caller}"))
                .spawn(move || {
                    for (id, call) in rx {
                        let answered =
                            service::call_local(&call.service, &call.request, SERVICE_WAIT)
                                .map_err(|e| e.to_string());
                        answer(&reply_to, id, answered);
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("no thread for subtask {caller}'s calls: {e}");
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
