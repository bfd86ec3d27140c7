//! A host's ends of its channels: [`ActorOutbox`] sends a subtask's
//! output, into the receiver's mailbox on this machine or by `deliver`
//! calls to another; [`HostInbox`] reads its inputs.

use super::call_server::CallServer;
use super::{Shared, SlotReceiver, SubtaskHostHandle};
use crate::stream::channel::{ArrowBatch, ChannelMsg, ColumnarRef, MailedBatch, Outbox};
use crate::stream::columnar::ColumnarError;
use crate::stream::edges::{ChannelMeter, Meters};
use crate::stream::failure::ChannelError;
use crate::stream::mailbox::{self, MailboxAddr};
use crate::stream::runner::Inbox;
use braid::store::batch::{BatchLayout, BatchWriter};
use braid::{ActorCall, Runtime};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Batches at least this large cross through the node's store: written
/// once, only the reference travels, and the receiver decodes the records
/// out of shared memory (pulled to its node first if it runs elsewhere).
pub const STORE_BATCH_BYTES: usize = 16 << 10;

/// A channel message on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Delivery {
    /// Carried in the call.
    Inline(ChannelMsg),
    /// An encoded batch in the store.
    Stored(braid::ObjectRef<braid::Array<u8>>),
}

pub(super) struct ViewBytes(pub(super) braid::ArrayView<u8>);

impl AsRef<[u8]> for ViewBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Where an output channel leads: the receiving subtask's host, its input
/// slot, and where the host's process sits on its node's store (a sender
/// on the same store lends it each batch as the batch is sealed).
#[derive(Clone, Serialize, Deserialize)]
pub struct ChannelTarget {
    pub(super) host: SubtaskHostHandle,
    pub(super) slot: usize,
    pub(super) seat: braid::store::StoreSeat,
    /// The receiver's mailbox, written directly when it shares this
    /// sender's store (so its machine).
    pub(super) mailbox: Option<MailboxAddr>,
}

pub(super) struct ActorOutbox {
    rt: Runtime,
    /// Where this process sits on its node's store.
    seat: braid::store::StoreSeat,
    targets: Vec<ChannelTarget>,
    next_seq: Vec<u64>,
    /// Per channel, the calls in flight, the store bytes each holds, and
    /// the batch it lends (kept until the receiver has read it).
    in_flight: Vec<VecDeque<InFlight>>,
    /// Batches built and not yet sent, by id.
    built: HashMap<braid::store::ObjectId, braid::ObjectRef<braid::Batch>>,
    /// Per channel, the store bytes of the calls in flight.
    stored_in_flight: Vec<usize>,
    /// Per channel, whether it writes the receiver's mailbox.
    rings: Vec<RingState>,
    /// Where a message is encoded before it goes into a ring.
    scratch: Vec<u8>,
    credits: usize,
    credit_bytes: usize,
    /// The plan channel of each output.
    ids: Vec<usize>,
    meters: Meters,
}

/// A `deliver` call in flight, the store bytes it holds and the batch it
/// lends.
type InFlight = (
    tokio::task::JoinHandle<braid::Result<bool>>,
    usize,
    Option<braid::ObjectRef<braid::Batch>>,
);

/// How an output channel reaches its receiver.
enum RingState {
    /// Not used yet: decided on the first message.
    Unopened,
    /// Through the receiver's mailbox.
    Ring(RingOut),
    /// By `deliver` calls (another machine's store, or no mailbox).
    Calls,
}

/// An output channel written into the receiver's mailbox.
struct RingOut {
    sender: mailbox::Sender,
    /// Messages sent so far.
    sent: u64,
    /// Messages not yet taken: their number, store bytes and the batch
    /// each lends (kept until the receiver has adopted it).
    queued: VecDeque<(u64, usize, Option<braid::ObjectRef<braid::Batch>>)>,
    /// Store bytes of the queued messages.
    stored: usize,
}

impl RingOut {
    /// Builds a batch of `layout` in the receiver's arena, if it has room:
    /// the message naming it, or why `fill` failed.
    fn build(
        &mut self,
        layout: &BatchLayout,
        fill: &mut dyn FnMut(&mut BatchWriter<'_>) -> Result<(), ColumnarError>,
    ) -> Option<Result<ChannelMsg, ChannelError>> {
        let len = layout.total_len();
        let (start, buf) = self.sender.arena_alloc(len)?;
        let built = BatchWriter::new(layout, buf)
            .map_err(|e| ChannelError::Encode(e.to_string()))
            .and_then(|mut writer| {
                fill(&mut writer).map_err(|e| ChannelError::Encode(e.to_string()))?;
                writer
                    .finish()
                    .map_err(|e| ChannelError::Encode(e.to_string()))
            });
        Some(match built {
            Ok(()) => Ok(ChannelMsg::Mailed(MailedBatch {
                start,
                len: len as u64,
            })),
            Err(e) => {
                self.sender.arena_abandon(start);
                Err(e)
            }
        })
    }

    /// Forgets the messages the receiver has taken.
    fn release(&mut self) {
        let taken = self.sender.taken();
        while self.queued.front().is_some_and(|(seq, _, _)| *seq < taken) {
            if let Some((_, stored, _)) = self.queued.pop_front() {
                self.stored -= stored;
            }
        }
    }

    /// Waits until the receiver took the oldest queued message.
    fn wait_oldest(&mut self, channel: usize) -> Result<(), ChannelError> {
        if let Some((seq, _, _)) = self.queued.front() {
            self.sender
                .wait_taken(seq + 1)
                .map_err(|_| ChannelError::Closed(channel))?;
        }
        self.release();
        Ok(())
    }
}

impl ActorOutbox {
    /// An outbox on `targets`, with `credit` (messages, store bytes) per
    /// channel; `ids` are the channels' plan numbers, for their meters.
    pub(super) fn new(
        rt: Runtime,
        targets: Vec<ChannelTarget>,
        credit: (usize, usize),
        ids: Vec<usize>,
        meters: Meters,
    ) -> Self {
        let n = targets.len();
        ActorOutbox {
            seat: rt.store_seat(),
            rt,
            targets,
            next_seq: vec![0; n],
            in_flight: (0..n).map(|_| VecDeque::new()).collect(),
            rings: (0..n).map(|_| RingState::Unopened).collect(),
            scratch: Vec::new(),
            stored_in_flight: vec![0; n],
            built: HashMap::new(),
            credits: credit.0,
            credit_bytes: credit.1,
            ids,
            meters,
        }
    }

    /// The channel's ring, opened on first use when the receiver shares
    /// this process's store and has a mailbox.
    fn ring(&mut self, channel: usize) -> Option<&mut RingOut> {
        if matches!(self.rings.get(channel), Some(RingState::Unopened)) {
            let opened = self
                .targets
                .get(channel)
                .filter(|t| t.seat.same_store(&self.seat))
                .and_then(|t| {
                    let addr = t.mailbox?;
                    mailbox::Sender::open(addr, t.slot)
                        .map_err(|e| tracing::warn!("channel {channel} falls back to calls: {e}"))
                        .ok()
                });
            self.rings[channel] = match opened {
                Some(sender) => RingState::Ring(RingOut {
                    sender,
                    sent: 0,
                    queued: VecDeque::new(),
                    stored: 0,
                }),
                None => RingState::Calls,
            };
        }
        match self.rings.get_mut(channel) {
            Some(RingState::Ring(r)) => Some(r),
            _ => None,
        }
    }

    /// Sends a message through the channel's ring.
    fn send_ring(&mut self, channel: usize, msg: ChannelMsg) -> Result<(), ChannelError> {
        let (lent, stored) = match &msg {
            ChannelMsg::Columnar(r) => (self.built.remove(&r.object.id()), r.bytes),
            ChannelMsg::Mailed(m) => (None, m.len as usize),
            ChannelMsg::Batch(bytes) if bytes.len() >= STORE_BATCH_BYTES => {
                if let Some(meter) = self.meter(channel) {
                    meter.copied(bytes.len());
                }
                (None, 0)
            }
            _ => (None, 0),
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let encoded = braid::store::codec::encode_append(&msg, &mut scratch)
            .map_err(|e| ChannelError::Encode(e.to_string()));
        let (credits, credit_bytes) = (self.credits, self.credit_bytes);
        let sent = encoded.and_then(|_| {
            let Some(ring) = self.ring(channel) else {
                return Err(ChannelError::Closed(channel));
            };
            ring.sender
                .send(&scratch)
                .map_err(|_| ChannelError::Closed(channel))?;
            ring.queued.push_back((ring.sent, stored, lent));
            ring.sent += 1;
            ring.stored += stored;
            ring.release();
            while ring.queued.len() > credits
                || (ring.queued.len() > 1 && ring.stored > credit_bytes)
            {
                ring.wait_oldest(channel)?;
            }
            Ok(())
        });
        self.scratch = scratch;
        sent
    }

    fn wait_oldest(&mut self, channel: usize) -> Result<(), ChannelError> {
        let Some((oldest, stored, _lent)) = self.in_flight[channel].pop_front() else {
            return Ok(());
        };
        self.stored_in_flight[channel] -= stored;
        match self.rt.block_on(oldest) {
            Ok(Ok(true)) => Ok(()),
            _ => Err(ChannelError::Closed(channel)),
        }
    }

    /// Whether channel `channel` has used up its credit: too many calls,
    /// or too many store bytes, in flight (one call always may be).
    fn over_credit(&self, channel: usize) -> bool {
        let calls = self.in_flight[channel].len();
        calls > self.credits || (calls > 1 && self.stored_in_flight[channel] > self.credit_bytes)
    }
}

impl Outbox for ActorOutbox {
    fn send(&mut self, channel: usize, msg: ChannelMsg) -> Result<(), ChannelError> {
        if self.ring(channel).is_some() {
            return self.send_ring(channel, msg);
        }
        let Some(ChannelTarget {
            host: target, slot, ..
        }) = self.targets.get(channel).cloned()
        else {
            return Err(ChannelError::Closed(channel));
        };
        let seq = self.next_seq[channel];
        self.next_seq[channel] += 1;
        let mut lent = None;
        let (delivery, stored) = match msg {
            ChannelMsg::Batch(bytes) if bytes.len() >= STORE_BATCH_BYTES => {
                match self.rt.put_array(&bytes) {
                    Ok(object) => {
                        if let Some(meter) = self.meter(channel) {
                            meter.copied(bytes.len());
                        }
                        (Delivery::Stored(object), bytes.len())
                    }
                    Err(_) => (Delivery::Inline(ChannelMsg::Batch(bytes)), 0),
                }
            }
            ChannelMsg::Columnar(r) => {
                lent = self.built.remove(&r.object.id());
                let stored = r.bytes;
                (Delivery::Inline(ChannelMsg::Columnar(r)), stored)
            }
            msg => (Delivery::Inline(msg), 0),
        };
        let call: ActorCall<bool> = target.deliver(slot, seq, delivery);
        let handle = self.rt.spawn(call);
        self.in_flight[channel].push_back((handle, stored, lent));
        self.stored_in_flight[channel] += stored;
        while self.over_credit(channel) {
            self.wait_oldest(channel)?;
        }
        Ok(())
    }

    fn channels(&self) -> usize {
        self.targets.len()
    }

    fn meter(&self, channel: usize) -> Option<&ChannelMeter> {
        self.meters.get(*self.ids.get(channel)?)
    }

    fn put_batch(
        &mut self,
        channel: usize,
        layout: &BatchLayout,
        fill: &mut dyn FnMut(&mut BatchWriter<'_>) -> Result<(), ColumnarError>,
    ) -> Option<Result<ChannelMsg, ChannelError>> {
        if let Some(ring) = self.ring(channel) {
            if let Some(mailed) = ring.build(layout, fill) {
                return Some(mailed);
            }
        }
        let mut failed = None;
        let mut fill = |writer: &mut BatchWriter<'_>| {
            fill(writer).map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                braid::Error::Codec(message)
            })
        };
        let reader = self
            .targets
            .get(channel)
            .map(|t| t.seat)
            .filter(|seat| seat.same_store(&self.seat));
        let put = match reader {
            Some(seat) => self.rt.put_batch_lent(layout, &seat, fill),
            None => self.rt.put_batch_with(layout, &mut fill).map(|object| {
                let lent = object.lend();
                (object, lent)
            }),
        };
        Some(match (put, failed) {
            (Ok((object, lent)), _) => {
                self.built.insert(object.id(), object);
                Ok(ChannelMsg::Columnar(ColumnarRef {
                    object: lent,
                    bytes: layout.total_len(),
                }))
            }
            (Err(_), Some(e)) => Err(ChannelError::Encode(e.to_string())),
            (Err(e), None) => Err(ChannelError::Store(e.to_string())),
        })
    }
}

impl Drop for ActorOutbox {
    fn drop(&mut self) {
        for (channel, ring) in self.rings.iter_mut().enumerate() {
            if let RingState::Ring(ring) = ring {
                while !ring.queued.is_empty() {
                    if ring.wait_oldest(channel).is_err() {
                        break;
                    }
                }
            }
        }
        for channel in 0..self.in_flight.len() {
            while !self.in_flight[channel].is_empty() {
                if self.wait_oldest(channel).is_err() {
                    break;
                }
            }
        }
    }
}

/// A subtask's inputs: its mailbox, for senders on this machine, and the
/// queues `deliver` calls fill, for the others.
pub(super) struct HostInbox {
    shared: Arc<Shared>,
    receivers: Vec<SlotReceiver>,
    mailbox: Option<mailbox::Receiver>,
    /// Answers peers' calls from the mailbox's call slots between inputs.
    server: Option<CallServer>,
    rt: Runtime,
    /// The slot the next look starts at, so every input gets its turn.
    next: usize,
}

impl Drop for HostInbox {
    /// Peers may still call after the subtask's inputs ended: a thread of
    /// the host's own answers them from now on.
    fn drop(&mut self) {
        if let (Some(mailbox), Some(server)) = (self.mailbox.take(), self.server.take()) {
            if let Err(e) = server.spawn(mailbox, Arc::downgrade(&self.shared)) {
                tracing::warn!("no call server after the subtask ended: {e}");
            }
        }
    }
}

impl HostInbox {
    pub(super) fn new(
        shared: Arc<Shared>,
        receivers: Vec<SlotReceiver>,
        mailbox: Option<mailbox::Receiver>,
        server: Option<CallServer>,
        rt: Runtime,
    ) -> Self {
        HostInbox {
            shared,
            receivers,
            mailbox,
            server,
            rt,
            next: 0,
        }
    }

    /// A message waiting on an unblocked input, if any.
    fn poll(&mut self, blocked: &[bool]) -> Result<Option<(usize, ChannelMsg)>, ChannelError> {
        if let (Some(server), Some(mailbox)) = (self.server.as_mut(), self.mailbox.as_mut()) {
            server.serve(mailbox);
        }
        let n = self.receivers.len();
        for i in 0..n {
            let slot = (self.next + i) % n;
            if blocked.get(slot).copied().unwrap_or(false) {
                continue;
            }
            if let Some(mailbox) = self.mailbox.as_mut() {
                mailbox.reclaim(slot);
                let frame = mailbox
                    .try_frame(slot)
                    .map_err(|e| ChannelError::Decode(e.to_string()))?;
                if let Some(frame) = frame {
                    let msg = braid::store::codec::decode::<ChannelMsg>(&frame)
                        .map_err(|e| ChannelError::Decode(e.to_string()))?;
                    let msg = match msg {
                        ChannelMsg::Mailed(m) => {
                            let buffer = mailbox
                                .arena_batch(slot, m.start, m.len)
                                .map_err(|e| ChannelError::Decode(e.to_string()))?;
                            let batch = braid::store::batch::read_record_batch(buffer)
                                .map_err(|e| ChannelError::Decode(e.to_string()))?;
                            ChannelMsg::Arrow(ArrowBatch(batch))
                        }
                        msg => self.adopt(msg)?,
                    };
                    if let Some(mailbox) = &self.mailbox {
                        mailbox.mark_taken(slot);
                    }
                    self.next = slot + 1;
                    return Ok(Some((slot, msg)));
                }
            }
            if let Ok((seq, msg)) = self.receivers[slot].try_recv() {
                if let Some(s) = self.shared.slots.lock().get(slot) {
                    s.consumed.send_replace(seq + 1);
                }
                self.next = slot + 1;
                return Ok(Some((slot, msg)));
            }
        }
        Ok(None)
    }

    /// A columnar batch read in place: adopted when it was lent to this
    /// process, fetched otherwise.
    fn adopt(&self, msg: ChannelMsg) -> Result<ChannelMsg, ChannelError> {
        let ChannelMsg::Columnar(stored) = msg else {
            return Ok(msg);
        };
        let batch = match self.rt.adopt_batch(&stored.object) {
            Some(adopted) => adopted,
            None => {
                let rt = self.rt.clone();
                self.rt
                    .block_on(async move { rt.get_batch_lent(&stored.object).await })
            }
        };
        batch
            .map(|b| ChannelMsg::Arrow(ArrowBatch(b)))
            .map_err(|e| ChannelError::Store(format!("a columnar batch cannot be read: {e}")))
    }

    /// Whether a message may be waiting on an unblocked input.
    fn ready(&self, blocked: &[bool]) -> bool {
        let open =
            || (0..self.receivers.len()).filter(|s| !blocked.get(*s).copied().unwrap_or(false));
        let calls = |m: &mailbox::Receiver| {
            self.server
                .as_ref()
                .is_some_and(|server| m.pending(server.slots(m)))
        };
        self.mailbox
            .as_ref()
            .is_some_and(|m| m.pending(open()) || calls(m))
            || open().any(|s| !self.receivers[s].is_empty())
    }
}

impl Inbox for HostInbox {
    fn recv(
        &mut self,
        blocked: &[bool],
        timeout: Duration,
    ) -> Result<Option<(usize, ChannelMsg)>, ChannelError> {
        if self.mailbox.is_none() {
            let Some((channel, (seq, msg))) =
                crate::stream::local::recv_unblocked(&self.receivers, blocked, timeout)?
            else {
                return Ok(None);
            };
            if let Some(slot) = self.shared.slots.lock().get(channel) {
                slot.consumed.send_replace(seq + 1);
            }
            return Ok(Some((channel, msg)));
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(got) = self.poll(blocked)? {
                return Ok(Some(got));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let Some(mailbox) = self.mailbox.as_ref() else {
                return Ok(None);
            };
            let signal = mailbox.prepare_sleep();
            if self.ready(blocked) {
                mailbox.awake();
                continue;
            }
            let _ = mailbox.sleep(signal, deadline - now);
        }
    }

    fn meter(&self, channel: usize) -> Option<&ChannelMeter> {
        self.shared.meters.get(*self.shared.inputs.get(channel)?)
    }
}
